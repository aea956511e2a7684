"""The expert as a transformers sequence classifier, on its own Ray actor pool.

Scoring works with any ``AutoModelForSequenceClassification`` folder: P(unsafe) is the softmax
probability of the label named ``unsafe_label`` in the model's ``id2label`` (or index 1 of a
two-label model whose labels carry no names). Building one for an experiment or the demo is
:mod:`ctd.evaluation.classifier_head`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from ..config import ClassifierExpertConfig, resolve_model_path
from ..model.activations import TextEncoder, run_encoder, transformers_models
from ..pipeline.corpus import row_input
from ..pipeline.raydata import accelerated, in_actor
from .base import PoolPlan
from .prompt import STATUS_OK, error_status

if TYPE_CHECKING:
    import ray.data

__all__ = ["ClassifierExpert", "ClassifierStage", "SequenceClassifierExpert", "UNSAFE_LABELS"]

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


class SequenceClassifierExpert:
    """P(unsafe) from a sequence classifier; the model is loaded once (e.g. once per Ray actor)."""

    def __init__(
        self,
        model_dir: str,
        *,
        unsafe_label: str | None = None,
        max_length: int | None = None,
        token_budget: int | None = None,
        device: str = "auto",
    ):
        import torch

        dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        auto = transformers_models().AutoModelForSequenceClassification
        self.model = auto.from_pretrained(model_dir).to(dev).eval()
        self.encoder = TextEncoder(model_dir, max_length=max_length)
        self.unsafe_index = _unsafe_index(self.model.config, unsafe_label)
        # rows x padded length per forward pass: on CPU small batches stay in cache (350 demo rows, 1 thread:
        # 7.6 s at 2048 vs 10.8 s at 8192), as in ActivationExtractor
        self.token_budget = token_budget or (8192 if dev.startswith("cuda") else 2048)

    def score_ids(self, ids: Sequence[np.ndarray]) -> np.ndarray:
        import torch

        def fn(model, input_ids, mask):
            return torch.softmax(model(input_ids=input_ids, attention_mask=mask).logits.float(), dim=-1)[:, self.unsafe_index]

        if len(ids) == 0:
            return np.zeros(0)
        return run_encoder(self.model, ids, self.token_budget, fn).astype(np.float64)

    def score(self, inputs: Sequence) -> np.ndarray:
        ids, _ = self.encoder.encode(inputs)
        return self.score_ids(ids)


class ClassifierStage:
    """Ray Data stage: rows (``input``, ``is_chat`` and carried columns) → the carried columns with
    ``expert``, ``expert_status`` and ``expert_truncated``. A batch that fails is scored row by row,
    so one bad row fails alone."""

    def __init__(self, cfg: ClassifierExpertConfig):
        if cfg.pool.torch_device == "cpu" and in_actor():
            # torch's intra-op threads = the CPUs this actor holds (Ray derives OMP_NUM_THREADS from them only
            # where the variable is unset); never in a driver that builds a stage to call it directly
            import torch

            torch.set_num_threads(max(1, int(round(cfg.pool.num_cpus))))
        self.expert = SequenceClassifierExpert(
            resolve_model_path(cfg.path), unsafe_label=cfg.unsafe_label, max_length=cfg.max_length, device=cfg.pool.torch_device
        )

    def _score(self, inputs) -> tuple[list, list, list]:
        ids, cut = self.expert.encoder.encode(inputs)
        return self.expert.score_ids(ids).tolist(), [STATUS_OK] * len(inputs), cut.tolist()

    def __call__(self, batch: pa.Table) -> pa.Table:
        texts, chats = batch.column("input").to_pylist(), batch.column("is_chat").to_pylist()
        t0 = time.perf_counter()
        try:
            scores, status, cut = self._score([row_input(t, c) for t, c in zip(texts, chats)]) if texts else ([], [], [])
        except Exception:  # find the rows that fail; the others are scored
            scores, status, cut = [], [], []
            for t, c in zip(texts, chats):
                try:
                    (p,), (s,), (k,) = self._score([row_input(t, c)])
                except Exception as e:
                    p, s, k = None, error_status(f"{type(e).__name__}: {e}"), False
                scores.append(p), status.append(s), cut.append(k)
        return (
            batch.drop_columns(["input", "is_chat"])
            .append_column("expert", pa.array(scores, type=pa.float64()))
            .append_column("expert_status", pa.array(status, type=pa.string()))
            .append_column("expert_truncated", pa.array(cut, type=pa.bool_()))
            # a row's latency: the call that scored its whole batch
            .append_column("expert_seconds", pa.array(np.full(len(texts), time.perf_counter() - t0), type=pa.float64()))
        )


class ClassifierExpert:
    """``expert.kind: classifier``: a sequence classifier on an actor pool of its own."""

    kind = "classifier"

    def __init__(self, cfg: ClassifierExpertConfig):
        self.cfg = cfg

    def identity(self) -> dict:
        c = self.cfg
        return {"kind": self.kind, "path": c.path, "unsafe_label": c.unsafe_label, "max_length": c.max_length}

    def check(self) -> None:
        """Nothing to check before the actors load the model."""

    def bill_terms(self) -> dict:
        p = self.cfg.pool
        return {"gpus_each": p.num_gpus, "gpu_hour_price": p.gpu_hour_price, "token_price": None, "by_tokens": False}

    def plan(self, rows: int) -> PoolPlan:
        p = self.cfg.pool
        return PoolPlan(rows, p.max_actors, p.max_actors, None, None)

    def judge(self, ds: ray.data.Dataset, carry: tuple, plan: PoolPlan, log: Callable[[str], None]) -> ray.data.Dataset:
        from ray.data import ActorPoolStrategy

        c = self.cfg
        log(f"expert pool (classifier {c.path}): {c.pool.min_actors}..{c.pool.max_actors} actors")
        return ds.map_batches(
            ClassifierStage,
            fn_constructor_kwargs={"cfg": c},
            batch_format="pyarrow",
            batch_size=c.pool.batch_size,
            num_gpus=c.pool.num_gpus or None,
            num_cpus=c.pool.num_cpus,
            resources=dict(c.pool.resources) or None,
            compute=ActorPoolStrategy(min_size=c.pool.min_actors, max_size=c.pool.max_actors),
            **accelerated(c.pool.num_gpus, c.pool.resources),
        )
