"""The `ctd calibrate` CLI on good and bad files, and the evaluation routines."""

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ctd.cli import main
from ctd.evaluation.experiments import DEFAULT_BUDGETS, Scores, budget_sweep, topk_value_curve, validate_guarantee
from ctd.stats.calibrate import threshold_grid


def scores_table(n=600, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    d = np.clip(rng.normal(size=n) * 0.3, -1, 1)
    p = np.clip(0.5 + (2 * y - 1) * 0.1 + 0.2 * rng.normal(size=n), 0, 1)
    e = np.clip(0.5 + (2 * y - 1) * 0.3 * (d > 0) + 0.1 * rng.normal(size=n), 0, 1)
    return {"id": [f"r{i}" for i in range(n)], "label": y, "probe": p, "expert": e, "dv": d, "group": rng.choice(["a", "b"], n)}


def test_calibrate_cli_writes_artifact_report_and_plots(tmp_path, capsys):
    src = tmp_path / "scores.parquet"
    pq.write_table(pa.table(scores_table()), src)
    out = tmp_path / "out"
    assert main(["calibrate", "--scores", str(src), "--alpha", "0.2", "--delta", "0.1", "--out", str(out)]) == 0
    body = json.load(open(out / "calibration.json"))
    c = body["calibration"]
    assert c["alpha"] == 0.2 and c["pareto"] and c["delegates"] and len(c["grid"]) == len(c["pvalues"]) == 1001
    assert {"calibration_report.html", "calibration_report.json", "calibration.png"} <= set(os.listdir(out))
    assert "Certified" in capsys.readouterr().out
    from ctd.calibration.artifact import load_calibration

    art = load_calibration(str(out))
    assert art.threshold == c["lambda_hat"]
    # plain budget-only LTT from JSON lines gives the closed-form answer
    jl = tmp_path / "scores.jsonl"
    t = scores_table()
    with open(jl, "w") as f:
        for i in range(len(t["id"])):
            f.write(json.dumps({k: (v[i].item() if hasattr(v[i], "item") else v[i]) for k, v in t.items()}) + "\n")
    assert (
        main(["calibrate", "--scores", str(jl), "--alpha", "0.2", "--delta", "0.1", "--no-pareto", "--out", str(tmp_path / "o2")])
        == 0
    )
    c2 = json.load(open(tmp_path / "o2" / "calibration.json"))["calibration"]
    assert not c2["pareto"] and c2["method"] == "fixed_sequence"


def test_tampered_calibration_artifact_is_refused(tmp_path):
    from ctd.calibration.artifact import load_calibration
    from ctd.model.artifacts import ArtifactError

    src = tmp_path / "s.parquet"
    pq.write_table(pa.table(scores_table()), src)
    main(["calibrate", "--scores", str(src), "--alpha", "0.2", "--delta", "0.1", "--out", str(tmp_path / "c")])
    p = tmp_path / "c" / "calibration.json"
    body = json.load(open(p))
    body["calibration"]["lambda_hat"] = -1.0  # someone loosens the threshold by hand
    json.dump(body, open(p, "w"))
    with pytest.raises(ArtifactError, match="integrity"):
        load_calibration(str(p))


BAD = [
    ({"drop": "dv"}, "missing column"),
    ({"set": ("probe", 0, np.nan)}, "NaN"),
    ({"set": ("label", 0, 2)}, "0/1"),
    ({"set": ("probe", 0, 1.5)}, r"\[0, 1\]"),
    ({"set": ("id", 1, "r0")}, "duplicate"),
]


@pytest.mark.parametrize("change,message", BAD)
def test_bad_scores_files_give_one_error_line_and_exit_2(tmp_path, change, message):
    import re

    t = scores_table(50)
    t = {k: list(v) for k, v in t.items()}
    if "drop" in change:
        t.pop(change["drop"])
    else:
        col, i, val = change["set"]
        t[col][i] = val
    src = tmp_path / "bad.parquet"
    pq.write_table(pa.table(t), src)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "ctd.cli",
            "calibrate",
            "--scores",
            str(src),
            "--alpha",
            "0.2",
            "--delta",
            "0.1",
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2
    lines = [x for x in r.stderr.strip().splitlines() if x]
    assert len(lines) == 1 and lines[0].startswith("error:") and re.search(message, lines[0]), r.stderr
    assert not (tmp_path / "o").exists()  # nothing written


@pytest.mark.parametrize(
    "args,message",
    [
        (["--alpha", "1.5", "--delta", "0.1"], "alpha must lie"),
        (["--alpha", "0.2", "--delta", "0"], "delta must lie"),
        (["--alpha", "x", "--delta", "0.1"], "alpha must be a number"),
    ],
)
def test_bad_levels_exit_2(tmp_path, args, message):
    src = tmp_path / "s.parquet"
    pq.write_table(pa.table(scores_table(20)), src)
    r = subprocess.run(
        [sys.executable, "-m", "ctd.cli", "calibrate", "--scores", str(src), *args, "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_malformed_files_exit_2(tmp_path):
    for name, data in (("a.jsonl", b'{"id": 1,\n'), ("b.parquet", b"PAR1garbage"), ("c.jsonl", b"\xff\xfe")):
        (tmp_path / name).write_bytes(data)
        assert (
            main(
                ["calibrate", "--scores", str(tmp_path / name), "--alpha", "0.2", "--delta", "0.1", "--out", str(tmp_path / "o")]
            )
            == 2
        )
    assert (
        main(
            [
                "calibrate",
                "--scores",
                str(tmp_path / "nope.parquet"),
                "--alpha",
                "0.2",
                "--delta",
                "0.1",
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )


def test_validation_bootstrap_within_delta_and_split_halves_reported():
    rng = np.random.default_rng(3)
    d = rng.normal(size=1600)
    grid = threshold_grid(reference=rng.normal(size=4000), size=501)
    boot = validate_guarantee(d, DEFAULT_BUDGETS, 0.1, grid, n_cal=800, draws=500)
    assert len(boot["violation_rate"]) == 20 and boot["draws"] == 500
    assert max(boot["ci_low"]) <= 0.1  # not significantly above δ at any budget
    halves = validate_guarantee(d, DEFAULT_BUDGETS, 0.1, grid, n_cal=800, draws=500, scheme="split_halves")
    assert halves["mean_violation_rate"] > boot["mean_violation_rate"]  # the design note's pitfall


def test_budget_sweep_and_topk_curve_shapes():
    t = scores_table(400)
    y, p, e, d = (np.asarray(t[k]) for k in ("label", "probe", "expert", "dv"))
    from ctd.stats.signals import uncertainty_signal

    s = Scores(y, p, e, d, uncertainty_signal(p, p), np.asarray(t["group"]))
    sw = budget_sweep(
        s,
        budgets=[0.1, 0.2],
        dv_grid=threshold_grid(size=201),
        unc_grid=threshold_grid(size=101, low=-0.5, high=0),
        splits=2,
        group_budget=0.2,
    )
    assert set(sw["methods"]) == {
        "ctd_pareto",
        "ctd_ltt",
        "uncertainty_pareto",
        "uncertainty_ltt",
        "topk_uncertainty",
        "topk_dv",
        "topk_oracle",
        "probe_only",
        "expert_only",
    }
    assert sw["methods"]["expert_only"]["rate"]["mean"] == [1.0, 1.0]
    assert [r["group"] for r in sw["group_table"]["rows"]] == ["all", "a", "b"]
    curve = topk_value_curve(s.v, {"oracle": s.v, "dv": d}, fractions=[0.1, 0.5, 1.0])
    assert curve["curves"]["oracle"][0] >= curve["curves"]["oracle"][-1]


# ------------------------------------------------------------------ ctd plan (issue #24 item 5, #26 item 4)
def test_plan_against_a_hand_computation_both_ways_and_its_refusal(tmp_path, capsys):
    """10^7 rows at the calibrated α 0.2, δ 0.1; 25 rows/s per replica of 2 GPUs, a 2 h window, $3 per GPU-hour.
    Forward: q = the 95% binomial quantile of Binom(10^7, 0.2) = 2,000,000 + ⌈1.645·√(1.6·10^6)⌉ (± 1) calls;
    replicas ⌈q / (25·7200)⌉ = 12; GPU-hours q/25/3600·2 ≈ 44.5, $133.4; every row: 222.2 GPU-hours. A quota of 8
    refuses it (exit 1, 4 short: the judge stage takes q/(8·25)/3600 ≈ 2.8 h, not 2 h, said in words).
    Inverse: 8 replicas judge 8·25·7200 = 1,440,000
    calls, so the largest α is the one whose 95% quantile is 1,440,000: α ≈ (1,440,000 − 1.645·√(α(1−α)·10^7))/10^7."""
    from scipy import stats

    src = tmp_path / "scores.parquet"
    pq.write_table(pa.table(scores_table()), src)
    assert main(["calibrate", "--scores", str(src), "--alpha", "0.2", "--delta", "0.1", "--out", str(tmp_path / "c")]) == 0
    capsys.readouterr()
    base = ["plan", "--calibration", str(tmp_path / "c"), "--rows", "10000000", "--rows-per-second", "25"]
    base += ["--gpus-per-replica", "2", "--window", "2h", "--gpu-hour-price", "3", "--control-share", "0", "--json"]
    assert main(base) == 0
    got = json.loads(capsys.readouterr().out)
    q = int(stats.binom.ppf(0.95, 10**7, 0.2))
    assert abs(q - (2_000_000 + 1.645 * np.sqrt(1.6e6))) < 3
    plan = got["plan"]
    assert plan["delegated_bound"] == plan["calls"] == q and plan["replicas"] == int(np.ceil(q / (25 * 7200))) == 12
    assert plan["gpu_hours"] == pytest.approx(q / 25 / 3600 * 2) and plan["cost"] == pytest.approx(3 * q / 25 / 3600 * 2)
    assert plan["all_judge_gpu_hours"] == pytest.approx(1e7 / 25 / 3600 * 2) and plan["fits"] and got["largest_alpha"] is None

    assert main(base + ["--quota", "8"]) == 1  # refused
    got = json.loads(capsys.readouterr().out)
    assert not got["plan"]["fits"] and got["plan"]["short_by"] == 4
    assert got["plan"]["hours"] == pytest.approx(q / (8 * 25) / 3600)
    inv = got["largest_alpha"]
    budget = 8 * 25 * 7200
    assert stats.binom.ppf(0.95, 10**7, inv["alpha"]) <= budget < stats.binom.ppf(0.95, 10**7, inv["alpha"] + 1e-5)
    assert inv["alpha"] == pytest.approx((budget - 1.645 * np.sqrt(0.144 * 0.856 * 1e7)) / 1e7, abs=1e-4)
    assert inv["recertified"] and inv["lambda_star"] is not None and inv["performance"] is not None

    # a budget in money: $60 buys 20 GPU-hours = 10 replica-hours = 900,000 calls
    assert main(base + ["--budget-money", "60"]) == 0
    inv = json.loads(capsys.readouterr().out)["largest_alpha"]
    assert stats.binom.ppf(0.95, 10**7, inv["alpha"]) <= 900_000 < stats.binom.ppf(0.95, 10**7, inv["alpha"] + 1e-5)
    assert inv["cost"] <= 60 + 1e-9

    text = base[:-1] + ["--quota", "8"]
    assert main(text) == 1
    out = capsys.readouterr().out
    assert "REFUSED: the quota is 8 replicas, 4 short of the 12 needed" in out and "largest α is 0.14" in out
    assert "only audit.budget_cap bounds a night outright" in out
    assert "the judge stage would take 2.8 h instead of 2 h" in out

    # the control sample as the audit draws it: the share, raised to the floor, lowered to the ceiling (expected rows)
    from ctd.calibration.plan import Pool, control_calls, plan_night

    assert control_calls(10**7, 0.01, 400, 20_000) == 20_000  # the ceiling, not 100,000
    assert control_calls(20_000, 0.01, 400, 20_000) == 400  # the floor, not 200
    assert control_calls(100_000, 0.01, 400, 20_000) == 1_000 and control_calls(10**7, 0.0, 400, 20_000) == 0
    pool = Pool(rows_per_second=25, gpus_per_replica=2, window_s=7200)
    p = plan_night(10**7, 0.2, 0.1, pool, control_share=0.01, control_floor=400, control_ceiling=20_000)
    assert p.control_calls == 20_000 and p.calls == q + 20_000
    with_config = base[:-1] + ["--control-share", "0.01"]  # no config: the share alone, no floor or ceiling
    assert main(with_config) == 0 and "about 100,000 control rows" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:  # bad usage
        main(["plan", "--rows", "0", "--calibration", str(tmp_path / "c")])
    assert e.value.code == 2
    assert main(["plan", "--rows", "10", "--calibration", str(tmp_path / "c")]) == 2  # no throughput: said, exit 2
    assert "needs --rows-per-second" in capsys.readouterr().err
