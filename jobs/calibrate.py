"""Calibrate λ* on a labelled held-out shard: python -m jobs.calibrate --config configs/demo.yaml"""

import sys

from ctd.calibration.job import run_calibration
from ctd.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main("calibrate", lambda cfg, args: run_calibration(cfg) and 0))
