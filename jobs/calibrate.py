"""Calibrate λ* on a labelled held-out shard:      python -m jobs.calibrate --config configs/demo.yaml
or, for the budget, on the recent nights' scores:  python -m jobs.calibrate --config C --from-runs OUTPUT [--nights 7]"""

import sys

from ctd.calibration.from_runs import recalibrate_from_runs
from ctd.calibration.job import run_calibration
from ctd.cli import job_main


def _args(ap):
    ap.add_argument("--from-runs", metavar="OUTPUT", help="recertify λ* on the published nights under this audit output")
    ap.add_argument("--nights", type=int, default=7, help="with --from-runs: the last this many nights (default 7)")
    ap.add_argument("--out", help="with --from-runs: where to write the new calibration (default OUTPUT/calibration-from-runs)")


def _run(cfg, args):
    if args.from_runs:
        return recalibrate_from_runs(cfg, args.from_runs, args.nights, args.out) and 0
    return run_calibration(cfg) and 0


if __name__ == "__main__":
    sys.exit(job_main("calibrate", _run, add_args=_args))
