"""The embedded default, end to end on a local Ray instance, offline, on CPU:

    python -m jobs.demo [--config configs/demo.yaml] [--out out/demo] [--end-date YYYY-MM-DD]

generates realistic traffic (ctd/testing/traffic.py), builds the classifier expert (MiniLM, head
fine-tuned on its own split), trains the probes, calibrates λ* on a held-out shard, audits three nights
ending yesterday or on --end-date (the last one carries a campaign the probe passes, so that what the
control sample estimates the probe misses rises while the drift alarm stays quiet), and prints where the
reports are.
"""

import argparse
import datetime as _dt
import json
import os
import sys
import time

import yaml

from ctd.audit.run import run_audit
from ctd.config import load_config
from ctd.log import log
from ctd.pipeline.raydata import init_ray
from ctd.runs.folder import run_file
from ctd.runs.job import audited_day
from ctd.testing.demo import deploy, generate_night


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jobs.demo")
    ap.add_argument("--config", default="configs/demo.yaml", help="the base config; paths are filled in under --out")
    ap.add_argument("--out", default="out/demo", help="folder for everything the demo writes")
    ap.add_argument(
        "--nights", type=int, default=3, help="audit this many nights, ending yesterday; the last one's traffic is shifted"
    )
    ap.add_argument(
        "--shifted-ambiguous",
        type=float,
        default=None,
        help="share of conversations told against their label on the shifted night (default the traffic's own, 0.15; "
        "0.8 moves the delegation rate enough for the drift alarm)",
    )
    ap.add_argument(
        "--shifted-campaign",
        type=float,
        default=0.2,
        help="share of the shifted night's rows from a campaign of harmful requests shaped like everyday questions",
    )
    ap.add_argument(
        "--end-date",
        default=None,
        help="the last audited night, YYYY-MM-DD (default yesterday); the traffic and the control sample are drawn "
        "by day, so one end date gives the same figures on every run",
    )
    args = ap.parse_args(argv)
    if args.nights < 1:
        ap.error("--nights must be at least 1")
    try:
        end = _dt.date.fromisoformat(args.end_date) if args.end_date else None
    except ValueError:
        ap.error(f"--end-date must be YYYY-MM-DD, got {args.end_date!r}")
    t0 = time.perf_counter()
    out = os.path.abspath(args.out)
    base = yaml.safe_load(open(args.config))
    init_ray(load_config(args.config).ray)
    steps = 4 + args.nights
    step = iter(range(1, steps + 1))
    started: list[tuple[str, float]] = []  # each step and when it began: where the demo's time goes

    def begin(m: str) -> None:
        started.append((m, time.perf_counter()))
        log(f"[{next(step)}/{steps}] {m}")

    d = deploy(out, out, base, log=begin, traffic="realistic")
    # each night's traffic in a file of its own; the config names them by {date}, so that
    # `python -m jobs.audit --config <out>/config.yaml --date D` audits night D
    cfg = yaml.safe_load(open(d["config_path"]))
    cfg["audit"]["corpus"] = f"{out}/corpus/audit/{{date}}.jsonl"
    with open(d["config_path"], "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    yesterday = end or audited_day(None, cfg["audit"].get("timezone", "UTC"))
    report = None
    for k in range(args.nights):
        day = (yesterday - _dt.timedelta(days=args.nights - 1 - k)).isoformat()
        shifted = k == args.nights - 1 and args.nights > 1
        ambiguous = args.shifted_ambiguous if shifted else None
        campaign = args.shifted_campaign if shifted else 0.0
        generate_night(
            f"{out}/corpus/audit/{day}.jsonl", day, seed=100 + k, ambiguous=ambiguous, campaign=campaign, traffic="realistic"
        )
        told = "" if ambiguous is None else f"{ambiguous:.0%} of conversations told against their label, "
        begin(
            f"nightly audit of {day}"
            + (
                f" (shifted traffic: {told}{campaign:.0%} from a campaign of harmful requests shaped like everyday questions)"
                if shifted
                else ""
            )
        )
        report = run_audit(load_config(d["config_path"]), date=day)
    t1 = time.perf_counter()
    log(f"demo finished in {t1 - t0:.0f} s")
    ends = [t for _, t in started[1:]] + [t1]
    timing = {
        "total_seconds": round(t1 - t0, 1),
        "cpus": os.cpu_count(),
        "note": "a step runs from its start to the next one's (a night includes writing its corpus file); "
        "the total also counts starting Ray",
        "steps": [{"step": m, "seconds": round(e - t, 1)} for (m, t), e in zip(started, ends)],
    }
    with open(os.path.join(out, "timing.json"), "w", encoding="utf-8") as f:  # benchmarks/demo_figures.py records it
        json.dump(timing, f, indent=1, ensure_ascii=False)
    print(f"\nAudit report:        {run_file(out, report.run_id, 'report.html')}")
    print(f"Calibration report:  {out}/calibration/calibration_report.html")
    print(f"Show it here:        .venv/bin/ctd report show {out}/runs/{report.run_id}")
    print(f"The nights so far:   .venv/bin/ctd report history {out}")
    print(f"Config used:         {d['config_path']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
