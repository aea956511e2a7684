"""Stage 1's pipeline overhead on CPU: the Ray Data stage 1 against a plain single-process loop over
the same model, probes and corpus, measured side by side in one run.

    python benchmarks/overhead.py [--rows 24000] [--out benchmarks/results/overhead.json]

* loop: one process reads the corpus's JSON lines, tokenises batches with the same TextEncoder,
  pools layer L with the same ActivationExtractor (torch using every core) and applies both probes.
  The strongest simple baseline: no Ray, no Arrow, no serialisation.
* pipeline: ``ctd.pipeline.scoring.run_stage1`` on a local Ray instance (read → validate → tokenize →
  activations + probes + gate → Parquet), with the demo's actor configuration.

Steady-state throughput excludes start-up (model loads, actor start): each side runs on a small and a
large corpus and the throughput is (rows_large - rows_small) / (seconds_large - seconds_small). The
two sides' probe scores are compared row by row.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def deploy_probes(work: str) -> str:
    """A demo deployment (corpus, probes, expert); returns its config path."""
    import subprocess

    cfg_path = os.path.join(work, "config.yaml")
    if not os.path.exists(cfg_path):
        code = (
            f"import yaml; from ctd.testing.demo import deploy; from ctd.config import load_config; from ctd.pipeline.raydata import init_ray; "
            f"init_ray(load_config('configs/demo.yaml').ray); deploy({work!r}, {work!r}, yaml.safe_load(open('configs/demo.yaml')))"
        )
        subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
    return cfg_path


def corpus(work: str, rows: int) -> str:
    from ctd.testing.demo import generate_corpus

    out = os.path.join(work, f"corpus-{rows}")
    if not os.path.exists(os.path.join(out, "audit.jsonl")):
        generate_corpus(
            out, seed=11, sizes={"train": 1, "expert_train": 1, "dev": 1, "calibration": 1, "audit": rows}, bad_rows=False
        )
    return os.path.join(out, "audit.jsonl")


def plain_loop(cfg, path: str, batch_size: int) -> tuple[float, dict]:
    """Seconds for tokenise + pool + probes over every row (after the model and probes are loaded)."""
    import torch

    from ctd.config import resolve_model_path
    from ctd.model.activations import ActivationExtractor, TextEncoder
    from ctd.model.probes import LinearProbe

    torch.set_num_threads(os.cpu_count() or 1)
    model_dir = resolve_model_path(cfg.model.path)
    enc = TextEncoder(model_dir, max_length=cfg.model.max_length)
    ext = ActivationExtractor.from_pretrained(
        model_dir, [cfg.model.layer], device="cpu", dtype=cfg.model.dtype, token_budget=cfg.model.token_budget
    )
    safety, dv = LinearProbe.load(cfg.probes.safety), LinearProbe.load(cfg.probes.dv)
    t0 = time.perf_counter()
    rows = [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]
    scores = {}
    for s in range(0, len(rows), batch_size):
        chunk = rows[s : s + batch_size]
        inputs = [r["messages"] if r.get("messages") is not None else r["text"] for r in chunk]
        ids, _ = enc.encode(inputs)
        z = ext.pool(ids)[cfg.model.layer]
        p, d = safety.predict(z), dv.predict(z)
        for r, a, b in zip(chunk, p, d):
            scores[r["id"]] = (float(a), float(b))
    return time.perf_counter() - t0, scores


def pipeline(cfg, path: str, out: str) -> tuple[float, dict]:
    from ctd.model.deployment import Deployment
    from ctd.pipeline.scoring import activation_spec, run_stage1
    from ctd.tables import read_parquet

    dep = Deployment.load(cfg.model, cfg.probes)
    spec = activation_spec(cfg.model, cfg.activations, safety=dep.safety, dv=dep.dv, gate=np.inf, keep_text="delegated")
    s1 = run_stage1(path, out, spec, cfg.activations, rows_per_file=250_000)
    t = [read_parquet(f, ["id", "probe", "dv"]) for f in s1.files]
    scores = {}
    for x in t:
        for i, a, b in zip(x.column("id").to_pylist(), x.column("probe").to_pylist(), x.column("dv").to_pylist()):
            scores[i] = (a, b)
    return s1.seconds, scores


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=24_000, help="rows of the large corpus (the small one has a sixth)")
    ap.add_argument("--work", default="out/overhead", help="a demo deployment (made here if it has no config.yaml)")
    ap.add_argument("--actor-cpus", type=float, default=None, help="activations.num_cpus (default: the deployment's config)")
    ap.add_argument("--batch-size", type=int, default=None, help="activations.batch_size (default: the deployment's config)")
    ap.add_argument("--out", default="benchmarks/results/overhead.json")
    args = ap.parse_args(argv)
    os.environ["RAY_AUTH_MODE"] = "token"
    from ctd.config import load_config
    from ctd.pipeline.raydata import init_ray

    work = os.path.abspath(args.work)
    over = {}
    if args.actor_cpus is not None:
        over["activations.num_cpus"] = args.actor_cpus
    if args.batch_size is not None:
        over["activations.batch_size"] = args.batch_size
    cfg = load_config(deploy_probes(work), over)
    sizes = (args.rows // 6, args.rows)
    paths = {n: corpus(work, n) for n in sizes}
    res: dict = {
        "command": "python benchmarks/overhead.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "model": cfg.model.path,
        "layer": cfg.model.layer,
        "max_length": cfg.model.max_length,
        "batch_size": cfg.activations.batch_size,
        "activation_actor_cpus": cfg.activations.num_cpus,
        "ray_logical_cpus": cfg.ray.num_cpus,
        "runs": {},
    }
    loop_scores = pipe_scores = None
    for n in sizes:
        t, loop_scores = plain_loop(cfg, paths[n], cfg.activations.batch_size)
        res["runs"][f"loop_{n}"] = {"rows": n, "seconds": round(t, 2), "rows_per_second": round(n / t, 1)}
        print(f"loop      {n:>7} rows  {t:7.1f} s  {n / t:7.1f} rows/s", flush=True)
    init_ray(cfg.ray)
    for n in sizes:
        t, pipe_scores = pipeline(cfg, paths[n], os.path.join(work, f"stage1-{n}"))
        res["runs"][f"pipeline_{n}"] = {"rows": n, "seconds": round(t, 2), "rows_per_second": round(n / t, 1)}
        print(f"pipeline  {n:>7} rows  {t:7.1f} s  {n / t:7.1f} rows/s", flush=True)
    small, large = sizes
    steady = {
        k: (large - small) / (res["runs"][f"{k}_{large}"]["seconds"] - res["runs"][f"{k}_{small}"]["seconds"])
        for k in ("loop", "pipeline")
    }
    diff = max(max(abs(loop_scores[i][0] - pipe_scores[i][0]), abs(loop_scores[i][1] - pipe_scores[i][1])) for i in loop_scores)
    res["steady_rows_per_second"] = {k: round(v, 1) for k, v in steady.items()}
    res["pipeline_over_loop"] = round(steady["pipeline"] / steady["loop"], 3)
    res["target"] = "pipeline_over_loop >= 1/1.3 = 0.769"
    res["max_abs_score_difference"] = diff
    print(
        f"steady state: loop {steady['loop']:.1f} rows/s, pipeline {steady['pipeline']:.1f} rows/s, ratio {res['pipeline_over_loop']:.3f}"
        f" (target ≥ 0.769); max |Δ score| {diff:.2e}"
    )
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
