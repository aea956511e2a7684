"""The nightly audit on a Ray cluster of the production shape (issue #26 items 1 and 3).

benchmarks/cluster_shape.py starts a local multi-node cluster whose nodes are read from
cluster/raycluster.yaml (a head with no CPUs, then the cpu, activations and expert groups with their
resources and labels; GPUs declared, not real) and audits the session's deployed night with
configs/production.yaml (its resource requests, labels and audit settings as production has them; overridden: paths,
devices (CPU, fp32, no compile), sizes, and the judge (the demo's classifier on the pool production
gives its vLLM replicas, one GPU bundle each: vLLM with tensor parallelism 2 needs two real GPUs)). It runs in a process of its own:
a driver connects to one cluster, and the session's Ray head is another.
"""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow


def shape_run(deployment, tmp_path, *args) -> tuple[dict, str]:
    out = tmp_path / "shape.json"
    cmd = [sys.executable, "benchmarks/cluster_shape.py", "--config", deployment["config_path"]]
    cmd += ["--work", str(tmp_path / "work"), "--json", str(out), *args]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    log = r.stdout[-4000:] + r.stderr[-4000:]
    assert out.exists(), log
    return json.loads(out.read_text()), log


def test_the_production_night_runs_where_the_manifest_says_and_survives_losing_whole_nodes(deployment, tmp_path):
    """Two nodes of each GPU group; the node running the activation actor is removed (raylet, object store
    and workers killed at once) while stage 1 runs, and the node running the judge actor while the judge
    stage runs. The run publishes in one attempt and verifies: rows read = scored + quarantined, none
    lost, none twice, each stage's actor restarted on its group's other node. Ray's state API says the
    activation actors ran only on activation nodes, the judge actors only on expert nodes, every CPU-only
    task on the cpu group's nodes but Ray Data's block splits, which Ray 2.60 places without the selector
    (no other on the GPU-shaped ones: before `ray.cpu_nodes`, Ray Data spread about
    a third of its tasks onto each), and nothing that asks for resources on the head. A misspelt resource in
    the production config exits 2 before any work, so nothing is published and this test fails."""
    got, log = shape_run(deployment, tmp_path, "--lose", "activations,expert")
    assert [x["group"] for x in got["lost"]] == ["activations", "expert"], log
    assert got["violations"] == [], (got["violations"], got["placement"]["tasks"])
    assert got["attempts"] == 1 and got["errors"] == [], log
    pub = got["published"]
    assert pub["verify"]["ok"] and pub["verify"]["rows_lost"] == 0 and pub["verify"]["rows_extra"] == 0, pub
    assert pub["verify"]["duplicate_ids"] == 0 and pub["rows_read"] == pub["rows_scored"] + pub["rows_quarantined"]
    assert pub["expert_calls"] == pub["delegated"] + pub["control_only"] > 0  # the judge's count reconciles
    actors = got["placement"]["actors"]
    stage = {cls: [a for a in actors if cls in a["class"]] for cls in ("ActivationStage", "ClassifierStage")}
    assert {a["group"] for a in stage["ActivationStage"]} == {"activations"}
    assert {a["group"] for a in stage["ClassifierStage"]} == {"expert"}
    assert all(a["restarts"] >= 1 for s in stage.values() for a in s), stage  # each came back after its node was lost
    assert all(not any(v > 0 for k, v in a["resources"].items() if k != "memory") for a in actors if a["group"] == "head")
    tasks = got["placement"]["tasks"]
    assert tasks["cpu"]["cpu_only"] > 0
    # every CPU-only task off the cpu group is one of Ray Data's block splits, which Ray 2.60 places without
    # the label selector (benchmarks/cluster_shape.py UNHELD); none of ours, none of the stages'
    for g in ("head", "activations", "expert"):
        names = tasks.get(g, {}).get("names", {})
        assert set(names) <= {"_split_single_block"}, (g, names)
