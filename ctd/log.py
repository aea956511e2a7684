"""The jobs' log lines: ``[ctd HH:MM:SS] message`` on stdout, flushed (a Ray job's log is its stdout)."""

from __future__ import annotations

import time

__all__ = ["log"]


def log(msg: str) -> None:
    print(f"[ctd {time.strftime('%H:%M:%S')}] {msg}", flush=True)
