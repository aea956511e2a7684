"""Plots (matplotlib, PNG bytes) for the reports and the benchmarks.

Nothing here computes statistics: it draws what :mod:`ctd.evaluation`, :mod:`ctd.stats` and the
pipeline produced. The pages embed the PNGs (:mod:`ctd.reporting.pages`). Only the driver imports
this module: Ray workers never load matplotlib.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "plot_history",
    "plot_quality_history",
    "plot_tradeoff",
    "plot_calibration",
    "plot_budget_sweep",
    "plot_violations",
    "plot_topk_value",
    "plot_histogram",
    "plot_binned",
    "png",
]

METHOD_STYLE = {
    "ctd_pareto": ("CTD (DV, Pareto LTT)", "C0", "-"),
    "ctd_ltt": ("DV, budget-only LTT", "C0", "--"),
    "uncertainty_pareto": ("Uncertainty, Pareto LTT", "C1", "-"),
    "uncertainty_ltt": ("Uncertainty, budget-only LTT", "C1", "--"),
    "topk_uncertainty": ("top-k uncertainty", "C1", ":"),
    "topk_dv": ("top-k DV", "C0", ":"),
    "topk_oracle": ("top-k oracle v", "C2", ":"),
    "probe_only": ("probe only", "grey", "-."),
    "expert_only": ("expert only", "black", "-."),
}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _plt().close(fig)
    return buf.getvalue()


def plot_calibration(result: dict) -> bytes:
    """p-values and empirical budget risk along the grid, δ, α and the chosen threshold."""
    plt = _plt()
    grid = np.array(result["grid"], dtype=float)
    fig, ax = plt.subplots(1, 2, figsize=(11, 3.8))
    pv = np.array([np.nan if x is None else x for x in result["pvalues"]], dtype=float)
    bp = np.array([np.nan if x is None else x for x in result["budget_pvalues"]], dtype=float)
    ax[0].semilogy(grid, np.clip(bp, 1e-12, 1), color="C0", lw=1, label="budget p-value")
    if result.get("pareto"):
        ax[0].semilogy(grid, np.clip(pv, 1e-12, 1), "o", ms=3, color="C3", label="tested (Pareto front)")
    ax[0].axhline(result["delta"], color="k", ls="--", lw=1, label="δ")
    cert = np.array(result["certified"], dtype=bool)
    if cert.any():
        # the certified thresholds themselves: with Pareto testing they need not be every one between two of them
        ax[0].semilogy(
            grid[cert], np.clip(bp[cert], 1e-12, 1), "|", ms=9, color="C2", label=f"certified ({int(cert.sum()):,} thresholds)"
        )
    ax[0].set_ylabel("p-value (log scale)")
    risk = np.array(result["budget_risk"], dtype=float)
    ax[1].plot(grid, risk, color="C0", label="share sent to the judge")
    ax[1].axhline(result["alpha"], color="k", ls="--", lw=1, label="α")
    extra: list = []
    if result.get("performance_risk") is not None:
        ax2 = ax[1].twinx()
        risk_name = {"accuracy": "1 − accuracy", "auroc": "1 − AUROC"}.get(result.get("risk"), "performance risk")
        extra += ax2.plot(
            grid, np.array(result["performance_risk"], dtype=float), color="C1", lw=1, label=f"cascade's {risk_name}"
        )
        ax2.set_ylabel(f"cascade's {risk_name} on the calibration rows", color="C1")
    if result.get("lambda_hat") is not None:
        for a in ax:
            a.axvline(result["lambda_hat"], color="C3", lw=1, label=f"λ* = {result['lambda_hat']:.4g}")
    ax[0].legend(fontsize=8)
    ax[1].set_xlabel("threshold λ on the delegation value d(x)")
    ax[0].set_xlabel("threshold λ on the delegation value d(x)")
    ax[1].set_ylabel("share of calibration rows sent to the judge")
    handles, labels = ax[1].get_legend_handles_labels()
    ax[1].legend(handles + extra, labels + [h.get_label() for h in extra], fontsize=8, loc="upper right")
    fig.suptitle(
        f"Calibration: α={result['alpha']}, δ={result['delta']}, n={result['n']}, "
        f"λ*={'never delegate' if result.get('lambda_hat') is None else format(result['lambda_hat'], '.4g')}"
    )
    return png(fig)


def plot_budget_sweep(sweep: dict, metric: str = "auroc", methods: Sequence[str] | None = None, title: str = "") -> bytes:
    plt = _plt()
    b = np.array(sweep["budgets"])
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for m in methods or sweep["methods"]:
        if m not in sweep["methods"]:
            continue
        label, color, ls = METHOD_STYLE.get(m, (m, None, "-"))
        mean = np.array(sweep["methods"][m][metric]["mean"])
        std = np.array(sweep["methods"][m][metric]["std"])
        ax.plot(b, mean, ls=ls, color=color, label=label)
        ax.fill_between(b, mean - std, mean + std, color=color, alpha=0.08)
    ax.set_xlabel("budget α (share of rows the expert may see)")
    ax.set_ylabel({"auroc": "AUROC", "accuracy": "accuracy", "rate": "realised delegation rate"}.get(metric, metric))
    if metric == "rate":
        ax.plot(b, b, color="k", lw=0.8, ls="--", label="α")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title or f"{metric} vs budget (mean ± sd over {sweep['splits']} splits)", fontsize=10)
    return png(fig)


def plot_violations(validations: list[dict], title: str = "") -> bytes:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, v in enumerate(validations):
        b = np.array(v["budgets"])
        r = np.array(v["violation_rate"])
        lab = f"{'Pareto' if v['pareto'] else 'budget-only'} LTT, {v['scheme'].replace('_', '-')}"
        ax.errorbar(
            b + (i - 1.5) * 0.004,
            r,
            yerr=[r - np.array(v["ci_low"]), np.array(v["ci_high"]) - r],
            fmt="o-",
            ms=3,
            lw=1,
            capsize=2,
            label=lab,
        )
    ax.axhline(validations[0]["delta"], color="k", ls="--", lw=1, label="δ")
    ax.set_xlabel("budget α")
    ax.set_ylabel("violation frequency P(R_B(λ̂) > α)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title or f"Guarantee validation ({validations[0]['draws']} draws, n_cal={validations[0]['n_cal']})", fontsize=10)
    return png(fig)


def plot_topk_value(curve: dict, title: str = "") -> bytes:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, vals in curve["curves"].items():
        ax.plot(curve["fractions"], vals, marker="o", ms=3, label=name)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xlabel("share of rows delegated (top-k by signal)")
    ax.set_ylabel("mean delegation value v of delegated rows")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or "Mean v of the top-k rows by each signal", fontsize=10)
    return png(fig)


def plot_history(nights: list[dict], gaps: list | None = None) -> bytes:
    """The nights before, one point per audited day (:func:`ctd.runs.history.history`):
    delegation rate against α with the band a night at rate α stays in, expert calls, unsafe and
    quarantine shares, and the drift e-detector against its alarm level. ``gaps``: runs that could not
    be read (:class:`ctd.runs.history.Gap`), drawn where their day falls, as grey bands."""
    from scipy.stats import binom

    plt = _plt()
    gaps = list(gaps or [])
    dated = sorted({g.audited_date for g in gaps if g.audited_date})
    days = sorted({n["audited_date"] for n in nights} | set(dated))
    where = {d: i for i, d in enumerate(days)}
    x = np.array([where[n["audited_date"]] for n in nights], dtype=float)
    g = lambda k: np.array([n[k] for n in nights], dtype=float)  # noqa: E731
    scored, alpha = np.maximum(g("rows_scored"), 1), g("alpha")
    level = g("drift_alpha")
    fig, ax = plt.subplots(2, 2, figsize=(11, 6.4), sharex=True)
    a = ax[0, 0]
    upper = binom.ppf(1 - level, scored, alpha) / scored
    often = f"{1 - level[-1]:.1%} of the time" if np.all(level == level[-1]) else "with probability 1 − the drift alarm's level"
    a.fill_between(x, 0, upper, color="C2", alpha=0.15, step="mid", label=f"a night delegating at rate α stays here {often}")
    a.plot(x, alpha, "k--", lw=1, label="budget α")
    a.plot(x, g("delegated_by_threshold") / scored, "o-", color="C0", label="delegation rate (passed λ*)")
    a.set_ylabel("share of audited rows")
    a.set_ylim(0, max(float(np.nanmax(upper)), float(np.nanmax(g("delegated_by_threshold") / scored))) * 1.25)
    a.legend(fontsize=7, loc="lower left")
    a.set_title("Delegation rate against the budget", fontsize=10)
    a = ax[0, 1]
    a.bar(x, g("expert_calls"), color="C1")
    a.set_ylabel("judge calls (delegated + control)")
    a.set_title("Expert (judge) calls", fontsize=10)
    a = ax[1, 0]
    a.plot(x, 100 * g("decisions_unsafe") / scored, "o-", color="C3", label="flagged unsafe")
    a.plot(x, 100 * g("rows_quarantined") / np.maximum(g("rows_read"), 1), "s-", color="grey", label="quarantined (of rows read)")
    a.set_ylabel("% of rows")
    a.legend(fontsize=7)
    a.set_title("Unsafe and quarantine shares", fontsize=10)
    a = ax[1, 1]
    e = np.maximum(g("drift_e_value"), 1e-300)  # calm nights drive it far below 1: drawn as it is, on a log scale
    a.semilogy(x, e, "o-", color="C4", label="e-detector")
    a.semilogy(x, 1 / level, "k--", lw=1, label="alarm level (the drift alarm fires above it)")
    alarms = np.array([bool(n["drift_alarm"]) for n in nights])
    if alarms.any():
        a.semilogy(x[alarms], e[alarms], "o", ms=9, mfc="none", color="C3", label="alarm")
    a.legend(fontsize=7)
    a.set_ylabel("e-detector (log scale)")
    a.set_title("Drift statistic: evidence the delegation rate rose", fontsize=10)
    for a in ax.flat:
        for k, d in enumerate(dated):
            a.axvspan(
                where[d] - 0.4,
                where[d] + 0.4,
                color="grey",
                alpha=0.35,
                lw=0,
                label="unreadable night (left out)" if k == 0 else None,
            )
    ax[0, 1].legend(fontsize=7) if dated else None
    for a in ax[1]:
        a.set_xticks(np.arange(len(days)), days, rotation=30, ha="right", fontsize=8)
        a.set_xlabel("audited day")
    for a in ax.flat:
        a.grid(alpha=0.3)
    undated = len(gaps) - sum(1 for g in gaps if g.audited_date)
    fig.suptitle(
        f"The last {len(nights)} audited night(s) with this calibration"
        + (f"; {len(gaps)} unreadable run(s) left out" if gaps else "")
        + (f" ({undated} of unknown day)" if undated else ""),
        fontsize=11,
    )
    return png(fig)


def plot_tradeoff(result: dict) -> bytes:
    """Budget against performance along the threshold grid (calibration rows): the share of rows a
    threshold sends to the expert and the cascade's performance risk there, with α and λ*."""
    plt = _plt()
    rate = np.array(result["budget_risk"], dtype=float)
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    perf = result.get("performance_risk")
    if perf is None:
        ax.text(0.5, 0.5, "no performance risk recorded", ha="center", transform=ax.transAxes)
    else:
        perf = 1 - np.array(perf, dtype=float) if result.get("risk") in ("accuracy", "auroc") else np.array(perf, dtype=float)
        order = np.argsort(rate, kind="stable")
        ax.plot(rate[order], perf[order], color="C0", lw=1.2, label="cascade on the calibration rows")
        cert = np.array(result["certified"], dtype=bool)
        if cert.any():
            ax.plot(rate[cert], perf[cert], "o", ms=3, color="C2", label="certified thresholds")
        if result.get("lambda_hat") is not None:
            i = int(np.searchsorted(np.array(result["grid"], dtype=float), result["lambda_hat"]))
            ax.plot([rate[i]], [perf[i]], "*", ms=14, color="C3", label="λ* (tomorrow's threshold)")
        ax.set_ylabel({"accuracy": "accuracy", "auroc": "AUROC"}.get(result.get("risk"), "performance"))
    ax.axvline(result["alpha"], color="k", ls="--", lw=1, label="budget α")
    ax.set_xlabel("share of rows sent to the expert")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("What the budget buys: performance against delegation rate", fontsize=10)
    return png(fig)


def _finish_histogram(fig, ax, threshold, title, xlabel) -> bytes:
    """The threshold line, labels and legend shared by the histogram plots."""
    if threshold is not None and np.isfinite(threshold):
        ax.axvline(threshold, color="C3", lw=1.5, label=f"λ* = {threshold:.4g}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("rows (count per bin)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    return png(fig)


def plot_histogram(values: dict[str, np.ndarray], threshold: float | None = None, title: str = "", xlabel: str = "") -> bytes:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for name, v in values.items():
        v = np.asarray(v, dtype=float)
        v = v[np.isfinite(v)]
        if v.size:
            ax.hist(v, bins=50, alpha=0.55, label=f"{name} (n={v.size})")
    return _finish_histogram(fig, ax, threshold, title, xlabel)


def plot_binned(
    counts: dict[str, np.ndarray], edges: np.ndarray, threshold: float | None = None, title: str = "", xlabel: str = ""
) -> bytes:
    """A histogram from counts already binned (by a distributed aggregation) on ``edges``."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for name, c in counts.items():
        c = np.asarray(c)
        if c.sum():
            ax.stairs(c, edges, fill=True, alpha=0.55, label=f"{name} (n={int(c.sum())})")
    return _finish_histogram(fig, ax, threshold, title, xlabel)


QUALITY_TITLES = {
    "miss_rate": "What the probe misses (of the rows it decided alone)",
    "false_flag_rate": "Flagged by the probe, safe by the judge",
    "agreement": "Published decision agrees with the judge",
    "prevalence": "Unsafe by the judge (the night's prevalence)",
}


def plot_quality_history(nights: list[dict]) -> bytes:
    """The quality estimates of the nights (``quality`` of each audit report), one panel per estimate:
    the estimate and its interval per night; nights without a control sample are left blank."""
    plt = _plt()
    days = [n["audited_date"] for n in nights]
    fig, ax = plt.subplots(2, 2, figsize=(11, 6.0), sharex=True)
    for a, (name, title) in zip(ax.flat, QUALITY_TITLES.items()):
        pts = [(i, n["quality"][name]) for i, n in enumerate(nights) if name in (n.get("quality") or {})]
        pts = [(i, e) for i, e in pts if e.get("value") is not None and np.isfinite(e["value"])]
        if pts:
            x = np.array([i for i, _ in pts], dtype=float)
            v = np.array([e["value"] for _, e in pts])
            lo, hi = np.array([e["low"] for _, e in pts]), np.array([e["high"] for _, e in pts])
            a.errorbar(x, 100 * v, yerr=[100 * (v - lo), 100 * (hi - v)], fmt="o-", color="C0", capsize=3, lw=1)
            level = pts[-1][1].get("level", 0.95)
            a.set_ylabel(f"% (with {100 * level:g}% interval)")
        else:
            a.text(0.5, 0.5, "no control sample yet", ha="center", va="center", transform=a.transAxes, color="grey")
        a.set_title(title, fontsize=10)
        a.grid(alpha=0.3)
    for a in ax[1]:
        a.set_xticks(np.arange(len(days)), days, rotation=30, ha="right", fontsize=8)
        a.set_xlabel("audited day")
    fig.suptitle("What the probe misses, night by night (control sample; PPI++ or Clopper-Pearson intervals)", fontsize=11)
    fig.tight_layout()
    return png(fig)
