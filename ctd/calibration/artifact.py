"""The calibration artifact: a calibration result plus what it was made for, with one identity.

``calibration.json`` holds α, δ, λ*, the grid, every p-value, the certified set, n, the empirical
risks, the seeds (from :class:`ctd.stats.calibrate.CalibrationResult`) and its provenance: the
monitored model's id and fingerprint, the layer, the content hashes of the safety and DV probes,
the hash of the scores table, and ``artifact_hash`` over all of it. ``artifact_hash`` is the
calibration's identity everywhere: the calibration report, the audit reports, the run manifests and
``ctd report history --calibration`` (a prefix of it is enough). The audit refuses an artifact whose
hash does not verify or whose provenance differs from the configured model and probes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .. import __version__, storage
from ..hashing import digest
from ..model.artifacts import ArtifactError, require_match
from ..stats.calibrate import CalibrationResult

__all__ = ["CalibrationArtifact", "Reference", "load_calibration", "load_reference", "FORMAT"]

FORMAT = "ctd.calibration/v1"


@dataclass(frozen=True)
class CalibrationArtifact:
    result: CalibrationResult
    provenance: dict

    @property
    def threshold(self) -> float | None:
        """λ*: a row goes to the expert when d(x) > λ*; None when nothing was certified (never delegate)."""
        return float(self.result.lambda_hat) if self.result.delegates else None

    @property
    def gate(self) -> float:
        """The gate stage 1 applies: λ*, or +inf (never delegate) when nothing was certified."""
        return float(self.result.lambda_hat) if self.result.delegates else float(np.inf)

    def body(self) -> dict:
        """``calibration.json``: the result, its provenance and ``artifact_hash`` over both."""
        body = {"format": FORMAT, "ctd_version": __version__, "provenance": self.provenance, "calibration": self.result.to_dict()}
        body["artifact_hash"] = digest(body)
        return body

    @property
    def hash(self) -> str:
        """The calibration's identity (``artifact_hash``)."""
        return self.body()["artifact_hash"]

    def save(self, out_dir: str) -> str:
        uri = storage.join(out_dir, "calibration.json")
        storage.write_json(uri, self.body())
        return uri

    def check_matches(
        self,
        *,
        model_id: str | None = None,
        model_fingerprint: str | None = None,
        layer: int | None = None,
        safety_probe_hash: str | None = None,
        dv_probe_hash: str | None = None,
    ) -> None:
        """Refuse to gate with a calibration made for another model, layer or probes."""
        require_match(
            self.provenance,
            "calibration artifact",
            model_id=model_id,
            model_fingerprint=model_fingerprint,
            layer=layer,
            safety_probe_hash=safety_probe_hash,
            dv_probe_hash=dv_probe_hash,
        )


def load_calibration(uri: str) -> CalibrationArtifact:
    """Read and verify a calibration artifact (a ``calibration.json`` URI or the folder holding it)."""
    if not uri.endswith(".json"):
        uri = storage.join(uri, "calibration.json")
    try:
        body = storage.read_json(uri)
    except FileNotFoundError:
        raise ArtifactError(f"calibration artifact not found: {uri}") from None
    except ValueError as e:
        raise ArtifactError(f"{uri} is not valid JSON ({e})") from None
    if not isinstance(body, dict) or body.get("format") != FORMAT:
        raise ArtifactError(f"{uri} is not a CTD calibration artifact")
    recorded = body.pop("artifact_hash", None)
    if recorded != digest(body):
        raise ArtifactError(f"calibration artifact {uri} failed its integrity check (artifact_hash mismatch: it was modified)")
    return CalibrationArtifact(CalibrationResult.from_dict(body["calibration"]), body["provenance"])


@dataclass(frozen=True)
class Reference:
    """The calibration rows' probe-versus-judge figures, the yardstick of a night's control sample:
    ``disagree`` of ``n`` rows where the probe's decision differs from the judge's, ``unsafe`` rows the
    judge calls unsafe."""

    n: int
    disagree: int
    unsafe: int
    groups: dict = field(default_factory=dict)  # group: (rows with d(x) > λ*, rows), when the rows have groups


def load_reference(calibration_uri: str, artifact: CalibrationArtifact, threshold: float) -> Reference | None:
    """:class:`Reference` from the ``calibration_scores.parquet`` beside ``calibration.json``, checked
    against the hash the artifact records (None when it is not there, the artifact alone was copied, or
    when the artifact records no hash).
    Raises :class:`ArtifactError` when the file is there but is not the one the calibration used."""
    from ..tables import read_parquet
    from .calibrator import CalibrationScores

    folder = calibration_uri[: -len("calibration.json")] if calibration_uri.endswith("calibration.json") else calibration_uri
    uri = storage.join(folder.rstrip("/") or ".", "calibration_scores.parquet")
    if not storage.exists(uri) or artifact.provenance.get("scores_hash") is None:
        return None  # the artifact alone was copied, or it records no scores table: no yardstick to trust
    scores = CalibrationScores.from_table(read_parquet(uri), uri)
    if artifact.provenance.get("scores_hash") != scores.hash():
        raise ArtifactError(f"{uri} is not the scores table the calibration {artifact.hash[:12]} was made from (hash differs)")
    probe, judge = scores.probe >= threshold, scores.expert >= threshold
    groups = {}
    if scores.group is not None:
        sent = scores.dv > artifact.gate
        for g in sorted(set(scores.group.tolist())):
            member = scores.group == g
            groups[g or None] = (int(np.sum(sent & member)), int(np.sum(member)))
    return Reference(len(scores), int(np.sum(probe != judge)), int(np.sum(judge)), groups)
