"""The control sample: a uniform random share of the audited rows that goes to the judge every night,
whatever the scores say, so that the report can estimate what the probe misses.

A row is in the sample when ``u < π``, where ``u`` is a keyed hash of its id (BLAKE2b keyed by the
audited day, read as a number in [0, 1)). So the sample is reproducible (a rerun or a resumed run
draws the same rows), independent of every score (the hash sees the id and the day only), and, for
distinct ids, a Bernoulli(π) sample: which rows a night samples cannot be steered by anything the
model computes. ``π`` is ``audit.control_share`` held between a floor and a ceiling in rows
(:func:`ctd.stats.quality.control_plan`), fixed from the rows read before any row is drawn.

Stage 1 keeps the text of the rows with ``u < keep`` (:func:`keep_share`, an upper bound of π fixed
before the corpus is read); the audit then takes ``u < π`` of them.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa

__all__ = ["control_u", "keep_share", "ROW_BYTES_BOUND"]

# Stage 1 must keep the text of every row the sample may take before it knows how many rows there are.
# With rows averaging at most this many bytes, bytes / ROW_BYTES_BOUND is a lower bound of the rows and
# so floor / that bound an upper bound of the share the floor asks for. (A night of longer rows can get
# fewer than the floor; the report says how many it got.)
ROW_BYTES_BOUND = 64 << 10


def control_u(ids: pa.Array | pa.ChunkedArray | list, day: str) -> np.ndarray:
    """The row ids' keyed hashes as numbers in [0, 1) (NaN for a null id)."""
    key = f"ctd-control:{day}".encode()[:64]
    out = np.full(len(ids), np.nan)
    for i, rid in enumerate(ids.to_pylist() if hasattr(ids, "to_pylist") else ids):
        if rid is not None:
            h = hashlib.blake2b(rid.encode("utf-8", "surrogatepass"), key=key, digest_size=8).digest()
            out[i] = int.from_bytes(h, "big") / 2.0**64
    return out


def keep_share(corpus_bytes: int, share: float, floor: int) -> float:
    """The share of rows whose text stage 1 keeps for the sample: at least any π the floor can ask of a
    corpus of ``corpus_bytes`` bytes (see :data:`ROW_BYTES_BOUND`)."""
    if share <= 0:
        return 0.0
    low_rows = max(1, corpus_bytes // ROW_BYTES_BOUND)
    return float(min(1.0, max(share, floor / low_rows)))
