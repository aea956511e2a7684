"""The calibration report: what α, δ and λ* mean for tomorrow's bill, in words first, then the curves.

``calibration_report.json`` and ``calibration_report.html`` (with its plots) are written beside
``calibration.json``; both name the calibration by its one identity, ``artifact_hash``.
"""

from __future__ import annotations

import html
import json
import os

import numpy as np
from numpy.typing import ArrayLike

from ..config import CREDENTIAL_ENVS
from ..reporting.pages import html_figure, html_page, html_table, pct, write_report
from ..reporting.plots import plot_calibration, plot_histogram, plot_tradeoff
from ..reporting.redact import redact_values
from ..stats.calibrate import CalibrationResult
from ..stats.pvalues import min_certifiable_n, rows_to_certify
from .artifact import CalibrationArtifact

__all__ = ["write_calibration", "explain"]


def write_calibration(
    out_dir: str, art: CalibrationArtifact, dv: ArrayLike | None = None, night_rows: int | None = None
) -> dict[str, str]:
    """Write ``calibration.json`` (the artifact), ``calibration_report.{json,html}`` and plots;
    ``dv``: the calibration rows' d(x), for their histogram; ``night_rows``: the night size that the
    report's night-level statement is for (default :data:`NIGHT_ROWS`)."""
    if night_rows is not None and night_rows < 1:
        raise ValueError(f"night_rows must be at least 1, got {night_rows}")
    night_rows = NIGHT_ROWS if night_rows is None else int(night_rows)
    uri = art.save(out_dir)
    body = art.body()
    r = art.result
    figures = {"calibration": plot_calibration(body["calibration"]), "tradeoff": plot_tradeoff(body["calibration"])}
    if dv is not None:
        figures["dv_histogram"] = plot_histogram(
            {"calibration dv": dv}, r.lambda_hat, "DV scores of the calibration rows", "d(x)"
        )
    summary = {
        "alpha": r.alpha,
        "delta": r.delta,
        "n": r.n,
        "lambda_star": body["calibration"]["lambda_hat"],
        "delegates": r.delegates,
        "message": r.message,
        "method": r.method,
        "pareto": r.pareto,
        "risk": r.risk,
        "certified_count": r.certified_count,
        "artifact_hash": body["artifact_hash"],
        "provenance": art.provenance,
        "night_rows": night_rows,
        "explanation": explain(r, night_rows) + from_runs_sentences(art.provenance),
    }
    # values redacted before any page is built: a corpus or scores URI may carry a credential
    summary = redact_values(summary, [os.environ.get(k, "") for k in CREDENTIAL_ENVS])
    i = None if not r.delegates else int(np.searchsorted(r.grid, r.lambda_hat))
    rows = [
        {"quantity": k, "value": v}
        for k, v in [
            ("α (budget)", r.alpha),
            ("δ", r.delta),
            ("calibration rows n", r.n),
            ("λ*", "never delegate" if i is None else r.lambda_hat),
            ("delegation rate on calibration at λ*", "—" if i is None else float(r.budget_risk[i])),
            ("certified thresholds", r.certified_count),
            ("method", f"{r.method}{' + Pareto testing' if r.pareto else ''}"),
            ("effective delegation capacity (share v > 0)", art.provenance.get("effective_capacity")),
            ("calibration (artifact hash)", body["artifact_hash"]),
        ]
    ]
    words = "".join(f"<li>{html.escape(t)}</li>" for t in summary["explanation"])
    page = html_page(
        "CTD calibration report",
        [
            (
                "What this means",
                f"<ul class='headline'>{words}</ul>"
                + html_figure(
                    "tradeoff",
                    figures["tradeoff"],
                    "What the budget buys: each threshold's share sent to the expert and the "
                    "cascade's performance on the calibration rows",
                ),
            ),
            ("Result", f"<p class='{'ok' if r.delegates else 'alarm'}'>{html.escape(r.message)}</p>" + html_table(rows)),
            ("Provenance", f"<pre>{html.escape(json.dumps(summary['provenance'], indent=2, ensure_ascii=False))}</pre>"),
        ],
        {k: v for k, v in figures.items() if k != "tradeoff"},
        {
            "calibration": 'Left: each threshold\'s p-value for "it sends more than α of the traffic to the judge" (log '
            "scale); thresholds tested below δ, the dashed line, are certified (green ticks). Right: the share of calibration "
            "rows each threshold sends to the judge, and the cascade's performance risk (orange, right axis). The red line "
            "is λ*, tomorrow's threshold",
            "dv_histogram": "How the calibration rows' delegation values d(x) spread (rows per bin): rows right of λ*, the "
            "red line, go to the judge",
        },
    )
    out = write_report(out_dir, "calibration_report", summary, page, figures)
    out["artifact"] = uri
    return out


NIGHT_ROWS, NIGHT_EPSILON = 10_000, 0.05  # the night-level statement: by default a night of this size; a quantile at 1 - ε


def night_count_bound(alpha: float, rows: int, epsilon: float) -> int:
    """q with P(Binom(rows, p) > q) <= epsilon for every rate p <= alpha (the binomial is stochastically
    increasing in p): with the rate guarantee, a night's count exceeds q with probability <= δ + epsilon."""
    from scipy import stats

    return int(stats.binom.ppf(1 - epsilon, rows, alpha))


CHANCE = 0.9  # "N rows would be needed": N certifies the threshold with this probability over the draw of the rows


def from_runs_sentences(prov: dict) -> list[str]:
    """What a recalibration from recent nights used, certifies and assumes (nothing for a labelled one)."""
    if "from_runs" not in prov:
        return []
    days = prov["nights"]
    return [
        f"Made from {len(days)} published night(s) under {prov['from_runs']} ({days[0]} to {days[-1]}), "
        f"{prov['rows']:,} scored rows' DV scores (no labels: the budget needs none) and {prov['control_rows_judged']:,} "
        f"control rows' judge verdicts; it certifies {prov['certifies']}, under one assumption: {prov['assumption']}."
    ]


def _compare(r: CalibrationResult, i: int) -> list[str]:
    """One sentence: the probe alone, the judge alone and the cascade at λ* on the calibration rows (the grid's
    two ends and λ*, on the performance the calibration measured)."""
    if r.performance_risk is None:
        return []
    perf, rate = 1.0 - np.asarray(r.performance_risk, dtype=float), np.asarray(r.budget_risk, dtype=float)
    name = {"accuracy": "accuracy", "auroc": "AUROC"}.get(str(r.risk), "performance")
    probe, judge, cascade = perf[-1], perf[0], perf[i]
    alone = "the probe alone" if rate[-1] == 0 else f"the probe with {rate[-1]:.1%} of rows judged (the grid's top)"
    judged = "the judge on every row" if rate[0] == 1 else f"the judge on {rate[0]:.1%} of rows (the grid's lowest threshold)"
    verdict = "better" if judge > probe else "worse" if judge < probe else "no better"
    best = max(probe, judge)
    versus = (
        "the cascade beats both"
        if cascade > best
        else "the cascade matches the better of the two"
        if cascade == best
        else f"the cascade is {best - cascade:.3f} below the better of the two"
    )
    return [
        f"On the calibration rows, {name}: {alone} {probe:.3f}, {judged} {judge:.3f}, the cascade at λ* {cascade:.3f} with "
        f"{rate[i]:.1%} of rows sent to the judge. The judge alone is {verdict} than the probe alone, and {versus}."
    ]


def explain(r: CalibrationResult, night_rows: int = NIGHT_ROWS) -> list[str]:
    """The calibration in words: what α, δ and λ* mean for tomorrow's bill (the night-level count for a
    night of ``night_rows``), what was certified, and when nothing was, what to do (how many labelled
    rows would be enough)."""
    if r.delegates:
        i = int(np.searchsorted(r.grid, r.lambda_hat))
        cert = r.grid[np.asarray(r.certified, dtype=bool)]
        q = night_count_bound(r.alpha, night_rows, NIGHT_EPSILON)
        return [
            f"Tomorrow's threshold is λ* = {r.lambda_hat:.4g} on the DV score: a conversation goes to the judge when its DV score is above it.",
            f"On traffic like these {r.n:,} calibration rows, the rate at which conversations are delegated to the judge (DV "
            f"score above λ*) is at most α = {pct(r.alpha)}, with probability at least 1 − δ = {pct(1 - r.delta)} over the draw "
            f"of the calibration rows; on the calibration rows λ* delegated {r.budget_risk[i]:.1%}.",
            f"That bounds a rate, not a night's count, which can exceed α·N by chance: a night of {night_rows:,} conversations "
            f"delegates at most {q:,} with probability at least {pct(1 - r.delta - NIGHT_EPSILON)} (1 − δ − "
            f"{NIGHT_EPSILON:g}: the rate guarantee and the {pct(1 - NIGHT_EPSILON)} binomial quantile, conversations drawn "
            "independently). Only a hard cap on the night's judge calls (the audit's budget cap) bounds a night's delegated "
            "calls outright; the audit's control sample (a uniform sample of the night's rows, its share set in the audit's "
            "settings) goes to the judge on top of them.",
            f"{r.certified_count:,} of the {len(r.grid):,} thresholds on the grid were certified (the lowest {cert.min():.4g}, the highest "
            f"{cert.max():.4g}; not necessarily every threshold between them); "
            + (
                "λ* is the certified one that does best on the performance risk (" + str(r.risk) + ")."
                if r.pareto
                else "λ* is the lowest certified one: it delegates the most within the budget."
            ),
            *_compare(r, i),
            "The audit's drift alarm watches the share of rows sent to the judge, and its quality alarms watch what the probe "
            "misses on the control sample; a shift that moves neither goes unseen. When one fires, recalibrate: on fresh "
            "labelled rows (python -m jobs.calibrate), or for the budget on the recent nights themselves "
            "(python -m jobs.calibrate --from-runs <audit output>).",
        ]
    out = [
        f"Nothing could be certified at α = {pct(r.alpha)} and δ = {r.delta:g}: tomorrow no conversation goes to the judge; every "
        "decision is the probe's alone."
    ]
    if r.performance_target is not None:  # joint control: the budget may not be what failed
        return out + [f"Why: {r.message} Check the performance target before adding rows."]
    rate = np.asarray(r.budget_risk, dtype=float)
    below = np.flatnonzero(rate < r.alpha)
    if not below.size:
        return out + [
            "Every threshold on the grid sends at least α of the calibration rows to the judge: more rows will not help. "
            "Raise α or retrain the DV probe so that its scores separate (its grid comes from its own training split)."
        ]
    test_share = 1 - (r.opt_fraction or 0) if r.pareto else 1.0
    # the level the first test runs at: δ for fixed-sequence testing, δ/m for Bonferroni and Holm
    level = r.delta if r.method == "fixed_sequence" else r.delta / len(r.grid)
    j = below[np.argmin(np.abs(rate[below] - r.alpha / 2))]  # a useful threshold: about half the budget
    need = rows_to_certify(float(rate[j]), r.alpha, level, chance=CHANCE)
    if need is None:
        return out + [
            f"The threshold nearest half the budget sends {rate[j]:.1%} of the rows, too close to α for any feasible calibration set."
        ]
    total = int(np.ceil(need / test_share))
    if total <= r.n:  # enough rows for the budget test: something else stopped it
        return out + [f"Why: {r.message}"]
    zero = int(np.ceil(min_certifiable_n(r.alpha, level) / test_share))
    return out + [
        f"To certify a threshold that sends {rate[j]:.1%} of the rows (the one nearest half the budget) with a "
        f"{CHANCE:.0%} chance, about {total:,} labelled calibration rows are needed"
        f"{' (' + format(need, ',') + ' in the testing split of Pareto testing)' if r.pareto else ''}"
        f"{'' if level == r.delta else ' (' + r.method + ' tests at δ/' + format(len(r.grid), ',') + ')'}; "
        f"there were {r.n:,}. A threshold that sends none needs {zero:,} (for certain: its count is 0)."
    ]
