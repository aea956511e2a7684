"""Building a classifier expert for an experiment or the demo: a BERT-style encoder, frozen, with its
classification head (pooler dense + tanh, then a linear layer on the [CLS] state) trained on
labelled rows and saved with ``save_pretrained``, so it loads like any other classifier
(:class:`ctd.experts.classifier.SequenceClassifierExpert`). :func:`cross_fit_scores` gives
out-of-fold scores of the same head on its training rows, which is what a DV probe must be trained
on (an expert that saw a row's label would look better there than it is).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import ArrayLike

from ..model.activations import run_encoder

if TYPE_CHECKING:
    import torch

__all__ = ["cls_features", "train_head", "head_scores", "pooler_init", "cross_fit_scores", "build_classifier"]


def cls_features(model_dir: str, ids: Sequence[np.ndarray], token_budget: int = 2048) -> np.ndarray:
    """Final-layer [CLS] states of a frozen encoder (the input of a BERT classification head), on CPU
    (``token_budget``: rows x padded length per forward pass; small batches stay in cache there)."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(model_dir, attn_implementation="sdpa").eval()
    if hasattr(model, "pooler"):
        model.pooler = None

    def fn(m, input_ids, mask):
        return m(input_ids=input_ids, attention_mask=mask).last_hidden_state[:, 0]

    return run_encoder(model, ids, token_budget, fn)


def train_head(
    features: ArrayLike,
    labels: ArrayLike,
    *,
    steps: int = 300,
    lr: float = 3e-3,
    weight_decay: float = 1e-2,
    seed: int = 0,
    init: dict[str, torch.Tensor] | None = None,
    label_smoothing: float = 0.0,
) -> dict[str, torch.Tensor]:
    """Train a BERT classification head (dense + tanh, then linear to 2 logits) on frozen [CLS]
    features with full-batch AdamW for a fixed number of steps (no label-dependent early stopping);
    ``label_smoothing`` > 0 keeps its probabilities off 0 and 1 (a judge that says how sure it is).
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
        loss = torch.nn.functional.cross_entropy(out(torch.tanh(dense(x))), y, label_smoothing=label_smoothing)
        loss.backward()
        opt.step()
    return {
        "pooler.dense.weight": dense.weight.detach(),
        "pooler.dense.bias": dense.bias.detach(),
        "classifier.weight": out.weight.detach(),
        "classifier.bias": out.bias.detach(),
    }


def head_scores(head: dict[str, torch.Tensor], features: ArrayLike) -> np.ndarray:
    import torch

    x = torch.as_tensor(np.asarray(features), dtype=torch.float32)
    with torch.no_grad():
        z = torch.tanh(x @ head["pooler.dense.weight"].T + head["pooler.dense.bias"])
        logits = z @ head["classifier.weight"].T + head["classifier.bias"]
        return torch.softmax(logits, dim=-1)[:, 1].numpy().astype(np.float64)


def pooler_init(model_dir: str) -> dict[str, torch.Tensor] | None:
    from transformers import AutoModel

    m = AutoModel.from_pretrained(model_dir)
    pooler = getattr(m, "pooler", None)
    if pooler is None or not hasattr(pooler, "dense"):
        return None
    return {"weight": pooler.dense.weight.detach().clone(), "bias": pooler.dense.bias.detach().clone()}


def cross_fit_scores(
    features: ArrayLike,
    labels: ArrayLike,
    *,
    folds: int = 5,
    seed: int = 0,
    init: dict[str, torch.Tensor] | None = None,
    **kw: Any,
) -> np.ndarray:
    """Out-of-fold P(unsafe) of :func:`train_head` (stratified folds): each row is scored by a head
    that never saw its label."""
    from sklearn.model_selection import StratifiedKFold

    features, labels = np.asarray(features), np.asarray(labels)
    out = np.empty(len(labels))
    for tr, te in StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(features, labels):
        out[te] = head_scores(train_head(features[tr], labels[tr], seed=seed, init=init, **kw), features[te])
    return out


def build_classifier(
    base_dir: str,
    features: ArrayLike,
    labels: ArrayLike,
    out_dir: str,
    *,
    labels_names: Sequence[str] = ("safe", "unsafe"),
    seed: int = 0,
    **kw: Any,
) -> str:
    """Train a head on frozen [CLS] ``features`` of ``base_dir`` and save a complete
    ``AutoModelForSequenceClassification`` folder (safetensors) at ``out_dir``."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    head = train_head(features, labels, seed=seed, init=pooler_init(base_dir), **kw)
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
