"""Why a local Ray instance of ours keeps twice num_cpus idle workers (ctd.pipeline.raydata.local_system_config);
writes benchmarks/results/worker_warmth.json.

    .venv/bin/python benchmarks/worker_warmth.py      # ~1 min on 2 cores

The audit's duplicate census (ctd.pipeline.dedup.census: one groupby(id) over 1,210 rows, as on a demo
night) is timed three times on a fresh local instance (num_cpus 4): cold, again (warm), and after an actor
stage that holds 2 CPUs and imports transformers, as the activation and judge stages do. Once with Ray's
default soft limit on idle workers (num_cpus) and once with ``local_system_config`` (2 x num_cpus); each
setting in a process of its own. The baseline is Ray's default in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROWS = 1210


def measure(keep: bool, data: str) -> dict:
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    import ray

    from ctd.pipeline.dedup import census
    from ctd.pipeline.raydata import configure_data, local_system_config

    ray.init(address="local", num_cpus=4, include_dashboard=False, _system_config=local_system_config(4) if keep else {})
    configure_data()
    t = pa.table(
        {"id": [f"r{i}" for i in range(ROWS)], "error": pa.nulls(ROWS, pa.string()), "dv": np.random.default_rng(0).random(ROWS)}
    )
    files = [os.path.join(data, "a.parquet"), os.path.join(data, "b.parquet")]
    pq.write_table(t.slice(0, 600), files[0])
    pq.write_table(t.slice(600), files[1])

    def run() -> float:
        t0 = time.perf_counter()
        c = census(
            ray.data.read_parquet(files), broadcast_limit=1000, size=ROWS, flags={"x": lambda b: pc.greater(b.column("dv"), 0.5)}
        )
        assert c.scored == ROWS
        return round(time.perf_counter() - t0, 2)

    class Stage:
        def __init__(self):
            from transformers import AutoModel  # noqa: F401  (the import an activation or judge actor pays)

        def __call__(self, b):
            return b

    out = {"cold_s": run(), "warm_s": run()}
    ray.data.read_parquet(files[:1]).map_batches(
        Stage, compute=ray.data.ActorPoolStrategy(size=1), num_cpus=2, batch_format="pyarrow"
    ).materialize()
    out["after_actor_stage_s"] = run()
    ray.shutdown()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default="benchmarks/results/worker_warmth.json")
    ap.add_argument("--one", choices=["default", "keep"], help=argparse.SUPPRESS)  # a child process: one setting
    ap.add_argument("--data", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.one == "keep", args.data)))
        return 0
    import tempfile

    result: dict = {
        "command": "python benchmarks/worker_warmth.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "rows": ROWS,
        "cpus": os.cpu_count(),
    }
    for name in ("default", "keep"):
        with tempfile.TemporaryDirectory() as d:
            r = subprocess.run(
                [sys.executable, __file__, "--one", name, "--data", d],
                capture_output=True,
                text=True,
                check=True,
                env=dict(os.environ),
            )
        result["ray_default_soft_limit" if name == "default" else "local_system_config"] = json.loads(
            r.stdout.strip().splitlines()[-1]
        )
    print(json.dumps(result, indent=1))
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
