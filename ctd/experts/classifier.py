"""A transformers sequence classifier as the expert, and a builder for one.

Scoring works with any ``AutoModelForSequenceClassification`` folder: P(unsafe) is the softmax
probability of the label named ``unsafe_label`` in the model's ``id2label`` (or index 1 of a
two-label model whose labels carry no names).

:func:`build_classifier` makes such a folder from a BERT-style encoder: the encoder stays frozen
and its classification head (pooler dense + tanh, then a linear layer on the [CLS] state) is trained
on labelled rows; the result is saved with ``save_pretrained`` and loads like any other
classifier. :func:`cross_fit_scores` gives out-of-fold scores of the same head on its training rows,
which is what the DV probe must be trained on (an expert that saw a row's label would look
better there than it is).
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from ..activations import TextEncoder, plan_batches

__all__ = ["SequenceClassifierExpert", "cls_features", "train_head", "cross_fit_scores", "build_classifier", "UNSAFE_LABELS"]

UNSAFE_LABELS = ("unsafe", "high-stakes", "high_stakes", "harmful", "injection", "jailbreak", "positive", "label_1")


def _unsafe_index(config, unsafe_label: str | None) -> int:
    id2label = {int(k): str(v).lower() for k, v in (getattr(config, "id2label", None) or {}).items()}
    if unsafe_label is not None:
        for i, name in id2label.items():
            if name == unsafe_label.lower():
                return i
        raise ValueError(f"classifier has no label {unsafe_label!r}; its labels are {sorted(id2label.values())}")
    for cand in UNSAFE_LABELS:
        for i, name in id2label.items():
            if name == cand:
                return i
    if len(id2label) == 2:
        return 1
    raise ValueError(f"cannot tell which label means unsafe among {sorted(id2label.values())}; set unsafe_label")


def _run_encoder(model, ids: Sequence[np.ndarray], token_budget: int, fn):
    """Run ``fn(model, input_ids, attention_mask)`` over token-budget batches; rows back in order."""
    import torch

    lengths = np.array([len(x) for x in ids], dtype=np.int64)
    device = next(model.parameters()).device
    outs: list = [None] * len(ids)
    with torch.inference_mode():
        for idx in plan_batches(lengths, token_budget):
            t = int(lengths[idx[0]])
            buf = np.zeros((idx.size, t), dtype=np.int64)
            for r, i in enumerate(idx):
                buf[r, : lengths[i]] = ids[i]
            mask = torch.from_numpy((np.arange(t)[None, :] < lengths[idx][:, None]).astype(np.int64)).to(device)
            res = fn(model, torch.from_numpy(buf).to(device), mask).float().cpu().numpy()
            for r, i in enumerate(idx):
                outs[i] = res[r]
    return np.stack(outs) if outs else np.zeros((0,))


class SequenceClassifierExpert:
    """P(unsafe) from a sequence classifier; the model is loaded once (e.g. once per Ray actor)."""

    def __init__(self, model_dir: str, *, unsafe_label: str | None = None, max_length: int | None = None,
                 token_budget: int = 8192, device: str = "auto"):
        import torch
        from transformers import AutoModelForSequenceClassification

        dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        self.model = AutoModelForSequenceClassification.from_pretrained(model_dir).to(dev).eval()
        self.encoder = TextEncoder(model_dir, max_length=max_length)
        self.unsafe_index = _unsafe_index(self.model.config, unsafe_label)
        self.token_budget = token_budget

    def score_ids(self, ids: Sequence[np.ndarray]) -> np.ndarray:
        import torch

        def fn(model, input_ids, mask):
            return torch.softmax(model(input_ids=input_ids, attention_mask=mask).logits.float(), dim=-1)[:, self.unsafe_index]

        if len(ids) == 0:
            return np.zeros(0)
        return _run_encoder(self.model, ids, self.token_budget, fn).astype(np.float64)

    def score(self, inputs: Sequence) -> np.ndarray:
        ids, _ = self.encoder.encode(inputs)
        return self.score_ids(ids)


# ----------------------------------------------------------------------------------------------
# building one
# ----------------------------------------------------------------------------------------------
def cls_features(model_dir: str, ids: Sequence[np.ndarray], token_budget: int = 8192) -> np.ndarray:
    """Final-layer [CLS] states of a frozen encoder (the input of a BERT classification head)."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(model_dir, attn_implementation="sdpa").eval()
    if hasattr(model, "pooler"):
        model.pooler = None

    def fn(m, input_ids, mask):
        return m(input_ids=input_ids, attention_mask=mask).last_hidden_state[:, 0]

    return _run_encoder(model, ids, token_budget, fn)


def train_head(features, labels, *, steps: int = 300, lr: float = 3e-3, weight_decay: float = 1e-2, seed: int = 0, init=None):
    """Train a BERT classification head (dense + tanh, then linear to 2 logits) on frozen [CLS]
    features with full-batch AdamW for a fixed number of steps (no label-dependent early stopping).
    Returns a dict of float32 tensors: pooler.dense.{weight,bias}, classifier.{weight,bias}."""
    import torch

    torch.manual_seed(seed)
    x = torch.as_tensor(np.asarray(features), dtype=torch.float32)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    h = x.shape[1]
    dense = torch.nn.Linear(h, h)
    out = torch.nn.Linear(h, 2)
    if init is not None:
        with torch.no_grad():
            dense.weight.copy_(init["weight"])
            dense.bias.copy_(init["bias"])
    opt = torch.optim.AdamW([*dense.parameters(), *out.parameters()], lr=lr, weight_decay=weight_decay)
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(out(torch.tanh(dense(x))), y)
        loss.backward()
        opt.step()
    return {"pooler.dense.weight": dense.weight.detach(), "pooler.dense.bias": dense.bias.detach(),
            "classifier.weight": out.weight.detach(), "classifier.bias": out.bias.detach()}


def head_scores(head, features) -> np.ndarray:
    import torch

    x = torch.as_tensor(np.asarray(features), dtype=torch.float32)
    with torch.no_grad():
        z = torch.tanh(x @ head["pooler.dense.weight"].T + head["pooler.dense.bias"])
        logits = z @ head["classifier.weight"].T + head["classifier.bias"]
        return torch.softmax(logits, dim=-1)[:, 1].numpy().astype(np.float64)


def _pooler_init(model_dir: str):
    from transformers import AutoModel

    m = AutoModel.from_pretrained(model_dir)
    pooler = getattr(m, "pooler", None)
    if pooler is None or not hasattr(pooler, "dense"):
        return None
    return {"weight": pooler.dense.weight.detach().clone(), "bias": pooler.dense.bias.detach().clone()}


def cross_fit_scores(features, labels, *, folds: int = 5, seed: int = 0, init=None, **kw) -> np.ndarray:
    """Out-of-fold P(unsafe) of :func:`train_head` (stratified folds): each row is scored by a head
    that never saw its label."""
    from sklearn.model_selection import StratifiedKFold

    features, labels = np.asarray(features), np.asarray(labels)
    out = np.empty(len(labels))
    for tr, te in StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(features, labels):
        out[te] = head_scores(train_head(features[tr], labels[tr], seed=seed, init=init, **kw), features[te])
    return out


def build_classifier(base_dir: str, features, labels, out_dir: str, *, labels_names=("safe", "unsafe"), seed: int = 0, **kw) -> str:
    """Train a head on frozen [CLS] ``features`` of ``base_dir`` and save a complete
    ``AutoModelForSequenceClassification`` folder (safetensors) at ``out_dir``."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    head = train_head(features, labels, seed=seed, init=_pooler_init(base_dir), **kw)
    model = AutoModelForSequenceClassification.from_pretrained(
        base_dir, num_labels=2, id2label=dict(enumerate(labels_names)), label2id={n: i for i, n in enumerate(labels_names)}
    )
    state = model.state_dict()
    prefix = model.base_model_prefix + "."
    with torch.no_grad():
        for k, v in head.items():
            key = prefix + k if k.startswith("pooler") else k
            if key not in state:
                raise ValueError(f"{type(model).__name__} has no parameter {key}: only BERT-style heads can be built")
            state[key].copy_(v)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(out_dir)
    return out_dir
