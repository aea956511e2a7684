"""The drift alarm of the nightly audit, simulated: false alarms in calm nights and delay after a shift.

    .venv/bin/python benchmarks/drift.py        # writes benchmarks/results/drift.json (about 20 s)

The rule that sets ``drift_alarm`` is the e-detector alone (``ctd/stats/drift.py``): a CUSUM of
binomial likelihood-ratio e-values, alarm when it reaches 1/level. Nights are simulated as
Binomial(rows, rate) delegation counts, the same model the e-values are built on.

* False alarms: the share of histories of T calm nights (rate = α, the boundary of the null) with
  at least one alarm, for T = 30 and 100, with a 95% Clopper-Pearson interval; and the average run
  length to a false alarm (censored at ``--arl-nights``, so a lower bound) against its bound 1/level.
* Delay: 30 calm nights, then the rate shifts to 1.1, 1.2, 1.5 or 2 α; nights after the shift until
  the first alarm (median, mean, share detected within 60 nights).
* For comparison, the rule before 2026-11 (a night's one-sided binomial p < level OR the
  e-detector): its false-alarm share within 30 and 100 calm nights, the reason it was replaced.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ctd.stats.drift import alarms, detection_delay, e_detector, log_e_values  # noqa: E402
from ctd.stats.pvalues import binomial_upper_pvalue, clopper_pearson  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def calm_nights(alpha, rows, level, nights, sims, rng, chunk=2000):
    """Share of calm histories with an alarm by night T (for every T <= nights), for the e-detector
    and for the old OR rule; and the censored run lengths of the e-detector."""
    first_det, first_or = [], []
    for start in range(0, sims, chunk):
        d = rng.binomial(rows, alpha, size=(min(chunk, sims - start), nights))
        det = alarms(e_detector(log_e_values(d, np.full(d.shape, rows), alpha)), level)
        old = det | (binomial_upper_pvalue(d, rows, alpha) < level)
        for over, out in ((det, first_det), (old, first_or)):
            out.append(np.where(over.any(axis=1), over.argmax(axis=1) + 1, nights + 1))
    return np.concatenate(first_det), np.concatenate(first_or)


def share(first, horizon, sims):
    k = int((first <= horizon).sum())
    lo, hi = clopper_pearson(np.array([k]), sims, 0.95)
    return {"nights": horizon, "alarms": k, "histories": sims, "share": k / sims, "ci95": [float(lo[0]), float(hi[0])]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--alpha", type=float, default=0.1)
    ap.add_argument("--rows", type=int, default=5000, help="scored rows a night")
    ap.add_argument("--level", type=float, default=0.01, help="audit.drift_alpha: the alarm is at 1/level")
    ap.add_argument("--sims", type=int, default=20000)
    ap.add_argument("--arl-nights", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "drift.json"))
    args = ap.parse_args(argv)
    t0 = time.time()
    rng = np.random.default_rng(args.seed)
    first_det, first_or = calm_nights(args.alpha, args.rows, args.level, args.arl_nights, args.sims, rng)
    censored = float((first_det > args.arl_nights).mean())
    result = {
        "benchmark": "drift",
        "command": "python benchmarks/drift.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "rule": "e-detector (CUSUM of binomial likelihood-ratio e-values, rates 1.25/1.5/2/3 α), alarm when M_k >= 1/level",
        "alpha": args.alpha,
        "rows_per_night": args.rows,
        "level": args.level,
        "sims": args.sims,
        "false_alarms": [share(first_det, t, args.sims) for t in (30, 100, 365)],
        "average_run_length": {
            "lower_bound_nights": float(np.minimum(first_det, args.arl_nights).mean()),
            "censored_at": args.arl_nights,
            "share_censored": censored,
            "guaranteed_at_least": 1 / args.level,
        },
        "old_rule_or_nightly_pvalue": {"false_alarms": [share(first_or, t, args.sims) for t in (30, 100)]},
        "shifts": [
            detection_delay(args.alpha, f * args.alpha, args.rows, level=args.level, sims=2000, seed=args.seed + 1 + i)
            for i, f in enumerate((1.1, 1.2, 1.5, 2.0))
        ],
    }
    result["seconds"] = round(time.time() - t0, 1)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    for s in result["false_alarms"]:
        print(
            f"e-detector: false alarm within {s['nights']} calm nights {s['share']:.4f} (95% CI {s['ci95'][0]:.4f}-{s['ci95'][1]:.4f})"
        )
    a = result["average_run_length"]
    print(
        f"average run length >= {a['lower_bound_nights']:.0f} nights (censored at {a['censored_at']}, "
        f"{a['share_censored']:.1%} censored; bound {a['guaranteed_at_least']:g})"
    )
    for s in result["old_rule_or_nightly_pvalue"]["false_alarms"]:
        print(f"old OR rule: false alarm within {s['nights']} calm nights {s['share']:.3f}")
    for s in result["shifts"]:
        print(
            f"shift to {s['shifted_rate'] / args.alpha:.1f} α: median delay {s['median_delay_nights']} nights, mean {s['mean_delay_nights']:.2f}, "
            f"detected within {s['detected_within']}: {s['share_detected']:.3f}"
        )
    print(f"wrote {args.out} in {result['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
