"""Before any work: can this cluster ever place the night's actors?

Every actor the job will start asks Ray for a resource shape (CPU, GPU, custom resources such as
``activations: 1``); a vLLM judge replica asks for ``tensor_parallel_size`` bundles packed on one node
(STRICT_PACK). A shape that no node has, and no node the autoscaler can add has, waits forever: Ray
logs "No available node types can fulfill resource request" every half minute and the job holds its
lease. :func:`check_schedulable` compares each request with the shapes of

- the nodes alive now (``ray.nodes()``),
- the node types the autoscaler reports it can add (Ray's autoscaler v2 writes them to the GCS),
- the worker groups of the RayCluster manifest named by ``ray.node_types_from`` (the shapes KubeRay
  gives its pods: ``rayStartParams`` num-cpus / num-gpus / resources, else the container's limits),

and raises :class:`Unschedulable` (the job exits 2, before its lease) naming the request and what is
missing. Requests are per actor: the minimum pool must fit somewhere, not all of it at once (the
autoscaler adds nodes as the pool grows).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from ..config import ConfigError, JobConfig

__all__ = [
    "Request",
    "Unschedulable",
    "requests",
    "node_shapes",
    "manifest_shapes",
    "per_node",
    "unschedulable",
    "check_schedulable",
]


class Unschedulable(ConfigError):
    """A resource request that no node of the cluster can ever satisfy (exit 2: the config or the cluster)."""


@dataclass(frozen=True)
class Request:
    what: str  # who asks, named by its config keys
    bundle: dict[str, float]  # one bundle's resources
    bundles: int = 1  # bundles packed on one node (STRICT_PACK)

    @property
    def on_one_node(self) -> dict[str, float]:
        return {k: v * self.bundles for k, v in self.bundle.items() if v > 0}


def requests(cfg: JobConfig) -> list[Request]:
    """The per-actor resource requests of the audit's stages, as the stages make them."""
    a = cfg.activations
    out = [Request("an activation actor (activations.*)", {"CPU": a.num_cpus, "GPU": a.num_gpus, **a.resources})]
    e = cfg.expert
    if e.kind == "classifier" and e.classifier is not None:
        p = e.classifier.pool
        out.append(Request("a judge actor (expert.classifier.pool.*)", {"CPU": p.num_cpus, "GPU": p.num_gpus, **p.resources}))
    elif e.kind == "vllm" and e.vllm is not None:
        v = e.vllm
        bundle = ({"GPU": v.num_gpus_per_replica, "CPU": 1.0} if v.num_gpus_per_replica > 0 else {"CPU": 1.0}) | dict(v.resources)
        what = "a judge replica (expert.vllm.*" + (
            f": {v.tensor_parallel_size} bundles packed on one node for tensor parallelism)"
            if v.tensor_parallel_size > 1
            else ")"
        )
        out.append(Request(what, bundle, v.tensor_parallel_size))
    if cfg.ray.cpu_nodes:  # CPU-only work is held to nodes with these labels: one such node must exist or be addable
        out.append(Request("CPU-only work (ray.cpu_nodes)", {"CPU": 1.0} | label_resources(cfg.ray.cpu_nodes)))
    return out


LABEL = "label:"  # a node label, counted as a resource of 1 in a shape (k=v): what a label selector needs


def label_resources(labels: dict[str, str]) -> dict[str, float]:
    return {f"{LABEL}{k}={v}": 1.0 for k, v in labels.items()}


def _resource_shape(raw: dict, labels: dict | None = None) -> dict[str, float]:
    shape = {k: float(v) for k, v in raw.items() if not k.startswith("node:") and k not in ("memory", "object_store_memory")}
    return shape | label_resources({k: v for k, v in (labels or {}).items() if not k.startswith("ray.io/")})


def node_shapes() -> list[tuple[str, dict[str, float]]]:
    """(where it comes from, shape) for the alive nodes and the autoscaler's node types."""
    import ray

    shapes = [
        (f"node {n['NodeManagerAddress']}", _resource_shape(n["Resources"], n.get("Labels")))
        for n in ray.nodes()
        if n.get("Alive")
    ]
    try:  # autoscaler v2 reports the node groups it can launch; a private API, so only a hint when present
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception:  # noqa: BLE001 - no autoscaler, an older Ray, or a client connection
        config = None
    for g in getattr(config, "node_group_configs", None) or []:
        if g.max_count != 0 and g.resources:
            labels = dict(getattr(g, "labels", None) or {})
            shapes.append((f"autoscaler node type {g.name}", _resource_shape(dict(g.resources), labels)))
    return shapes


def _quantity(v) -> float:
    s = str(v).strip()
    return float(s[:-1]) / 1000 if s.endswith("m") else float(s)


def manifest_shapes(path: str) -> list[tuple[str, dict[str, float]]]:
    """The worker groups of a RayCluster manifest (or a RayJob's or RayCronJob's embedded one) as
    Ray node shapes, the way KubeRay starts their pods: ``rayStartParams`` num-cpus, num-gpus and
    resources, else the first container's limits (cpu, nvidia.com/gpu). Groups with maxReplicas 0
    and the head (it takes no work when num-cpus is 0) are left out unless they have resources.
    A group's ``labels`` are in its shape as ``label:k=v`` resources of 1 (see :func:`label_resources`)."""
    import yaml

    try:
        docs = [d for d in yaml.safe_load_all(open(path, encoding="utf-8")) if isinstance(d, dict)]
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"ray.node_types_from: cannot read {path} ({e})") from None
    out = []
    for doc in docs:
        spec = doc.get("spec") or {}
        spec = spec.get("rayClusterSpec") or (spec.get("jobTemplate") or {}).get("rayClusterSpec") or spec
        groups = [("head", spec.get("headGroupSpec") or {}, 1)] + [
            (g.get("groupName", "?"), g, int(g.get("maxReplicas", g.get("replicas", 1)) or 0))
            for g in spec.get("workerGroupSpecs") or []
        ]
        for name, g, count in groups:
            if not g or count == 0:
                continue
            params = g.get("rayStartParams") or {}
            containers = ((g.get("template") or {}).get("spec") or {}).get("containers") or [{}]
            limits = (containers[0].get("resources") or {}).get("limits") or {}
            shape = {
                "CPU": _quantity(params.get("num-cpus", limits.get("cpu", 0))),
                "GPU": _quantity(params.get("num-gpus", limits.get("nvidia.com/gpu", 0))),
            }
            custom = params.get("resources")
            while isinstance(custom, str) and custom.strip():  # KubeRay's format: '"{\"name\": 1}"' (JSON in a JSON string)
                custom = json.loads(custom)
            if isinstance(custom, dict):
                shape |= {k: float(v) for k, v in custom.items()}
            shape |= label_resources(g.get("labels") or {})
            out.append((f"{path} worker group {name}" if name != "head" else f"{path} head", shape))
    return out


def _fits(need: dict[str, float], shape: dict[str, float]) -> bool:
    return all(shape.get(k, 0.0) >= v - 1e-9 for k, v in need.items())


def per_node(r: Request, shape: dict[str, float]) -> int:
    """How many of request ``r`` (its bundles packed on one node) one node of ``shape`` holds at once."""
    need = r.on_one_node
    return int(min((shape.get(k, 0.0) + 1e-9) // v for k, v in need.items())) if need else 0


def _lacking(need: dict[str, float], shape: dict[str, float]) -> dict[str, float]:
    return {k: v - shape.get(k, 0.0) for k, v in need.items() if shape.get(k, 0.0) < v - 1e-9}


def _fmt(d: dict[str, float]) -> str:
    return (
        "{" + ", ".join(f"label {k[len(LABEL) :]}" if k.startswith(LABEL) else f"{k}: {v:g}" for k, v in sorted(d.items())) + "}"
    )


def unschedulable(reqs: list[Request], shapes: list[tuple[str, dict[str, float]]]) -> list[str]:
    """One sentence per request that fits no shape: what it asks for, and what the nearest shape lacks."""
    problems = []
    for r in reqs:
        need = r.on_one_node
        if any(_fits(need, s) for _, s in shapes):
            continue
        if not shapes:
            problems.append(f"{r.what} asks for {_fmt(need)} on one node, and the cluster reports no node at all")
            continue

        where, best = min(shapes, key=lambda x: (len(_lacking(need, x[1])), sum(_lacking(need, x[1]).values())))
        miss = ", ".join(
            f"label {k[len(LABEL) :]}"
            if k.startswith(LABEL)
            else f"{k} {need[k]:g} (has {best.get(k, 0.0):g})"
            if k in best
            else f"{k} {need[k]:g} (no such resource)"
            for k in _lacking(need, best)
        )
        known = sorted({k.replace(LABEL, "label ", 1) for _, s in shapes for k in s})
        problems.append(
            f"{r.what} asks for {_fmt(need)} on one node; no node or node type the cluster has or can add provides it "
            f"(nearest: {where}, lacking {miss}; resources the cluster knows: {', '.join(known)})"
        )
    return problems


def check_schedulable(cfg: JobConfig) -> None:
    """Raise :class:`Unschedulable` when a request of the night fits no node the cluster has or can add."""
    shapes = node_shapes()
    if cfg.ray.node_types_from:
        shapes += manifest_shapes(cfg.ray.node_types_from)
    problems = unschedulable(requests(cfg), shapes)
    if problems:
        raise Unschedulable(
            "this night cannot be scheduled, so nothing was started: "
            + "; ".join(problems)
            + ". Fix the resource request in the config, or give the cluster a node group that advertises it "
            "(cluster/raycluster.yaml; ray.node_types_from names the manifest whose groups the autoscaler can add)."
        )
