"""Apply a calibrated alarm threshold to step logs: python -m jobs.monitor --config configs/monitor.yaml

Calibrate first: ctd monitor calibrate --trajectories FILE --risk false-alarm --control crc --epsilon 0.1 --out DIR
"""

import sys

from ctd.config import MonitorConfig
from ctd.pipeline.entry import job_main
from ctd.pipeline.monitor import run_monitor

if __name__ == "__main__":
    sys.exit(job_main("monitor", lambda cfg, args: run_monitor(cfg) and 0, config_model=MonitorConfig))
