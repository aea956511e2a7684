"""The embedded default, end to end on a local Ray instance, offline, on CPU:

    python -m jobs.demo [--config configs/demo.yaml] [--out out/demo]

generates a corpus, builds the classifier expert (MiniLM, head fine-tuned on its own split),
trains the probes, calibrates λ* on a held-out shard, runs the audit, and prints where the
reports are.
"""

import argparse
import os
import sys
import time

import yaml

from ctd.config import load_config
from ctd.demo import deploy
from ctd.pipeline.audit import run_audit
from ctd.pipeline.runs import run_file
from ctd.pipeline.graph import init_ray, log


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jobs.demo")
    ap.add_argument("--config", default="configs/demo.yaml", help="the base config; paths are filled in under --out")
    ap.add_argument("--out", default="out/demo", help="folder for everything the demo writes")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    out = os.path.abspath(args.out)
    base = yaml.safe_load(open(args.config))
    init_ray(load_config(args.config))
    step = iter(range(1, 10))
    d = deploy(out, out, base, log=lambda m: log(f"[{next(step)}/5] {m}"))
    log("[5/5] nightly audit")
    report = run_audit(load_config(d["config_path"]))
    log(f"demo finished in {time.perf_counter() - t0:.0f} s")
    print(f"\nAudit report:        {run_file(out, report.run_id, 'report.html')}")
    print(f"Calibration report:  {out}/calibration/calibration_report.html")
    print(f"Show it here:        .venv/bin/ctd report show {out}/runs/{report.run_id}")
    print(f"Config used:         {d['config_path']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
