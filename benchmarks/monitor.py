"""Online monitoring on step-wise verifier scores: calibrated thresholds (CRC, UCB) against a
sequential test (e-process), on the e-valuator trajectories (math, gsm8k, mmlupro).

    .venv/bin/python benchmarks/monitor.py            # writes benchmarks/results/monitor.{json,html} + plots

Per dataset: 30% of the trajectories (seeded) fit the e-process's step-score densities; the other
70% are the population. For each ε, risk (false alarm, missed detection) and control (CRC, UCB),
``--draws`` calibration sets of the relevant trajectories (half the population's count) are drawn
with replacement; λ̂ is evaluated exactly over the population: the realised risk, the power (share of
incorrect trajectories flagged), the false-alarm rate and the detection delay (steps, and tokens where
the data has them). CRC must keep the mean realised risk <= ε (one-sided z-test at 1%); UCB the violation
frequency <= δ (exact one-sided binomial test at 1%; the default ``--draws`` is ``simulation_draws(δ)``,
with which a true violation rate of 1.25 δ fails the check with probability >= 0.9).
The e-process (alarm when prod f_1/f_0 >= 1/ε) needs no calibration; its false-alarm rate is measured.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ctd.evaluation.datasets import default_data_dir  # noqa: E402
from ctd.monitor.rules import (  # noqa: E402
    DensityRatio,
    eprocess_alarms,
    evaluate_eprocess,
    evaluate_threshold,
    paired_positions,
    read_trajectories,
)
from ctd.reporting.pages import html_page, html_table, write_report  # noqa: E402
from ctd.stats.calibrate import threshold_grid  # noqa: E402
from ctd.stats.pvalues import binomial_upper_pvalue, clopper_pearson, simulation_draws  # noqa: E402
from ctd.stats.risk_control import alarm_counts, control_threshold  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
EPSILONS = [0.05, 0.1, 0.15, 0.2, 0.3]


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run_dataset(name: str, args) -> dict:
    path = os.path.join(args.data_dir, "verifier-trajectories", f"{name}.csv.gz")
    t0 = time.perf_counter()
    t = read_trajectories(path, label="solved")
    rng = np.random.default_rng(args.seed)
    perm = rng.permutation(len(t))
    n_dens = int(0.3 * len(t))
    dens, pop = t.subset(perm[:n_dens]), t.subset(perm[n_dens:])
    seg = np.repeat(np.arange(len(dens)), dens.lengths)
    ratio = DensityRatio(dens.scores[dens.label[seg] == 0], dens.scores[dens.label[seg] == 1])
    grid = threshold_grid(size=1001, low=0.0, high=1.0)
    maxima = pop.maxima()
    log(
        f"{name}: {len(t)} trajectories ({int(t.label.mean() * 100)}% correct), {t.steps.size} steps; "
        f"population {len(pop)}, density split {len(dens)}"
    )
    out = {
        "dataset": name,
        "trajectories": len(t),
        "steps": int(t.steps.size),
        "share_correct": float(t.label.mean()),
        "population": len(pop),
        "density_split": len(dens),
        "has_tokens": t.tokens is not None,
        "results": [],
    }
    lams = np.unique(np.quantile(maxima, np.linspace(0, 1, 400)))  # the threshold monitor's whole trade-off curve
    curve = [evaluate_threshold(pop, lam) for lam in lams]
    cache = {}

    def metrics_at(lam):
        key = float(lam)
        if key not in cache:
            cache[key] = evaluate_threshold(pop, lam)
        return cache[key]

    for eps in EPSILONS:
        for risk in ("false-alarm", "missed-detection"):
            kind = pop.label == (1 if risk == "false-alarm" else 0)
            m_rel = maxima[kind]
            n_cal = max(1, int(round(kind.sum() / 2)))
            draws = m_rel[rng.integers(0, m_rel.size, size=(args.draws, n_cal))]
            true_risk_grid = alarm_counts(m_rel, grid, risk) / m_rel.size  # exact over the population
            for control in ("crc", "ucb"):
                lam = control_threshold(draws, grid, risk, control, eps, args.delta)
                gi = np.clip(np.searchsorted(grid, lam), 0, grid.size - 1)
                realised = np.where(np.isfinite(lam), true_risk_grid[gi], 0.0)
                viol = int((realised > eps).sum())
                lo, hi = clopper_pearson(np.array([viol]), args.draws, 0.95)
                ms = [metrics_at(x) for x in lam]
                agg = {k: float(np.nanmean([m[k] for m in ms])) for k in ms[0]}
                out["results"].append(
                    {
                        "epsilon": eps,
                        "risk": risk,
                        "control": control,
                        "n_cal": n_cal,
                        "draws": args.draws,
                        "mean_realised_risk": float(realised.mean()),
                        "realised_risk_se": float(realised.std(ddof=1) / np.sqrt(args.draws)),
                        "violation_frequency": viol / args.draws,
                        "violation_test_pvalue": float(binomial_upper_pvalue(viol, args.draws, args.delta)),
                        "violation_ci": [float(lo[0]), float(hi[0])],
                        "lambda_median": float(np.median(lam)),
                        **agg,
                    }
                )
        ev = evaluate_eprocess(pop, ratio, eps)
        # the threshold monitor at the same realised false-alarm rate as the e-process (its ROC point)
        fa = np.array([curve[k]["false_alarm_rate"] for k in range(len(lams))])
        k = int(np.argmin(np.abs(fa - ev["false_alarm_rate"])))
        # alarm positions compared on the same trajectories (the incorrect ones both detect), not as means over
        # the different sets each detects: CRC at its median λ̂ of false-alarm control, and at the matched point
        e_alarms = eprocess_alarms(pop, ratio, eps)
        crc = next(r for r in out["results"] if (r["epsilon"], r["risk"], r["control"]) == (eps, "false-alarm", "crc"))
        paired = {
            "crc_median_lambda": paired_positions(pop, pop.first_alarm(crc["lambda_median"]), e_alarms),
            "matched_false_alarms": paired_positions(pop, pop.first_alarm(float(lams[k])), e_alarms),
        }
        out["results"].append(
            {
                "epsilon": eps,
                "risk": "false-alarm",
                "control": "eprocess",
                **ev,
                "mean_realised_risk": ev["false_alarm_rate"],
                "violation_frequency": None,
                "threshold_at_matched_false_alarms": {"lambda": float(lams[k]), **curve[k]},
                "paired_positions": paired,
            }
        )
    out["seconds"] = round(time.perf_counter() - t0, 1)
    log(f"{name}: done in {out['seconds']} s")
    return out


def holm(p: np.ndarray) -> np.ndarray:
    """Holm's step-down adjusted p-values (family-wise error control over all the checks)."""
    order = np.argsort(p)
    m = p.size
    adj = np.maximum.accumulate((m - np.arange(m)) * p[order])
    out = np.empty(m)
    out[order] = np.minimum(adj, 1.0)
    return out


def claims(results: list[dict], delta: float) -> dict:
    """CRC mean risk <= ε; UCB violations <= δ; calibrated thresholds vs the e-process at the same ε
    of false-alarm control: power and detection delay."""
    from scipy.stats import norm

    rows, checks = [], []  # checks: (name, p-value) of every guarantee check, for one multiplicity correction
    for ds in results:
        by = {(r["epsilon"], r["risk"], r["control"]): r for r in ds["results"]}
        for eps in EPSILONS:
            for risk in ("false-alarm", "missed-detection"):
                c, u = by[(eps, risk, "crc")], by[(eps, risk, "ucb")]
                z = (c["mean_realised_risk"] - eps) / max(c["realised_risk_se"], 1e-12)
                where = f"{ds['dataset']} {risk} ε={eps}"
                checks.append((f"crc {where}", float(norm.sf(z))))  # one-sided z-test of the mean realised risk
                checks.append((f"ucb {where}", u["violation_test_pvalue"]))  # exact one-sided binomial test
            e, c, u = by[(eps, "false-alarm", "eprocess")], by[(eps, "false-alarm", "crc")], by[(eps, "false-alarm", "ucb")]
            rows.append(
                {
                    "dataset": ds["dataset"],
                    "epsilon": eps,
                    "power_crc": c["power"],
                    "power_ucb": u["power"],
                    "power_eprocess": e["power"],
                    "false_alarms_crc": c["false_alarm_rate"],
                    "false_alarms_ucb": u["false_alarm_rate"],
                    "false_alarms_eprocess": e["false_alarm_rate"],
                    "delay_steps_crc": c["delay_steps"],
                    "delay_steps_eprocess": e["delay_steps"],
                    "delay_fraction_crc": c["delay_fraction"],
                    "delay_fraction_eprocess": e["delay_fraction"],
                    "matched_power_threshold": e["threshold_at_matched_false_alarms"]["power"],
                    "matched_delay_fraction_threshold": e["threshold_at_matched_false_alarms"]["delay_fraction"],
                    "paired_crc_vs_eprocess": e["paired_positions"]["crc_median_lambda"],
                    "paired_matched_vs_eprocess": e["paired_positions"]["matched_false_alarms"],
                }
            )
    names, p = zip(*checks)
    adjusted = holm(np.asarray(p))
    worst = int(np.argmin(p))
    paired = lambda key: [r[key] for r in rows if r[key]["n"] > 0]  # noqa: E731
    return {
        "checks": len(checks),
        "multiplicity": "Holm over all checks (family-wise error 1%)",
        "checks_rejected_at_1pct_family_wise": [n for n, a in zip(names, adjusted) if a <= 0.01],
        "crc_mean_risk_within_epsilon_everywhere": not any(a <= 0.01 for n, a in zip(names, adjusted) if n.startswith("crc")),
        "ucb_violations_not_above_delta_everywhere": not any(a <= 0.01 for n, a in zip(names, adjusted) if n.startswith("ucb")),
        "smallest_unadjusted_p": {"check": names[worst], "p": float(p[worst]), "holm_adjusted": float(adjusted[worst])},
        "crc_no_later_on_shared_detections": sum(d["a_no_later_share"] >= 0.5 for d in paired("paired_crc_vs_eprocess")),
        "crc_vs_eprocess_paired_comparisons": len(paired("paired_crc_vs_eprocess")),
        "matched_no_later_on_shared_detections": sum(d["a_no_later_share"] >= 0.5 for d in paired("paired_matched_vs_eprocess")),
        "matched_vs_eprocess_paired_comparisons": len(paired("paired_matched_vs_eprocess")),
        "false_alarm_control_vs_eprocess": rows,
        "crc_power_ge_eprocess": sum(r["power_crc"] >= r["power_eprocess"] for r in rows),
        "comparisons": len(rows),
        "eprocess_false_alarms_above_epsilon": sum(r["false_alarms_eprocess"] > r["epsilon"] for r in rows),
        "threshold_power_ge_eprocess_at_matched_false_alarms": sum(
            r["matched_power_threshold"] >= r["power_eprocess"] - 1e-12 for r in rows
        ),
        "threshold_earlier_or_equal_at_matched_false_alarms": sum(
            r["matched_delay_fraction_threshold"] <= r["delay_fraction_eprocess"]
            for r in rows
            if np.isfinite(r["matched_delay_fraction_threshold"]) and np.isfinite(r["delay_fraction_eprocess"])
        ),
        "crc_detects_earlier_or_equal": sum(
            (r["delay_fraction_crc"] <= r["delay_fraction_eprocess"])
            for r in rows
            if np.isfinite(r["delay_fraction_crc"]) and np.isfinite(r["delay_fraction_eprocess"])
        ),
    }


def plots(results):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ctd.reporting.plots import png as _png

    figs = {}
    fig, axes = plt.subplots(2, len(results), figsize=(5 * len(results), 7.5))
    for j, ds in enumerate(results):
        for control, style in (("crc", "o-"), ("ucb", "s--"), ("eprocess", "^:")):
            r = [x for x in ds["results"] if x["risk"] == "false-alarm" and x["control"] == control]
            e = [x["epsilon"] for x in r]
            axes[0, j].plot(e, [x["power"] for x in r], style, label=f"{control} (false-alarm control)")
            axes[1, j].plot(e, [x["delay_fraction"] for x in r], style, label=control)
        axes[0, j].set_title(ds["dataset"])
        axes[0, j].set_ylabel("power (incorrect trajectories flagged)")
        axes[1, j].set_ylabel("alarm position (share of the trajectory seen)")
        for a in axes[:, j]:
            a.set_xlabel("ε")
            a.grid(alpha=0.3)
        axes[0, j].legend(fontsize=7)
    figs["monitor_power_delay"] = _png(fig)
    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.8))
    for j, ds in enumerate(results):
        for risk, control, style in (
            ("false-alarm", "crc", "o-"),
            ("false-alarm", "ucb", "s-"),
            ("missed-detection", "crc", "o--"),
            ("missed-detection", "ucb", "s--"),
        ):
            r = [x for x in ds["results"] if x["risk"] == risk and x["control"] == control]
            y = [x["mean_realised_risk"] if control == "crc" else x["violation_frequency"] for x in r]
            axes[j].plot(
                [x["epsilon"] for x in r],
                y,
                style,
                label=f"{control} {risk}: {'mean risk' if control == 'crc' else 'violation freq.'}",
            )
        axes[j].plot(EPSILONS, EPSILONS, "k:", lw=0.8, label="ε")
        axes[j].axhline(0.1, color="grey", lw=0.8, ls="--", label="δ")
        axes[j].set_title(ds["dataset"])
        axes[j].set_xlabel("ε")
        axes[j].legend(fontsize=6)
        axes[j].grid(alpha=0.3)
    figs["monitor_validation"] = _png(fig)
    return figs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default="math,gsm8k,mmlupro")
    ap.add_argument("--draws", type=int, default=None, help="calibration sets per setting (default: simulation_draws(δ))")
    ap.add_argument("--delta", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-dir", default=default_data_dir())
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args(argv)
    if args.draws is None:
        args.draws = simulation_draws(args.delta)
    results = [run_dataset(d, args) for d in args.datasets.split(",")]
    summary = {
        "benchmark": "monitor",
        "command": "python benchmarks/monitor.py " + " ".join(argv or sys.argv[1:]),
        "epsilons": EPSILONS,
        "delta": args.delta,
        "draws": args.draws,
        "check": {
            "ucb": "exact one-sided binomial test of the violation count at 1%",
            "crc": "one-sided z-test of the mean realised risk (CRC bounds an expectation; no exact test applies)",
            "multiplicity": "Holm over the CRC and UCB checks of every dataset, risk and ε: family-wise error 1%",
            "power": "a true violation rate of 1.25 δ fails the UCB check with probability >= 0.9 when draws >= simulation_draws(δ)",
            "power_ok": args.draws >= simulation_draws(args.delta),
        },
        "datasets": results,
        "claims": claims(results, args.delta),
    }
    figs = plots(results)
    table = html_table(summary["claims"]["false_alarm_control_vs_eprocess"])
    write_report(
        args.out,
        "monitor",
        summary,
        html_page(
            "Online monitoring: calibrated thresholds vs a sequential test",
            [
                ("False-alarm control at the same ε", table),
                (
                    "Claims",
                    f"<pre>{json.dumps({k: v for k, v in summary['claims'].items() if k != 'false_alarm_control_vs_eprocess'}, indent=2)}</pre>",
                ),
            ],
            figs,
            {
                "monitor_power_delay": "Top: the share of incorrect trajectories each monitor flags, at each ε of false-alarm "
                "control. Bottom: how much of a flagged trajectory had been seen when its alarm fired (mean over the flagged)",
                "monitor_validation": "Each control's realised risk over the population, against ε: CRC's mean, UCB's "
                "violation frequency against δ",
            },
        ),
        figs,
    )
    c = summary["claims"]
    log(
        f"{c['checks']} checks, Holm at family-wise 1%: CRC mean risk <= ε everywhere: "
        f"{c['crc_mean_risk_within_epsilon_everywhere']}; UCB violations <= δ: {c['ucb_violations_not_above_delta_everywhere']}; "
        f"smallest p {c['smallest_unadjusted_p']}"
    )
    log(
        f"on the trajectories both detect: CRC (median λ̂) alarms no later in most of them in "
        f"{c['crc_no_later_on_shared_detections']}/{c['crc_vs_eprocess_paired_comparisons']}; at matched false alarms in "
        f"{c['matched_no_later_on_shared_detections']}/{c['matched_vs_eprocess_paired_comparisons']}"
    )
    log(
        f"CRC power >= e-process in {c['crc_power_ge_eprocess']}/{c['comparisons']}; "
        f"CRC alarms no later in {c['crc_detects_earlier_or_equal']}/{c['comparisons']}; "
        f"e-process false alarms above its ε in {c['eprocess_false_alarms_above_epsilon']}/{c['comparisons']}"
    )
    log(
        "at the e-process's realised false-alarm rate, the threshold monitor has >= power in "
        f"{c['threshold_power_ge_eprocess_at_matched_false_alarms']}/"
        f"{c['comparisons']} and alarms no later in {c['threshold_earlier_or_equal_at_matched_false_alarms']}/{c['comparisons']}"
    )
    for r in c["false_alarm_control_vs_eprocess"]:
        log(
            f"  {r['dataset']:8s} ε={r['epsilon']:.2f}  power crc {r['power_crc']:.3f} ucb {r['power_ucb']:.3f} "
            f"e-process {r['power_eprocess']:.3f} | false alarms crc {r['false_alarms_crc']:.3f} "
            f"e-process {r['false_alarms_eprocess']:.3f} | alarm at {r['delay_fraction_crc']:.2f} vs {r['delay_fraction_eprocess']:.2f} | "
            f"matched: power {r['matched_power_threshold']:.3f} alarm at {r['matched_delay_fraction_threshold']:.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
