"""Apply a calibrated alarm threshold to one day's step logs:

    python -m jobs.monitor --config configs/monitor.yaml [--date YYYY-MM-DD] [--run-id ID]

Calibrate first: ctd monitor calibrate --trajectories FILE --risk false-alarm --control crc --epsilon 0.1 --out DIR
"""

import sys

from ctd.cli import job_main
from ctd.config import MonitorConfig
from ctd.monitor.job import run_monitor


def _args(ap):
    ap.add_argument(
        "--date",
        default=None,
        metavar="YYYY-MM-DD",
        help="the day to monitor: {date} in monitor.input and monitor.run_id (default: yesterday in monitor.timezone)",
    )
    ap.add_argument("--run-id", default=None, help="overrides monitor.run_id")


if __name__ == "__main__":
    sys.exit(
        job_main(
            "monitor",
            lambda cfg, args: run_monitor(cfg, run_id=args.run_id, date=args.date) and 0,
            add_args=_args,
            config_model=MonitorConfig,
        )
    )
