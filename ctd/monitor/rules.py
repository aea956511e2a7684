"""Online monitoring of unfolding outputs with step-wise verifier scores (arXiv 2607.02510).

An external verifier gives, at step t of a trajectory, the probability s_t that the trajectory is on
track. The monitor's alarm score is r_t = 1 - s_t, and a threshold monitor raises an alarm at the
first step with r_t > λ. λ is calibrated on held-out trajectories for the false-alarm risk (alarm on a
trajectory that ends correct) or the missed-detection risk (no alarm on one that ends incorrect), by
conformal risk control (in expectation) or an upper confidence bound (with probability >= 1 - δ):
:mod:`ctd.stats.risk_control`, which reuses the project's one set of p-values and tests.

Baseline: a sequential test in the style of e-valuators. With densities f_1 (incorrect) and f_0
(correct) of the step scores, fitted on a separate split, the e-process E_t = prod_{u<=t} f_1(s_u) /
f_0(s_u) alarms when E_t >= 1/ε. If the steps of a correct trajectory were independent draws from f_0,
Ville's inequality would bound its false-alarm probability by ε at any time; verifier scores of one
trajectory are dependent, so the benchmark measures how far that holds.

Streaming: :class:`ThresholdMonitor` and :class:`EProcessMonitor` keep state per trajectory and take
one score at a time; steps out of order, duplicated steps and scores outside [0, 1] are refused.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import ArrayLike

from .. import __version__, storage
from ..hashing import digest
from ..stats.calibrate import threshold_grid
from ..stats.risk_control import RISKS, alarm_counts, control_threshold

if TYPE_CHECKING:
    import argparse

    import pyarrow as pa

__all__ = [
    "TrajectoryError",
    "Trajectories",
    "validate_steps",
    "read_step_table",
    "read_trajectories",
    "ThresholdMonitor",
    "EProcessMonitor",
    "DensityRatio",
    "evaluate_threshold",
    "evaluate_eprocess",
    "eprocess_alarms",
    "paired_positions",
    "calibrate_monitor",
    "load_monitor",
    "MONITOR_FORMAT",
]

MONITOR_FORMAT = "ctd.monitor/v1"


class TrajectoryError(ValueError):
    pass


@dataclass
class Trajectories:
    """Step logs grouped by trajectory (flat arrays with offsets; steps in order)."""

    ids: np.ndarray  # [T] trajectory ids
    label: np.ndarray  # [T] 1 = ends correct, 0 = ends incorrect
    offsets: np.ndarray  # [T + 1]
    steps: np.ndarray  # [N] step numbers
    scores: np.ndarray  # [N] verifier P(on track) in [0, 1]
    tokens: np.ndarray | None = None  # [N] tokens generated in each step

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def risk(self) -> np.ndarray:
        return 1.0 - self.scores

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def maxima(self) -> np.ndarray:
        """max_t r_t per trajectory: the alarm fires at some step iff this exceeds λ."""
        return np.maximum.reduceat(self.risk, self.offsets[:-1])

    def subset(self, idx: ArrayLike) -> Trajectories:
        idx = np.asarray(idx)
        parts = [np.arange(self.offsets[i], self.offsets[i + 1]) for i in idx]
        flat = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        offs = np.concatenate([[0], np.cumsum(self.lengths[idx])])
        return Trajectories(
            self.ids[idx],
            self.label[idx],
            offs,
            self.steps[flat],
            self.scores[flat],
            None if self.tokens is None else self.tokens[flat],
        )

    def first_alarm(self, lam: float) -> tuple[np.ndarray, np.ndarray]:
        """(alarmed [T], alarm step index within the trajectory [T], -1 where none) for r_t > λ."""
        return self.first_true(self.risk > lam)

    def first_true(self, over: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
        """For a flat per-step mask [N]: (any step true [T], index of the first true step within its
        trajectory [T], -1 where none). Every monitor's first alarm is read off this."""
        seg = np.repeat(np.arange(len(self)), self.lengths)
        first = np.full(len(self), -1, dtype=np.int64)
        hit = np.flatnonzero(over)
        if hit.size:
            # hits are in flat order, so the first hit of each trajectory is the first of its segment
            s = seg[hit]
            keep = np.concatenate([[True], s[1:] != s[:-1]])
            first[s[keep]] = hit[keep] - self.offsets[s[keep]]
        return first >= 0, first


def validate_steps(
    traj_ids: ArrayLike,
    steps: ArrayLike,
    scores: ArrayLike,
    labels: ArrayLike,
    tokens: ArrayLike | None = None,
    *,
    quarantine: bool = False,
) -> Trajectories | tuple[Trajectories, list[tuple[str, str]]]:
    """Group step rows into :class:`Trajectories` (rows of a trajectory must be contiguous or are
    grouped in their file order). Bad trajectories — steps out of order, duplicated steps, scores
    outside [0, 1] or NaN, mixed final labels — raise :class:`TrajectoryError`, or with
    ``quarantine=True`` are left out and returned as ``[(trajectory id, reason)]``."""
    traj_ids = np.asarray(traj_ids).astype(str)
    steps = np.asarray(steps)
    scores = np.asarray(scores, dtype=float)
    labels = np.asarray(labels)
    if labels.dtype == bool:
        labels = labels.astype(np.int64)
    order = np.argsort(traj_ids, kind="stable")  # group rows by trajectory, keeping each one's file order
    tid, st, sc, lb = traj_ids[order], steps[order], scores[order], labels[order]
    tk = None if tokens is None else np.asarray(tokens, dtype=float)[order]
    starts = np.flatnonzero(np.concatenate([[True], tid[1:] != tid[:-1]]))
    ends = np.concatenate([starts[1:], [tid.size]])
    good, bad = [], []
    for a, b in zip(starts, ends):
        reason = None
        d = np.diff(st[a:b].astype(float))
        if not np.all(np.isfinite(sc[a:b])) or np.any((sc[a:b] < 0) | (sc[a:b] > 1)):
            reason = "score outside [0, 1]"
        elif np.any(d == 0):
            reason = "duplicated step"
        elif np.any(d < 0):
            reason = "steps out of order"
        elif len(set(lb[a:b].tolist())) != 1:
            reason = "mixed final labels"
        elif lb[a] not in (0, 1, True, False):
            reason = f"final label must be 0/1, got {lb[a]!r}"
        if reason:
            bad.append((tid[a], reason))
        else:
            good.append((a, b))
    if bad and not quarantine:
        raise TrajectoryError(f"{len(bad)} bad trajectories, e.g. {bad[0][0]!r}: {bad[0][1]}")
    idx = np.concatenate([np.arange(a, b) for a, b in good]) if good else np.zeros(0, dtype=np.int64)
    offs = np.concatenate([[0], np.cumsum([b - a for a, b in good])]).astype(np.int64)
    t = Trajectories(
        np.array([tid[a] for a, _ in good]),
        np.array([int(lb[a]) for a, _ in good], dtype=np.int64),
        offs,
        st[idx],
        sc[idx],
        None if tk is None else tk[idx],
    )
    return (t, bad) if quarantine else t


def read_step_table(uri: str) -> pa.Table:
    """A step-log file (CSV, optionally gzipped; Parquet; JSON lines) from any URI as a pyarrow Table,
    in file order."""
    import io
    import json

    import pyarrow as pa
    import pyarrow.csv as pcsv

    from ..tables import _parquet

    data = storage.read_bytes(uri)
    if data[:4] == b"PAR1":
        return _parquet(pa.BufferReader(data))
    if uri.endswith((".jsonl", ".json", ".ndjson")):
        return pa.Table.from_pylist([json.loads(x) for x in data.decode().splitlines() if x.strip()])
    if data[:2] == b"\x1f\x8b":
        import gzip

        data = gzip.decompress(data)
    try:
        return pcsv.read_csv(io.BytesIO(data), parse_options=pcsv.ParseOptions(newlines_in_values=True))
    except pa.ArrowInvalid as e:
        raise TrajectoryError(f"{uri}: unreadable step log ({e})") from None


def read_trajectories(
    uri: str,
    *,
    trajectory: str = "uq_problem_idx",
    step: str = "num_steps",
    score: str = "judge_probability",
    label: str = "solved",
    tokens: str | None = "generated_tokens",
    quarantine: bool = False,
) -> Trajectories | tuple[Trajectories, list[tuple[str, str]]]:
    """Step logs from CSV (optionally gzipped), Parquet or JSON lines at any URI."""
    table = read_step_table(uri)
    missing = [c for c in (trajectory, step, score, label) if c not in table.column_names]
    if missing:
        raise TrajectoryError(f"{uri}: missing column(s) {', '.join(missing)}")
    col = lambda c: table.column(c).to_numpy(zero_copy_only=False)  # noqa: E731
    tk = col(tokens) if tokens and tokens in table.column_names else None
    return validate_steps(col(trajectory), col(step), col(score), col(label), tk, quarantine=quarantine)


# ----------------------------------------------------------------------------------------------
# streaming monitors
# ----------------------------------------------------------------------------------------------
class _Streaming:
    def __init__(self):
        self.state: dict[str, dict] = {}

    def _check(self, trajectory: str, step, score: float) -> dict:
        if not (np.isfinite(score) and 0 <= score <= 1):
            raise TrajectoryError(f"trajectory {trajectory!r} step {step}: score {score} outside [0, 1]")
        st = self.state.setdefault(trajectory, {"last": None, "alarmed": False, "log_e": 0.0})
        if st["last"] is not None and step == st["last"]:
            raise TrajectoryError(f"trajectory {trajectory!r}: duplicated step {step}")
        if st["last"] is not None and step < st["last"]:
            raise TrajectoryError(f"trajectory {trajectory!r}: step {step} out of order (after {st['last']})")
        st["last"] = step
        return st


class ThresholdMonitor(_Streaming):
    """Alarm at the first step with 1 - score > λ; one alarm per trajectory."""

    def __init__(self, lam: float):
        super().__init__()
        self.lam = float(lam)

    def observe(self, trajectory: str, step: float, score: float) -> bool:
        st = self._check(trajectory, step, score)
        if not st["alarmed"] and 1.0 - score > self.lam:
            st["alarmed"] = True
            return True
        return False


class DensityRatio:
    """log f_1(s) - log f_0(s) from histograms of step scores of incorrect (1) and correct (0)
    trajectories, with add-one smoothing (fitted on a split used for nothing else)."""

    def __init__(self, scores_incorrect: ArrayLike, scores_correct: ArrayLike, bins: int = 20):
        edges = np.linspace(0.0, 1.0, bins + 1)
        h1, _ = np.histogram(np.asarray(scores_incorrect, dtype=float), edges)
        h0, _ = np.histogram(np.asarray(scores_correct, dtype=float), edges)
        self.edges = edges
        self.log_ratio_bins = np.log((h1 + 1) / (h1.sum() + bins)) - np.log((h0 + 1) / (h0.sum() + bins))

    def __call__(self, s: ArrayLike) -> np.ndarray:
        i = np.clip(np.searchsorted(self.edges, np.asarray(s, dtype=float), side="right") - 1, 0, len(self.log_ratio_bins) - 1)
        return self.log_ratio_bins[i]


class EProcessMonitor(_Streaming):
    """Alarm when prod of f_1/f_0 over the steps so far reaches 1/ε."""

    def __init__(self, ratio: DensityRatio, epsilon: float):
        super().__init__()
        self.ratio, self.log_threshold = ratio, float(np.log(1.0 / epsilon))

    def observe(self, trajectory: str, step: float, score: float) -> bool:
        st = self._check(trajectory, step, score)
        st["log_e"] += float(self.ratio(score))
        if not st["alarmed"] and st["log_e"] >= self.log_threshold:
            st["alarmed"] = True
            return True
        return False


# ----------------------------------------------------------------------------------------------
# evaluation (vectorised; equivalent to feeding the streaming monitors step by step)
# ----------------------------------------------------------------------------------------------
def _metrics(t: Trajectories, alarmed, first) -> dict:
    correct, wrong = t.label == 1, t.label == 0
    out = {
        "false_alarm_rate": float(alarmed[correct].mean()) if correct.any() else float("nan"),
        "power": float(alarmed[wrong].mean()) if wrong.any() else float("nan"),
        "missed_detection_rate": float(1 - alarmed[wrong].mean()) if wrong.any() else float("nan"),
    }
    hit = wrong & alarmed
    out["delay_steps"] = float((first[hit] + 1).mean()) if hit.any() else float("nan")  # steps seen when the alarm fires
    out["delay_fraction"] = float(((first[hit] + 1) / t.lengths[hit]).mean()) if hit.any() else float("nan")
    if t.tokens is not None and hit.any():
        cum = np.cumsum(t.tokens)
        at = cum[t.offsets[:-1][hit] + first[hit]] - np.concatenate([[0], cum])[t.offsets[:-1][hit]]
        out["delay_tokens"] = float(at.mean())
    return out


def evaluate_threshold(t: Trajectories, lam: float) -> dict:
    alarmed, first = t.first_alarm(lam)
    return _metrics(t, alarmed, first)


def eprocess_alarms(t: Trajectories, ratio: DensityRatio, epsilon: float) -> tuple[np.ndarray, np.ndarray]:
    """(alarmed, first alarm step) per trajectory of the e-process alarming at 1/``epsilon``."""
    seg = np.repeat(np.arange(len(t)), t.lengths)
    lr = ratio(t.scores)
    cum = np.cumsum(lr)
    before = np.concatenate([[0.0], cum])[t.offsets[:-1]]
    log_e = cum - before[seg]
    return t.first_true(log_e >= np.log(1.0 / epsilon))


def evaluate_eprocess(t: Trajectories, ratio: DensityRatio, epsilon: float) -> dict:
    return _metrics(t, *eprocess_alarms(t, ratio, epsilon))


def paired_positions(t: Trajectories, a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> dict:
    """Two monitors' alarm positions (share of the trajectory seen) compared on the same trajectories:
    the incorrect ones that both detect. ``a``, ``b``: (alarmed, first) as :meth:`Trajectories.first_alarm`
    gives them. Returns the count, the share where ``a`` alarms no later than ``b``, and the mean of
    ``a``'s position minus ``b``'s (negative: ``a`` earlier)."""
    both = (t.label == 0) & a[0] & b[0]
    n = int(both.sum())
    if n == 0:
        return {"n": 0, "a_no_later_share": float("nan"), "mean_difference": float("nan")}
    pa_, pb = (a[1][both] + 1) / t.lengths[both], (b[1][both] + 1) / t.lengths[both]
    return {"n": n, "a_no_later_share": float((pa_ <= pb).mean()), "mean_difference": float((pa_ - pb).mean())}


# ----------------------------------------------------------------------------------------------
# calibration artifact and CLI
# ----------------------------------------------------------------------------------------------
def calibrate_monitor(
    t: Trajectories, *, risk: str, control: str, epsilon: float, delta: float = 0.1, grid: ArrayLike | None = None
) -> dict:
    """λ̂ for one risk and control on calibration trajectories; the artifact as a dict."""
    if risk not in RISKS:
        raise ValueError(f"risk must be one of {RISKS}")
    g = threshold_grid(size=1001, low=0.0, high=1.0) if grid is None else np.asarray(grid, dtype=float)
    kind = t.label == (1 if risk == "false-alarm" else 0)
    m = t.maxima()[kind]
    if m.size == 0:
        raise TrajectoryError(f"no {'correct' if risk == 'false-alarm' else 'incorrect'} calibration trajectories for {risk}")
    lam = float(control_threshold(m, g, risk, control, epsilon, delta))
    counts = alarm_counts(m, g, risk)
    if np.isfinite(lam):
        emp = float(counts[int(np.searchsorted(g, lam))] / m.size)
        what = f"alarm when 1 - score > {lam:.6g}"
    else:
        emp = 0.0
        what = "never alarm" if lam > 0 else "alarm at the first step"
    guarantee = f"E[{risk} rate] <= {epsilon}" if control == "crc" else f"P({risk} rate <= {epsilon}) >= {1 - delta:g}"
    body = {
        "format": MONITOR_FORMAT,
        "ctd_version": __version__,
        "risk": risk,
        "control": control,
        "epsilon": epsilon,
        "delta": delta if control == "ucb" else None,
        "lambda_hat": lam if np.isfinite(lam) else None,
        "lambda_is": None if np.isfinite(lam) else ("+inf" if lam > 0 else "-inf"),
        "rule": what,
        "guarantee": guarantee,
        "n_relevant": int(m.size),
        "n_trajectories": int(len(t)),
        "empirical_risk_at_lambda": emp,
        "score_convention": "alarm score r_t = 1 - verifier P(on track); alarm iff r_t > λ",
        "grid": [float(x) for x in g],
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    body["artifact_hash"] = digest(body)
    return body


def load_monitor(uri: str) -> dict:
    if not uri.endswith(".json"):
        uri = storage.join(uri, "monitor.json")
    body = storage.read_json(uri)
    from ..model.artifacts import ArtifactError

    if body.get("format") != MONITOR_FORMAT:
        raise ArtifactError(f"{uri} is not a CTD monitor calibration")
    h = body.pop("artifact_hash", None)
    if h != digest(body):
        raise ArtifactError(f"monitor calibration {uri} failed its integrity check (artifact_hash mismatch)")
    body["artifact_hash"] = h
    return body


def monitor_lambda(body: dict) -> float:
    if body["lambda_hat"] is not None:
        return float(body["lambda_hat"])
    return np.inf if body["lambda_is"] == "+inf" else -np.inf


def calibrate_monitor_cli(args: argparse.Namespace) -> int:
    t = read_trajectories(
        args.trajectories,
        trajectory=args.trajectory_column,
        step=args.step_column,
        score=args.score_column,
        label=args.label_column,
    )
    body = calibrate_monitor(t, risk=args.risk, control=args.control, epsilon=args.epsilon, delta=args.delta)
    uri = storage.join(args.out, "monitor.json")
    storage.write_json(uri, body)
    lam = monitor_lambda(body)
    m = evaluate_threshold(t, lam)
    print(
        f"{args.control.upper()} for {args.risk} at ε={args.epsilon}: {body['rule']} ({body['guarantee']}); "
        f"n={body['n_relevant']}; on these trajectories: false alarms {m['false_alarm_rate']:.3f}, power {m['power']:.3f}"
    )
    print(f"monitor calibration: {uri}")
    return 0


def stream(
    monitor: ThresholdMonitor | EProcessMonitor, rows: Iterable[tuple[str, int, float]]
) -> Iterator[tuple[str, int, float]]:
    """Feed (trajectory, step, score) rows; yield (trajectory, step, score) for each alarm."""
    for tr, step, score in rows:
        if monitor.observe(tr, step, score):
            yield tr, step, score
