"""While the night runs: stop it when its work cannot be placed, or when its deadline has passed.

The pre-flight check (:mod:`ctd.pipeline.preflight`) refuses a request that no node can ever meet. A
request that some node type could meet can still wait forever tonight: the node group's quota is used
up, the cloud has no GPU of that type, another job holds the nodes. Ray then keeps the actors
*pending creation* and the job holds its lease. :func:`watch` runs beside the night and, every
``poll_s`` seconds, asks Ray's state API for this job's actors:

- a **stuck stage** is an actor class with actors pending creation and none alive (a pool that got
  some of its actors runs on them, slower, and is not stuck). One stuck for ``wait_s`` seconds in a
  row stops the night with :class:`StuckWaiting` (exit 1: a retry later may find the resources);
- past ``deadline`` the night stops with :class:`DeadlinePassed` (exit 6).

A local instance the job started itself has no dashboard, so no state API: there only the deadline
is watched (said once in the log).

Either way the exception is raised in the driver's main thread (a signal interrupts whatever it
waits on), the lease is released on the way out, and what was committed stays for the resume: a
rerun of the same run id skips the committed stage-1 chunks and judge files.
"""

from __future__ import annotations

import datetime as _dt
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

from ..log import log
from .raydata import has_state_api

__all__ = ["Stopped", "StuckWaiting", "DeadlinePassed", "deadline_at", "stuck_classes", "watch", "EXIT_DEADLINE"]

EXIT_DEADLINE = 6
_said_local: list[bool] = []  # the note that a local instance is not watched for waits, said once per process


class Stopped(RuntimeError):
    """The night was stopped before it finished; what it committed is kept for the resume."""

    exit_code = 1


class StuckWaiting(Stopped):
    """Work that waited for resources longer than allowed (exit 1: retry when the cluster has them)."""


class DeadlinePassed(Stopped):
    """The night's deadline passed before it published (exit 6)."""

    exit_code = EXIT_DEADLINE


def deadline_at(spec: str | None, timezone: str, start: _dt.datetime) -> _dt.datetime | None:
    """The moment ``audit.deadline`` names, for a night that starts at ``start`` (timezone-aware): "HH:MM" is
    the next such clock time in ``timezone`` after the start (tomorrow's when today's has passed); "90m" or
    "2.5h" is that long after the start; None is none."""
    if spec is None:
        return None
    if spec[-1] in "mh":
        return start + _dt.timedelta(minutes=float(spec[:-1]) * (60 if spec[-1] == "h" else 1))
    from zoneinfo import ZoneInfo

    local = start.astimezone(ZoneInfo(timezone))
    hh, mm = (int(x) for x in spec.split(":"))
    at = local.replace(hour=hh, minute=mm, second=0, microsecond=0)
    return at if at > local else at + _dt.timedelta(days=1)


def stuck_classes(actors: Iterable[dict]) -> dict[str, dict]:
    """The actor classes with at least one actor pending creation and none alive, each with one of its
    pending actors' required resources (``{"class_name", "state", "required_resources"}`` per actor,
    as Ray's state API lists them)."""
    alive, pending = set(), {}
    for a in actors:
        name = a.get("class_name") or "?"
        if a.get("state") == "ALIVE":
            alive.add(name)
        elif a.get("state") in ("PENDING_CREATION", "DEPENDENCIES_UNREADY"):
            pending.setdefault(name, dict(a.get("required_resources") or {}))
    return {k: v for k, v in pending.items() if k not in alive}


def _job_actors() -> list[dict]:
    """This job's actors that are not dead, from Ray's state API (the dashboard's)."""
    import ray
    from ray.util.state import list_actors

    ctx = ray.get_runtime_context()
    job = ctx.get_job_id()
    return [
        {"class_name": a.class_name, "state": a.state, "required_resources": a.required_resources}
        for a in list_actors(
            address=ctx.gcs_address,  # this job's cluster, not whichever "auto" finds first on the machine
            filters=[("job_id", "=", job), ("state", "!=", "DEAD")],
            limit=10_000,
            detail=True,
            timeout=30,
            raise_on_missing_output=False,
        )
    ]


@contextmanager
def watch(
    *,
    wait_s: float | None,
    deadline: _dt.datetime | None,
    poll_s: float = 5.0,
    actors: Callable[[], list[dict]] | None = None,
    what: str = "the night",
) -> Iterator[None]:
    """Run the body under the watch described in the module docstring. ``deadline`` is timezone-aware;
    ``wait_s`` None: no limit on waiting. Outside the main thread (where no signal can be handled) the
    body runs unwatched, with a warning."""
    if wait_s is not None and actors is None and not has_state_api():
        if not _said_local:
            _said_local.append(True)
            log(
                "note: on this local Ray instance (no dashboard, so no state API) a stage waiting for resources is "
                "not watched (audit.unschedulable_wait_minutes); a deadline is"
            )
        wait_s = None
    poll = actors or _job_actors  # this job's actors, from Ray's state API
    if wait_s is None and deadline is None:
        yield
        return
    if threading.current_thread() is not threading.main_thread():
        log(f"warning: {what} runs outside the main thread: its unschedulable wait and deadline are not watched")
        yield
        return
    stop, found = threading.Event(), []
    main = threading.main_thread().ident
    assert main is not None

    def interrupt(signum, frame):
        if found:  # Ray's blocking calls (ray.get, a Dataset's iterator) give way to KeyboardInterrupt only
            raise KeyboardInterrupt(str(found[0]))

    def loop() -> None:
        since: dict[str, float] = {}
        said = -1e9  # when the last failed poll was logged: once every 5 minutes at most
        while not stop.wait(poll_s):
            if deadline is not None and _dt.datetime.now(deadline.tzinfo) >= deadline:
                found.append(
                    DeadlinePassed(
                        f"{what} stopped at its deadline ({deadline.isoformat(timespec='minutes')}, audit.deadline); "
                        "what it committed is kept: a rerun of the same run id resumes from it"
                    )
                )
            elif wait_s is not None:
                try:
                    stuck = stuck_classes(poll())
                except Exception as e:  # noqa: BLE001 - the state API is a hint: a failed poll is not a stuck night
                    if time.monotonic() - said >= 300:
                        said = time.monotonic()
                        log(
                            f"warning: could not list the job's actors ({type(e).__name__}: {str(e)[:160]}): until it can, "
                            "a stage stuck waiting for resources is not seen (a local Ray instance has no state API); "
                            "retrying every few seconds, said again in 5 minutes"
                        )
                    continue
                now = time.monotonic()
                since = {k: since.get(k, now) for k in stuck}
                late = {k: v for k, v in stuck.items() if now - since[k] >= wait_s}
                if late:
                    name, need = next(iter(late.items()))
                    found.append(
                        StuckWaiting(
                            f"{what} stopped: {name} waited {now - since[name]:.0f} s for resources {need} that no node "
                            f"gave it (audit.unschedulable_wait_minutes = {wait_s / 60:g}); the cluster may be "
                            "full or a node group at its quota. What was committed is kept: a retry resumes from it"
                        )
                    )
            if found:
                log(f"error: {found[0]}")
                signal.pthread_kill(main, signal.SIGUSR1)
                while not stop.wait(max(poll_s, 30.0)):  # until the body has left (a handler on the way may swallow one)
                    signal.pthread_kill(main, signal.SIGUSR1)
                return

    previous = signal.signal(signal.SIGUSR1, interrupt)
    watcher = threading.Thread(target=loop, name="ctd-watchdog", daemon=True)
    watcher.start()
    try:
        yield
    except KeyboardInterrupt:
        if found:  # the watch's interrupt, however Ray passed it on: the reason, as its own exception
            raise found[0] from None
        raise
    finally:
        stop.set()
        watcher.join()
        signal.signal(signal.SIGUSR1, previous)
