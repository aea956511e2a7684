"""A local Ray cluster of the production shape, and the production config made to run on it.

The nodes come from the RayCluster manifest itself (``cluster/raycluster.yaml``, read by
:func:`ctd.pipeline.preflight.manifest_shapes`, the same reader the pre-flight check uses): the head
with the num-cpus its ``rayStartParams`` give (0: it takes no work), and ``per_group`` nodes of each
worker group with its GPUs, custom resources and labels declared as Ray's. This machine has no GPU, so
the GPU-shaped nodes only *say* they have GPUs: the stages that ask for them run on CPU with tiny
models (:func:`production_on_cpu` sets their ``device``). CPU counts are capped at ``max_cpus`` per node
(a 2-core machine cannot back 24 busy CPUs); resources other than CPU stay as the manifest says.

:func:`placement` reads, through Ray's state API, where every actor and task of a job ran, so a test
can assert it instead of only seeing that the run finished.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field

import yaml

from ..pipeline.preflight import LABEL, manifest_shapes

__all__ = ["GroupNode", "LocalCluster", "production_on_cpu", "placement", "ROOT", "MANIFEST", "PRODUCTION"]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MANIFEST = os.path.join(ROOT, "cluster", "raycluster.yaml")
PRODUCTION = os.path.join(ROOT, "configs", "production.yaml")


@dataclass
class GroupNode:
    group: str  # "head", or the worker group's name in the manifest
    resources: dict[str, float]  # as the node advertises them (CPU capped)
    node: object = field(repr=False, default=None)  # ray._private.node.Node

    @property
    def node_id(self) -> str:
        return self.node.node_id


class LocalCluster:
    """``ray.cluster_utils.Cluster`` with the manifest's head and ``per_group`` nodes of each worker
    group; a context manager. ``address`` is what a driver connects to."""

    def __init__(self, manifest: str = MANIFEST, *, per_group: int = 1, max_cpus: float = 4, object_store_mb: int = 200):
        self.manifest, self.per_group, self.max_cpus, self.store = manifest, per_group, max_cpus, object_store_mb
        self.nodes: list[GroupNode] = []  # alive
        self.ever: dict[str, str] = {}  # node id -> group, lost nodes included
        self.cluster = None

    def shapes(self) -> list[tuple[str, dict[str, float]]]:
        """(group, resources) of every node to start, head first."""
        out = []
        for where, shape in manifest_shapes(self.manifest):
            group = "head" if where.endswith(" head") else where.rsplit(" worker group ", 1)[1]
            res = {k: v for k, v in shape.items() if v > 0 or k == "CPU"}
            res["CPU"] = min(res.get("CPU", 0.0), self.max_cpus)
            out += [(group, res)] * (1 if group == "head" else self.per_group)
        return out

    def _node_args(self, res: dict[str, float]) -> dict:
        custom = {k: v for k, v in res.items() if k not in ("CPU", "GPU") and not k.startswith(LABEL)}
        labels = dict(k[len(LABEL) :].split("=", 1) for k in res if k.startswith(LABEL))
        return {
            "num_cpus": int(res["CPU"]),
            "num_gpus": int(res.get("GPU", 0)),
            "resources": custom,
            "labels": labels,
            "object_store_memory": self.store << 20,
        }

    def __enter__(self) -> LocalCluster:
        from ray.cluster_utils import Cluster

        from .localstack import free_port

        self._address_file = os.path.join(os.environ.get("RAY_TMPDIR") or "/tmp", "ray", "ray_current_cluster")
        try:  # Cluster writes its address where `ray.init()` looks for one: put back what was there on exit
            self._address_before = open(self._address_file).read()
        except OSError:
            self._address_before = None
        shapes = self.shapes()
        (hg, hres), workers = shapes[0], shapes[1:]
        assert hg == "head", f"{self.manifest}: no head group"
        self.cluster = Cluster(
            initialize_head=True,
            head_node_args={
                **self._node_args(hres),
                "gcs_server_port": free_port(),
                "include_dashboard": True,
                "dashboard_port": free_port(),
            },
        )
        self.nodes.append(GroupNode("head", hres, self.cluster.head_node))
        self.ever[self.nodes[0].node_id] = "head"
        for group, res in workers:
            self.add(group, res)
        self.cluster.wait_for_nodes()
        return self

    def add(self, group: str, res: dict[str, float] | None = None) -> GroupNode:
        """Start one more node of ``group`` (what the autoscaler does when a pool grows or a node is lost)."""
        res = res or next(r for g, r in self.shapes() if g == group)
        n = GroupNode(group, res, self.cluster.add_node(**self._node_args(res)))
        self.nodes.append(n)
        self.ever[n.node_id] = group
        return n

    def remove(self, n: GroupNode) -> None:
        """Lose a whole node: its raylet, object store and every worker on it are killed."""
        self.cluster.remove_node(n.node, allow_graceful=False)
        self.nodes.remove(n)

    @property
    def address(self) -> str:
        return self.cluster.address

    def __exit__(self, *exc) -> None:
        import ray

        ray.shutdown()  # a driver connected to the head would stop the head's removal
        try:
            if self.cluster is not None:
                # each node killed at once: Cluster.shutdown() stops them gracefully, one process at a time
                # with a grace period each (a head that ran actors took ~32 s that way), for nothing we keep
                for node in [*self.cluster.worker_nodes, self.cluster.head_node]:
                    if node is not None:
                        self.cluster.remove_node(node, allow_graceful=False)
                self.cluster.shutdown()  # no node left: what remains is resetting the driver's view
        finally:
            self._restore_address()

    def _restore_address(self) -> None:
        try:  # never leave the address of a cluster that is gone for the next `ray.init()` to wait on
            if self._address_before is None:
                os.remove(self._address_file)
            else:
                with open(self._address_file, "w") as f:
                    f.write(self._address_before)
        except (OSError, AttributeError):
            pass


def production_on_cpu(deployed: dict, *, address: str, day: str, output: str, rows_per_file: int = 200) -> dict:
    """``configs/production.yaml`` with what this machine forces overridden: the model, probe,
    corpus, calibration and output paths of a deployment (``deployed``: a config dict the demo's
    ``deploy`` wrote), devices (cpu, fp32, no compile), sizes (actors, CPUs, batch and file sizes, the
    control sample's floor), the cluster's address and ``output`` (a folder of its own: the deployment's
    nights are not joined by this one). The resource requests (``activations.resources``,
    the judge's per-replica GPUs and ``expert`` resource) and ``ray.node_types_from`` stay as production
    has them. The judge is the deployment's classifier on the pool production gives its vLLM replicas
    (one bundle each: vLLM with tensor parallelism 2 needs two real GPUs)."""
    with open(PRODUCTION, encoding="utf-8") as f:
        prod = yaml.safe_load(f)
    cfg = copy.deepcopy(prod)
    m, d = cfg["model"], deployed["model"]
    m.update({k: d[k] for k in ("path", "id", "layer", "max_length")})
    m.update({"dtype": "auto", "compile": False, "token_budget": None})
    m.pop("candidate_layers", None)
    cfg["probes"] = dict(deployed["probes"])
    a = cfg["activations"]
    a.update({"min_actors": 1, "max_actors": 1, "num_cpus": 1, "batch_size": 128, "device": "cpu"})
    v = prod["expert"]["vllm"]
    cfg["expert"] = {
        "kind": "classifier",
        "classifier": {
            **{k: deployed["expert"]["classifier"][k] for k in ("path", "max_length")},
            "pool": {
                "min_actors": 1,
                "max_actors": 1,
                "num_cpus": 1,
                "num_gpus": v["num_gpus_per_replica"],
                "resources": dict(v["resources"]),
                "batch_size": 64,
                "device": "cpu",
            },
        },
    }
    cfg["calibration"] = dict(deployed["calibration"])
    cfg["ray"] = {**prod["ray"], "address": address, "node_types_from": MANIFEST}
    cfg["train"], cfg["calibrate"] = dict(deployed["train"]), dict(deployed["calibrate"])
    au = cfg["audit"]
    au.update({k: deployed["audit"][k] for k in ("corpus", "calibration")} | {"output": output})
    au.update({"date": day, "rows_per_file": rows_per_file, "commit_rows": 64, "control_floor": 20, "control_ceiling": 60})
    return cfg


def placement(address: str, job_id: str, group_of: dict[str, str]) -> dict:
    """Where the job's actors and tasks ran, by worker group: {"actors": [{class, group, resources,
    state}], "tasks": {group: {"cpu_only": n, "other": n, "names": {name: n}}}}, from Ray's state API
    (actor and normal tasks; an actor's own method calls run where the actor is)."""
    from ray.util.state import list_actors, list_tasks

    flt = [("job_id", "=", job_id)]
    actors = [
        {
            "class": a.class_name,
            "group": group_of.get(a.node_id, "?"),
            "resources": dict(a.required_resources or {}),
            "state": a.state,
            "restarts": a.num_restarts,
        }
        for a in list_actors(address=address, filters=flt, limit=10_000, detail=True, raise_on_missing_output=False)
    ]
    tasks: dict[str, dict[str, int]] = {}
    for t in list_tasks(address=address, filters=flt, limit=10_000, detail=True, raise_on_missing_output=False):
        if t.type != "NORMAL_TASK" or not t.node_id:
            continue
        res = dict(t.required_resources or {})
        kind = "cpu_only" if set(res) <= {"CPU", "memory"} else "other"
        g = tasks.setdefault(group_of.get(t.node_id, "?"), {"cpu_only": 0, "other": 0, "names": {}})
        g[kind] += 1
        g["names"][t.name] = g["names"].get(t.name, 0) + 1
    return {"actors": actors, "tasks": tasks}
