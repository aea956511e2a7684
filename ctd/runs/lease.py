"""One writer per run id: a lease object with an owner and an expiry, taken by a conditional write.

    <output>/runs/<run_id>/_lease.json   {"owner", "run_id", "acquired_at", "expires_at", "released"}

A driver takes the lease before it writes anything for a run and holds it until it has published:

- **take**: create the object if it does not exist (S3 ``If-None-Match: *``); if it exists and is
  released or expired, replace it conditioned on the version just read (S3 ``If-Match: <ETag>``), so
  of two drivers taking over the same expired lease exactly one wins;
- **hold**: a daemon thread renews it every ``ttl / 3`` seconds, conditioned on our own last version;
  a renewal that finds another owner marks the lease lost, and :meth:`Lease.check` (called before
  publishing) raises :class:`LeaseLost`, so a driver that was paused past its expiry never publishes
  over the new owner's run;
- **release**: replaced by a released record (conditioned on our version), which anyone may take.

The guarantee is that of :func:`ctd.storage.conditional_writes`: exclusive on S3 stores with
conditional PUTs and on a local filesystem of one machine; advisory elsewhere. Expiry compares the
holder's wall clock with the taker's: keep clocks synchronised (NTP) and ``ttl`` well above the skew.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable

from .. import storage

__all__ = ["Lease", "LeaseHeld", "LeaseLost", "EXIT_LEASE_HELD"]

EXIT_LEASE_HELD = 4  # documented exit code of the jobs: another driver holds the run's lease; nothing was written


class LeaseHeld(Exception):
    """Another live driver holds the lease."""


class LeaseLost(Exception):
    """We held the lease but another driver has taken it (ours expired)."""


class Lease:
    def __init__(self, uri: str, *, run_id: str, ttl_s: float = 120.0, wait_s: float = 0.0, log: Callable[[str], None] = print):
        self.uri, self.run_id, self.ttl_s, self.wait_s, self.log = uri, run_id, float(ttl_s), float(wait_s), log
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._token: str | None = None
        self._lost: str | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    # --------------------------------------------------------------------------------------------
    def _record(self, *, released: bool = False, acquired_at: float | None = None) -> bytes:
        now = time.time()
        return json.dumps(
            {
                "owner": self.owner,
                "run_id": self.run_id,
                "acquired_at": acquired_at or now,
                "renewed_at": now,
                "expires_at": now if released else now + self.ttl_s,
                "released": released,
            }
        ).encode()

    def acquire(self, wait_s: float = 0.0) -> Lease:
        """Take the lease, waiting up to ``wait_s`` seconds while another driver holds it (a retry
        after a crash waits for the dead driver's lease to expire); then raise :class:`LeaseHeld`
        naming the holder."""
        deadline, said = time.time() + wait_s, False
        while True:
            try:
                return self._try_acquire()
            except LeaseHeld as e:
                if time.time() >= deadline:
                    raise
                if not said:
                    self.log(f"lease: waiting up to {deadline - time.time():.0f} s: {e}")
                    said = True
                time.sleep(min(5.0, max(deadline - time.time(), 0.1)))

    def _try_acquire(self) -> Lease:
        cur = storage.read_versioned(self.uri)
        try:
            if cur is None:
                self._token = storage.write_if(self.uri, self._record(), None)
            else:
                held = _parse(cur[0])
                if not held.get("released") and held.get("expires_at", 0) > time.time():
                    raise LeaseHeld(_held_message(self.uri, held))
                why = "released" if held.get("released") else f"expired {time.time() - held.get('expires_at', 0):.0f} s ago"
                self.log(f"lease: taking over {self.uri} from {held.get('owner', '?')} ({why})")
                self._token = storage.write_if(self.uri, self._record(), cur[1])
        except storage.PreconditionFailed:
            cur = storage.read_versioned(self.uri)
            if cur is not None and _parse(cur[0]).get("owner") == self.owner:  # our own write landed after all
                self._token = cur[1]
                return self._started()
            raise LeaseHeld(_held_message(self.uri, _parse(cur[0]) if cur else {})) from None
        return self._started()

    def _started(self) -> Lease:
        self._acquired_at = time.time()
        self._thread = threading.Thread(target=self._heartbeat, name="ctd-lease", daemon=True)
        self._thread.start()
        return self

    def renew(self) -> None:
        with self._lock:
            if self._lost:
                raise LeaseLost(self._lost)
            try:
                self._token = storage.write_if(self.uri, self._record(acquired_at=self._acquired_at), self._token)
            except storage.PreconditionFailed:
                cur = storage.read_versioned(self.uri)
                if cur is not None and _parse(cur[0]).get("owner") == self.owner and not _parse(cur[0]).get("released"):
                    self._token = cur[1]  # our own write landed (a retried PUT answered 412): still ours
                    return
                self._lost = (
                    f"the lease on run {self.run_id!r} was taken by "
                    f"{_parse(cur[0]).get('owner', '?') if cur else 'nobody (deleted)'} after ours expired; "
                    "this driver must not publish"
                )
                raise LeaseLost(self._lost) from None

    def check(self) -> None:
        """Renew now; raise :class:`LeaseLost` if another driver owns the run (call before publishing)."""
        self.renew()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                self.renew()
            except LeaseLost as e:
                self.log(f"lease: LOST: {e}")
                return
            except Exception as e:  # a transient storage error: try again at the next beat
                self.log(f"lease: renewal failed ({e!r}); retrying")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        with self._lock:
            if self._lost or self._token is None:
                return
            try:
                storage.write_if(self.uri, self._record(released=True, acquired_at=self._acquired_at), self._token)
            except storage.PreconditionFailed:
                pass  # someone else holds it now: theirs to keep
            except Exception as e:  # never turn a finished run into a failure: the lease simply expires
                self.log(f"lease: release failed ({e!r}); it expires in {self.ttl_s:.0f} s")
            self._token = None

    def __enter__(self) -> Lease:
        return self.acquire(self.wait_s)

    def __exit__(self, *exc) -> None:
        self.release()


def _parse(data: bytes) -> dict:
    try:
        return json.loads(data.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        return {}  # an unreadable lease is treated as expired


def _held_message(uri: str, held: dict) -> str:
    left = max(held.get("expires_at", 0) - time.time(), 0)
    return (
        f"run {held.get('run_id', '?')!r} is being written by another driver ({held.get('owner', '?')}, lease {uri}, "
        f"expires in {left:.0f} s unless its holder renews it); nothing was written: wait for that run to finish, "
        "or rerun once the lease has expired"
    )
