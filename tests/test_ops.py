"""The audit's distributed row operations against the straightforward driver-side logic they replaced,
kept here as the oracle: duplicate ids, the hard budget cap with ties broken by id, and the split of
rows into expert / probe-only / quarantine. Both ways of applying the duplicates (broadcast of a
small id set, and the join used when the set is large) are checked; the review list's distributed
top-k against a full sort; tallies reduced over many blocks. The per-batch rules themselves are
unit-tested without Ray in tests/test_audit_rules.py."""

import math
import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from conftest import old_driver_logic

from ctd.audit import review as rv
from ctd.audit.facts import Facts, collect, result_counts
from ctd.audit.results import Rows, finalize, not_sent, quarantined, to_expert
from ctd.audit.selection import cap_boundary, cap_rows, delegated, is_passing, mark
from ctd.pipeline.dedup import census, count_where, is_scored
from ctd.pipeline.raydata import read, tree_reduce
from ctd.stats.cascade import Cascade

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _data_context(ray_head):
    from ctd.pipeline.raydata import configure_data

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
    t = pa.table(
        {
            "id": ids,
            "input": [f"text {i}" for i in range(n)],
            "is_chat": [False] * n,
            "group": rng.choice(["a", "b", None], n).tolist(),
            "label": pa.array(rng.integers(-1, 2, n), pa.int8()),
            "source": [f"c.jsonl:{i + 1}" for i in range(n)],
            "error": error,
            "truncated": rng.random(n) < 0.1,
            "probe": rng.random(n),
            "dv": np.where(valid, dv, np.nan),
            "delegated": valid & (dv > 0.1),
            "tokens": pa.array(rng.integers(1, 50, n), pa.int32()),
        }
    )
    os.makedirs(folder, exist_ok=True)
    paths = []
    for k, part in enumerate(np.array_split(np.arange(n), files)):
        p = os.path.join(folder, f"part-{k}.parquet")
        pq.write_table(t.take(pa.array(part)), p)
        paths.append(p)
    return t, paths


def distributed(paths, cap_fraction, broadcast_limit):
    rows = read(paths)
    c = census(rows, broadcast_limit=broadcast_limit, size=3000, flags={"passing": delegated})
    dups = c.dups
    counts = {"scored": c.scored, "passing": c.flagged["passing"]}
    assert counts == count_where(mark(rows, dups), {"scored": is_scored, "passing": is_passing})  # the one pass = the marked rows
    cap = cap_rows(cap_fraction, counts["scored"])
    boundary = cap_boundary(mark(rows, dups), cap) if cap is not None and counts["passing"] > cap else None
    marked = mark(rows, dups, boundary)
    sent = marked.map_batches(to_expert, batch_format="pyarrow", batch_size=None).to_arrow_refs()
    rest = marked.map_batches(not_sent, batch_format="pyarrow", batch_size=None).to_arrow_refs()
    q = marked.map_batches(quarantined, batch_format="pyarrow", batch_size=None).to_arrow_refs()
    import ray

    cat = lambda refs: pa.concat_tables([x for x in ray.get(refs) if x.num_rows]) if refs else None  # noqa: E731
    sent, rest, q = cat(sent), cat(rest), cat(q)
    over = {i for i, o in zip(rest.column("id").to_pylist(), rest.column("over_cap").to_pylist()) if o}
    return {
        "dups": dups,
        "counts": counts,
        "boundary": boundary,
        "sent": set(sent.column("id").to_pylist()),
        "over": over,
        "scored": set(sent.column("id").to_pylist()) | set(rest.column("id").to_pylist()),
        "n_sent_rows": sent.num_rows,
        "n_rest_rows": rest.num_rows,
        "quarantine": sorted(zip([i or "" for i in q.column("id").to_pylist()], q.column("error").to_pylist())),
    }


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
    rows = read([p])
    dups = census(rows, broadcast_limit=10, size=n).dups
    boundary = cap_boundary(mark(rows, dups), 8)  # 5 at 0.9, then 3 of the 10 tied at 0.5
    tied = sorted(i for i, d in zip(ids, dv) if d == 0.5)
    assert boundary == (0.5, tied[3])
    assert cap_boundary(mark(rows, dups), 15) is None  # 15 pass, cap 15: nobody over


def test_facts_of_many_files_sum_to_the_rows(ray_head, tmp_path):
    """The distributed facts of results spread over files and blocks equal the facts of the whole
    table computed in one batch (tests/test_audit_rules.py checks those against the rows)."""
    from ctd.pipeline.raydata import tally_sum as _sum

    res = synthetic_results(5000, seed=3)
    files = []
    for k in range(3):
        files.append(str(tmp_path / f"r{k}.parquet"))
        pq.write_table(res.slice(k * 2000, 2000), files[-1], row_group_size=300)
    q = str(tmp_path / "q.parquet")
    pq.write_table(
        pa.table({"id": ["a", "b"], "source": ["s", "s"], "error": ["empty text", "malformed JSON (x)"], "group": [None, "g"]}), q
    )
    got = collect(Rows(files, [q], 0.0), Cascade())
    from ctd.pipeline.raydata import Tally

    t = _sum(result_counts(res))
    want = Facts.from_tally(
        Tally(
            {
                (k, key): n
                for k, key, n in zip(t.column("kind").to_pylist(), t.column("key").to_pylist(), t.column("n").to_pylist())
            }
        )
    )
    assert got.counts == want.counts | {"quarantined": 2} and got.groups == want.groups and got.statuses == want.statuses
    assert got.reasons == {"empty text": 1, "malformed JSON": 1}
    assert all(np.array_equal(got.histograms[c], want.histograms[c]) for c in want.histograms)


def synthetic_results(n=4000, seed=5):
    rng = np.random.default_rng(seed)
    probe = np.round(rng.random(n), 2)  # ties, broken by id
    deleg = rng.random(n) < 0.3
    control = rng.random(n) < 0.05  # the control sample: judged whatever the scores, some rows delegated too
    judged = deleg | control
    expert = np.where(judged, np.round(rng.random(n), 2), np.nan)
    status = np.where(judged, np.where(rng.random(n) < 0.1, "error: boom", "ok"), None)
    t = pa.table(
        {
            "id": [f"r{i:05d}" for i in rng.permutation(n)],
            "group": rng.choice(["a", "b"], n).tolist(),
            "label": pa.array(np.zeros(n), pa.int8()),
            "source": ["s"] * n,
            "truncated": np.zeros(n, bool),
            "tokens": pa.array(np.ones(n), pa.int32()),
            "probe": probe,
            "dv": rng.normal(0, 0.5, n),
            "delegated": deleg,
            "over_cap": np.zeros(n, bool),
            "control": control,
            "expert": pa.array(expert, mask=~judged),
            "expert_status": status.tolist(),
            "expert_truncated": pa.array(np.zeros(n, bool), mask=~judged),
        }
    )
    return finalize(t)


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
    pq.write_table(
        pa.table(
            {"id": ["bad-1", "bad-2"], "source": ["s", "s"], "error": ["empty text", "malformed JSON (x)"], "group": [None, None]}
        ),
        str(q),
    )
    d = res.to_pydict()
    final, probe, ids = np.array(d["final"]), np.array(d["probe"]), np.array(d["id"])
    dec = np.array(d["decision"])
    usable = (np.array(d["delegated"]) | np.array(d["control"])) & np.array([s == "ok" for s in d["expert_status"]])
    lists = (
        ("flagged", dec, final),
        ("missed", usable & (probe < 0.5) & dec, np.abs(final - probe)),
        ("false_alarm", usable & (probe >= 0.5) & ~dec, np.abs(final - probe)),
    )
    for which, mask, key in lists:
        order = np.lexsort((ids[mask], -probe[mask], -key[mask]))
        if which == "flagged":
            want_flagged_pool = ids[mask][order][: rv.FOLD_POOL * 30].tolist()
            want_flagged = want_flagged_pool[:30]
        want = ids[mask][order][:30].tolist()
        assert len(want) == 30
        local = ray.data.read_parquet(files, override_num_blocks=100).map_batches(
            lambda b, w=which: rv.top(30, rv.candidates(b, w)), batch_format="pyarrow", batch_size=None
        )
        got = tree_reduce(local.to_arrow_refs(), lambda *ts: rv.top(30, *ts)).column("id").to_pylist()
        assert got == want, which
    r = rv.review(files, [str(q)], [], 30, Cascade(), excerpt_chars=0)
    assert r.schema == rv.REVIEW_SCHEMA
    counts = {w: r.filter(pc.equal(r.column("list"), w)).num_rows for w in ("flagged", "missed", "false_alarm", "quarantined")}
    assert counts == {"flagged": 30, "missed": 30, "false_alarm": 30, "quarantined": 2}
    assert sorted(r.filter(pc.equal(r.column("list"), "quarantined")).column("reason").to_pylist()) == [
        "empty text",
        "malformed JSON (x)",
    ]
    assert r.filter(pc.equal(r.column("list"), "flagged")).column("rank").to_pylist() == list(range(1, 31))
    # excerpts come from stage 1's excerpt column (by id), cut to the configured length
    s1 = tmp_path / "s1.parquet"
    words = lambda i: i.translate(str.maketrans("0123456789", "abcdefghij"))  # noqa: E731 - distinct words per id
    excerpts = {i: f"text of {i} {words(i)} " + "y" * 50 for i in d["id"]}
    pq.write_table(pa.table({"id": d["id"], "excerpt": list(excerpts.values())}), str(s1), row_group_size=500)
    r = rv.review(files, [str(q)], [str(s1)], 30, Cascade(), excerpt_chars=20)
    fl = r.filter(pc.equal(r.column("list"), "flagged"))
    assert fl.column("id").to_pylist() == want_flagged and set(fl.column("similar").to_pylist()) == {1}
    assert all(
        e.startswith(f"text of {i}") and len(e) == 20 and e.endswith("…")
        for i, e in zip(fl.column("id").to_pylist(), fl.column("excerpt").to_pylist())
    )
    # the same prompt, digits apart, as the 2nd, 5th and 40th flagged rows: folded into the 2nd, with its count;
    # the list is still 30 rows long, the next distinct rows moving up
    same = [want_flagged_pool[1], want_flagged_pool[4], want_flagged_pool[39]]
    for n, i in enumerate(same):
        excerpts[i] = f"How do I get into my ex's account? Attempt {n}."
    pq.write_table(pa.table({"id": d["id"], "excerpt": list(excerpts.values())}), str(s1), row_group_size=500)
    r = rv.review(files, [], [str(s1)], 30, Cascade(), excerpt_chars=40)
    fl = r.filter(pc.equal(r.column("list"), "flagged"))
    rest = [i for i in want_flagged_pool if i not in same[1:]]
    assert fl.column("id").to_pylist() == rest[:30]
    assert fl.column("similar").to_pylist() == [1, 3] + [1] * 28
    off = rv.review(files, [], [str(s1)], 5, Cascade(), excerpt_chars=0)  # excerpts off: 5 rows in each of the 4 lists
    assert off.num_rows == 20 and off.column("excerpt").null_count == 20


def test_facts_reduce_many_blocks_as_a_tree(ray_head):
    """More partial tables than one summing task takes (64): sums of sums."""
    import ray

    ds = ray.data.range(300, override_num_blocks=150)
    counted = count_where(
        ds,
        {"all": lambda b: pa.array(np.ones(b.num_rows, bool)), "even": lambda b: pc.equal(pc.bit_wise_and(b.column("id"), 1), 0)},
    )
    assert counted == {"all": 300, "even": 150}
