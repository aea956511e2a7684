"""Identities: one canonical JSON and one SHA-256 for configs, artifacts, resume keys and data.

Every hash the project records (a config's, a calibration's, a probe's content hash, a stage's resume
key) is :func:`digest` of canonical JSON: keys sorted, no spaces, NaN refused. Two objects that are
equal as JSON have the same identity, whatever process or order made them.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np

__all__ = ["canonical_json", "digest", "data_hash"]


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("utf-8")


def digest(obj: Any) -> str:
    """SHA-256 (hex) of the canonical JSON of ``obj``."""
    return hashlib.sha256(canonical_json(obj)).hexdigest()


def data_hash(*arrays: Any) -> str:
    """SHA-256 of the contents of some arrays (training features, targets, ids): identifies the data
    a probe or a calibration was fitted on. Strings are hashed one by one, NUL-separated."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.asarray(a)
        if a.dtype.kind in "OUS":
            for x in a.ravel():
                h.update(str(x).encode("utf-8"))
                h.update(b"\0")
        else:
            a = np.ascontiguousarray(a)
            h.update(str(a.dtype).encode())
            h.update(str(a.shape).encode())
            h.update(a.tobytes())
    return h.hexdigest()
