"""Online monitoring: CRC and UCB thresholds against closed forms and by simulation; streaming
monitors against the vectorised evaluation; bad step logs."""

import numpy as np
import pytest

from ctd.monitor.rules import (
    DensityRatio,
    EProcessMonitor,
    ThresholdMonitor,
    TrajectoryError,
    evaluate_eprocess,
    evaluate_threshold,
    paired_positions,
    validate_steps,
)
from ctd.stats.calibrate import threshold_grid
from ctd.stats.pvalues import binomial_upper_pvalue, max_certifiable_count, simulation_draws
from ctd.stats.risk_control import alarm_counts, control_threshold


def test_crc_and_ucb_match_closed_forms():
    rng = np.random.default_rng(0)
    for _ in range(300):
        n = int(rng.integers(1, 60))
        m = rng.choice(np.round(rng.uniform(0, 1, 8), 2), n)  # ties, and values on the grid
        grid = np.unique(np.round(rng.uniform(0, 1, int(rng.integers(2, 15))), 2))
        eps, dlt = float(rng.choice([0.05, 0.1, 0.3])), 0.1
        # false alarm: smallest λ with (n/(n+1)) R̂ + 1/(n+1) <= ε (monotone: the set is an upper ray)
        ok = [lam for lam in grid if all((np.sum(m > l2) + 1) / (n + 1) <= eps for l2 in grid if l2 >= lam)]
        assert control_threshold(m, grid, "false-alarm", "crc", eps) == (min(ok) if ok else np.inf)
        k = max_certifiable_count(n, eps, dlt)
        ok = [lam for lam in grid if k >= 0 and np.sum(m > lam) <= k]
        assert control_threshold(m, grid, "false-alarm", "ucb", eps, dlt) == (min(ok) if ok else np.inf)
        # missed detection: largest λ with the bound on #{M <= λ}
        ok = [lam for lam in grid if all((np.sum(m <= l2) + 1) / (n + 1) <= eps for l2 in grid if l2 <= lam)]
        assert control_threshold(m, grid, "missed-detection", "crc", eps) == (max(ok) if ok else -np.inf)
        ok = [lam for lam in grid if k >= 0 and np.sum(m <= lam) <= k]
        assert control_threshold(m, grid, "missed-detection", "ucb", eps, dlt) == (max(ok) if ok else -np.inf)
    assert alarm_counts([0.2, 0.5, 0.5], [0.5], "false-alarm").tolist() == [0]  # strict: r > λ alarms
    assert alarm_counts([0.2, 0.5, 0.5], [0.5], "missed-detection").tolist() == [3]


@pytest.mark.parametrize("risk", ["false-alarm", "missed-detection"])
def test_guarantees_by_simulation(risk):
    """M ~ Uniform(0, 1): R_I(λ) = 1 - λ, R_II(λ) = λ exactly, over simulation_draws(δ) = 2,150 calibration sets.
    UCB: P(R(λ̂) > ε) <= δ, the exact one-sided binomial test at 1% (power 0.9 against a rate of 1.25 δ).
    CRC: E[R(λ̂)] <= ε, a one-sided z-test at 1% of the mean realised risk; its SE here is about 0.0005, so
    a true mean of 1.25 ε fails with probability ≈ 1."""
    rng = np.random.default_rng(1)
    eps, dlt, n = 0.1, 0.1, 150
    draws = simulation_draws(dlt)
    grid = threshold_grid(size=501, low=0.0, high=1.0)
    true = (lambda lam: 1 - np.clip(lam, 0, 1)) if risk == "false-alarm" else (lambda lam: np.clip(lam, 0, 1))
    m = rng.uniform(size=(draws, n))
    crc = true(control_threshold(m, grid, risk, "crc", eps))
    ucb = true(control_threshold(m, grid, risk, "ucb", eps, dlt))
    se = crc.std(ddof=1) / np.sqrt(draws)
    assert crc.mean() <= eps + 2.33 * se and 1.25 * eps > eps + 2.33 * se + 5 * se
    assert crc.mean() > eps - 0.02  # and not vacuous
    assert float(binomial_upper_pvalue(int((ucb > eps).sum()), draws, dlt)) > 0.01
    assert (crc > eps).mean() > dlt  # CRC controls the mean, not the tail: the two controls differ


def traj_fixture():
    ids = ["a"] * 3 + ["b"] * 2 + ["c"] * 4
    steps = [1, 2, 3, 1, 2, 1, 2, 3, 4]
    scores = [0.9, 0.4, 0.8, 0.95, 0.9, 0.7, 0.6, 0.2, 0.1]
    labels = [1, 1, 1, 1, 1, 0, 0, 0, 0]
    tokens = [10, 5, 5, 3, 3, 4, 4, 4, 4]
    return validate_steps(ids, steps, scores, labels, tokens)


def test_alarm_positions_are_compared_on_the_trajectories_both_monitors_detect():
    """Issue #24 item 1: "alarms earlier" compared on the same trajectories. Incorrect trajectories c (4
    steps), d (2), e (5): monitor A detects c at step 2 and d at step 2; B detects c at step 3 and e at
    step 1. Only c is shared: A at 2/4, B at 3/4. (Means over each one's own detections would say A at
    (0.5 + 1.0)/2 = 0.75, B at (0.75 + 0.2)/2 = 0.475: B "earlier", the wrong way round.)"""
    t = validate_steps(["c"] * 4 + ["d"] * 2 + ["e"] * 5, [1, 2, 3, 4, 1, 2, 1, 2, 3, 4, 5], [0.5] * 11, [0] * 11)
    alarm = lambda found: (  # noqa: E731
        np.array([k in found for k in t.ids]),
        np.array([found.get(k, 0) - 1 for k in t.ids]),
    )
    a, b = alarm({"c": 2, "d": 2}), alarm({"c": 3, "e": 1})
    got = paired_positions(t, a, b)
    assert got == {"n": 1, "a_no_later_share": 1.0, "mean_difference": pytest.approx(0.5 - 0.75)}
    assert paired_positions(t, a, alarm({"e": 1}))["n"] == 0


def test_holm_adjusts_the_family_of_guarantee_checks():
    import importlib.util
    import os

    spec = importlib.util.spec_from_file_location(
        "monitor_bench", os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks", "monitor.py")
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    p = np.array([0.01, 0.04, 0.03, 0.5])
    assert bench.holm(p) == pytest.approx([0.04, 0.09, 0.09, 0.5])  # 4·0.01, max(3·0.03, 0.04), 2·0.04 → 0.09, 0.5
    assert (bench.holm(np.array([0.004] * 3)) <= 0.012 + 1e-12).all()


def test_streaming_monitors_agree_with_vectorised_evaluation():
    t = traj_fixture()
    for lam in (0.3, 0.5, 0.75):
        mon = ThresholdMonitor(lam)
        alarms = {
            tr: s
            for tr, s, sc in (
                (t.ids[i], int(t.steps[j]), float(t.scores[j]))
                for i in range(len(t))
                for j in range(t.offsets[i], t.offsets[i + 1])
            )
            if mon.observe(tr, s, sc)
        }
        alarmed, first = t.first_alarm(lam)
        assert {t.ids[i]: int(t.steps[t.offsets[i] + first[i]]) for i in range(len(t)) if alarmed[i]} == alarms
    m = evaluate_threshold(t, 0.5)
    assert m["false_alarm_rate"] == 0.5 and m["power"] == 1.0 and m["delay_steps"] == 3 and m["delay_tokens"] == 12
    ratio = DensityRatio([0.2, 0.1, 0.6], [0.9, 0.95, 0.8, 0.9], bins=5)
    mon = EProcessMonitor(ratio, 0.2)
    got = [tr for tr, s, sc in [("c", 1, 0.7), ("c", 2, 0.6), ("c", 3, 0.2), ("c", 4, 0.1)] if mon.observe(tr, s, sc)]
    ev = evaluate_eprocess(t, ratio, 0.2)
    assert (got == ["c"]) == (ev["power"] == 1.0)


@pytest.mark.parametrize(
    "change,reason",
    [
        ({"steps": [1, 3, 2, 1, 2, 1, 2, 3, 4]}, "steps out of order"),
        ({"steps": [1, 2, 2, 1, 2, 1, 2, 3, 4]}, "duplicated step"),
        ({"scores": [0.9, 1.4, 0.8, 0.95, 0.9, 0.7, 0.6, 0.2, 0.1]}, "outside"),
        ({"labels": [1, 0, 1, 1, 1, 0, 0, 0, 0]}, "mixed final labels"),
    ],
)
def test_bad_step_logs_error_or_quarantine(change, reason):
    base = dict(
        ids=["a"] * 3 + ["b"] * 2 + ["c"] * 4,
        steps=[1, 2, 3, 1, 2, 1, 2, 3, 4],
        scores=[0.9, 0.4, 0.8, 0.95, 0.9, 0.7, 0.6, 0.2, 0.1],
        labels=[1, 1, 1, 1, 1, 0, 0, 0, 0],
    )
    base.update(change)
    with pytest.raises(TrajectoryError, match=reason):
        validate_steps(base["ids"], base["steps"], base["scores"], base["labels"])
    t, bad = validate_steps(base["ids"], base["steps"], base["scores"], base["labels"], quarantine=True)
    assert bad == [("a", reason)] or (bad[0][0] == "a" and reason in bad[0][1])
    assert sorted(t.ids.tolist()) == ["b", "c"]
    mon = ThresholdMonitor(0.5)
    mon.observe("x", 2, 0.9)
    with pytest.raises(TrajectoryError, match="out of order"):
        mon.observe("x", 1, 0.9)
    with pytest.raises(TrajectoryError, match="duplicated"):
        mon.observe("x", 2, 0.9)
    with pytest.raises(TrajectoryError, match="outside"):
        mon.observe("y", 1, -0.1)


def test_monitor_calibrate_cli_on_real_trajectories(data_dir, tmp_path):
    import json
    import os

    from ctd.cli import main

    src = os.path.join(data_dir, "verifier-trajectories", "math.csv.gz")
    for risk, control in (("false-alarm", "crc"), ("missed-detection", "ucb")):
        out = tmp_path / f"{risk}-{control}"
        assert (
            main(
                [
                    "monitor",
                    "calibrate",
                    "--trajectories",
                    src,
                    "--risk",
                    risk,
                    "--control",
                    control,
                    "--epsilon",
                    "0.1",
                    "--out",
                    str(out),
                ]
            )
            == 0
        )
        body = json.load(open(out / "monitor.json"))
        assert body["risk"] == risk and body["n_relevant"] > 1000 and body["empirical_risk_at_lambda"] <= 0.1
    bad = tmp_path / "bad.csv"
    bad.write_text("uq_problem_idx,num_steps,judge_probability,solved\na,1,0.5,1\na,1,0.6,1\n")
    assert (
        main(
            [
                "monitor",
                "calibrate",
                "--trajectories",
                str(bad),
                "--risk",
                "false-alarm",
                "--control",
                "crc",
                "--epsilon",
                "0.1",
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )


@pytest.mark.slow
def test_monitor_job_on_s3_with_bad_trajectories(ray_head, s3, data_dir, tmp_path):
    """Step logs in S3 → the Ray monitor job → alarms, quarantine, report and manifest in S3."""
    import gzip
    import io
    import os
    import subprocess
    import sys

    import pyarrow.csv as pcsv

    from ctd import storage
    from ctd.cli import main
    from ctd.config import MonitorConfig, load_config
    from ctd.monitor.job import run_monitor
    from ctd.monitor.rules import read_step_table
    from ctd.runs.folder import read_manifest, read_run_table

    src = read_step_table(os.path.join(data_dir, "verifier-trajectories", "math.csv.gz"))
    first = src.slice(0, 2400)
    keep = [c for c in ("uq_problem_idx", "num_steps", "judge_probability", "solved", "generated_tokens")]
    buf = io.BytesIO()
    pcsv.write_csv(first.select(keep), buf)
    bad = (
        "zz_order,2,0.5,1,3\nzz_order,1,0.5,1,3\nzz_dup,1,0.5,0,3\nzz_dup,1,0.4,0,3\n"
        "zz_mixed,1,0.5,1,3\nzz_mixed,2,0.5,0,3\nzz_score,1,1.7,0,3\n"
    )
    root = f"s3://{s3['bucket']}/monitor"
    storage.write_bytes(f"{root}/steps/2026-11-24/part-0.csv.gz", gzip.compress(buf.getvalue() + bad.encode()))
    storage.write_bytes(f"{root}/heldout.csv", open(os.path.join(data_dir, "verifier-trajectories", "math.csv.gz"), "rb").read())
    assert (
        main(
            [
                "monitor",
                "calibrate",
                "--trajectories",
                f"{root}/heldout.csv",
                "--risk",
                "false-alarm",
                "--control",
                "ucb",
                "--epsilon",
                "0.1",
                "--out",
                f"{root}/calibration",
            ]
        )
        == 0
    )
    cfg_path = tmp_path / "monitor.yaml"
    # the monitored day is a parameter: {date} in the input and the run id, so a retry reads the same day
    cfg_path.write_text(
        f"monitor:\n  input: {root}/steps/{{date}}/\n  calibration: {root}/calibration\n  output: {root}\n  run_id: m1-{{date}}\n"
    )
    cfg = load_config(str(cfg_path), model=MonitorConfig)
    summary = run_monitor(cfg, date="2026-11-24")
    assert summary["run_id"] == "m1-2026-11-24" and summary["monitored_date"] == "2026-11-24"
    assert read_manifest(root, "m1-2026-11-24")["summary"]["monitored_date"] == "2026-11-24"
    n_traj = len(set(first.column("uq_problem_idx").to_pylist()))
    assert summary["trajectories"] == n_traj + 4 and summary["trajectories_quarantined"] == 4
    assert set(summary["quarantine_reasons"]) == {
        "steps out of order",
        "duplicated step",
        "mixed final labels",
        "score outside [0, 1]",
    }
    alarms = read_run_table(root, "m1-2026-11-24")
    assert set(alarms.column_names) >= {"trajectory", "step", "score"} and alarms.num_rows == summary["alarms"] > 0
    # every alarm is the first step whose alarm score exceeds λ
    lam = storage.read_json(f"{root}/calibration/monitor.json")["lambda_hat"]
    assert all(1 - s > lam for s in alarms.column("score").to_pylist())
    assert read_manifest(root, "m1-2026-11-24")["rows"] == {"results": alarms.num_rows, "quarantine": 4}
    # the quality figures (distributed aggregates) against the source labels, trajectory by trajectory
    label = dict(zip(first.column("uq_problem_idx").to_pylist(), first.column("solved").to_pylist()))
    label = {str(k): int(v) for k, v in label.items()}
    fired = dict(zip(alarms.column("trajectory").to_pylist(), alarms.column("steps_seen").to_pylist()))
    correct, wrong = [t for t, y in label.items() if y == 1], [t for t, y in label.items() if y == 0]
    q = summary["quality_with_labels"]
    assert q["false_alarm_rate"] == pytest.approx(sum(t in fired for t in correct) / len(correct))
    assert q["power"] == pytest.approx(sum(t in fired for t in wrong) / len(wrong)) and q["power"] > 0
    assert q["mean_steps_seen_at_alarm_incorrect"] == pytest.approx(np.mean([fired[t] for t in wrong if t in fired]))
    # a tampered calibration is refused by the job entrypoint: one line, exit 2
    body = storage.read_json(f"{root}/calibration/monitor.json")
    body["lambda_hat"] = 0.99
    storage.write_json(f"{root}/tampered/monitor.json", body)
    r = subprocess.run(
        [sys.executable, "-m", "jobs.monitor", "--config", str(cfg_path), "--set", f"monitor.calibration={root}/tampered"],
        capture_output=True,
        text=True,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert r.returncode == 2 and "integrity" in r.stderr
