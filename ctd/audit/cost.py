"""The night's bill in the reader's terms (pure arithmetic, no Ray).

- **Pool time**: each pool's stage wall time × its workers (actors or replicas; the pool's maximum, so
  an upper bound on what ran) → worker-hours, × GPUs per worker → GPU-hours.
- **Money** where the config gives prices: GPU-hours × ``gpu_hour_price`` of the pool, and for a judge
  behind a priced endpoint the tokens sent × ``price_per_1k_tokens`` / 1,000 (tokens as the monitored
  model counts them, up to its context: a lower bound of what the endpoint bills).
- **Every row to the judge**, for comparison: tonight's judge cost per judged row × the rows audited
  (a linear extrapolation: a bigger pool may run at another rate).
- **Judge latency per row**: the time the call that judged a row took (a classifier's batch, a vLLM
  request, an HTTP request), counted per row into bins 12% wide (:data:`LATENCY_EDGES`, 20 a decade
  from 1 ms); a quantile is the upper edge of the bin that holds it, so it overstates by < 12%.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa

__all__ = ["LATENCY_EDGES", "PoolUse", "Bill", "latency_counts", "latency_quantiles"]

LATENCY_EDGES = np.logspace(-3, 4, 141)  # seconds: 1 ms ... 10^4 s, bins 10^(1/20) = 1.122 wide


def latency_counts(batch: pa.Table) -> pa.Table:
    """Rows per latency bin of a batch of expert output (``expert_seconds``; rows without it are not
    counted): one row per bin, ``bin`` 0 is below 1 ms, ``len(LATENCY_EDGES)`` above the last edge."""
    k = len(LATENCY_EDGES) + 1
    if "expert_seconds" not in batch.column_names or batch.num_rows == 0:
        counts = np.zeros(k, dtype=np.int64)
    else:
        s = batch.column("expert_seconds").to_numpy(zero_copy_only=False).astype(float)
        s = s[np.isfinite(s)]
        counts = np.bincount(np.searchsorted(LATENCY_EDGES, s, side="left"), minlength=k).astype(np.int64)
    return pa.table({"bin": np.arange(k, dtype=np.int32), "n": counts})


def latency_quantiles(counts: np.ndarray, qs: tuple[float, ...] = (0.5, 0.95)) -> dict:
    """{"n": rows timed, "p50": s, "p95": s, ...} from per-bin counts: each quantile is the upper edge of
    the bin holding it (None where no row was timed; the top open bin reports its lower edge)."""
    counts = np.asarray(counts, dtype=np.int64)
    n = int(counts.sum())
    out: dict = {"n": n}
    for q in qs:
        key = f"p{round(q * 100):d}"
        if n == 0:
            out[key] = None
            continue
        b = int(np.searchsorted(np.cumsum(counts), q * n, side="left"))
        out[key] = float(LATENCY_EDGES[min(b, len(LATENCY_EDGES) - 1)])
    return out


@dataclass(frozen=True)
class PoolUse:
    """One pool's share of the night: its stage's wall time on its workers."""

    pool: str  # "activations" or "judge"
    seconds: float  # the stage's wall time in this run
    workers: int  # actors or replicas: the pool's maximum (an upper bound on what ran)
    gpus_each: float  # GPUs per worker (0: a CPU pool)
    gpu_hour_price: float | None = None

    @property
    def worker_hours(self) -> float:
        return self.seconds * self.workers / 3600

    @property
    def gpu_hours(self) -> float:
        return self.worker_hours * self.gpus_each

    @property
    def money(self) -> float | None:
        return self.gpu_hours * self.gpu_hour_price if self.gpu_hour_price and self.gpus_each > 0 else None


@dataclass(frozen=True)
class Bill:
    """The night's cost: the pools, the judge's tokens and their price, and the judge's latency."""

    currency: str
    activations: PoolUse
    judge: PoolUse
    judged_rows: int  # judge calls this run made
    rows: int  # rows audited
    judge_tokens: int = 0  # tokens sent to the judge, as the monitored model counts them
    token_price: float | None = None  # per 1,000 tokens, for a judge behind a priced endpoint
    by_tokens: bool = False  # the judge is an endpoint billed by tokens (expert.kind http)
    latency: dict | None = None  # latency_quantiles of the judged rows
    resumed: bool = False  # this attempt resumed a night: its pool time and calls are this attempt's only

    @property
    def judge_money(self) -> float | None:
        parts = [m for m in (self.judge.money, self.token_money) if m is not None]
        return sum(parts) if parts else None

    @property
    def token_money(self) -> float | None:
        return self.judge_tokens * self.token_price / 1000 if self.token_price else None

    @property
    def total(self) -> float | None:
        """Both pools and the tokens; None unless every part that costs money (a pool with GPUs, a
        token-billed judge) has its price. CPU pools are counted as free: their price is not asked."""
        a = self.activations
        if a.gpus_each > 0 and a.money is None:
            return None
        if (self.by_tokens and self.token_money is None) or (self.judge.gpus_each > 0 and self.judge.money is None):
            return None
        parts = [m for m in (a.money, self.judge_money) if m is not None]
        return sum(parts) if parts else None

    @property
    def all_to_judge(self) -> float | None:
        """Tonight's judge cost per judged row × every audited row (None without a price or a judged row)."""
        m = self.judge_money
        return m / self.judged_rows * self.rows if m is not None and self.judged_rows else None

    @property
    def all_to_judge_gpu_hours(self) -> float | None:
        return self.judge.gpu_hours / self.judged_rows * self.rows if self.judged_rows and self.judge.gpus_each else None

    @property
    def all_to_judge_worker_hours(self) -> float | None:
        return self.judge.worker_hours / self.judged_rows * self.rows if self.judged_rows else None

    def to_dict(self) -> dict:
        return {
            "currency": self.currency,
            "pools": {u.pool: asdict(u) | {"gpu_hours": u.gpu_hours, "money": u.money} for u in (self.activations, self.judge)},
            "judged_rows": self.judged_rows,
            "rows": self.rows,
            "judge_tokens": self.judge_tokens,
            "token_price": self.token_price,
            "by_tokens": self.by_tokens,
            "judge_money": self.judge_money,
            "total": self.total,
            "all_to_judge": self.all_to_judge,
            "all_to_judge_gpu_hours": self.all_to_judge_gpu_hours,
            "all_to_judge_worker_hours": self.all_to_judge_worker_hours,
            "latency": self.latency,
            "resumed": self.resumed,
        }
