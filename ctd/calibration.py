"""The calibration artifact: a calibration result plus what it was made for.

``calibration.json`` holds α, δ, λ*, the grid, every p-value, the certified set, n, the empirical
risks, the seeds (from :class:`ctd.stats.calibrate.CalibrationResult`) and its provenance: the
monitored model's id and fingerprint, the layer, the content hashes of the safety and DV probes,
the hash of the scores table, and an ``artifact_hash`` over all of it. The audit refuses an artifact
whose hash does not verify or whose provenance differs from the configured model and probes.

This module is the one entry point for calibrating from a scores table: the ``ctd calibrate`` CLI
and the Ray calibration job both call :func:`calibrate_table`.
"""

from __future__ import annotations

import datetime as _dt
import html
from dataclasses import dataclass

import numpy as np

from . import __version__, storage
from .artifacts import ArtifactError, config_hash, data_hash, require_match
from .report import html_figure, html_page, html_table, pct, plot_calibration, plot_histogram, plot_tradeoff, write_report
from .signals import delegation_value, effective_capacity
from .stats.calibrate import CalibrationResult, calibrate, threshold_grid
from .stats.pvalues import min_certifiable_n, rows_to_certify

__all__ = ["CalibrationArtifact", "calibrate_table", "write_calibration", "load_calibration", "explain", "FORMAT"]

FORMAT = "ctd.calibration/v1"


@dataclass
class CalibrationArtifact:
    result: CalibrationResult
    provenance: dict

    @property
    def lambda_star(self) -> float:
        return self.result.lambda_hat

    def to_dict(self) -> dict:
        body = {"format": FORMAT, "ctd_version": __version__, "provenance": self.provenance, "calibration": self.result.to_dict()}
        body["artifact_hash"] = config_hash(body)
        return body

    def check_matches(self, *, model_id=None, model_fingerprint=None, layer=None, safety_probe_hash=None, dv_probe_hash=None) -> None:
        """Refuse to gate with a calibration made for another model, layer or probes."""
        require_match(self.provenance, "calibration artifact", model_id=model_id, model_fingerprint=model_fingerprint,
                      layer=layer, safety_probe_hash=safety_probe_hash, dv_probe_hash=dv_probe_hash)


def calibrate_table(scores: dict[str, np.ndarray], *, alpha: float, delta: float, pareto: bool = True, risk: str = "accuracy",
                    grid=None, performance_target: float | None = None, method: str = "fixed_sequence", seed: int = 0,
                    opt_fraction: float = 0.3, cascade: str = "switch", decision_threshold: float = 0.5,
                    provenance: dict | None = None) -> CalibrationArtifact:
    """Calibrate λ on a validated scores table (see :func:`ctd.tables.scores_for_calibration`).

    ``grid`` must be fixed before these scores are seen: the DV probe's reference quantiles from
    its training split, or by default a uniform grid on [-1, 1] (the range of the delegation value).
    """
    g = threshold_grid() if grid is None else np.asarray(grid, dtype=float)
    res = calibrate(scores["dv"], g, alpha, delta, labels=scores["label"], probe=scores["probe"], expert=scores["expert"],
                    pareto=pareto, risk=risk, performance_target=performance_target, method=method, seed=seed,
                    opt_fraction=opt_fraction, cascade=cascade, decision_threshold=decision_threshold)
    v = delegation_value(scores["label"], scores["probe"], scores["expert"])
    prov = dict(provenance or {})
    prov.setdefault("scores_hash", data_hash(scores["ids"], scores["label"], scores["probe"], scores["expert"], scores["dv"]))
    prov.setdefault("created_at", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    prov["calibration_rows"] = int(len(scores["dv"]))
    prov["effective_capacity"] = effective_capacity(v)
    return CalibrationArtifact(res, prov)


def write_calibration(out_dir: str, art: CalibrationArtifact, scores: dict[str, np.ndarray] | None = None) -> dict[str, str]:
    """Write ``calibration.json`` (the artifact), ``calibration_report.{json,html}`` and plots."""
    body = art.to_dict()
    uri = storage.join(out_dir, "calibration.json")
    storage.write_json(uri, body)
    r = art.result
    figures = {"calibration": plot_calibration(body["calibration"]), "tradeoff": plot_tradeoff(body["calibration"])}
    if scores is not None:
        figures["dv_histogram"] = plot_histogram({"calibration dv": scores["dv"]}, r.lambda_hat, "DV scores of the calibration rows", "d(x)")
    summary = {
        "alpha": r.alpha, "delta": r.delta, "n": r.n, "lambda_star": body["calibration"]["lambda_hat"], "delegates": r.delegates,
        "message": r.message, "method": r.method, "pareto": r.pareto, "risk": r.risk, "certified_count": r.certified_count,
        "artifact_hash": body["artifact_hash"], "provenance": art.provenance, "explanation": explain(r),
    }
    i = None if not r.delegates else int(np.searchsorted(r.grid, r.lambda_hat))
    rows = [{"quantity": k, "value": v} for k, v in [
        ("α (budget)", r.alpha), ("δ", r.delta), ("calibration rows n", r.n), ("λ*", "never delegate" if i is None else r.lambda_hat),
        ("delegation rate on calibration at λ*", "—" if i is None else float(r.budget_risk[i])),
        ("certified thresholds", r.certified_count), ("method", f"{r.method}{' + Pareto testing' if r.pareto else ''}"),
        ("effective delegation capacity (share v > 0)", art.provenance.get("effective_capacity")),
    ]]
    words = "".join(f"<li>{html.escape(t)}</li>" for t in summary["explanation"])
    page = html_page("CTD calibration report", [
        ("What this means", f"<ul class='headline'>{words}</ul>"
         + html_figure("tradeoff", figures["tradeoff"], "What the budget buys: each threshold's share sent to the expert and the "
                       "cascade's performance on the calibration rows")),
        ("Result", f"<p class='{'ok' if r.delegates else 'alarm'}'>{html.escape(r.message)}</p>" + html_table(rows)),
        ("Provenance", f"<pre>{_pre(art.provenance)}</pre>"),
    ], {k: v for k, v in figures.items() if k != "tradeoff"})
    out = write_report(out_dir, "calibration_report", summary, page, figures)
    out["artifact"] = uri
    return out


def explain(r: CalibrationResult) -> list[str]:
    """The calibration in words: what α, δ and λ* mean for tomorrow's bill, what was certified, and
    when nothing was, what to do (how many labelled rows would be enough)."""
    per = 10_000
    if r.delegates:
        i = int(np.searchsorted(r.grid, r.lambda_hat))
        cert = r.grid[np.asarray(r.certified, dtype=bool)]
        return [
            f"Tomorrow's threshold is λ* = {r.lambda_hat:.4g} on the DV score: a conversation goes to the judge when its DV score is above it.",
            f"On traffic like these {r.n:,} calibration rows, at most α = {pct(r.alpha)} of conversations go to the judge "
            f"(at most {r.alpha * per:,.0f} judge calls per {per:,} conversations), and this holds with probability at least "
            f"1 − δ = {pct(1 - r.delta)} over the draw of the calibration rows; on the calibration rows λ* sent {r.budget_risk[i]:.1%}.",
            f"{r.certified_count:,} of the {len(r.grid):,} thresholds on the grid were certified (from {cert.min():.4g} to {cert.max():.4g}); "
            + ("λ* is the certified one that does best on the performance risk (" + str(r.risk) + ")." if r.pareto else
               "λ* is the lowest certified one: it delegates the most within the budget."),
            "If tomorrow's traffic shifts, the audit's drift alarm says so; recalibrate on fresh labelled rows then.",
        ]
    out = [f"Nothing could be certified at α = {pct(r.alpha)} and δ = {r.delta:g}: tomorrow no conversation goes to the judge; every "
           "decision is the probe's alone."]
    if r.performance_target is not None:  # joint control: the budget may not be what failed
        return out + [f"Why: {r.message} Check the performance target before adding rows."]
    rate = np.asarray(r.budget_risk, dtype=float)
    below = np.flatnonzero(rate < r.alpha)
    if not below.size:
        return out + ["Every threshold on the grid sends at least α of the calibration rows to the judge: more rows will not help. "
                      "Raise α or retrain the DV probe so that its scores separate (its grid comes from its own training split)."]
    test_share = 1 - (r.opt_fraction or 0) if r.pareto else 1.0
    # the level the first test runs at: δ for fixed-sequence testing, δ/m for Bonferroni and Holm
    level = r.delta if r.method == "fixed_sequence" else r.delta / len(r.grid)
    j = below[np.argmin(np.abs(rate[below] - r.alpha / 2))]  # a useful threshold: about half the budget
    need = rows_to_certify(float(rate[j]), r.alpha, level)
    if need is None:
        return out + [f"The threshold nearest half the budget sends {rate[j]:.1%} of the rows, too close to α for any feasible calibration set."]
    total = int(np.ceil(need / test_share))
    if total <= r.n:  # enough rows for the budget test: something else stopped it
        return out + [f"Why: {r.message}"]
    zero = int(np.ceil(min_certifiable_n(r.alpha, level) / test_share))
    return out + [f"To certify a threshold that sends {rate[j]:.1%} of the rows (the one nearest half the budget), about {total:,} labelled "
                  f"calibration rows are needed{' (' + format(need, ',') + ' in the testing split of Pareto testing)' if r.pareto else ''}"
                  f"{'' if level == r.delta else ' (' + r.method + ' tests at δ/' + format(len(r.grid), ',') + ')'}; "
                  f"there were {r.n:,}. A threshold that sends none needs {zero:,}."]


def _pre(d: dict) -> str:
    import html
    import json

    return html.escape(json.dumps(d, indent=2))


def load_calibration(uri: str) -> CalibrationArtifact:
    """Read and verify a calibration artifact (a ``calibration.json`` URI or the folder holding it)."""
    if not uri.endswith(".json"):
        uri = storage.join(uri, "calibration.json")
    try:
        body = storage.read_json(uri)
    except FileNotFoundError:
        raise ArtifactError(f"calibration artifact not found: {uri}") from None
    if not isinstance(body, dict) or body.get("format") != FORMAT:
        raise ArtifactError(f"{uri} is not a CTD calibration artifact")
    recorded = body.pop("artifact_hash", None)
    if recorded != config_hash(body):
        raise ArtifactError(f"calibration artifact {uri} failed its integrity check (artifact_hash mismatch: it was modified)")
    return CalibrationArtifact(CalibrationResult.from_dict(body["calibration"]), body["provenance"])
