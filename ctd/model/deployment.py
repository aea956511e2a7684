"""A deployment: the monitored model, its two probes and (for the audit) the calibration, loaded and
checked against each other once, before any compute.

The calibration and audit jobs start from :meth:`Deployment.load`; a mismatch (probes made for another
model or layer, a calibration made for other probes, a tampered artifact) raises
:class:`ctd.model.artifacts.ArtifactError` before anything is written.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..calibration.artifact import CalibrationArtifact, load_calibration
from ..config import ModelConfig, ProbesConfig, resolve_model_path
from .artifacts import model_fingerprint
from .probes import LinearProbe

__all__ = ["Deployment"]


@dataclass(frozen=True)
class Deployment:
    model: ModelConfig
    model_dir: str
    model_fingerprint: str
    safety: LinearProbe
    dv: LinearProbe
    calibration: CalibrationArtifact | None = None
    calibration_uri: str | None = None

    @classmethod
    def load(cls, model: ModelConfig, probes: ProbesConfig, calibration: str | None = None) -> Deployment:
        model_dir = resolve_model_path(model.path)
        fp = model_fingerprint(model_dir)
        safety, dv = LinearProbe.load(probes.safety), LinearProbe.load(probes.dv)
        for probe in (safety, dv):
            probe.check_compatible(model_fingerprint=fp, layer=model.layer, pooling="mean")
        cal = None
        if calibration is not None:
            cal = load_calibration(calibration)
            cal.check_matches(
                model_fingerprint=fp, layer=model.layer, safety_probe_hash=safety.content_hash, dv_probe_hash=dv.content_hash
            )
        return cls(model, model_dir, fp, safety, dv, cal, calibration)

    @property
    def model_id(self) -> str:
        return self.safety.meta.get("model_id", "")

    @property
    def layer(self) -> int:
        return self.model.layer

    def provenance(self) -> dict:
        """What a calibration made with this deployment records (and an audit checks)."""
        return {
            "model_id": self.safety.meta.get("model_id"),
            "model_fingerprint": self.model_fingerprint,
            "layer": self.layer,
            "safety_probe_hash": self.safety.content_hash,
            "dv_probe_hash": self.dv.content_hash,
        }
