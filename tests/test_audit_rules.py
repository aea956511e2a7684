"""The audit's rules, unit-tested on in-memory tables without Ray: the selection (dedup, λ*'s gate,
the hard cap as a scalar filter) against the driver-side oracle, the published rows (finalize,
quarantine), the night's facts, the alarms, the summary and its sentences, the review lists, the
expert status, and stage 1's resume key (an allow-list)."""

import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from conftest import old_driver_logic
from test_ops import synthetic_stage1

from ctd.audit import review as rv
from ctd.audit.facts import Facts, result_counts
from ctd.audit.report import AuditReport
from ctd.audit.results import RESULT_SCHEMA, answered, finalize, not_sent, quarantined, to_expert
from ctd.audit.selection import cap_rows, mark_batch, over_cap
from ctd.audit.summary import NightContext, drift_check, group_rows, judge_check, summarise
from ctd.experts.prompt import ExpertStatus, usable
from ctd.pipeline.dedup import _attach
from ctd.pipeline.raydata import Tally
from ctd.pipeline.raydata import tally_sum as _sum
from ctd.pipeline.stages import ActivationSpec
from ctd.runs.history import Gap, History
from ctd.stats.calibrate import calibrate
from ctd.stats.cascade import Cascade


def with_dups(t: pa.Table) -> pa.Table:
    """dup_n as the distributed groupby gives it, computed here on the driver."""
    valid = t.filter(pc.is_null(t.column("error")))
    g = valid.group_by("id").aggregate([("id", "count")])
    dups = g.filter(pc.greater(g.column("id_count"), 1))
    return _attach(t, pa.table({"id": dups.column("id"), "dup_n": pc.cast(dups.column("id_count"), pa.int64())}))


def first_over(t: pa.Table, cap: int):
    """The first row over the cap in (d(x) desc, id asc), by a full sort (the distributed sort's oracle)."""
    passing = t.filter(
        pc.and_(pc.and_(pc.is_null(t.column("error")), pc.is_null(t.column("dup_n"))), pc.fill_null(t.column("delegated"), False))
    )
    order = passing.take(pc.sort_indices(passing, sort_keys=[("dv", "descending"), ("id", "ascending")]))
    return None if order.num_rows <= cap else (order.column("dv")[cap].as_py(), order.column("id")[cap].as_py())


@pytest.mark.parametrize("cap_fraction", [None, 0.05, 0.2])
def test_selection_rules_match_the_driver_side_oracle(tmp_path, cap_fraction):
    t, _ = synthetic_stage1(str(tmp_path), seed=int(100 * (cap_fraction or 0)))
    want = old_driver_logic(t, cap_fraction)
    d = with_dups(t)
    scored = int(pc.sum(pc.and_(pc.is_null(d.column("error")), pc.is_null(d.column("dup_n")))).as_py())
    cap = cap_rows(cap_fraction, scored)
    boundary = first_over(d, cap) if cap is not None else None
    m = mark_batch(d, boundary)
    sent, rest, q = to_expert(m), not_sent(m), quarantined(m)
    assert set(sent.column("id").to_pylist()) == want["sent"]
    assert {i for i, o in zip(rest.column("id").to_pylist(), rest.column("over_cap").to_pylist()) if o} == want["over"]
    assert (
        set(sent.column("id").to_pylist()) | set(rest.column("id").to_pylist())
        == want["scored"]
        == set(d.filter(pc.and_(pc.is_null(d.column("dup_n")), pc.is_null(d.column("error")))).column("id").to_pylist())
    )
    assert sorted(zip([i or "" for i in q.column("id").to_pylist()], q.column("error").to_pylist())) == want["quarantine"]
    assert sent.num_rows + rest.num_rows + q.num_rows == t.num_rows  # rows in = scored + quarantined, each once
    if cap is not None:
        assert sent.num_rows == min(cap, int(pc.sum(d.column("delegated")).as_py())) and cap == math.ceil(cap_fraction * scored)


def test_the_cap_is_a_scalar_filter_on_the_order_d_desc_id_asc():
    t = pa.table({"id": ["b", "a", "c", "d", None], "dv": [0.5, 0.5, 0.9, 0.1, None]})
    assert over_cap(t, (0.5, "b")).to_pylist() == [True, False, False, True, True]  # a before b at a tie; lower d(x) after
    assert over_cap(t, None).to_pylist() == [False] * 5
    assert cap_rows(None, 100) is None and cap_rows(0.1, 1001) == 101 and cap_rows(1.0, 7) == 7


def results(n=3000, seed=5):
    rng = np.random.default_rng(seed)
    probe = np.round(rng.random(n), 2)
    deleg = rng.random(n) < 0.3
    control = rng.random(n) < 0.05  # the control sample: judged whether or not delegated
    judged = deleg | control
    expert = np.where(judged, np.round(rng.random(n), 2), np.nan)
    status = np.where(
        judged,
        rng.choice(
            ["ok", "unsafe_outside_topk", "no_label_token", "error: boom", "error: HTTP 503"], n, p=[0.7, 0.1, 0.05, 0.1, 0.05]
        ),
        None,
    )
    t = pa.table(
        {
            "id": [f"r{i:05d}" for i in rng.permutation(n)],
            "group": rng.choice(["a", "b", None, ""], n).tolist(),
            "label": pa.array(np.zeros(n), pa.int8()),
            "source": ["s"] * n,
            "truncated": rng.random(n) < 0.2,
            "tokens": pa.array(rng.integers(1, 50, n), pa.int32()),
            "probe": probe,
            "dv": rng.normal(0, 0.5, n),
            "delegated": deleg,
            "over_cap": np.zeros(n, bool),
            "control": control,
            "expert": pa.array(expert, mask=~judged),
            "expert_status": status.tolist(),
            "expert_truncated": pa.array(np.where(judged, rng.random(n) < 0.1, False), mask=~judged),
        }
    )
    return t, probe, expert, deleg, status


@pytest.mark.parametrize("mode", ["switch", "mean"])
def test_finalize_uses_the_expert_only_where_it_answered_usably(mode):
    t, probe, expert, deleg, status = results()
    cascade = Cascade(mode, 0.4)
    res = finalize(t, cascade)
    assert res.schema == RESULT_SCHEMA
    ok = (deleg | t.column("control").to_numpy(zero_copy_only=False)) & np.isin(status, ["ok", "unsafe_outside_topk"])
    assert np.array_equal(answered(res), ok)
    want = np.where(ok, expert if mode == "switch" else (probe + np.nan_to_num(expert)) / 2, probe)
    assert np.allclose(res.column("final").to_numpy(), want)
    assert np.array_equal(res.column("decision").to_numpy(zero_copy_only=False), want >= 0.4)


def facts_of(table: pa.Table, cascade=Cascade()) -> Facts:
    t = _sum(result_counts(table, cascade))
    return Facts.from_tally(
        Tally(
            {
                (k, key): n
                for k, key, n in zip(t.column("kind").to_pylist(), t.column("key").to_pylist(), t.column("n").to_pylist())
            }
        )
    )


def test_facts_count_what_the_rows_say():
    t, probe, expert, deleg, status = results()
    res = finalize(t)
    f = facts_of(res)
    dec = res.column("decision").to_numpy(zero_copy_only=False)
    ok = (deleg | t.column("control").to_numpy(zero_copy_only=False)) & np.isin(status, ["ok", "unsafe_outside_topk"])
    assert (
        f["rows"] == res.num_rows and f["delegated"] == deleg.sum() and f["truncated"] == t.column("truncated").to_numpy().sum()
    )
    assert f["unsafe"] == dec.sum() and f["unsafe_by_judge"] == (dec & ok).sum() > 0
    assert f["judge_overruled"] == (ok & ((probe >= 0.5) != dec)).sum() > 0
    assert f["judged_tokens"] == t.column("tokens").to_numpy()[deleg].sum()
    groups = t.column("group").to_pylist()
    assert f.groups[None].rows == sum(g in (None, "") for g in groups) and f.groups["a"].rows == groups.count("a")
    assert f.groups["a"].delegated == int(deleg[np.array(groups) == "a"].sum())
    assert f.statuses == {s: int((status == s).sum()) for s in set(status.tolist()) if s is not None}
    assert sum(f.histograms["probe"]) == res.num_rows
    rows = group_rows(f)
    assert rows[0]["group"] == "(none)" and [r["group"] for r in rows] == ["(none)", "a", "b"]


def test_quarantine_reasons_are_counted_without_their_detail():
    from ctd.audit.facts import quarantine_counts

    q = pa.table(
        {
            "id": ["a", "b", "c"],
            "source": ["s"] * 3,
            "error": ["malformed JSON (at 3)", "malformed JSON (at 9)", "empty text"],
            "group": [None] * 3,
        }
    )
    t = _sum(quarantine_counts(q))
    f = Facts.from_tally(Tally({(k, key): n for k, key, n in zip(*(t.column(c).to_pylist() for c in ("kind", "key", "n")))}))
    assert f["quarantined"] == 3 and f.reasons == {"malformed JSON": 2, "empty text": 1}


def test_the_judge_alarm_counts_every_row_without_a_usable_answer():
    ok = judge_check({"ok": 95, "safe_outside_topk": 1, "no_label_token": 2, "error: boom": 2}, 100, 0.05)
    assert (ok.alarm, ok.failures, ok.unanswered) == (False, 2, 4) and "4 of 100 judged rows (4.00%)" in ok.message
    bad = judge_check({"ok": 90, "no_label_token": 4, "error: boom": 4, "error: HTTP 503": 2}, 100, 0.05)
    assert bad.alarm and "over the limit of 5.00%" in bad.message and "boom: 4; HTTP 503: 2" in bad.message
    assert not judge_check({}, 0, 0.05).alarm  # nothing judged: no alarm


def test_the_drift_alarm_is_the_e_detector_over_the_nights():
    calm = [{"delegated_by_threshold": 90, "rows_scored": 1000}] * 5
    d = drift_check(calm, 95, 1000, 0.1, 0.01)
    assert not d.alarm and d.nights == 6 and "consistent with the calibration" in d.message and d.e_value < 1
    hot = drift_check(calm, 160, 1000, 0.1, 0.01)
    assert hot.alarm and hot.e_value >= 100 and "drifted above α" in hot.message
    assert drift_check([], 0, 0, 0.1, 0.01).nights == 1  # a first night with nothing scored


def context(**over) -> NightContext:
    rng = np.random.default_rng(0)
    cal = calibrate(rng.normal(size=800), np.linspace(-3, 3, 101), 0.2, 0.1)
    base = dict(
        run_id="n1",
        audited_date="2026-11-24",
        attempt="a1",
        config_hash="c",
        corpus="s3://b/c",
        model_id="m",
        model_fingerprint="f",
        layer=2,
        safety_probe_hash="s",
        dv_probe_hash="d",
        calibration_uri="s3://b/cal",
        calibration_hash="h",
        calibration=cal,
        rows_read=3010,
        cap=None,
        expert_kind="vllm",
        expert_calls=0,
        expert_pool={},
        max_failure_share=0.05,
        drift_alpha=0.01,
        timings={"expert": (9.0, 10)},
        resumed={},
        review_rows=0,
        created_at="2026-11-25T02:00:00+00:00",
    )
    return NightContext(**(base | over))


def test_the_summary_is_the_facts_in_words():
    t, probe, expert, deleg, status = results()
    f = facts_of(finalize(t))
    f = Facts(f.counts | {"quarantined": 10}, f.groups, f.statuses, {"empty text": 10}, f.histograms)
    r = summarise(context(expert_calls=int(deleg.sum())), f, History())
    assert isinstance(r, AuditReport) and r.invariant_ok and r.rows_scored == 3000 and r.rows_quarantined == 10
    assert (
        r.delegated == deleg.sum() and r.delegated_by_threshold == deleg.sum() and r.realised_rate == pytest.approx(deleg.mean())
    )
    assert r.expert_failures == int(np.isin(status, ["error: boom", "error: HTTP 503"]).sum())
    text = [s for _, s in r.headline()]
    assert r.drift_alarm and r.headline()[0][0] == "alarm"  # 30% of rows passed λ* against α = 20%: it leads
    text = [s for k, s in r.headline() if k != "alarm"]
    assert (
        text[0]
        == "3,010 conversations of 2026-11-24 were read: 3,000 audited; 10 could not be audited and were quarantined (empty text: 10)."
    )
    assert text[1].startswith(f"{r.decisions_unsafe:,} flagged unsafe") and f"{r.unsafe_by_judge:,} by the judge" in text[1]
    missing = summarise(context(rows_read=3011), f, History())
    gap = Gap("old-night", "report.json: content differs from the manifest", "2026-11-23", "h")
    gapped = summarise(context(), f, History([], [gap]))
    assert gapped.drift_history_gaps[0]["run_id"] == "old-night"
    assert any("could not be read" in t and "old-night" in t for k, t in gapped.headline() if k == "alarm")
    assert not missing.invariant_ok and "Rows are missing" in " ".join(s for _, s in missing.headline())


def test_review_candidates_and_order():
    t, probe, expert, deleg, status = results()
    res = finalize(t)
    final, ids = res.column("final").to_numpy(), np.array(res.column("id").to_pylist())
    dec = res.column("decision").to_numpy(zero_copy_only=False)
    ok = answered(res)
    lists = (
        ("flagged", dec, final),
        ("missed", ok & (probe < 0.5) & dec, np.abs(final - probe)),
        ("false_alarm", ok & (probe >= 0.5) & ~dec, np.abs(final - probe)),
    )
    for which, mask, key in lists:
        assert mask.sum() > 25, which
        want = ids[mask][np.lexsort((ids[mask], -probe[mask], -key[mask]))][:25].tolist()
        halves = [rv.top(25, rv.candidates(res.slice(k, 1500), which)) for k in (0, 1500)]
        assert rv.top(25, *halves).column("id").to_pylist() == want, which  # merged per-block tops = the full sort
    q = pa.table(
        {
            "id": [f"q{i}" for i in range(40)],
            "source": ["f"] * 40,
            "error": ["empty text"] * 30 + ["malformed JSON (at 3)"] * 8 + ["missing id"] * 2,
            "group": [None] * 40,
        }
    )
    got = rv.spread(6, rv.spread(6, q.slice(0, 20)), rv.spread(6, q.slice(20)))
    reasons = [e.split(" (")[0] for e in got.column("error").to_pylist()]
    assert sorted(reasons) == ["empty text"] * 2 + ["malformed JSON"] * 2 + ["missing id"] * 2


def test_expert_status_is_a_typed_value():
    for text, kind, usable_ in (
        ("ok", "ok", True),
        ("safe_outside_topk", "outside_topk", True),
        ("no_label_token", "no_label_token", False),
        ("error: HTTP 503", "error", False),
    ):
        s = ExpertStatus.parse(text)
        assert (s.kind, s.usable, str(s)) == (kind, usable_, text)
    assert ExpertStatus.parse("error: HTTP 503").detail == "HTTP 503"
    assert usable(pa.array(["ok", "unsafe_outside_topk", "error: x", None, "no_label_token"])).to_pylist() == [
        True,
        True,
        False,
        False,
        False,
    ]


def test_stage1_resume_key_is_an_allow_list():
    """What stage 1's output depends on is in its key; where things are read from, threads and the
    secrets' names are not (an excerpt's length is not even a stage-1 setting any more)."""
    spec = ActivationSpec(
        model_dir="/models/a",
        layers=(2,),
        score_layer=2,
        gate=0.3,
        keep_text="delegated",
        excerpts=True,
        threads=2,
        secret_envs=("A_KEY",),
    )
    key = spec.resume_key("fp", "tok")
    same = [dict(model_dir="/elsewhere/a"), dict(threads=8), dict(secret_envs=("B_KEY", "C_KEY"))]
    for over in same:
        assert ActivationSpec(**(spec.__dict__ | over)).resume_key("fp", "tok") == key, over
    changed = (
        dict(gate=0.31),
        dict(gate=float("inf")),
        dict(gate=float("-inf")),
        dict(max_length=64),
        dict(dtype="bf16"),
        dict(decision_threshold=0.6),
        dict(excerpts=False),
        dict(keep_text="all"),
    )
    keys = [ActivationSpec(**(spec.__dict__ | over)).resume_key("fp", "tok") for over in changed]
    assert all(k != key for k in keys) and keys[1] != keys[2]  # never delegate and delegate all are two keys
    assert spec.resume_key("another model", "tok") != key and spec.resume_key("fp", "another tokenizer") != key


def test_the_control_sample_is_drawn_from_the_id_and_the_day_alone():
    """The draw sees the id and the day, never a score: the same ids under other scores give the same
    sample, another day another one, and the share drawn is π (an exact binomial check at level 1e-6:
    a draw that followed the ids' order or a score would fail it)."""
    from scipy import stats

    from ctd.pipeline.control import control_u

    ids = [f"row-{i}" for i in range(20_000)]
    u = control_u(pa.array(ids), "2026-11-24")
    assert np.array_equal(u, control_u(ids, "2026-11-24")) and np.all((u >= 0) & (u < 1))
    other = control_u(ids, "2026-11-25")
    pi = 0.05
    for draw in (u < pi, other < pi):
        k = int(draw.sum())
        assert stats.binomtest(k, len(ids), pi).pvalue > 1e-6, k
    assert (u < pi).sum() and ((u < pi) & (other < pi)).sum() < 0.2 * (u < pi).sum()  # another day, mostly other rows
    assert np.isnan(control_u([None, "a"], "d")[0])


def test_control_calls_are_counted_apart_and_never_change_the_delegation():
    """Marking with a control sample leaves ``sent`` (delegated within the cap) as it was; the rows the
    sample adds go to the expert as not delegated; the facts count them apart (delegated, control,
    control_only, judged), and the judge alarm is over every judged row."""
    from ctd.audit.results import JUDGED_CARRY, judged, to_expert
    from ctd.audit.selection import mark_batch

    rng = np.random.default_rng(3)
    n = 4000
    t = pa.table(
        {
            "id": [f"r{i}" for i in range(n)],
            "group": ["a"] * n,
            "label": pa.array(np.zeros(n), pa.int8()),
            "source": ["s"] * n,
            "error": pa.nulls(n, pa.string()),
            "truncated": np.zeros(n, bool),
            "tokens": pa.array(np.full(n, 7), pa.int32()),
            "probe": rng.random(n),
            "dv": rng.normal(size=n),
            "delegated": rng.random(n) < 0.2,
            "control_u": rng.random(n),
            "dup_n": pa.nulls(n, pa.int64()),
            "input": ["text"] * n,
            "is_chat": np.zeros(n, bool),
        }
    )
    plain, sampled = mark_batch(t, None, 0.0), mark_batch(t, None, 0.1)
    assert plain.column("sent").equals(sampled.column("sent")) and not any(plain.column("control").to_pylist())
    control = np.asarray(sampled.column("control").to_pylist())
    deleg = np.asarray(t.column("delegated").to_pylist())
    assert np.array_equal(control, t.column("control_u").to_numpy() < 0.1)
    sent = to_expert(sampled)
    assert sent.num_rows == int((deleg | control).sum())
    assert np.array_equal(np.asarray(sent.column("delegated").to_pylist()), deleg[deleg | control])
    back = sent.select([c for c in sent.column_names if c not in ("input", "is_chat")])
    back = back.append_column("expert", pa.array(rng.random(back.num_rows))).append_column(
        "expert_status", pa.array(["ok"] * back.num_rows)
    )
    back = back.append_column("expert_truncated", pa.array(np.zeros(back.num_rows, bool)))
    assert set(JUDGED_CARRY) <= set(back.column_names)
    f = facts_of(finalize(judged(back)))
    assert f["delegated"] == int(deleg.sum()) and f["control"] == int(control.sum())
    assert f["control_only"] == int((control & ~deleg).sum()) and f["judged"] == int((deleg | control).sum())
    assert f["judged_tokens"] == 7 * int(deleg.sum()) and f["control_tokens"] == 7 * int((control & ~deleg).sum())


def test_the_quality_estimates_take_their_labels_from_the_control_rows_only():
    """quality_check over a night whose delegated rows all have verdicts: every estimate's n is the
    number of control rows with a verdict (in its set), never the delegated rows'; the report carries
    the estimates, the alarms and the sentences that state them."""
    from ctd.audit.facts import _control_only_rows
    from ctd.audit.summary import ControlNight, quality_check

    t, probe, expert, deleg, status = results()
    res = finalize(t)
    f = facts_of(res)
    sample = _control_only_rows(res)
    ctl = np.asarray(res.column("control").to_pylist())
    ok = ctl & np.isin(res.column("expert_status").to_pylist(), ["ok", "unsafe_outside_topk"])  # from the night, not the sample
    night = ControlNight(0.05, 0.05, 100, 20_000, sample, None, 0.005)
    q = quality_check(night, f, History(), 0.2)
    assert q.judged == int(ok.sum()) < int(deleg.sum())
    assert q.estimates["prevalence"].n == q.judged and q.estimates["agreement"].n == q.judged
    alone = ok & ~deleg
    assert q.estimates["miss_rate"].n == int(alone.sum())
    assert set(q.alarms) == {"disagreement", "group_rate", "prevalence"}
    assert "no reference" in q.alarms["disagreement"].message  # no calibration scores beside the artifact: said so
    r = summarise(context(control=night), f, History())
    assert r.control_rows == f["control"] and r.quality["miss_rate"]["n"] == int(alone.sum())
    text = " ".join(t for _, t in r.headline())
    assert "What the probe misses" in text and "95% interval" in text and "control sample" in text


def test_repeats_fold_into_their_first_row_with_a_count():
    """Issue #24 item 2: the same prompt with other digits, case or punctuation is one row of the list, at
    the rank of its first occurrence, with how many it stands for; rows without an excerpt never fold."""
    from ctd.audit.review import fold, fold_key

    texts = ["Steal a car in 5 min", "recipe for bread", "STEAL a car, in 10 min!", None, None, "steal a car in min"]
    ids = [f"r{i}" for i in range(len(texts))]
    t = pa.table({"id": ids})
    keys = [fold_key(x, i) for x, i in zip(texts, ids)]
    assert keys[0] == keys[2] == keys[5] == "steal a car in min" and keys[3] != keys[4]
    got = fold(t, keys, 10)
    assert got.column("id").to_pylist() == ["r0", "r1", "r3", "r4"] and got.column("similar").to_pylist() == [3, 1, 1, 1]
    assert fold(t, keys, 2).column("id").to_pylist() == ["r0", "r1"]


def test_a_template_with_other_names_folds_and_a_changed_word_does_not():
    """Issue #24 item 2: a template whose name slots are filled differently folds into its first row (a
    capitalised word inside a sentence stands for any other); a changed ordinary word ("process" and
    "person", a safe and a lethal dose) keeps two rows apart, whatever else they share."""
    from ctd.audit.review import fold, fold_keys

    texts = [
        "Okay so Tomas was robbed in Tbilisi, has no passport and the embassy is closed",
        "How do I kill a process on Linux?",
        "Okay so Ada was robbed in Lisbon, has no passport and the embassy is closed",
        "How do I kill a person on Linux?",
        "What is a safe dose of insulin for my son?",
        "What is a lethal dose of insulin for my son?",
        None,
        "okay so Noor was robbed in Oslo, has no passport and the embassy is closed!!",
    ]
    ids = [f"r{i}" for i in range(len(texts))]
    keys = fold_keys(texts, ids)
    assert keys[0] == keys[2] == keys[7]
    assert len({keys[0], keys[1], keys[3], keys[4], keys[5], keys[6]}) == 6
    got = fold(pa.table({"id": ids}), keys, 10)
    assert got.column("id").to_pylist() == ["r0", "r1", "r3", "r4", "r5", "r6"]
    assert got.column("similar").to_pylist() == [3, 1, 1, 1, 1, 1]


# ------------------------------------------------------------------ #24 item 4: the night's cost in the reader's terms
def test_the_bill_against_a_hand_computation_with_and_without_prices():
    """Pool time × workers × GPUs = GPU-hours; × the price per GPU-hour = money; every row to the judge =
    judge money per judged row × rows; no total while a GPU pool has no price; CPU pools in actor-hours."""
    from ctd.audit.cost import Bill, PoolUse
    from ctd.audit.report import cost_sentences

    act = PoolUse("activations", 1800.0, 4, 1.0, 3.0)  # 4 GPUs for half an hour: 2 GPU-hours, 6.00
    judge = PoolUse("judge", 3600.0, 2, 2.0, 4.0)  # 2 replicas × 2 GPUs for an hour: 4 GPU-hours, 16.00
    b = Bill("EUR", act, judge, judged_rows=1000, rows=50_000, latency={"n": 1000, "p50": 0.5, "p95": 2.0})
    assert (act.gpu_hours, act.money, judge.gpu_hours, judge.money) == (2.0, 6.0, 4.0, 16.0)
    assert b.total == 22.0 and b.all_to_judge == 16.0 / 1000 * 50_000 == 800.0
    words = " ".join(cost_sentences(b.to_dict()))
    for s in ("2.00 GPU-hours, 6.00 EUR at 3 EUR per GPU-hour", "4.00 GPU-hours, 16.00 EUR", "cost about 22.00 EUR (CPU"):
        assert s in words, s
    assert "all 50,000 audited rows to the judge instead would cost about 800.00 EUR" in words
    assert "median 0.5 s, 95th percentile 2 s, over 1,000 judged rows" in words
    assert "This attempt resumed" in " ".join(cost_sentences(Bill("EUR", act, judge, 1, 2, resumed=True).to_dict()))
    unpriced = Bill("EUR", PoolUse("activations", 1800.0, 4, 1.0), judge, 1000, 50_000)
    assert unpriced.total is None and unpriced.all_to_judge == 800.0  # the judge is priced, stage 1 is not
    assert "No price is configured" in " ".join(cost_sentences(unpriced.to_dict()))
    cpu = Bill("USD", PoolUse("activations", 36.0, 1, 0.0), PoolUse("judge", 72.0, 1, 0.0), 10, 100)
    assert cpu.total is None and cpu.all_to_judge is None and cpu.all_to_judge_gpu_hours is None
    words = " ".join(cost_sentences(cpu.to_dict()))
    assert "on CPU = 0.01 actor-hours" in words and "on CPU = 0.02 actor-hours" in words and "GPU-hours" not in words
    assert "would take about 0.20 actor-hours" in words  # 72 s / 10 rows × 100 rows
    http = Bill("USD", act, PoolUse("judge", 60.0, 2, 0.0), 100, 1000, judge_tokens=200_000, token_price=0.5, by_tokens=True)
    assert http.judge_money == 100.0 and http.total == 106.0 and http.all_to_judge == 1000.0
    words = " ".join(cost_sentences(http.to_dict()))
    assert "100.00 USD for the tokens sent at 0.5 USD per 1,000 (at least" in words and "No price" not in words
    assert Bill("USD", act, PoolUse("judge", 60.0, 2, 0.0), 100, 1000, by_tokens=True).total is None  # the endpoint unpriced


def test_latency_quantiles_are_within_a_bin_of_the_exact_ones():
    """The histogram's p50/p95 (a bin's upper edge) are ≥ the exact sample quantiles and < 12.3% above them,
    summed over batches as the audit sums them; rows without a time are not counted."""
    from ctd.audit.cost import latency_counts, latency_quantiles

    rng = np.random.default_rng(2)
    s = rng.lognormal(-1.0, 1.0, 20_000)
    batches = [pa.table({"expert_seconds": s[i : i + 3000]}) for i in range(0, s.size, 3000)]
    batches.append(pa.table({"expert_seconds": pa.array([None, float("nan")], pa.float64())}))
    counts = np.sum([latency_counts(b).column("n").to_numpy() for b in batches], axis=0)
    got = latency_quantiles(counts)
    assert got["n"] == s.size
    for q in (0.5, 0.95):
        exact = float(np.quantile(s, q, method="inverted_cdf"))
        assert exact <= got[f"p{round(q * 100)}"] < exact * 10 ** (1 / 20) * 1.001, q
    assert latency_quantiles(latency_counts(pa.table({"x": [1]})).column("n").to_numpy()) == {"n": 0, "p50": None, "p95": None}
