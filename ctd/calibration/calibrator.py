"""Calibrating λ* from a labelled scores table: settings validated once, then ``fit``.

    scores = CalibrationScores.from_table(table, uri)          # validated: ids, labels, probe, expert, dv
    artifact = Calibrator(settings, cascade).fit(scores, grid)   # LTT (ctd.stats.calibrate) + provenance

The ``ctd calibrate`` command and the calibration job both go through :class:`Calibrator`. The grid
must be fixed before these scores are seen: the DV probe's reference quantiles from its own training
split (:func:`grid_for`), or by default a uniform grid on [-1, 1] (the range of the delegation value).
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from numpy.typing import ArrayLike

from ..config import CalibrationConfig
from ..hashing import data_hash
from ..model.probes import LinearProbe
from ..stats.calibrate import calibrate, threshold_grid
from ..stats.cascade import Cascade
from ..stats.signals import delegation_value, effective_capacity
from ..tables import TableError
from .artifact import CalibrationArtifact

__all__ = ["CalibrationScores", "Calibrator", "grid_for", "CALIBRATION_COLUMNS"]

CALIBRATION_COLUMNS = ("id", "label", "probe", "expert", "dv")


@dataclass(frozen=True)
class CalibrationScores:
    """Labelled calibration rows: ids (unique strings), labels 0/1, probe and expert probabilities
    in [0, 1], finite d(x); groups when known. In a fixed order (by id), whatever order workers wrote."""

    ids: np.ndarray
    label: np.ndarray
    probe: np.ndarray
    expert: np.ndarray
    dv: np.ndarray
    group: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def from_table(cls, table: pa.Table, uri: str = "scores") -> CalibrationScores:
        """Validated scores from a table; raises :class:`ctd.tables.TableError` naming ``uri``."""
        missing = [c for c in CALIBRATION_COLUMNS if c not in table.column_names]
        if missing:
            raise TableError(f"{uri}: missing column(s) {', '.join(missing)} (need {', '.join(CALIBRATION_COLUMNS)})")
        if table.num_rows == 0:
            raise TableError(f"{uri}: no rows")
        ids = np.asarray(table.column("id").cast(pa.string()).to_pylist(), dtype=object)
        if any(i is None or i == "" for i in ids):
            raise TableError(f"{uri}: column 'id' has missing or empty values")
        if len(set(ids.tolist())) != len(ids):
            raise TableError(f"{uri}: column 'id' has duplicate values")
        cols = {name: _numeric(table, name, uri) for name in ("label", "probe", "expert", "dv")}
        if not np.all(np.isin(cols["label"], (0, 1))):
            bad = sorted(set(np.unique(cols["label"]).tolist()) - {0.0, 1.0})[:5]
            raise TableError(f"{uri}: column 'label' must hold 0/1 (1 = unsafe), found {bad}")
        for name in ("probe", "expert"):
            if np.any((cols[name] < 0) | (cols[name] > 1)):
                raise TableError(f"{uri}: column {name!r} must hold probabilities in [0, 1]")
        group = None
        if "group" in table.column_names:
            group = np.asarray(table.column("group").cast(pa.string()).fill_null("").to_pylist(), dtype=object)
        order = np.argsort(ids.astype(str), kind="stable")
        take = lambda a: None if a is None else a[order]  # noqa: E731
        return cls(
            ids[order],
            cols["label"].astype(np.int64)[order],
            take(cols["probe"]),
            take(cols["expert"]),
            take(cols["dv"]),
            take(group),
        )

    def table(self) -> pa.Table:
        cols = {"id": self.ids.tolist(), "label": self.label, "probe": self.probe, "expert": self.expert, "dv": self.dv}
        if self.group is not None:
            cols["group"] = self.group.tolist()
        return pa.table(cols)

    def hash(self) -> str:
        return data_hash(self.ids, self.label, self.probe, self.expert, self.dv)


def _numeric(table: pa.Table, name: str, uri: str) -> np.ndarray:
    col = table.column(name)
    if col.null_count:
        raise TableError(f"{uri}: column {name!r} has {col.null_count} missing values")
    try:
        a = np.asarray(col.to_numpy(zero_copy_only=False), dtype=float)
    except (TypeError, ValueError):
        raise TableError(f"{uri}: column {name!r} must be numeric") from None
    if not np.all(np.isfinite(a)):
        raise TableError(f"{uri}: column {name!r} has NaN or infinite values")
    return a


def grid_for(dv_probe: LinearProbe | None, size: int = 1001) -> tuple[np.ndarray, str]:
    """(grid, how it was made): the DV probe's reference quantiles from its own training split when
    it has them, else a uniform grid on [-1, 1]."""
    ref = dv_probe.meta.get("grid_reference") if dv_probe is not None else None
    if ref:
        return threshold_grid(reference=ref, size=len(ref)), "DV probe reference quantiles"
    return threshold_grid(size=size), "uniform on [-1, 1]"


@dataclass(frozen=True)
class Calibrator:
    """Learn-then-Test calibration of λ* with the configured settings (α, δ, Pareto testing, the
    performance risk, an optional joint target, the testing method, the split) and cascade rule."""

    settings: CalibrationConfig
    cascade: Cascade = Cascade()

    def fit(self, scores: CalibrationScores, grid: ArrayLike, provenance: dict | None = None) -> CalibrationArtifact:
        s = self.settings
        res = calibrate(
            scores.dv,
            np.asarray(grid, dtype=float),
            s.alpha,
            s.delta,
            labels=scores.label,
            probe=scores.probe,
            expert=scores.expert,
            pareto=s.pareto,
            risk=s.risk,
            performance_target=s.performance_target,
            method=s.method,
            seed=s.seed,
            opt_fraction=s.opt_fraction,
            cascade=self.cascade,
        )
        prov = dict(provenance or {})
        prov.setdefault("scores_hash", scores.hash())
        prov.setdefault("created_at", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
        prov["calibration_rows"] = len(scores)
        prov["effective_capacity"] = effective_capacity(delegation_value(scores.label, scores.probe, scores.expert))
        return CalibrationArtifact(res, prov)
