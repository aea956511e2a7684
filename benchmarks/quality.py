"""The nightly quality watch (ctd/stats/quality.py), simulated: interval coverage and width, the alarms'
false-alarm rates over calm nights, and their detection delays after a shift.

    .venv/bin/python benchmarks/quality.py        # writes benchmarks/results/quality.json (a few minutes)

The simulated traffic: nights of ``--rows`` rows in four groups (shares 50/25/15/10%, unsafe prevalence
0.30/0.25/0.35/0.40), a probe whose score is the calibrated probability of a latent Gaussian feature
(AUC 0.85 within each group), decision p >= 0.5, delegation of the rows with |p - 0.5| below one cut
(λ* at α = 0.2: about 16% of rows delegated, the busiest group 19%, every group below α), and the
control sample of :func:`control_plan` (Bernoulli, 2% of 20,000 rows: n ≈ 400). The judge is the truth.

* Coverage: ``--nights`` calm nights (row level); for each estimate, overall and per group, the share of
  nights whose 95% interval covers the night's true share, and the mean width, for PPI++ and for
  Clopper-Pearson on the control sample alone; the per-group intervals with the Bonferroni level
  (simultaneous coverage). Also the miss rate on nights after the probe degraded (PPI stays valid with
  any predictor).
* False alarms, at the default level 0.005: on the same calm nights (references and trailing nights
  from the same model), and over ``--count-nights`` nights simulated as counts (the same binomial
  model, at the boundary of each null: every group delegating exactly α); Fisher's test for the
  disagreement alarm, for comparison (valid on average over references, not given one).
* Delays: ``--histories`` histories of 30 calm nights then a shift (the probe's miss rate doubling;
  a group's delegation rate going to 1.2 or 1.5 α; the prevalence up 5 or 10 points), overall and for
  each group alone; nights after the shift until the alarm (1: the first shifted night), within 30.
  Simulated as the nightly counts of the row model (rates measured on a million rows of it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
from scipy import special, stats

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ctd.stats import quality as q  # noqa: E402
from ctd.stats.pvalues import binomial_upper_pvalue, clopper_pearson  # noqa: E402
from ctd.stats.testing import holm  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
GROUPS = np.array(["A", "B", "C", "D"])
SHARES = np.array([0.5, 0.25, 0.15, 0.10])
PREVALENCE = np.array([0.30, 0.25, 0.35, 0.40])
DELTA = np.sqrt(2) * stats.norm.ppf(0.85)  # AUC 0.85
ALPHA = 0.2
N_REF = 2000  # calibration rows with judge verdicts: the disagreement reference
TRAILING = 7  # nights pooled for the prevalence alarm
SHIFT_AT, AFTER = 30, 30


def rows(rng, n, prevalence=PREVALENCE, hidden=None):
    """One night's rows: group index, judge verdict y, probe score p. ``hidden[g]``: the share of group g's
    unsafe rows whose feature looks safe (a new attack the probe cannot see: its misses rise)."""
    g = rng.choice(len(SHARES), n, p=SHARES)
    prev = np.asarray(prevalence)[g]
    y = rng.random(n) < prev
    seen = y & (rng.random(n) >= (0 if hidden is None else np.asarray(hidden)[g]))
    x = rng.standard_normal(n) + DELTA * seen
    p = special.expit(special.logit(PREVALENCE[g]) + DELTA * x - DELTA**2 / 2)  # calibrated on calm traffic
    return g, y.astype(float), p


def measure(rng, cut, n=1_000_000, **kw):
    """Rates of the row model, overall and per group, on a million rows."""
    g, y, p = rows(rng, n, **kw)
    fl, dl = p >= 0.5, np.abs(p - 0.5) < cut
    out = {}
    for name, m in [("overall", np.ones(n, bool))] + [(str(GROUPS[k]), g == k) for k in range(len(GROUPS))]:
        nd = m & ~dl
        out[name] = {
            "prevalence": float(y[m].mean()),
            "delegation_rate": float(dl[m].mean()),
            "disagreement": float(np.mean(fl[m] != (y[m] == 1))),
            "miss_rate": float(np.mean((~fl & (y == 1))[nd])),
        }
    return out


def calibrate_cut(rng):
    """The delegation cut: the group that delegates most delegates 19% of its rows (λ* certifies the overall
    rate at α = 0.2; here every group stays below α on calm nights, so each group's alarm is calm too)."""
    g, _, p = rows(rng, 1_000_000)
    return float(min(np.quantile(np.abs(p[g == k] - 0.5), 0.19) for k in range(len(GROUPS))))


def hidden_for_doubling(rng, cut, group=None):
    """The share of unsafe rows hidden from the probe that doubles the miss rate (of one group, or overall)."""
    key = "overall" if group is None else str(GROUPS[group])
    base = measure(np.random.default_rng(1), cut, 400_000)[key]["miss_rate"]
    lo, hi = 0.0, 1.0
    for _ in range(14):
        mid = (lo + hi) / 2
        h = np.full(len(GROUPS), mid) if group is None else np.where(np.arange(len(GROUPS)) == group, mid, 0.0)
        m = measure(np.random.default_rng(1), cut, 400_000, hidden=h)[key]["miss_rate"]
        lo, hi = (mid, hi) if m < 2 * base else (lo, mid)
    h = (lo + hi) / 2
    return np.full(len(GROUPS), h) if group is None else np.where(np.arange(len(GROUPS)) == group, h, 0.0)


def share_ci(k, n):
    lo, hi = clopper_pearson(np.array([int(k)]), int(n), 0.95)
    return [float(lo[0]), float(hi[0])]


def summary(cov, width, ns):
    cov = np.asarray(cov, dtype=float)
    return {
        "coverage": float(cov.mean()),
        "coverage_ci95": share_ci(cov.sum(), cov.size),
        "mean_width": float(np.mean(width)),
        "mean_n": float(np.mean(ns)),
    }


# ------------------------------------------------------------------ coverage on calm nights
def coverage(rng, cut, nights, n_rows, pi, level, hidden=None, estimates=q.ESTIMATES, groups=True):
    rec: dict = {}
    counts = {"disagree": [], "n": [], "unsafe": [], "deleg_g": [], "rows_g": [], "n_g": [], "unsafe_g": []}
    for _ in range(nights):
        g, y, p = rows(rng, n_rows, hidden=hidden)
        fl, dl = p >= 0.5, np.abs(p - 0.5) < cut
        smp = rng.random(n_rows) < pi
        v = np.where(smp | dl, y, np.nan)
        lab = GROUPS[g]
        c = smp
        for name in estimates:
            member, _, _ = q.estimate_terms(name, p, fl, dl, v)
            truth_y = q.estimate_terms(name, p, fl, dl, y)[2]
            s = q.subset_sums(name, p, fl, dl, v)
            for method in ("ppi++", "sample"):
                e = q.estimate(name, p[c], fl[c], dl[c], v[c], sums=s, method=method, level=level)
                t = truth_y[member].mean() if member.any() else np.nan
                rec.setdefault((name, "overall", method), []).append((e.low <= t <= e.high, e.high - e.low, e.n))
            if not groups:
                continue
            gs = q.subset_sums(name, p, fl, dl, v, group=lab)
            for method in ("ppi++", "sample"):
                for simultaneous in (False, True):
                    if simultaneous and method == "sample":
                        continue
                    per = q.by_group(
                        name, p[c], fl[c], dl[c], v[c], lab[c], sums=gs, method=method, level=level, simultaneous=simultaneous
                    )
                    hits = []
                    for k, e in per.items():
                        m = member & (lab == k)
                        t = truth_y[m].mean() if m.any() else np.nan
                        hits.append(e.low <= t <= e.high)
                        if not simultaneous:
                            rec.setdefault((name, str(k), method), []).append((hits[-1], e.high - e.low, e.n))
                    if simultaneous:
                        rec.setdefault((name, "simultaneous", method), []).append((all(hits), 0.0, 0))
        counts["disagree"].append(int(np.sum(fl[c] != (y[c] == 1))))
        counts["n"].append(int(c.sum()))
        counts["unsafe"].append(int(y[c].sum()))
        counts["deleg_g"].append(np.bincount(g, weights=dl, minlength=len(GROUPS)).astype(int))
        counts["rows_g"].append(np.bincount(g, minlength=len(GROUPS)))
        counts["n_g"].append(np.bincount(g[c], minlength=len(GROUPS)))
        counts["unsafe_g"].append(np.bincount(g[c], weights=y[c], minlength=len(GROUPS)).astype(int))
    return rec, {k: np.array(v) for k, v in counts.items()}


def coverage_table(rec, estimates):
    out = {}
    for name in estimates:
        out[name] = {}
        for (n2, scope, method), r in rec.items():
            if n2 != name:
                continue
            r = np.array(r, dtype=float)
            if scope == "simultaneous":
                out[name].setdefault("simultaneous_groups", {})[method] = {
                    "coverage": float(r[:, 0].mean()),
                    "coverage_ci95": share_ci(r[:, 0].sum(), len(r)),
                }
            else:
                out[name].setdefault(scope, {})[method] = summary(r[:, 0], r[:, 1], r[:, 2])
    return out


# ------------------------------------------------------------------ alarms, vectorised (checked against the Alarm functions)
def group_fires(deleg, rows_g, alpha, level):
    """group_rate_alarm over arrays (..., groups): fired, and which groups Holm flags."""
    pv = np.where(rows_g > 0, binomial_upper_pvalue(deleg, np.maximum(rows_g, 1), alpha), np.inf)
    rej = holm(pv, level)
    return rej.any(axis=-1), rej


def check_vectorised(rng, level):
    """The vectorised rules used below agree with the Alarm functions (a sample of random nights)."""
    for _ in range(200):
        n, nr = int(rng.integers(1, 600)), int(rng.integers(1, 3000))
        k, kr = int(rng.binomial(n, 0.15)), int(rng.binomial(nr, 0.1))
        assert q.disagreement_alarm(k, n, kr, nr, level).fired == bool(q.disagreement_pvalue(k, n, kr, nr, level) <= level / 2)
        assert q.prevalence_alarm(k, n, kr, nr, level).fired == bool(q.fisher_two_sided_pvalue(k, n, kr, nr) <= level)
        rows_g = rng.integers(0, 3000, 4)
        d = rng.binomial(rows_g, 0.23)
        fired, rej = group_fires(d, rows_g, ALPHA, level)
        a = q.group_rate_alarm(dict(zip(GROUPS, d)), dict(zip(GROUPS, rows_g)), ALPHA, level)
        assert a.fired == bool(fired) and set(a.flagged) == set(GROUPS[rej])


def false_alarms_row_level(rng, counts, calm, level):
    nights = len(counts["n"])
    k_ref = rng.binomial(N_REF, calm["overall"]["disagreement"], nights)  # a calibration reference per night
    dis = q.disagreement_pvalue(counts["disagree"], counts["n"], k_ref, N_REF, level) <= level / 2
    fired_g, _ = group_fires(counts["deleg_g"], counts["rows_g"], ALPHA, level)
    k, n = counts["unsafe"], counts["n"]
    ck, cn = np.r_[0, np.cumsum(k)], np.r_[0, np.cumsum(n)]
    idx = np.arange(TRAILING, nights)
    prev = q.fisher_two_sided_pvalue(k[idx], n[idx], ck[idx] - ck[idx - TRAILING], cn[idx] - cn[idx - TRAILING]) <= level
    return {
        "nights": nights,
        "disagreement_alarm": {"alarms": int(dis.sum()), "rate": float(dis.mean()), "ci95": share_ci(dis.sum(), nights)},
        "group_rate_alarm": {
            "alarms": int(fired_g.sum()),
            "rate": float(fired_g.mean()),
            "ci95": share_ci(fired_g.sum(), nights),
            "group_delegation_rates": {str(GROUPS[j]): calm[str(GROUPS[j])]["delegation_rate"] for j in range(len(GROUPS))},
        },
        "prevalence_alarm": {
            "alarms": int(prev.sum()),
            "rate": float(prev.mean()),
            "ci95": share_ci(prev.sum(), idx.size),
            "tests": int(idx.size),
        },
    }


def false_alarms_count_level(rng, calm, n_rows, pi, level, m):
    n = rng.binomial(n_rows, pi, m)
    r = calm["overall"]["disagreement"]
    k, kr = rng.binomial(n, r), rng.binomial(N_REF, r, m)
    dis = q.disagreement_pvalue(k, n, kr, N_REF, level) <= level / 2
    fis = q.fisher_greater_pvalue(k, n, kr, N_REF) <= level
    low_ref = int(stats.binom.ppf(0.025, N_REF, r))  # a reference 2 standard errors low (2.5% of references)
    dis_low = q.disagreement_pvalue(k, n, low_ref, N_REF, level) <= level / 2
    fis_low = q.fisher_greater_pvalue(k, n, low_ref, N_REF) <= level
    rows_g = rng.multinomial(n_rows, SHARES, m)
    fired_g, _ = group_fires(rng.binomial(rows_g, ALPHA), rows_g, ALPHA, level)  # every group exactly at α
    p0 = calm["overall"]["prevalence"]
    nt = rng.binomial(TRAILING * n_rows, pi, m)
    prev = q.fisher_two_sided_pvalue(rng.binomial(n, p0), n, rng.binomial(nt, p0), nt) <= level
    rate = lambda x: {"alarms": int(x.sum()), "rate": float(x.mean()), "ci95": share_ci(x.sum(), x.size)}  # noqa: E731
    return {
        "nights": m,
        "disagreement_alarm": rate(dis),
        "disagreement_alarm_given_a_low_reference": {**rate(dis_low), "reference": f"{low_ref}/{N_REF} (its 2.5% quantile)"},
        "group_rate_alarm_every_group_at_alpha": rate(fired_g),
        "prevalence_alarm": rate(prev),
        "for_comparison_fisher_disagreement": {
            "rate": float(fis.mean()),
            "rate_given_a_low_reference": float(fis_low.mean()),
            "ci95_given_a_low_reference": share_ci(fis_low.sum(), m),
        },
    }


# ------------------------------------------------------------------ delays
def first_alarm(fires_by_night):
    """Nights after the shift until the first alarm (1-based), NaN if none; fires_by_night: (histories, nights)."""
    hit = fires_by_night.any(axis=1)
    return np.where(hit, fires_by_night.argmax(axis=1) + 1, np.nan)


def delay_summary(delays, before, **info):
    d = delays[~np.isnan(delays)]
    return {
        **info,
        "histories": int(delays.size),
        "false_alarm_before_shift": float(before),
        "detected_within": AFTER,
        "share_detected": float(np.mean(~np.isnan(delays))),
        "detected_first_night": float(np.mean(delays == 1)),
        "median_delay_nights": float(np.median(d)) if d.size else None,
        "mean_delay_nights": float(d.mean()) if d.size else None,
    }


def simulate_counts(rng, h, n_rows, pi, share, before, after):
    """Per history and night: control rows of a set holding ``share`` of the rows, and their events at the
    rates ``before`` (first SHIFT_AT nights) and ``after``."""
    t = SHIFT_AT + AFTER
    n = rng.binomial(n_rows, pi * share, (h, t))
    rate = np.where(np.arange(t) < SHIFT_AT, before, after)
    return n, rng.binomial(n, rate)


def delay_disagreement(rng, h, n_rows, pi, level, before, after, share=1.0, tests=1, fisher=False):
    n, k = simulate_counts(rng, h, n_rows, pi, share, before, after)
    kr = rng.binomial(int(N_REF * share), before, (h, 1))
    if fisher:  # for comparison: Fisher's one-sided test against the reference at the full level
        fire = q.fisher_greater_pvalue(k, n, kr, int(N_REF * share)) <= level / tests
    else:
        fire = q.disagreement_pvalue(k, n, kr, int(N_REF * share), level / tests) <= level / tests / 2
    return first_alarm(fire[:, SHIFT_AT:]), fire[:, :SHIFT_AT].any(axis=1).mean()


def delay_prevalence(rng, h, n_rows, pi, level, before, after, share=1.0, tests=1):
    n, k = simulate_counts(rng, h, n_rows, pi, share, before, after)
    ck, cn = np.cumsum(np.c_[np.zeros((h, 1), int), k], axis=1), np.cumsum(np.c_[np.zeros((h, 1), int), n], axis=1)
    idx = np.arange(TRAILING, SHIFT_AT + AFTER)
    kt, nt = ck[:, idx] - ck[:, idx - TRAILING], cn[:, idx] - cn[:, idx - TRAILING]
    fire = q.fisher_two_sided_pvalue(k[:, idx], n[:, idx], kt, nt) <= level / tests
    split = SHIFT_AT - TRAILING
    return first_alarm(fire[:, split:]), fire[:, :split].any(axis=1).mean()


def delay_groups(rng, h, n_rows, level, rates_before, rates_after, shifted):
    t = SHIFT_AT + AFTER
    rows_g = rng.multinomial(n_rows, SHARES, (h, t))
    rates = np.where((np.arange(t) < SHIFT_AT)[None, :, None], rates_before, rates_after)
    fired, rej = group_fires(rng.binomial(rows_g, rates), rows_g, ALPHA, level)
    return first_alarm(rej[:, SHIFT_AT:, shifted]), fired[:, :SHIFT_AT].any(axis=1).mean()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=20_000, help="audited rows a night")
    ap.add_argument("--nights", type=int, default=3000, help="calm nights simulated row by row")
    ap.add_argument("--shifted-nights", type=int, default=300, help="row-level nights after the probe degraded")
    ap.add_argument("--count-nights", type=int, default=200_000)
    ap.add_argument("--histories", type=int, default=2000)
    ap.add_argument("--level", type=float, default=q.DEFAULT_LEVEL, help="the alarms' per-night false-alarm level")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "quality.json"))
    args = ap.parse_args(argv)
    t0 = time.time()
    rng = np.random.default_rng(args.seed)
    pi = q.control_plan(args.rows)
    cut = calibrate_cut(rng)
    calm = measure(rng, cut)
    assert max(calm[str(g)]["delegation_rate"] for g in GROUPS) < ALPHA
    check_vectorised(rng, args.level)

    rec, counts = coverage(rng, cut, args.nights, args.rows, pi, 0.95)
    print(f"coverage: {args.nights} calm nights in {time.time() - t0:.0f} s", flush=True)
    hidden = hidden_for_doubling(rng, cut)
    shifted = measure(rng, cut, hidden=hidden)
    rec_s, _ = coverage(rng, cut, args.shifted_nights, args.rows, pi, 0.95, hidden=hidden, estimates=("miss_rate",), groups=False)

    h, lvl = args.histories, args.level
    delays = []
    d, b = delay_disagreement(rng, h, args.rows, pi, lvl, calm["overall"]["disagreement"], shifted["overall"]["disagreement"])
    delays.append(
        delay_summary(
            d,
            b,
            alarm="disagreement_alarm",
            scope="overall",
            shift="the probe's miss rate doubles (every group)",
            miss_rate=[calm["overall"]["miss_rate"], shifted["overall"]["miss_rate"]],
            rate=[calm["overall"]["disagreement"], shifted["overall"]["disagreement"]],
        )
    )
    d, b = delay_disagreement(
        rng, h, args.rows, pi, lvl, calm["overall"]["disagreement"], shifted["overall"]["disagreement"], fisher=True
    )
    delays.append(
        delay_summary(
            d,
            b,
            alarm="for comparison: Fisher's one-sided test (not the alarm)",
            scope="overall",
            shift="the probe's miss rate doubles (every group)",
            rate=[calm["overall"]["disagreement"], shifted["overall"]["disagreement"]],
        )
    )
    for j, gname in enumerate(GROUPS):
        gm = measure(rng, cut, hidden=hidden_for_doubling(rng, cut, j))
        gk = str(gname)
        for scope, share, tests, key in (("overall", 1.0, 1, "overall"), (f"group {gk} (level/4)", SHARES[j], len(GROUPS), gk)):
            d, b = delay_disagreement(
                rng, h, args.rows, pi, lvl, calm[key]["disagreement"], gm[key]["disagreement"], share, tests
            )
            delays.append(
                delay_summary(
                    d,
                    b,
                    alarm="disagreement_alarm",
                    scope=scope,
                    shift=f"the probe's miss rate doubles in group {gk} alone",
                    miss_rate=[calm[gk]["miss_rate"], gm[gk]["miss_rate"]],
                    rate=[calm[key]["disagreement"], gm[key]["disagreement"]],
                )
            )
    base_rates = np.array([calm[str(g)]["delegation_rate"] for g in GROUPS])
    for factor in (1.2, 1.5):
        for j, gname in enumerate(GROUPS):
            after = np.where(np.arange(len(GROUPS)) == j, factor * ALPHA, base_rates)
            d, b = delay_groups(rng, h, args.rows, lvl, base_rates, after, j)
            delays.append(
                delay_summary(
                    d,
                    b,
                    alarm="group_rate_alarm",
                    scope=f"group {gname} flagged",
                    shift=f"group {gname}'s delegation rate goes to {factor} α",
                    rate=[float(base_rates[j]), factor * ALPHA],
                )
            )
    for points in (0.05, 0.10):
        p0 = calm["overall"]["prevalence"]
        d, b = delay_prevalence(rng, h, args.rows, pi, lvl, p0, p0 + points)
        delays.append(
            delay_summary(
                d,
                b,
                alarm="prevalence_alarm",
                scope="overall",
                shift=f"prevalence +{points:.0%} (every group)",
                rate=[p0, p0 + points],
            )
        )
    for j, gname in enumerate(GROUPS):
        gk = str(gname)
        pg = calm[gk]["prevalence"]
        p0 = calm["overall"]["prevalence"]
        for scope, share, tests, before, after in (
            ("overall", 1.0, 1, p0, p0 + 0.10 * SHARES[j]),
            (f"group {gk} (level/4)", SHARES[j], len(GROUPS), pg, pg + 0.10),
        ):
            d, b = delay_prevalence(rng, h, args.rows, pi, lvl, before, after, share, tests)
            delays.append(
                delay_summary(
                    d,
                    b,
                    alarm="prevalence_alarm",
                    scope=scope,
                    shift=f"prevalence +10% in group {gk} alone",
                    rate=[before, after],
                )
            )
    print(f"delays in {time.time() - t0:.0f} s", flush=True)

    result = {
        "benchmark": "quality",
        "command": "python benchmarks/quality.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "setting": {
            "rows_per_night": args.rows,
            "control_pi": pi,
            "control_rows_expected": pi * args.rows,
            "probe_auc": 0.85,
            "alpha": ALPHA,
            "delegation_cut_abs_p_minus_half": cut,
            "reference_rows": N_REF,
            "trailing_nights": TRAILING,
            "alarm_level": lvl,
            "groups": {str(g): {"share": float(s), **calm[str(g)]} for g, s in zip(GROUPS, SHARES)},
            "overall": calm["overall"],
            "shifted_probe": {"hidden_share_of_unsafe": float(hidden[0]), **shifted["overall"]},
        },
        "coverage": {
            "nights": args.nights,
            "level": 0.95,
            "estimates": coverage_table(rec, q.ESTIMATES),
            "miss_rate_after_the_probe_degraded": {
                "nights": args.shifted_nights,
                **coverage_table(rec_s, ("miss_rate",))["miss_rate"],
            },
        },
        "false_alarms": {
            "level": lvl,
            "row_level": false_alarms_row_level(rng, counts, calm, lvl),
            "count_level": false_alarms_count_level(rng, calm, args.rows, pi, lvl, args.count_nights),
        },
        "delays": delays,
    }
    result["seconds"] = round(time.time() - t0, 1)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    for name, by in result["coverage"]["estimates"].items():
        o = by["overall"]
        print(
            f"{name:16s} PPI++ coverage {o['ppi++']['coverage']:.3f} width {o['ppi++']['mean_width']:.4f} | "
            f"sample {o['sample']['coverage']:.3f} width {o['sample']['mean_width']:.4f} | "
            f"simultaneous groups {by['simultaneous_groups']['ppi++']['coverage']:.3f}"
        )
    for scope in ("row_level", "count_level"):
        fa = result["false_alarms"][scope]
        print(
            f"false alarms ({scope}, {fa['nights']} nights): "
            + ", ".join(f"{k} {v['rate']:.4f}" for k, v in fa.items() if isinstance(v, dict) and "rate" in v)
        )
    for d in delays:
        print(
            f"{d['alarm']:18s} {d['shift']:48s} {d['scope']:22s} detected {d['share_detected']:.3f}, first night "
            f"{d['detected_first_night']:.3f}, median {d['median_delay_nights']}, mean {d['mean_delay_nights']}"
        )
    print(f"wrote {args.out} in {result['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
