"""The audit's distributed row operations (ctd.pipeline.ops) against the straightforward driver-side
logic they replaced, kept here as the oracle: duplicate ids, the hard budget cap with ties broken by
id, and the split of rows into expert / probe-only / quarantine. Both ways of applying the
duplicates (broadcast of a small id set, and the join used when the set is large) are checked."""

import math
import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from ctd.pipeline import ops
from conftest import old_driver_logic

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _data_context(ray_head):
    from ctd.pipeline.graph import configure_data

    configure_data()


def synthetic_stage1(folder, n=3000, seed=0, files=4):
    """Stage-1 rows with planted duplicate ids (x2 and x3, one duplicated id also on an invalid
    row), invalid rows, and d(x) rounded to two decimals so that many rows tie at the cap."""
    rng = np.random.default_rng(seed)
    ids = [f"r{i:05d}" for i in range(n)]
    for j in range(0, 60, 3):  # 20 ids occur twice, 10 of them three times
        ids[n - 1 - j] = ids[j]
        if j % 6 == 0:
            ids[n - 2 - j] = ids[j]
    error = [None] * n
    for j in rng.choice(np.arange(200, n - 200), 40, replace=False):  # not on the planted duplicates
        error[j] = "malformed JSON (Expecting value at column 1)" if j % 2 else "empty text"
    error[n - 1] = "empty text"  # an invalid row sharing a duplicated id keeps its own reason
    for j in (100, 101):  # invalid rows without an id: kept (quarantined) by the join path too
        ids[j], error[j] = None, "missing id"
    dv = np.round(rng.normal(0, 0.4, n), 2)
    valid = np.array([e is None for e in error])
    t = pa.table({"id": ids, "input": [f"text {i}" for i in range(n)], "is_chat": [False] * n, "group": rng.choice(["a", "b", None], n).tolist(),
                  "label": pa.array(rng.integers(-1, 2, n), pa.int8()), "source": [f"c.jsonl:{i + 1}" for i in range(n)], "error": error,
                  "truncated": rng.random(n) < 0.1, "probe": rng.random(n), "dv": np.where(valid, dv, np.nan), "delegated": valid & (dv > 0.1),
                  "tokens": pa.array(rng.integers(1, 50, n), pa.int32())})
    os.makedirs(folder, exist_ok=True)
    paths = []
    for k, part in enumerate(np.array_split(np.arange(n), files)):
        p = os.path.join(folder, f"part-{k}.parquet")
        pq.write_table(t.take(pa.array(part)), p)
        paths.append(p)
    return t, paths


def distributed(paths, cap_fraction, broadcast_limit):
    rows = ops.read(paths)
    dups = ops.find_duplicates(rows, broadcast_limit=broadcast_limit, size=3000)
    counts = ops.count_true(ops.mark(rows, dups), {"scored": ops.is_scored, "passing": ops.is_passing})
    cap = math.ceil(cap_fraction * counts["scored"]) if cap_fraction is not None else None
    boundary = ops.cap_boundary(ops.mark(rows, dups), cap) if cap is not None and counts["passing"] > cap else None
    marked = ops.mark(rows, dups, boundary)
    sent = marked.map_batches(ops.to_expert, batch_format="pyarrow", batch_size=None).to_arrow_refs()
    rest = marked.map_batches(ops.not_sent, batch_format="pyarrow", batch_size=None).to_arrow_refs()
    q = marked.map_batches(ops.quarantined, batch_format="pyarrow", batch_size=None).to_arrow_refs()
    import ray

    cat = lambda refs: pa.concat_tables([x for x in ray.get(refs) if x.num_rows]) if refs else None  # noqa: E731
    sent, rest, q = cat(sent), cat(rest), cat(q)
    over = {i for i, o in zip(rest.column("id").to_pylist(), rest.column("over_cap").to_pylist()) if o}
    return {"dups": dups, "counts": counts, "boundary": boundary, "sent": set(sent.column("id").to_pylist()), "over": over,
            "scored": set(sent.column("id").to_pylist()) | set(rest.column("id").to_pylist()), "n_sent_rows": sent.num_rows,
            "n_rest_rows": rest.num_rows, "quarantine": sorted(zip([i or "" for i in q.column("id").to_pylist()], q.column("error").to_pylist()))}


@pytest.mark.parametrize("broadcast_limit", [1_000_000, 0], ids=["broadcast", "join"])
@pytest.mark.parametrize("cap_fraction", [None, 0.05, 0.2])
def test_dedup_cap_and_split_match_the_driver_side_oracle(ray_head, tmp_path, cap_fraction, broadcast_limit):
    t, paths = synthetic_stage1(str(tmp_path / "s1"), seed=int(100 * (cap_fraction or 0)))
    want = old_driver_logic(t, cap_fraction)
    got = distributed(paths, cap_fraction, broadcast_limit)
    assert got["dups"].broadcast == (broadcast_limit > 0)
    assert got["dups"].ids == len(want["dups"]) == 20 and got["dups"].rows == sum(want["dups"].values())
    assert got["counts"]["scored"] == len(want["scored"])
    assert got["scored"] == want["scored"] and got["n_sent_rows"] + got["n_rest_rows"] == len(want["scored"])  # each once
    assert got["sent"] == want["sent"] and got["over"] == want["over"]  # the same rows, ties broken by id alike
    if cap_fraction is not None:
        assert len(got["sent"]) == min(math.ceil(cap_fraction * len(want["scored"])), got["counts"]["passing"])  # cap exact
        assert got["boundary"] is not None and len(want["over"]) > 0
    assert got["quarantine"] == want["quarantine"]
    assert len(want["scored"]) + len(want["quarantine"]) == t.num_rows  # rows in = scored + quarantined


def test_cap_boundary_breaks_ties_by_id(ray_head, tmp_path):
    """Ten rows tie at the cap's d(x): the cap takes the smallest ids among them."""
    n = 40
    dv = np.array([0.9] * 5 + [0.5] * 10 + [0.2] * 25)
    ids = [f"x{i:02d}" for i in np.random.default_rng(1).permutation(n)]
    t = pa.table({"id": ids, "error": pa.nulls(n, pa.string()), "dv": dv, "delegated": dv > 0.3})
    p = str(tmp_path / "t.parquet")
    pq.write_table(t, p)
    rows = ops.read([p])
    dups = ops.find_duplicates(rows, broadcast_limit=10, size=n)
    boundary = ops.cap_boundary(ops.mark(rows, dups), 8)  # 5 at 0.9, then 3 of the 10 tied at 0.5
    tied = sorted(i for i, d in zip(ids, dv) if d == 0.5)
    assert boundary == (0.5, tied[3])
    assert ops.cap_boundary(ops.mark(rows, dups), 15) is None  # 15 pass, cap 15: nobody over


def test_facts_sum_to_the_rows(ray_head, tmp_path):
    rng = np.random.default_rng(3)
    n = 5000
    probe = rng.random(n)
    deleg = rng.random(n) < 0.2
    expert = np.where(deleg, rng.random(n), np.nan)
    status = np.where(deleg, np.where(rng.random(n) < 0.1, "error: boom", "ok"), None)
    t = pa.table({"id": [str(i) for i in range(n)], "group": rng.choice(["a", "b", None], n).tolist(), "label": pa.array(np.zeros(n), pa.int8()),
                  "source": ["s"] * n, "truncated": rng.random(n) < 0.3, "tokens": pa.array(np.ones(n), pa.int32()), "probe": probe,
                  "dv": rng.normal(0, 0.5, n), "delegated": deleg, "over_cap": np.zeros(n, bool), "expert": pa.array(expert, mask=~deleg),
                  "expert_status": status.tolist()})
    res = ops.finalize(t)
    usable = deleg & (status == "ok")
    assert np.allclose(res.column("final").to_numpy(), np.where(usable, expert, probe))
    for k in range(3):
        pq.write_table(res.slice(k * 2000, 2000), str(tmp_path / f"r{k}.parquet"))
    f = ops.facts(ops.read([str(tmp_path / f"r{k}.parquet") for k in range(3)]), ops.result_facts)
    assert f[("count", "rows")] == n and f[("count", "delegated")] == deleg.sum() and f[("count", "truncated")] == t.column("truncated").to_numpy().sum()
    assert f[("count", "unsafe")] == int((res.column("final").to_numpy() >= 0.5).sum())
    g = ops.collect_facts(f, "group_rows")
    assert sum(g.values()) == n and g["(none)"] == sum(x is None for x in t.column("group").to_pylist())
    st = ops.collect_facts(f, "status")
    assert st["error: boom"] == ((status == "error: boom")).sum() and st["ok"] == usable.sum()
    assert sum(v for (k, _), v in f.items() if k == "hist_probe") == n
    # who flagged what: the judge's own verdicts, and where it overruled the probe
    final, dec = res.column("final").to_numpy(), res.column("decision").to_numpy(zero_copy_only=False)
    assert f[("count", "unsafe_by_judge")] == int((dec & usable).sum()) > 0
    assert f[("count", "judge_overruled")] == int((usable & ((probe >= 0.5) != dec)).sum()) > 0
    assert f[("count", "judged_tokens")] == int(deleg.sum())


def synthetic_results(n=4000, seed=5):
    rng = np.random.default_rng(seed)
    probe = np.round(rng.random(n), 2)  # ties, broken by id
    deleg = rng.random(n) < 0.3
    expert = np.where(deleg, np.round(rng.random(n), 2), np.nan)
    status = np.where(deleg, np.where(rng.random(n) < 0.1, "error: boom", "ok"), None)
    t = pa.table({"id": [f"r{i:05d}" for i in rng.permutation(n)], "group": rng.choice(["a", "b"], n).tolist(),
                  "label": pa.array(np.zeros(n), pa.int8()), "source": ["s"] * n, "truncated": np.zeros(n, bool),
                  "tokens": pa.array(np.ones(n), pa.int32()), "probe": probe, "dv": rng.normal(0, 0.5, n), "delegated": deleg,
                  "over_cap": np.zeros(n, bool), "expert": pa.array(expert, mask=~deleg), "expert_status": status.tolist()})
    return ops.finalize(t)


def test_review_lists_are_the_top_rows_of_a_full_sort(ray_head, tmp_path):
    """The distributed top-k (per-block top k, merged by a tree of tasks over 100 blocks) equals a
    full sort on the driver: flagged rows by final score, judge-probe disagreements by the change
    of score, ties broken by id; the quarantine sample carries its reasons."""
    import ray

    res = synthetic_results()
    files = []
    for k in range(4):
        files.append(str(tmp_path / f"r{k}.parquet"))
        pq.write_table(res.slice(k * 1000, 1000), files[-1], row_group_size=40)
    q = tmp_path / "q.parquet"
    pq.write_table(pa.table({"id": ["bad-1", "bad-2"], "source": ["s", "s"], "error": ["empty text", "malformed JSON (x)"], "group": [None, None]}), str(q))
    d = res.to_pydict()
    final, probe, ids = np.array(d["final"]), np.array(d["probe"]), np.array(d["id"])
    dec = np.array(d["decision"])
    usable = np.array(d["delegated"]) & np.array([s == "ok" for s in d["expert_status"]])
    for which, mask, key in (("flagged", dec, final), ("disagreement", usable & ((probe >= 0.5) != dec), np.abs(final - probe))):
        order = np.lexsort((ids[mask], -key[mask]))[:30]
        want = ids[mask][order].tolist()
        assert len(want) == 30
        got = ops.top_rows(ray.data.read_parquet(files, override_num_blocks=100), which, 30).column("id").to_pylist()
        assert got == want, which
    r = ops.review(files, [str(q)], [], 30, excerpt_chars=0)
    assert r.schema == ops.REVIEW_SCHEMA
    counts = {w: r.filter(pc.equal(r.column("list"), w)).num_rows for w in ("flagged", "disagreement", "quarantined")}
    assert counts == {"flagged": 30, "disagreement": 30, "quarantined": 2}
    assert sorted(r.filter(pc.equal(r.column("list"), "quarantined")).column("reason").to_pylist()) == ["empty text", "malformed JSON (x)"]
    assert r.filter(pc.equal(r.column("list"), "flagged")).column("rank").to_pylist() == list(range(1, 31))
    # excerpts come from stage 1's excerpt column (by id), cut to the configured length; a stage 1
    # without the column (older, or excerpts off) gives none
    s1 = tmp_path / "s1.parquet"
    pq.write_table(pa.table({"id": d["id"], "excerpt": [f"text of {i} " + "y" * 50 for i in d["id"]]}), str(s1), row_group_size=500)
    r = ops.review(files, [str(q)], [str(s1)], 30, excerpt_chars=20)
    fl = r.filter(pc.equal(r.column("list"), "flagged"))
    assert all(e.startswith(f"text of {i}") and len(e) == 20 and e.endswith("…") for i, e in zip(fl.column("id").to_pylist(),
                                                                                                 fl.column("excerpt").to_pylist()))
    pq.write_table(pa.table({"id": d["id"]}), str(s1))
    assert ops.review(files, [], [str(s1)], 5, excerpt_chars=20).column("excerpt").null_count == 10


def test_quarantine_sample_spreads_over_the_reasons(ray_head, tmp_path):
    import ray

    q = pa.table({"id": [f"q{i}" for i in range(40)], "source": ["f.jsonl:%d" % i for i in range(40)],
                  "error": ["empty text"] * 30 + ["malformed JSON (at 3)"] * 8 + ["missing id"] * 2, "group": [None] * 40})
    pq.write_table(q, str(tmp_path / "q.parquet"), row_group_size=7)
    got = ops._tree(ray.data.read_parquet(str(tmp_path / "q.parquet"), override_num_blocks=6).map_batches(
        lambda b: ops._spread(6, b), batch_format="pyarrow", batch_size=None).to_arrow_refs(), lambda *ts: ops._spread(6, *ts))
    reasons = [e.split(" (")[0] for e in got.column("error").to_pylist()]
    assert got.num_rows == 6 and sorted(set(reasons)) == ["empty text", "malformed JSON", "missing id"]
    assert reasons.count("missing id") == 2 and reasons.count("malformed JSON") == 2 and reasons.count("empty text") == 2


def test_facts_reduce_many_blocks_as_a_tree(ray_head):
    """More partial tables than one summing task takes (64): sums of sums."""
    import ray

    ds = ray.data.range(300, override_num_blocks=150)
    counted = ops.count_true(ds, {"all": lambda b: pa.array(np.ones(b.num_rows, bool)),
                                  "even": lambda b: pc.equal(pc.bit_wise_and(b.column("id"), 1), 0)})
    assert counted == {"all": 300, "even": 150}
