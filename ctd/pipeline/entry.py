"""Shared command-line handling for the ``jobs/`` entrypoints (``ray job submit ... -- python -m jobs.X``).

    --config FILE        YAML job config (validated; unknown keys rejected)
    --set KEY=VALUE      override a config value by dotted path (VALUE parsed as YAML), repeatable

Bad input — a config error, a missing or tampered artifact, a corpus that cannot be found — prints
one line starting with "error:" and exits with code 2, before anything is written. A run id whose
lease another driver holds (:mod:`ctd.lease`), or took over from this one, prints one line and exits
with code 4.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

import yaml

__all__ = ["job_main"]


def _override(s: str) -> tuple[str, object]:
    if "=" not in s:
        raise argparse.ArgumentTypeError(f"--set needs KEY=VALUE, got {s!r}")
    k, v = s.split("=", 1)
    return k.strip(), yaml.safe_load(v)


def job_main(name: str, run: Callable, argv=None, add_args: Callable | None = None, config_model=None) -> int:
    from ..artifacts import ArtifactError
    from ..config import ConfigError, load_config
    from ..lease import EXIT_LEASE_HELD, LeaseHeld, LeaseLost
    from ..tables import TableError

    ap = argparse.ArgumentParser(prog=f"python -m jobs.{name}")
    ap.add_argument("--config", required=True)
    ap.add_argument("--set", dest="overrides", action="append", type=_override, default=[], metavar="KEY=VALUE")
    if add_args:
        add_args(ap)
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, dict(args.overrides), model=config_model)
        code = run(cfg, args)
    except (ConfigError, ArtifactError, TableError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except (LeaseHeld, LeaseLost) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_LEASE_HELD
    return int(code or 0)
