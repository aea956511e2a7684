"""Peak memory of fitting the probes on the driver, per training row, as the train job does it.

    python benchmarks/train_memory.py [--rows 4000] [--dim 2048] [--layers 4] [--out benchmarks/results/train_memory.json]

The train job keeps the labelled rows' pooled features on the driver as float32 (rows x dim x
candidate layers) and fits a logistic probe per layer and the ridge DV probe on one layer. This
measures the peak resident memory of exactly that (``select_layer`` + ``cross_fit_predict`` +
``fit_dv_probe`` on random features) at two row counts, and reports the slope in bytes per row:
the number behind the README's "largest training set for a given driver memory".
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = """
import resource, sys, numpy as np
sys.path.insert(0, {root!r})
from ctd.model.probes import select_layer, fit_dv_probe, cross_fit_predict
rows, dim, layers = {rows}, {dim}, {layers}
rng = np.random.default_rng(0)
feats = {{L: rng.standard_normal((rows, dim), dtype=np.float32) for L in range(layers)}}
dev = {{L: rng.standard_normal((rows // 2, dim), dtype=np.float32) for L in range(layers)}}
y, yd = rng.integers(0, 2, rows), rng.integers(0, 2, rows // 2)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
best, _, probes = select_layer(feats, y, dev, yd)
v = np.clip(rng.normal(0, 0.3, rows // 2), -1, 1)
cross_fit_predict(lambda a, b: fit_dv_probe(a, b), dev[best], v)
fit_dv_probe(dev[best], v)
print(base, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def peak(rows: int, dim: int, layers: int) -> tuple[int, int]:
    out = subprocess.run(
        [sys.executable, "-c", CHILD.format(root=ROOT, rows=rows, dim=dim, layers=layers)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return int(out[0]) * 1024, int(out[1]) * 1024


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=4000)
    ap.add_argument("--dim", type=int, default=2048, help="hidden size (Llama-3.2-1B: 2048)")
    ap.add_argument("--layers", type=int, default=4, help="candidate layers (configs/production.yaml: 4)")
    ap.add_argument("--out", default="benchmarks/results/train_memory.json")
    args = ap.parse_args(argv)
    small, large = args.rows // 4, args.rows
    res = {}
    for n in (small, large):
        base, top = peak(n, args.dim, args.layers)
        res[n] = {"features_mib": round(n * 1.5 * args.dim * args.layers * 4 / 2**20, 1), "peak_rss_mib": round(top / 2**20, 1)}
        print(n, res[n], flush=True)
    slope = (res[large]["peak_rss_mib"] - res[small]["peak_rss_mib"]) * 2**20 / (large - small)
    out = {
        "command": "python benchmarks/train_memory.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "dim": args.dim,
        "layers": args.layers,
        "runs": res,
        "bytes_per_training_row": round(slope),
        "note": "a training row comes with half a dev row (the benchmark's dev split is half the training split)",
        "rows_per_32_gib_driver": int((32 * 2**30 - res[small]["peak_rss_mib"] * 2**20) / slope),
    }
    print(json.dumps(out, indent=1))
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
