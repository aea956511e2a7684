"""Ray Data stages: small callable classes over pyarrow batches, one job each.

Each class is constructed once per actor (the model loads once) from a plain-dict spec, and its
``__call__`` maps a batch to a batch. Rows that carry an ``error`` (quarantined by validation) pass
through untouched, so every row read reaches the end of stage 1 exactly once.

Stage 1 (``TokenizeStage`` → ``ActivationStage``) turns validated rows into scores: p(x), d(x),
``delegated`` and, when asked, the pooled vectors. Stage 2 is an expert over delegated rows only
(``ClassifierStage``, ``HTTPJudgeStage``, or the vLLM processor from :mod:`ctd.pipeline.experts`).
Each expert stage returns its input rows without their text, with ``expert`` and ``expert_status``
added: the delegated rows' own results.
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..activations import ActivationExtractor, TextEncoder
from ..experts.judge import STATUS_OK

__all__ = ["row_input", "TokenizeStage", "ActivationStage", "ClassifierStage", "pooled_column"]


def row_input(text: str, is_chat: bool):
    """A validated row's model input: the chat list or the text."""
    return json.loads(text) if is_chat else text


def pooled_column(layer: int) -> str:
    return f"pooled_L{layer}"


def _valid(batch: pa.Table) -> np.ndarray:
    return np.asarray(batch.column("error").is_null().to_numpy(zero_copy_only=False), dtype=bool)


class TokenizeStage:
    """Tokenises valid rows (CPU), so the activation actors never wait on the tokenizer."""

    def __init__(self, spec: dict):
        self.encoder = TextEncoder(spec["model_dir"], max_length=spec.get("max_length"))

    def __call__(self, batch: pa.Table) -> pa.Table:
        ok = _valid(batch)
        ids: list = [None] * batch.num_rows
        truncated = np.zeros(batch.num_rows, dtype=bool)
        idx = np.flatnonzero(ok)
        if idx.size:
            inputs = batch.column("input").to_pylist()
            chats = batch.column("is_chat").to_pylist()
            enc, tr = self.encoder.encode([row_input(inputs[i], chats[i]) for i in idx])
            for j, i in enumerate(idx):
                ids[i] = enc[j].tolist()
                truncated[i] = tr[j]
        return batch.append_column("input_ids", pa.array(ids, type=pa.list_(pa.int32()))).append_column(
            "truncated", pa.array(truncated))


class ActivationStage:
    """Loads the monitored model once; computes p(x), d(x) and the gate inside the actor, so only
    scores (and, if asked, pooled vectors) leave it.

    spec: model_dir, layers (pooled), score_layer, token_budget, compile, dtype, device,
    safety_probe / dv_probe (artifact URIs or None), lambda_star (None: no gate; -inf: all),
    return_pooled (bool), text ("delegated": keep the text of delegated rows only; default all).
    """

    def __init__(self, spec: dict):
        from ..probes import LinearProbe

        self.spec = spec
        if spec.get("threads"):
            # torch's intra-op threads = the CPUs this actor holds (Ray's default environment gives one)
            import torch

            torch.set_num_threads(int(spec["threads"]))
        layers = sorted(set(spec.get("layers") or [spec["score_layer"]]))
        self.extractor = ActivationExtractor.from_pretrained(
            spec["model_dir"], layers, device=spec.get("device", "auto"), dtype=spec.get("dtype", "auto"),
            token_budget=spec.get("token_budget"), compile=spec.get("compile", False))
        self.probes = {}
        for role in ("safety", "dv"):
            uri = spec.get(f"{role}_probe")
            if uri:
                probe = LinearProbe.load(uri)
                probe.check_compatible(model_fingerprint=self.extractor.model_fingerprint, layer=spec["score_layer"],
                                       pooling="mean", feature_dim=self.extractor.hidden_size)
                self.probes[role] = probe
        self.lambda_star = spec.get("lambda_star")

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        ok = _valid(batch)
        idx = np.flatnonzero(ok)
        ids_col = batch.column("input_ids").to_pylist()
        t0 = time.perf_counter()
        pooled = self.extractor.pool([np.asarray(ids_col[i], dtype=np.int32) for i in idx]) if idx.size else {}
        layer = self.spec["score_layer"]
        cols: dict[str, Any] = {}
        for role, name in (("safety", "probe"), ("dv", "dv")):
            if role in self.probes:
                full = np.full(n, np.nan)
                if idx.size:
                    full[idx] = self.probes[role].predict(pooled[layer])
                cols[name] = pa.array(full, mask=~ok)
        if self.lambda_star is not None and "dv" in cols:
            dv = cols["dv"].to_numpy(zero_copy_only=False)
            cols["delegated"] = pa.array(ok & (np.nan_to_num(dv, nan=-np.inf) > self.lambda_star))
        tokens = np.array([len(ids_col[i]) if ok[i] else 0 for i in range(n)], dtype=np.int32)
        cols["tokens"] = pa.array(tokens)
        cols["activation_seconds"] = pa.array(np.full(n, (time.perf_counter() - t0) / max(n, 1)))
        if self.spec.get("return_pooled"):
            for L, z in pooled.items():
                vals: list = [None] * n
                for j, i in enumerate(idx):
                    vals[i] = z[j].tolist()
                cols[pooled_column(L)] = pa.array(vals, type=pa.list_(pa.float32()))
        out = batch.drop_columns(["input_ids"])
        if self.spec.get("excerpt_chars") and "probe" in cols:
            cols["excerpt"] = self._excerpts(out, cols, ok)
        if self.spec.get("text") == "delegated" and "delegated" in cols:
            # only the rows that go to the expert keep their text, in a partition of their own
            i = out.column_names.index("input")
            out = out.set_column(i, "input", pc.if_else(cols["delegated"], out.column("input"), pa.scalar(None, pa.string())))
            cols["part"] = pc.if_else(cols["delegated"], pa.scalar("expert"), pa.scalar("scores"))
        for k, v in cols.items():
            out = out.append_column(k, v)
        return out


    def _excerpts(self, batch: pa.Table, cols: dict, ok: np.ndarray) -> pa.Array:
        """A short redacted excerpt (:func:`ctd.report.excerpt`) of each row a reviewer may be shown:
        those the probe flags and those delegated; null elsewhere. The secrets redacted are the
        values of the environment variables the config names (``secret_envs``), read here."""
        import os

        from ..report import excerpt

        flag = ok & (np.nan_to_num(cols["probe"].to_numpy(zero_copy_only=False), nan=-np.inf) >= self.spec.get("decision_threshold", 0.5))
        if "delegated" in cols:
            flag |= np.asarray(cols["delegated"].to_numpy(zero_copy_only=False), dtype=bool)
        secrets = [os.environ.get(k, "") for k in self.spec.get("secret_envs", ())]
        idx = np.flatnonzero(flag)
        texts, chats = batch.column("input").take(idx).to_pylist(), batch.column("is_chat").take(idx).to_pylist()
        chars = int(self.spec["excerpt_chars"])
        out: list = [None] * batch.num_rows
        for j, i in enumerate(idx):
            out[i] = excerpt(texts[j], chars, secrets, bool(chats[j]))
        return pa.array(out, type=pa.string())


class ClassifierStage:
    """A transformers sequence classifier as the expert, on its own actor pool."""

    def __init__(self, spec: dict):
        from ..experts.classifier import SequenceClassifierExpert

        self.expert = SequenceClassifierExpert(spec["path"], unsafe_label=spec.get("unsafe_label"),
                                               max_length=spec.get("max_length"), device=spec.get("device", "auto"))

    def _score(self, inputs) -> tuple[list, list, list]:
        ids, cut = self.expert.encoder.encode(inputs)
        return self.expert.score_ids(ids).tolist(), [STATUS_OK] * len(inputs), cut.tolist()

    def __call__(self, batch: pa.Table) -> pa.Table:
        from ..experts.judge import error_status

        texts, chats = batch.column("input").to_pylist(), batch.column("is_chat").to_pylist()
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
        return (batch.drop_columns(["input", "is_chat"]).append_column("expert", pa.array(scores, type=pa.float64()))
                .append_column("expert_status", pa.array(status, type=pa.string()))
                .append_column("expert_truncated", pa.array(cut, type=pa.bool_())))
