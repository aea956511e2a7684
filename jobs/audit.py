"""The nightly audit: python -m jobs.audit --config configs/demo.yaml [--run-id ID] [--fail-on-drift]

Exit codes: 0 published; 2 bad input (nothing written); 3 published but the drift alarm fired and
--fail-on-drift was given.
"""

import sys

from ctd.pipeline.audit import run_audit
from ctd.pipeline.entry import job_main


def _args(ap):
    ap.add_argument("--run-id", default=None, help="overrides audit.run_id")
    ap.add_argument("--fail-on-drift", action="store_true", help="exit 3 when the drift alarm fires")


def _run(cfg, args):
    report = run_audit(cfg, run_id=args.run_id)
    return 3 if (args.fail_on_drift and report.drift_alarm) else 0


if __name__ == "__main__":
    sys.exit(job_main("audit", _run, add_args=_args))
