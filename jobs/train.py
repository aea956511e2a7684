"""Fit the safety probe and the DV probe: python -m jobs.train --config configs/demo.yaml"""

import sys

from ctd.cli import job_main
from ctd.model.training import run_training

if __name__ == "__main__":
    sys.exit(job_main("train", lambda cfg, args: run_training(cfg) and 0))
