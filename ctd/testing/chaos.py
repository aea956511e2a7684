"""Fault injection for the reliability tests and benchmark: kill real Ray actor processes mid-run.

:class:`ActorKiller` watches the cluster's live actors from a thread and sends SIGKILL to the worker
process of an actor whose class name contains a given string, once it has lived long enough to be
working. Ray Data then restarts the actor and retries its in-flight batch (its actor pools default to
``max_restarts=-1, max_task_retries=-1``). Nothing in the pipeline knows about this module: the
faults are real process deaths, not flags. Single-node only (it kills by PID).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from typing import IO

from .. import storage
from ..runs.layout import RunLayout
from ..tables import read_parquet

__all__ = ["ActorKiller", "kill_audit_driver", "RunReader"]


class ActorKiller(threading.Thread):
    def __init__(self, class_contains: str, after_seconds: float = 3.0, kills: int = 1, poll: float = 0.25):
        super().__init__(daemon=True)
        self.class_contains, self.after, self.kills, self.poll = class_contains, after_seconds, kills, poll
        self.first_seen: dict[str, float] = {}
        self.pid_first_seen: dict[int, float] = {}
        self.kill_times: list[float] = []
        self.killed: list[int] = []
        self._halt = threading.Event()

    def run(self) -> None:
        from ray.util.state import list_actors

        while not self._halt.is_set():
            try:
                actors = list_actors(filters=[("state", "=", "ALIVE")], detail=True, raise_on_missing_output=False)
            except Exception:  # the state API can be briefly unavailable; keep watching
                time.sleep(self.poll)
                continue
            now = time.time()
            for a in actors:
                if self.class_contains not in (a.class_name or ""):
                    continue
                pid = a.pid
                if not pid:
                    continue
                self.pid_first_seen.setdefault(pid, now)
                self.first_seen.setdefault(a.actor_id, now)
                if len(self.killed) < self.kills and pid not in self.killed and now - self.first_seen[a.actor_id] >= self.after:
                    try:
                        os.kill(pid, signal.SIGKILL)
                        self.killed.append(pid)
                        self.kill_times.append(now)
                    except ProcessLookupError:
                        pass
            time.sleep(self.poll)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=10)

    @property
    def restarted(self) -> bool:
        """A live actor of that class appeared (a new PID) after the first kill: Ray replaced it."""
        return bool(self.kill_times) and any(t > self.kill_times[0] for t in self.pid_first_seen.values())


def kill_audit_driver(
    config_path: str,
    output: str,
    run_id: str,
    overrides: dict[str, str],
    *,
    env: dict,
    cwd: str,
    after_files: int = 2,
    watch: str = "expert",
    timeout: float = 600.0,
    stdout: int | IO[bytes] | None = subprocess.DEVNULL,
) -> dict:
    """Start ``python -m jobs.audit`` as its own process group, wait until it has committed
    ``after_files`` expert-score files (``watch="expert"``) or stage-1 chunks (``watch="stage1"``),
    then SIGKILL the whole group (the driver dies mid-stage). Returns whether it was still running
    when killed, how many expert rows were committed and which stage-1 chunks were."""
    staging = RunLayout(output, run_id).path("_staging")
    expert_dir, stage1_dir = storage.join(staging, "expert"), storage.join(staging, "stage1")
    cmd = [sys.executable, "-m", "jobs.audit", "--config", config_path, "--run-id", run_id]
    for k, v in overrides.items():
        cmd += ["--set", f"{k}={v}"]
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=stdout, stderr=subprocess.STDOUT, start_new_session=True)

    def committed_files():
        return [n for n in storage.listdir(expert_dir) if n.endswith(".parquet")]

    def committed_chunks():
        return [n for n in storage.listdir(stage1_dir) if storage.exists(storage.join(stage1_dir, n, "_SUCCESS.json"))]

    done = committed_files if watch == "expert" else committed_chunks
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and len(done()) < after_files:
        time.sleep(0.3)
    interrupted = proc.poll() is None
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(3)  # let the dead driver's Ray job and workers go
    rows = sum(read_parquet(storage.join(expert_dir, n)).num_rows for n in committed_files())
    return {"interrupted": interrupted, "committed_rows": rows, "committed_chunks": sorted(committed_chunks())}


class RunReader(threading.Thread):
    """A reader polling a published run while something else happens to it (a rerun, a kill): each
    read records the manifest's attempt and whether the ids read are the run's ids at the start."""

    def __init__(self, output: str, run_id: str, every: float = 0.5):
        from ..runs.folder import read_manifest, read_run_table

        super().__init__(daemon=True)
        self.output, self.run_id, self.every = output, run_id, every
        self._manifest, self._table = read_manifest, read_run_table
        self.before = read_manifest(output, run_id)
        self.want = self._ids()
        self.reads: list[dict] = []
        self._halt = threading.Event()

    def _ids(self) -> list:
        return sorted(self._table(self.output, self.run_id, columns=["id"]).column("id").to_pylist())

    def run(self) -> None:
        while not self._halt.is_set():
            m = self._manifest(self.output, self.run_id)
            whole = m is not None and m["attempt"] == self.before["attempt"] and self._ids() == self.want
            self.reads.append({"attempt": (m or {}).get("attempt"), "whole_previous_run": whole})
            time.sleep(self.every)

    def stop(self) -> list[dict]:
        self._halt.set()
        self.join(timeout=30)
        return self.reads

    @property
    def saw_previous_run_whole(self) -> bool:
        return bool(self.reads) and all(r["whole_previous_run"] for r in self.reads)
