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
from dataclasses import dataclass

import numpy as np

from . import __version__, storage
from .artifacts import ArtifactError, config_hash, data_hash, require_match
from .report import html_page, html_table, plot_calibration, plot_histogram, write_report
from .signals import delegation_value, effective_capacity
from .stats.calibrate import CalibrationResult, calibrate, threshold_grid

__all__ = ["CalibrationArtifact", "calibrate_table", "write_calibration", "load_calibration", "FORMAT"]

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
    figures = {"calibration": plot_calibration(body["calibration"])}
    if scores is not None:
        figures["dv_histogram"] = plot_histogram({"calibration dv": scores["dv"]}, r.lambda_hat, "DV scores of the calibration rows", "d(x)")
    summary = {
        "alpha": r.alpha, "delta": r.delta, "n": r.n, "lambda_star": body["calibration"]["lambda_hat"], "delegates": r.delegates,
        "message": r.message, "method": r.method, "pareto": r.pareto, "risk": r.risk, "certified_count": r.certified_count,
        "artifact_hash": body["artifact_hash"], "provenance": art.provenance,
    }
    i = None if not r.delegates else int(np.searchsorted(r.grid, r.lambda_hat))
    rows = [{"quantity": k, "value": v} for k, v in [
        ("α (budget)", r.alpha), ("δ", r.delta), ("calibration rows n", r.n), ("λ*", "never delegate" if i is None else r.lambda_hat),
        ("delegation rate on calibration at λ*", "—" if i is None else float(r.budget_risk[i])),
        ("certified thresholds", r.certified_count), ("method", f"{r.method}{' + Pareto testing' if r.pareto else ''}"),
        ("effective delegation capacity (share v > 0)", art.provenance.get("effective_capacity")),
    ]]
    page = html_page("CTD calibration report", [
        ("Result", f"<p class='{'ok' if r.delegates else 'alarm'}'>{r.message}</p>" + html_table(rows)),
        ("Provenance", f"<pre>{_pre(art.provenance)}</pre>"),
    ], figures)
    out = write_report(out_dir, "calibration_report", summary, page, figures)
    out["artifact"] = uri
    return out


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
