"""The driver stays flat in N: everything after stage 1 (dedup, cap, expert, merge, report,
publish) runs as Ray Data operations, so the driver's peak Python allocation does not grow with the
number of rows. Stage 1 is replaced by synthetic stage-1 output of two sizes (10x apart), picked up
through the audit's own resume path, so the real post-stage-1 code runs against the real classifier
expert, probes and calibration of the session's deployment."""

import json
import os
import tracemalloc

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from ctd import storage
from ctd.audit.run import run_audit
from ctd.audit.specs import AuditSpec
from ctd.config import load_config
from ctd.pipeline.chunks import plan_chunks
from ctd.pipeline.scoring import Stage1
from ctd.runs.folder import read_run_table
from ctd.runs.layout import RunLayout

pytestmark = pytest.mark.slow

N_DELEGATED = 40  # the same expert work at both sizes: only the rows' count changes
N_DUP_IDS = 5
N_BAD = 7


def stage1_table(n: int, lam: float, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    ids = np.array([f"conv-{seed}-{i:09d}" for i in range(n)], dtype=object)
    ids[n - N_DUP_IDS :] = ids[:N_DUP_IDS]  # planted duplicates: 5 ids on 2 rows each
    error = np.full(n, None, dtype=object)
    bad = rng.choice(np.arange(N_DUP_IDS, n - N_DUP_IDS), N_BAD, replace=False)
    error[bad] = "malformed JSON (Expecting value at column 1)"
    valid = np.array([e is None for e in error])
    dv = np.where(valid, lam - 0.5 - rng.random(n) * 0.1, np.nan)
    deleg_idx = np.flatnonzero(valid)[N_DUP_IDS : N_DUP_IDS + N_DELEGATED]
    dv[deleg_idx] = lam + 0.01 + rng.random(N_DELEGATED) * 0.01
    delegated = valid & (np.nan_to_num(dv, nan=-np.inf) > lam)
    text = np.where(delegated, "I wired my entire savings to a stranger who called from the bank, what now?", None)
    return pa.table(
        {
            "id": ids.tolist(),
            "input": text.tolist(),
            "is_chat": np.zeros(n, bool),
            "group": rng.choice(["medical", "finance"], n).tolist(),
            "label": pa.array(np.full(n, -1), pa.int8()),
            "source": [f"c.jsonl:{i + 1}" for i in range(n)],
            "error": error.tolist(),
            "truncated": np.zeros(n, bool),
            "probe": pa.array(rng.random(n), mask=~valid),
            "dv": pa.array(dv, mask=~valid),
            "delegated": delegated,
            "tokens": pa.array(np.full(n, 20), pa.int32()),
            "excerpt": pa.nulls(n, pa.string()),
            "activation_seconds": np.zeros(n),
        }
    )


def audit_after_stage1(deployment, tmp_path, n: int) -> tuple[int, object, str]:
    """Peak Python allocation of the driver over a whole audit whose stage 1 is already done."""
    out = str(tmp_path / f"n{n}")
    corpus = str(tmp_path / "corpus.jsonl")
    if not os.path.exists(corpus):
        with open(corpus, "w") as f:
            f.write(json.dumps({"id": "x", "text": "y"}) + "\n")
    cfg = load_config(deployment["config_path"], {"audit.corpus": corpus, "audit.output": out, "audit.rows_per_file": 100_000})
    spec = AuditSpec.from_config(cfg, run_id="scale")
    lam = spec.deployment.calibration.threshold
    layout = RunLayout(out, "scale")
    t = stage1_table(n, lam)
    s = spec.scoring  # the one-file corpus: one chunk
    (chunk,) = plan_chunks(s.corpus, s.resume_key(), layout.path("_staging", "stage1"), s.chunk_bytes)
    files = []  # as stage 1 writes them: the delegated rows (with their text) in part=expert/, the rest in part=scores/
    for part, rows in (("expert", t.filter(t.column("delegated"))), ("scores", t.filter(pc.invert(t.column("delegated"))))):
        for k, start in enumerate(range(0, rows.num_rows, 100_000)):
            f = storage.join(chunk.uri, f"part={part}", f"part-{k:04d}.parquet")
            os.makedirs(os.path.dirname(f), exist_ok=True)
            pq.write_table(rows.slice(start, 100_000), f)
            files.append(f)
    chunk.commit(Stage1(chunk.uri, n, 0.0, files))
    del t
    tracemalloc.start()
    try:
        report = run_audit(cfg, run_id="scale")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return peak, report, out


def test_driver_peak_allocation_does_not_grow_with_rows(deployment, tmp_path):
    small, big = 20_000, 200_000
    peaks = {}
    for n in (small, big):
        peak, report, out = audit_after_stage1(deployment, tmp_path, n)
        peaks[n] = peak
        assert report.resumed["stage1_rows"] == n  # stage 1 was the synthetic one
        assert report.rows_read == n == report.rows_scored + report.rows_quarantined
        assert report.rows_quarantined == N_BAD + 2 * N_DUP_IDS
        assert report.delegated == report.expert_calls == N_DELEGATED
        res = read_run_table(out, "scale", columns=["id"])
        assert res.num_rows == report.rows_scored and len(set(res.column("id").to_pylist())) == res.num_rows
    print(
        f"driver peak Python allocation: {peaks[small] / 2**20:.1f} MiB at {small} rows, {peaks[big] / 2**20:.1f} MiB at {big} rows"
    )
    # 10x the rows. Measured: 3.0 and 2.8 MiB; with one driver-side list of the ids put back (what the
    # old dedup did first), 4.4 and 16.9 MiB, and this fails.
    assert peaks[big] < 1.25 * peaks[small] + 4 * 2**20, peaks
