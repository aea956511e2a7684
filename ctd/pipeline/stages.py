"""Stage 1's Ray Data stages: small callable classes over pyarrow batches, one job each.

Each class is constructed once per actor (the model loads once) from a typed spec, and its
``__call__`` maps a batch to a batch. Rows that carry an ``error`` (quarantined by validation) pass
through untouched, so every row read reaches the end of stage 1 exactly once.

    TokenizeStage     validated rows (:data:`ctd.pipeline.corpus.ROW_COLUMNS`) + input_ids, truncated
    ActivationStage   + probe, dv, delegated (with a gate), tokens, activation_seconds, excerpt,
                        pooled_L<k> (when asked), part (when only delegated rows keep their text);
                        - input_ids

On an accelerator the tokenizer runs in a CPU actor pool of its own, so the accelerator never waits
for it; on CPU the activation actor tokenizes its own batches (:attr:`ActivationSpec.tokenize_apart`):
a second pool would only compete for the same cores and cost one more actor start.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..model.activations import ActivationExtractor, TextEncoder
from ..model.probes import LinearProbe
from ..reporting.redact import EXCERPT_SOURCE_CHARS, excerpt
from ..stats.cascade import threshold_policy
from .control import control_u
from .corpus import is_valid, row_input

__all__ = ["ActivationSpec", "TokenizeStage", "ActivationStage", "pooled_column"]


def pooled_column(layer: int) -> str:
    return f"pooled_L{layer}"


@dataclasses.dataclass(frozen=True)
class ActivationSpec:
    """What the activation actors compute, and how.

    ``gate``: None, no ``delegated`` column; a float λ*, ``delegated = d(x) > λ*`` (``math.inf``:
    never). ``keep_text``: "all" rows keep their text, or only the "delegated" ones, written to a
    partition of their own (``part=expert``; the others to ``part=scores``). Rows the probe flags or
    the gate delegates get a redacted ``excerpt`` of :data:`EXCERPT_SOURCE_CHARS` characters when
    ``excerpts`` is set. ``secret_envs``: names of environment variables whose values are redacted.
    ``control_day``: the rows get ``control_u`` (:func:`ctd.pipeline.control.control_u`), and those
    with ``control_u < control_keep`` keep their text (and an excerpt) like the delegated ones.
    """

    model_dir: str
    layers: tuple[int, ...]
    score_layer: int
    max_length: int | None = None
    token_budget: int | None = None
    compile: bool = False
    dtype: str = "auto"
    device: str = "cpu"
    threads: int | None = None
    safety: LinearProbe | None = None
    dv: LinearProbe | None = None
    gate: float | None = None
    return_pooled: bool = False
    keep_text: Literal["all", "delegated"] = "all"
    excerpts: bool = False
    decision_threshold: float = 0.5
    secret_envs: tuple[str, ...] = ()
    control_day: str | None = None
    control_keep: float = 0.0

    def resume_key(self, model_fingerprint: str, tokenizer_fingerprint: str) -> dict:
        """Everything stage 1's output depends on besides its input files (an allow-list: where the
        model and the probes are read from, the thread count and the secrets' names are not in it)."""
        gate = self.gate if self.gate is None or np.isfinite(self.gate) else ("never" if self.gate > 0 else "all")
        return {
            "model": model_fingerprint,
            "tokenizer": tokenizer_fingerprint,
            "layers": list(self.layers),
            "score_layer": self.score_layer,
            "max_length": self.max_length,
            "token_budget": self.token_budget,
            "compile": self.compile,
            "dtype": self.dtype,
            "device": self.device,
            "safety": self.safety.content_hash if self.safety else None,
            "dv": self.dv.content_hash if self.dv else None,
            "gate": gate,
            "return_pooled": self.return_pooled,
            "keep_text": self.keep_text,
            "excerpts": self.excerpts,
            "decision_threshold": self.decision_threshold,
            **({"control": [self.control_day, self.control_keep]} if self.control_day else {}),
        }

    @property
    def tokenize_apart(self) -> bool:
        """Tokenize in a CPU pool of its own (on an accelerator), or inside the activation actor."""
        return self.device != "cpu"

    @property
    def partitioned(self) -> bool:
        return self.keep_text == "delegated" and self.gate is not None and self.dv is not None


class TokenizeStage:
    """Tokenises valid rows (CPU), so the activation actors never wait on the tokenizer."""

    def __init__(self, spec: ActivationSpec):
        self.encoder = TextEncoder(spec.model_dir, max_length=spec.max_length)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return tokenize(self.encoder, batch)


def tokenize(encoder: TextEncoder, batch: pa.Table) -> pa.Table:
    """``input_ids`` and ``truncated`` of the valid rows of a batch (null / False elsewhere)."""
    ok = np.asarray(is_valid(batch), dtype=bool)
    ids: list = [None] * batch.num_rows
    truncated = np.zeros(batch.num_rows, dtype=bool)
    idx = np.flatnonzero(ok)
    if idx.size:
        inputs = batch.column("input").to_pylist()
        chats = batch.column("is_chat").to_pylist()
        enc, tr = encoder.encode([row_input(inputs[i], chats[i]) for i in idx])
        for j, i in enumerate(idx):
            ids[i] = enc[j].tolist()
            truncated[i] = tr[j]
    return batch.append_column("input_ids", pa.array(ids, type=pa.list_(pa.int32()))).append_column(
        "truncated", pa.array(truncated)
    )


class ActivationStage:
    """Loads the monitored model once; computes p(x), d(x) and the gate inside the actor, so only
    scores (and, if asked, pooled vectors) leave it. The probes travel in the spec; the actor checks
    them against the model it loaded (its fingerprint, its hidden size)."""

    def __init__(self, spec: ActivationSpec):
        self.spec = spec
        if spec.threads:
            # torch's intra-op threads = the CPUs this actor holds (Ray's default environment gives one)
            import torch

            torch.set_num_threads(int(spec.threads))
        layers = sorted(set(spec.layers))
        self.extractor = ActivationExtractor.from_pretrained(
            spec.model_dir, layers, device=spec.device, dtype=spec.dtype, token_budget=spec.token_budget, compile=spec.compile
        )
        self.encoder = None if spec.tokenize_apart else TextEncoder(spec.model_dir, max_length=spec.max_length)
        self.probes = {name: p for name, p in (("probe", spec.safety), ("dv", spec.dv)) if p is not None}
        for probe in self.probes.values():
            probe.check_compatible(
                model_fingerprint=self.extractor.model_fingerprint,
                layer=spec.score_layer,
                pooling="mean",
                feature_dim=self.extractor.hidden_size,
            )

    def __call__(self, batch: pa.Table) -> pa.Table:
        if self.encoder is not None:
            batch = tokenize(self.encoder, batch)
        n, spec = batch.num_rows, self.spec
        ok = np.asarray(is_valid(batch), dtype=bool)
        idx = np.flatnonzero(ok)
        ids_col = batch.column("input_ids").to_pylist()
        t0 = time.perf_counter()
        pooled = self.extractor.pool([np.asarray(ids_col[i], dtype=np.int32) for i in idx]) if idx.size else {}
        cols: dict[str, Any] = {}
        for name, probe in self.probes.items():
            full = np.full(n, np.nan)
            if idx.size:
                full[idx] = probe.predict(pooled[spec.score_layer])
            cols[name] = pa.array(full, mask=~ok)
        if spec.gate is not None and "dv" in cols:
            dv = cols["dv"].to_numpy(zero_copy_only=False)
            cols["delegated"] = pa.array(ok & threshold_policy(np.nan_to_num(dv, nan=-np.inf), spec.gate))
        cols["tokens"] = pa.array(np.array([len(ids_col[i]) if ok[i] else 0 for i in range(n)], dtype=np.int32))
        cols["activation_seconds"] = pa.array(np.full(n, (time.perf_counter() - t0) / max(n, 1)))
        if spec.return_pooled:
            for layer, z in pooled.items():
                vals: list = [None] * n
                for j, i in enumerate(idx):
                    vals[i] = z[j].tolist()
                cols[pooled_column(layer)] = pa.array(vals, type=pa.list_(pa.float32()))
        out = batch.drop_columns(["input_ids"])
        keep = cols.get("delegated")
        if spec.control_day:  # the control sample's draw: a keyed hash of the id, never of a score
            u = control_u(out.column("id"), spec.control_day)
            cols["control_u"] = pa.array(u, mask=~ok)
            if keep is not None:
                keep = pc.or_(keep, pa.array(ok & (np.nan_to_num(u, nan=1.0) < spec.control_keep)))
        if spec.excerpts and "probe" in cols:
            cols["excerpt"] = self._excerpts(out, cols, ok, keep)
        if spec.keep_text == "delegated" and keep is not None:
            # only the rows that may go to the expert keep their text, in a partition of their own
            i = out.column_names.index("input")
            out = out.set_column(i, "input", pc.if_else(keep, out.column("input"), pa.scalar(None, pa.string())))
            cols["part"] = pc.if_else(keep, pa.scalar("expert"), pa.scalar("scores"))
        for k, v in cols.items():
            out = out.append_column(k, v)
        return out

    def _excerpts(self, batch: pa.Table, cols: dict, ok: np.ndarray, judged: pa.Array | None) -> pa.Array:
        """A redacted excerpt (:func:`ctd.reporting.redact.excerpt`) of each row a reviewer may be
        shown: those the probe flags and those that may go to the judge (``judged``); null elsewhere.
        The secrets redacted are the values of the environment variables the config names, read here."""
        probe = np.nan_to_num(cols["probe"].to_numpy(zero_copy_only=False), nan=-np.inf)
        flag = ok & (probe >= self.spec.decision_threshold)
        if judged is not None:
            flag |= np.asarray(judged.to_numpy(zero_copy_only=False), dtype=bool)
        secrets = [os.environ.get(k, "") for k in self.spec.secret_envs]
        idx = np.flatnonzero(flag)
        texts, chats = batch.column("input").take(idx).to_pylist(), batch.column("is_chat").take(idx).to_pylist()
        out: list = [None] * batch.num_rows
        for j, i in enumerate(idx):
            out[i] = excerpt(texts[j], EXCERPT_SOURCE_CHARS, secrets, bool(chats[j]))
        return pa.array(out, type=pa.string())
