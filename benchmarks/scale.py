"""The audit against N: driver memory and time, this implementation beside the one before it.

    python benchmarks/scale.py [--sizes 10000 100000 1000000] [--before f7d039b] [--out benchmarks/results/scale.json]

Builds a one-layer tiny Llama (hidden 64, word-level tokenizer) as the monitored model, so that the
run is bounded by the pipeline rather than the model; probes on its layer-1 mean-pooled activations;
a calibration artifact (λ* certified at α = 0.1 on 2,000 of its own rows); and a tiny Llama sequence
classifier as the expert. For each N it writes a corpus of N JSON lines (with planted duplicate ids
and malformed rows) and runs the real audit (`python -m jobs.audit`: local Ray head, real Parquet
output, real expert stage) once with this checkout and once with the commit ``--before`` (a git
worktree), each driver in its own process. Per run: the driver's peak RSS (getrusage of the driver
process alone), wall time per stage, rows/s, objects written. Targets: at the largest N the driver's
peak RSS within 1.25x of the smallest N's, and rows/s at least 0.8x that at 10^5.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Runs jobs.audit in this process with ``code`` first on the path, then prints the driver's peak RSS
# (getrusage) and the peaks of its parts, sampled from /proc/self/status every 0.2 s: RssAnon (the
# process's own memory), RssShmem (pages of the node's shared object store it has touched) and RssFile.
DRIVER = """
import json, resource, runpy, sys, threading, time
peaks = {{}}
def sample():
    while True:
        for line in open("/proc/self/status"):
            k = line.split(":")[0]
            if k in ("RssAnon", "RssFile", "RssShmem"):
                peaks[k] = max(peaks.get(k, 0), int(line.split()[1]))
        time.sleep(0.2)
threading.Thread(target=sample, daemon=True).start()
sys.path.insert(0, {code!r})
sys.argv = ["jobs.audit"] + {args!r}
try:
    runpy.run_module("jobs.audit", run_name="__main__")
except SystemExit as e:
    code = e.code
else:
    code = 0
print("DRIVER_PEAK_RSS_KIB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True)
print("DRIVER_PEAKS_KIB", json.dumps(peaks), flush=True)
sys.exit(code or 0)
"""


def build(work: str, alpha: float = 0.1) -> dict:
    """Model, expert, probes and calibration for the benchmark (made once)."""
    import yaml

    from ctd.calibration.calibrator import CalibrationScores, Calibrator
    from ctd.calibration.report import write_calibration
    from ctd.config import CalibrationConfig
    from ctd.model.activations import ActivationExtractor, TextEncoder
    from ctd.model.artifacts import model_fingerprint
    from ctd.model.probes import LinearProbe
    from ctd.stats.calibrate import threshold_grid
    from ctd.testing.tinymodels import build_tiny_llama

    cfg_path = os.path.join(work, "config.yaml")
    if os.path.exists(cfg_path):
        return yaml.safe_load(open(cfg_path))
    model = build_tiny_llama(os.path.join(work, "model"), layers=1, hidden=64, seed=0)
    expert = build_tiny_llama(os.path.join(work, "expert"), layers=1, hidden=64, seed=1, classifier=True)
    fp = model_fingerprint(model)
    rng = np.random.default_rng(0)
    sample = [text(rng) for _ in range(2000)]
    ids, _ = TextEncoder(model, max_length=64).encode(sample)
    z = ActivationExtractor.from_pretrained(model, [1], device="cpu", dtype="fp32").pool(ids)[1]
    mean, scale = z.mean(0), z.std(0) + 1e-6
    meta = {"model_id": "tiny-llama-1l", "model_fingerprint": fp, "layer": 1, "pooling": "mean", "max_length": 64}
    probes = {}
    for role, kind, seed in (("safety", "logistic", 2), ("dv", "ridge", 3)):
        coef = np.random.default_rng(seed).normal(0, 1, z.shape[1]) / np.sqrt(z.shape[1]) * (2.0 if kind == "logistic" else 0.5)
        p = LinearProbe(kind, coef, 0.0, mean, scale, {**meta, "role": role})
        p.save(os.path.join(work, "probes", role))
        probes[role] = p
    dv = probes["dv"].predict(z)
    p = probes["safety"].predict(z)
    labels = (rng.random(2000) < p).astype(int)
    scores = CalibrationScores(
        np.array([f"s{i:04d}" for i in range(2000)], dtype=object),
        labels,
        p,
        np.clip(labels + rng.normal(0, 0.3, 2000), 0, 1),
        dv,
    )
    art = Calibrator(CalibrationConfig(alpha=alpha, delta=0.1, pareto=False)).fit(
        scores,
        threshold_grid(),
        {**meta, "safety_probe_hash": probes["safety"].content_hash, "dv_probe_hash": probes["dv"].content_hash},
    )
    write_calibration(os.path.join(work, "calibration"), art, scores.dv)
    cfg = {
        "name": "scale",
        "model": {"path": model, "id": "tiny-llama-1l", "layer": 1, "max_length": 64, "dtype": "fp32"},
        "probes": {"safety": os.path.join(work, "probes", "safety"), "dv": os.path.join(work, "probes", "dv")},
        "activations": {"min_actors": 1, "max_actors": 1, "num_cpus": 1, "batch_size": 1024},
        "expert": {
            "kind": "classifier",
            "classifier": {
                "path": expert,
                "max_length": 64,
                "unsafe_label": "unsafe",
                "pool": {"min_actors": 1, "max_actors": 1, "batch_size": 256},
            },
        },
        "calibration": {"alpha": alpha, "delta": 0.1, "pareto": False},
        "audit": {
            "corpus": "",
            "output": "",
            "calibration": os.path.join(work, "calibration"),
            "run_id": "scale",
            "commit_rows": 4096,
        },
    }
    with open(cfg_path, "w") as f:
        yaml.safe_dump(cfg, f)
    print(f"built the model, expert, probes and calibration (λ* = {art.result.lambda_hat:.4g}) under {work}", flush=True)
    return cfg


def text(rng) -> str:
    return " ".join(f"w{i}" for i in rng.integers(0, 499, rng.integers(8, 40)))


def write_corpus(path: str, n: int, seed: int = 0) -> None:
    if os.path.exists(path):
        return
    rng = np.random.default_rng(seed)
    chunk = 100_000
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for s in range(0, n, chunk):
            m = min(chunk, n - s)
            words = rng.integers(0, 499, (m, 40))
            lens = rng.integers(8, 40, m)
            lines = [
                json.dumps(
                    {"id": f"c{s + i:010d}", "text": " ".join(f"w{w}" for w in words[i, : lens[i]]), "group": f"g{(s + i) % 4}"}
                )
                for i in range(m)
            ]
            f.write("\n".join(lines) + "\n")
        # planted: 10 duplicated ids (two rows each) and 10 malformed rows
        f.write("".join(json.dumps({"id": f"c{i:010d}", "text": "w1 w2 w3"}) + "\n" for i in range(10)))
        f.write("".join('{"id": "broken' + str(i) + '", "text": \n' for i in range(10)))
    os.replace(tmp, path)


def objects(folder: str) -> int:
    return sum(len(files) for _, _, files in os.walk(folder))


def volume(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(folder) for f in files)


def run(code: str, config: str, corpus: str, output: str, extra: list[str], env: dict) -> dict:
    args = [
        "--config",
        config,
        "--run-id",
        "scale",
        "--set",
        f"audit.corpus={corpus}",
        "--set",
        f"audit.output={output}",
        "--set",
        "audit.resume=false",
    ] + extra
    t0 = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "-c", DRIVER.format(code=code, args=args)],
        cwd=code,
        env=dict(env, PYTHONPATH=code),
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"audit failed ({code}):\n{r.stdout[-3000:]}\n{r.stderr[-4000:]}")
    rss = int(next(line.split()[1] for line in r.stdout.splitlines() if line.startswith("DRIVER_PEAK_RSS_KIB")))
    parts = json.loads(next(line.split(" ", 1)[1] for line in r.stdout.splitlines() if line.startswith("DRIVER_PEAKS_KIB")))
    sys.path.insert(0, ROOT)
    from ctd.runs.folder import run_file

    root = os.path.join(output, "runs", "scale")
    rep = json.load(open(run_file(output, "scale", "report.json")))  # either layout (v1 before attempts, v2)
    sub = {
        k: [os.path.join(d, k) for d, names, _ in os.walk(root) if k in names] for k in ("results", "quarantine")
    }  # v2: attempts/<a>/
    return {
        "rows_read": rep["rows_read"],
        "rows_scored": rep["rows_scored"],
        "rows_quarantined": rep["rows_quarantined"],
        "delegated": rep["delegated"],
        "expert_calls": rep["expert_calls"],
        # the sum of the sampled peaks of the driver's own parts: an upper bound of its peak RSS. getrusage's
        # ru_maxrss is kept for information only: Linux carries the parent's high-water mark across fork+exec,
        # so it reads the benchmark process (torch, the corpus it wrote) rather than the driver
        "driver_peak_rss_mib": round(sum(parts.values()) / 1024, 1),
        "getrusage_maxrss_mib": round(rss / 1024, 1),
        "driver_peak_mib_by_kind": {k: round(v / 1024, 1) for k, v in parts.items()},
        "wall_seconds": round(wall, 1),
        "rows_per_second": round(rep["rows_read"] / wall, 1),
        "stages": {s["stage"]: s["seconds"] for s in rep["stages"]},
        "objects_written": objects(os.path.join(output, "runs", "scale")),
        "published_files": sum(objects(d) for k in ("results", "quarantine") for d in sub[k]),
        "bytes": {
            **{k: volume(os.path.join(root, *k.split("/"))) for k in ("_staging/stage1", "_staging/expert")},
            **{k: sum(volume(d) for d in sub[k]) for k in ("results", "quarantine")},
        },
    }


def targets(result: dict) -> dict:
    """The issue's targets from the runs recorded (this checkout's implementation)."""
    sizes = sorted((n for n in result["runs"] if "after" in result["runs"][n]), key=int)
    after = {n: result["runs"][n]["after"] for n in sizes}
    if not sizes:  # --before-only: nothing of this checkout to judge
        return {"sizes": [], "missing_runs": [f"{n} after" for n in result["runs"]]}
    out = {
        "sizes": sizes,
        "driver_rss_largest_over_smallest": round(
            after[sizes[-1]]["driver_peak_rss_mib"] / after[sizes[0]]["driver_peak_rss_mib"], 3
        ),
        "driver_rss_target": "<= 1.25",
    }
    if "driver_peak_mib_by_kind" in after[sizes[0]]:
        a0, a1 = after[sizes[0]]["driver_peak_mib_by_kind"], after[sizes[-1]]["driver_peak_mib_by_kind"]
        out["driver_anon_rss_largest_over_smallest"] = round(a1["RssAnon"] / a0["RssAnon"], 3)
    if "100000" in after:
        out["rows_per_second_largest_over_1e5"] = round(
            after[sizes[-1]]["rows_per_second"] / after["100000"]["rows_per_second"], 3
        )
        out["rows_per_second_target"] = ">= 0.8"
    out["missing_runs"] = [f"{n} {k}" for n in sizes for k in ("after", "before") if k not in result["runs"][n]]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--before", default="f7d039b", help="commit of the implementation before the scale rewrite ('' to skip it)")
    ap.add_argument("--work", default="out/scale")
    ap.add_argument("--after-only", action="store_true", help="run only this checkout's implementation")
    ap.add_argument("--before-only", action="store_true", help="run only the --before commit's implementation")
    ap.add_argument("--out", default="benchmarks/results/scale.json")
    ap.add_argument("--summarise", action="store_true", help="only (re)compute the targets of the runs already in --out")
    args = ap.parse_args(argv)
    if args.summarise:
        result = json.load(open(args.out))
        result["targets"] = targets(result)
        result["summarised_by"] = "python benchmarks/scale.py --summarise " + " ".join(
            a for a in (argv if argv is not None else sys.argv[1:]) if a != "--summarise"
        )
        print(json.dumps(result["targets"], indent=1))
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
        return 0
    os.environ["RAY_AUTH_MODE"] = "token"
    work = os.path.abspath(args.work)
    os.makedirs(work, exist_ok=True)
    build(work)
    config = os.path.join(work, "config.yaml")
    impls = {} if args.before_only else {"after": ROOT}
    if args.before and not args.after_only:
        old = os.path.join(work, "before-code")
        if not os.path.isdir(old):
            subprocess.run(["git", "worktree", "add", "--detach", old, args.before], cwd=ROOT, check=True, capture_output=True)
        impls["before"] = old
    from ctd.testing.localstack import RayHead

    result = {
        "command": "python benchmarks/scale.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{os.cpu_count()} cores",
        "model": "tiny Llama, 1 layer, hidden 64 (built by the benchmark)",
        "expert": "tiny Llama sequence classifier (classifier expert pool)",
        "before": args.before,
        "runs": {},
    }
    with RayHead(num_cpus=4, log_dir=os.path.join(work, "ray")) as head:
        env = dict(head.env, RAY_ADDRESS=head.address)
        for n in args.sizes:
            corpus = os.path.join(work, f"corpus-{n}.jsonl")
            write_corpus(corpus, n)
            for name, code in impls.items():
                extra = ["--set", "audit.rows_per_file=250000", "--set", "audit.keep_staging=true"] if name == "after" else []
                r = run(code, config, corpus, os.path.join(work, f"{name}-{n}"), extra, env)
                result["runs"].setdefault(str(n), {})[name] = r
                print(
                    f"N={n:>9} {name:6s} driver peak RSS {r['driver_peak_rss_mib']:8.1f} MiB  wall {r['wall_seconds']:8.1f} s  "
                    f"{r['rows_per_second']:8.1f} rows/s  objects {r['objects_written']:6d}  stages {r['stages']}",
                    flush=True,
                )
                with open(args.out, "w") as f:
                    json.dump(result, f, indent=2)
    result["targets"] = targets(result)
    print(json.dumps(result["targets"]))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
