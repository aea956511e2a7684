"""The nightly audit: python -m jobs.audit --config configs/demo.yaml [--date YYYY-MM-DD] [--run-id ID]

Exit codes (what a scheduler should do):
  0  published (the drift alarm, if it fired, is in the report, the manifest's summary and the log:
     a published run is not a failure, so Kubernetes does not rerun it)
  2  bad input: config, artifacts or corpus (nothing written; a retry fails the same way)
  3  published, the drift alarm fired and --fail-on-drift was given (for interactive use and CI
     gates; the manifests in cluster/ do not pass it)
  5  published, more than expert.max_failure_share of the judged rows got no usable answer from the
     expert (failed, or no label token: they kept the probe's score) and --fail-on-judge-errors was
     given; without it the JUDGE ALARM is in the report, the manifest's summary and the log, and the
     exit code is 0
  4  another driver holds this run id's lease (nothing written; the other run goes on)
  6  stopped at audit.deadline before publishing (the lease released; a rerun resumes what was committed)
  1  anything else: a crash, or a stage whose actors waited audit.unschedulable_wait_minutes for resources
     (retrying resumes the run id from its staging)
"""

import sys

from ctd.audit.run import run_audit
from ctd.cli import job_main


def _args(ap):
    ap.add_argument(
        "--date",
        default=None,
        metavar="YYYY-MM-DD",
        help="the day to audit: {date} in audit.corpus and audit.run_id (default: yesterday in audit.timezone)",
    )
    ap.add_argument("--run-id", default=None, help="overrides audit.run_id")
    ap.add_argument("--fail-on-drift", action="store_true", help="exit 3 after publishing when the drift alarm fires")
    ap.add_argument(
        "--fail-on-judge-errors",
        action="store_true",
        help="exit 5 after publishing when more than expert.max_failure_share of the judged rows failed",
    )


def _run(cfg, args):
    report = run_audit(cfg, run_id=args.run_id, date=args.date)
    if args.fail_on_drift and report.drift_alarm:
        return 3
    return 5 if (args.fail_on_judge_errors and report.judge_alarm) else 0


if __name__ == "__main__":
    sys.exit(job_main("audit", _run, add_args=_args))
