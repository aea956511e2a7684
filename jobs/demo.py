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

from ctd.config import load_config, resolve_model_path
from ctd.demo import build_demo_expert, generate_corpus
from ctd.pipeline.audit import run_audit
from ctd.pipeline.calibrate import run_calibration
from ctd.pipeline.graph import log
from ctd.pipeline.train import run_training


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jobs.demo")
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--out", default="out/demo", help="folder for everything the demo writes")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    out = os.path.abspath(args.out)
    over = lambda **kw: {k.replace("__", "."): v for k, v in kw.items()}  # noqa: E731
    paths = over(probes__safety=f"{out}/probes/safety", probes__dv=f"{out}/probes/dv",
                 expert__classifier__path=f"{out}/expert", train__train=f"{out}/corpus/train.jsonl",
                 train__dev=f"{out}/corpus/dev.jsonl", calibrate__corpus=f"{out}/corpus/calibration.jsonl",
                 calibrate__output=f"{out}/calibration", audit__corpus=f"{out}/corpus/audit.jsonl", audit__output=out,
                 audit__calibration=f"{out}/calibration")
    cfg = load_config(args.config, paths)
    log(f"[1/5] generating the demo corpus under {out}/corpus")
    corpus = generate_corpus(f"{out}/corpus")
    log("[2/5] building the expert: MiniLM sequence classifier, head fine-tuned on the expert split")
    if not os.path.exists(os.path.join(out, "expert", "config.json")):
        build_demo_expert(corpus["expert_train"], resolve_model_path(cfg.model.path), f"{out}/expert")
    log("[3/5] training the safety and DV probes")
    trained = run_training(cfg)
    cfg = load_config(args.config, {**paths, "model.layer": trained["layer"]})
    log("[4/5] calibrating λ* on the held-out shard (expert on every row)")
    run_calibration(cfg)
    log("[5/5] nightly audit")
    report = run_audit(cfg)
    log(f"demo finished in {time.perf_counter() - t0:.0f} s")
    print(f"\nAudit report:        {out}/runs/{report.run_id}/report.html")
    print(f"Calibration report:  {out}/calibration/calibration_report.html")
    print(f"Show it here:        .venv/bin/ctd report show {out}/runs/{report.run_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
