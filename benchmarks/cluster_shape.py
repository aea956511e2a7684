"""The nightly audit on a local Ray cluster of the production shape; writes
benchmarks/results/cluster_shape.json.

    .venv/bin/python benchmarks/cluster_shape.py                   # deploys the demo first (~3 min on 2 cores)
    .venv/bin/python benchmarks/cluster_shape.py --config C.yaml   # a deployed config (the tests pass theirs)
    .venv/bin/python benchmarks/cluster_shape.py --lose activations,expert   # and lose a whole node mid-stage

The cluster (ctd.testing.cluster.LocalCluster) is cluster/raycluster.yaml's shape: a head that takes
no work (num-cpus 0), and nodes of the cpu, activations and expert worker groups with their custom
resources and their GPUs declared as Ray resources (no real GPU: the stages run on CPU with tiny
models). The config is configs/production.yaml (its resource requests, labels and audit settings as
production has them; overridden: paths, devices (CPU, fp32, no compile), sizes, and the judge (the
demo's classifier on the pool production gives its vLLM replicas, one GPU bundle each: vLLM with
tensor parallelism 2 needs two real GPUs); ctd.testing.cluster.production_on_cpu). The audit runs as
the nightly job would; then Ray's state
API says where each actor and task ran, and the checks below compare that with what the manifest
promises: activation actors only on activation nodes, judge actors only on expert nodes, CPU-only
tasks off the GPU-shaped nodes, nothing that asks for resources on the head.

With ``--lose GROUP``: the cluster has two nodes of that group; when the stage that uses it has
started, one of them is removed (raylet, object store and workers killed at once, as when a cloud
takes a node back). The audit either completes (Ray Data restarts the actors on the other node and
retries lost tasks) or fails, and is then rerun with the same run id, which resumes from the chunks
it committed; the rows published are checked against the corpus (none lost, none twice).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import yaml  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DAY = "2026-11-30"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def deployed_config(path: str | None, work: str) -> dict:
    """The deployment's config dict: ``path``, or the demo deployed under ``work`` (small sizes)."""
    if path:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    import ray

    from ctd.testing.demo import deploy

    with open(os.path.join(HERE, "..", "configs", "demo.yaml"), encoding="utf-8") as f:
        base = yaml.safe_load(f)
    ray.init(address="local", num_cpus=4, include_dashboard=False)
    try:
        d = deploy(
            os.path.join(work, "out"),
            os.path.join(work, "deploy"),
            base,
            seed=3,
            sizes={"train": 300, "expert_train": 400, "dev": 300, "calibration": 500, "audit": 400},
            log=log,
        )
    finally:
        ray.shutdown()
    with open(d["config_path"], encoding="utf-8") as f:
        return yaml.safe_load(f)


# Ray Data tasks that Ray 2.60 places without the dataset's label selector (a gap of Ray's, like shuffle v2's
# map tasks): the block splits of repartition(target_num_rows_per_block=...). Counted apart, not as violations.
UNHELD = {"_split_single_block"}


def unheld(where: dict) -> dict[str, int]:
    """{group: tasks of UNHELD that ran off the cpu group}."""
    return {
        g: sum(k for name, k in n.get("names", {}).items() if name in UNHELD)
        for g, n in where["tasks"].items()
        if g != "cpu" and any(name in UNHELD for name in n.get("names", {}))
    }


def violations(where: dict) -> list[str]:
    """Each placement the manifest forbids, as a sentence."""
    bad = []
    for a in where["actors"]:
        res, cls, g = a["resources"], a["class"], a["group"]
        if "ActivationStage" in cls and g != "activations":
            bad.append(f"activation actor {cls} ran on {g}")
        elif "ClassifierStage" in cls and g != "expert":
            bad.append(f"judge actor {cls} ran on {g}")
        elif g == "head" and any(v > 0 for k, v in res.items() if k != "memory"):
            bad.append(f"actor {cls} asking {res} ran on the head")
        elif set(res) <= {"CPU", "memory"} and res.get("CPU", 0) > 0 and g in ("activations", "expert"):
            bad.append(f"CPU-only actor {cls} ran on a GPU-shaped {g} node")
    for g, n in where["tasks"].items():
        held = n["cpu_only"] - sum(k for name, k in n.get("names", {}).items() if name in UNHELD)
        if g in ("head", "activations", "expert") and held:
            bad.append(f"{held} CPU-only task(s) ran on {g}")
    for a in where["actors"]:
        if ("ActivationStage" in a["class"] or "ClassifierStage" in a["class"]) and a["state"] == "PENDING_CREATION":
            bad.append(f"{a['class']} never placed")
    return bad


def _running_on(address: str, job_id: str, cls: str) -> str | None:
    """The node id of an alive actor of class ``cls`` of the job (None while there is none)."""
    from ray.util.state import list_actors

    try:
        acts = list_actors(address=address, filters=[("job_id", "=", job_id), ("state", "=", "ALIVE")], limit=1000)
    except Exception:  # noqa: BLE001 - the state API is momentarily unreachable
        return None
    return next((a.node_id for a in acts if cls in a.class_name), None)


def run(cfg_path: str, lose: list[str], work: str) -> dict:
    import ray

    from ctd.audit.run import run_audit
    from ctd.config import ConfigError, load_config
    from ctd.runs.verify import verify_run
    from ctd.testing.cluster import LocalCluster, production_on_cpu

    deployed = deployed_config(cfg_path, work)
    out: dict = {"lost": [], "attempts": 0}
    with LocalCluster(per_group=1) as lc:
        for g in lose:
            lc.add(g)  # a second node of the group: the one that survives the loss
        out["nodes"] = [{"group": n.group, "resources": n.resources} for n in lc.nodes]
        log("cluster: " + ", ".join(f"{n.group} {n.resources}" for n in lc.nodes))
        cfg = production_on_cpu(deployed, address=lc.address, day=DAY, output=os.path.join(work, "audits"))
        path = os.path.join(work, "production-on-cpu.yaml")
        with open(path, "w", encoding="utf-8") as f:
            yaml.safe_dump(cfg, f, sort_keys=False)
        ray.init(address=lc.address)
        job_id = ray.get_runtime_context().get_job_id()
        stop = threading.Event()

        def loser():  # remove the node that runs each lost group's stage, once that stage runs
            for g, cls in [(g, "ActivationStage" if g == "activations" else "ClassifierStage") for g in lose]:
                where = None
                while not stop.is_set() and where is None:
                    where = _running_on(lc.address, job_id, cls)
                    time.sleep(0.2)
                if stop.is_set():
                    return
                victim = next(n for n in lc.nodes if n.node_id == where)
                log(f"losing node {victim.node_id[:8]} of group {g} while {cls} runs")
                lc.remove(victim)
                out["lost"].append({"group": g, "at": time.time()})

        t = threading.Thread(target=loser, daemon=True)
        t.start()
        t0 = time.perf_counter()
        report, errors = None, []
        for attempt in range(3):  # the nightly job's retry: the same run id resumes from what was committed
            out["attempts"] = attempt + 1
            try:
                report = run_audit(load_config(path))
                break
            except Exception as e:  # noqa: BLE001 - recorded, then the retry (bad input, exit 2, is not retried)
                errors.append(f"{type(e).__name__}: {str(e)[:300]}")
                log(f"attempt {attempt + 1} failed: {errors[-1]}")
                if isinstance(e, ConfigError):
                    break
        stop.set()
        out["wall_s"] = round(time.perf_counter() - t0, 1)
        out["errors"] = errors
        from ctd.testing.cluster import placement

        out["placement"] = placement(lc.address, job_id, lc.ever)
        ray.shutdown()
    out["violations"] = violations(out["placement"])
    out["unheld_ray_data_tasks_off_cpu"] = unheld(out["placement"])
    if report is not None:
        from ctd import storage

        v = verify_run(storage.join(cfg["audit"]["output"], "runs", report.run_id), corpus=cfg["audit"]["corpus"])
        out["published"] = {
            "run_id": report.run_id,
            "rows_read": report.rows_read,
            "rows_scored": report.rows_scored,
            "rows_quarantined": report.rows_quarantined,
            "expert_calls": report.expert_calls,
            "delegated": report.delegated,
            "control_only": report.control_only,
            "verify": {k: v[k] for k in v if k != "problems"} | {"problems": v["problems"][:5]},
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", help="a deployed config (YAML); default: deploy the demo first")
    ap.add_argument("--lose", default="", help="comma-separated worker groups to lose a node of (activations,expert)")
    ap.add_argument("--work", help="keep the deployment and the run here (default: a temporary folder)")
    ap.add_argument("--json", default=os.path.join(HERE, "results", "cluster_shape.json"))
    args = ap.parse_args()
    lose = [g for g in args.lose.split(",") if g]
    if args.work:
        os.makedirs(args.work, exist_ok=True)
        out = run(args.config, lose, args.work)
    else:
        with tempfile.TemporaryDirectory(prefix="ctd-cluster-") as work:
            out = run(args.config, lose, work)
    out["lose"] = lose
    shown = [f"--lose {args.lose}"] * bool(lose) + [f"--config {args.config}"] * bool(args.config)
    out["command"] = " ".join(["python benchmarks/cluster_shape.py", *shown])
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=1)
    log(f"wrote {args.json}: {len(out['violations'])} placement violation(s); published: {out.get('published')}")
    ok = out.get("published") and out["published"]["verify"].get("ok") and not out["violations"]
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
