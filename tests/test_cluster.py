"""The deployment in cluster/: the KubeRay manifests validate against the KubeRay v1.7.0 CRDs with
unknown fields rejected (as the API server's strict field validation does), the cluster-launcher YAML
against Ray's own schema; the rendered files are current and hold no secret; and the manifests, the
launcher, the image and configs/production.yaml agree on every path, variable, resource and version.
No Ray cluster is started."""

import copy
import functools
import importlib.metadata
import importlib.util
import json
import operator
import os
import re

import jsonschema
import pytest
import yaml
from conftest import DATA, missing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLUSTER = os.path.join(ROOT, "cluster")
CRDS = os.path.join(DATA, "kuberay-crds")
PRODUCTION = os.path.join(ROOT, "configs", "production.yaml")
MANIFESTS = {"raycluster.yaml": "RayCluster", "rayjob-audit.yaml": "RayJob", "raycronjob-nightly.yaml": "RayCronJob"}


class Loader(yaml.SafeLoader):
    """Rejects a key given twice in one mapping, as kubectl's strict validation does (PyYAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        keys = [self.construct_object(k, deep=deep) for k, _ in node.value]
        dup = {k for k in keys if keys.count(k) > 1}
        if dup:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate keys {sorted(map(str, dup))}", node.start_mark)
        return super().construct_mapping(node, deep=deep)


def load(name):
    with open(os.path.join(CLUSTER, name)) as f:
        return yaml.load(f, Loader=Loader)


def test_duplicate_keys_are_rejected():
    with pytest.raises(yaml.constructor.ConstructorError, match="duplicate"):
        yaml.load("a: 1\nb: {c: 1, c: 2}\n", Loader=Loader)


# ----------------------------------------------------------------------------------------------
# strict validation against the CRDs' openAPIV3Schema
# ----------------------------------------------------------------------------------------------

# The top-level metadata is a generic ObjectMeta (the CRD says only `type: object`): the subset these
# manifests use, with unknown keys rejected.
OBJECT_META = {
    "type": "object",
    "required": ["name"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "minLength": 1},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}


def strict(s: dict) -> dict:
    """Structural schema -> JSON Schema as strict field validation applies it: an object schema with
    `properties` and no `additionalProperties` rejects unknown fields unless it says
    x-kubernetes-preserve-unknown-fields; x-kubernetes-int-or-string allows an integer or a string
    (the v1.7.0 CRDs also spell it as anyOf). Other x-kubernetes-* keywords (list types, CEL rules)
    are ignored."""
    if s.pop("x-kubernetes-int-or-string", False):
        s.pop("type", None)
        s.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if "properties" in s and "additionalProperties" not in s and not s.get("x-kubernetes-preserve-unknown-fields"):
        s["additionalProperties"] = False
    for sub in s.get("properties", {}).values():
        strict(sub)
    for key in ("items", "additionalProperties", "not"):
        if isinstance(s.get(key), dict):
            strict(s[key])
    for key in ("anyOf", "allOf", "oneOf"):
        for sub in s.get(key, []):
            strict(sub)
    return s


@functools.cache
def crd_validator(kind: str) -> jsonschema.Draft7Validator:
    path = os.path.join(CRDS, f"ray.io_{kind.lower()}s.yaml")
    if not os.path.exists(path):
        missing(f"KubeRay CRDs not found at {CRDS} (set CTD_DATA_DIR)")
    with open(path) as f:
        crd = yaml.load(f, Loader=Loader)
    assert crd["spec"]["names"]["kind"] == kind
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = strict(copy.deepcopy(v1["schema"]["openAPIV3Schema"]))
    schema["properties"].update(apiVersion={"const": f"{crd['spec']['group']}/v1"}, kind={"const": kind}, metadata=OBJECT_META)
    schema["required"] = ["apiVersion", "kind", "metadata", "spec"]
    return jsonschema.Draft7Validator(schema)


def crd_errors(doc: dict, kind: str) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in crd_validator(kind).iter_errors(doc)]


@pytest.mark.parametrize("name", MANIFESTS)
def test_manifests_validate_against_the_kuberay_crds_with_unknown_fields_rejected(name):
    assert crd_errors(load(name), MANIFESTS[name]) == []


def _rename(path, old, new):
    def f(doc):
        node = functools.reduce(operator.getitem, path, doc)
        node[new] = node.pop(old)

    return f


def _set(path, key, value):
    return lambda doc: functools.reduce(operator.getitem, path, doc).__setitem__(key, value)


WORKER0_CONTAINER = ["spec", "rayClusterSpec", "workerGroupSpecs", 0, "template", "spec", "containers", 0]


@pytest.mark.parametrize(
    "name, defect, expected",
    [
        (
            "raycluster.yaml",
            _rename(["spec", "headGroupSpec"], "rayStartParams", "rayStartParam"),
            "'rayStartParam' was unexpected",
        ),
        ("raycronjob-nightly.yaml", _rename(["spec"], "schedule", "schedul"), "'schedul' was unexpected"),
        ("raycronjob-nightly.yaml", _set(["spec"], "concurrencyPolicy", "Forbid"), "'concurrencyPolicy' was unexpected"),
        ("rayjob-audit.yaml", _rename(WORKER0_CONTAINER, "volumeMounts", "volumeMount"), "'volumeMount' was unexpected"),
        ("rayjob-audit.yaml", _set(["spec", "rayClusterSpec", "authOptions"], "mode", "Token"), "'Token' is not one of"),
        ("raycluster.yaml", _rename(["metadata"], "name", "nmae"), "'nmae' was unexpected"),
        ("raycluster.yaml", _set([], "apiVersion", "ray.io/v1alpha2"), "'ray.io/v1' was expected"),
    ],
)
def test_the_validator_rejects_a_misspelt_or_unknown_field(name, defect, expected):
    doc = load(name)
    defect(doc)
    errors = crd_errors(doc, MANIFESTS[name])
    assert any(expected in e for e in errors), errors


def test_cluster_launcher_validates_against_rays_schema():
    schema_path = os.path.join(os.path.dirname(importlib.util.find_spec("ray").origin), "autoscaler", "ray-schema.json")
    with open(schema_path) as f:
        validator = jsonschema.Draft7Validator(json.load(f))
    launcher = load("cluster-launcher.yaml")
    assert [e.message for e in validator.iter_errors(launcher)] == []
    launcher["docker"]["run_option"] = launcher["docker"].pop("run_options")  # the validator catches a typo
    assert any("'run_option' was unexpected" in e.message for e in validator.iter_errors(launcher))


# ----------------------------------------------------------------------------------------------
# rendered, secret-free, autoscaled
# ----------------------------------------------------------------------------------------------


def test_cluster_manifests_are_rendered_secure_and_autoscaled():
    spec = importlib.util.spec_from_file_location("render", os.path.join(CLUSTER, "render.py"))
    render = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(render)
    for name, text in render.render().items():
        assert open(os.path.join(CLUSTER, name)).read() == text, f"cluster/{name} is stale: run python cluster/render.py"
    for name in os.listdir(CLUSTER):
        if name.endswith((".yaml", "Dockerfile")):
            text = open(os.path.join(CLUSTER, name)).read()
            assert not re.search(r"(?i)(secret_access_key|password|api_key|auth_token)\s*:\s*\S", text), name  # nothing inline
            assert not re.search(r"RAY_AUTH_TOKEN=\S", text), name
    rc = load("raycluster.yaml")["spec"]
    assert rc["authOptions"]["mode"] == "token" and rc["enableInTreeAutoscaling"]
    groups = {g["groupName"]: g for g in rc["workerGroupSpecs"]}
    limits = {n: g["template"]["spec"]["containers"][0]["resources"]["limits"] for n, g in groups.items()}
    assert limits["activations"]["nvidia.com/gpu"] == "1" and limits["expert"]["nvidia.com/gpu"] == "2"
    assert "nvidia.com/gpu" not in limits["cpu"] and "resources" not in groups["cpu"]["rayStartParams"]
    assert rc["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # the head runs drivers, no tasks
    assert all(g["minReplicas"] == 0 and g["maxReplicas"] >= 1 for g in groups.values())
    cron = load("raycronjob-nightly.yaml")
    assert cron["kind"] == "RayCronJob" and "jobs.audit" in cron["spec"]["jobTemplate"]["entrypoint"]
    for entry in (cron["spec"]["jobTemplate"]["entrypoint"], load("rayjob-audit.yaml")["spec"]["entrypoint"]):
        module = re.search(r"python -m (\S+)", entry).group(1)
        assert os.path.exists(os.path.join(ROOT, *module.split(".")) + ".py"), entry  # the job module is in the image (COPY jobs)
    assert "--fail-on-drift" not in cron["spec"]["jobTemplate"]["entrypoint"]


# ----------------------------------------------------------------------------------------------
# the production config's paths, variables and resources exist where they are read
# ----------------------------------------------------------------------------------------------


def production():
    text = open(PRODUCTION).read()
    cfg = yaml.safe_load(text)
    paths = set()

    def walk(x):
        if isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)
        elif isinstance(x, str) and x.startswith("/"):
            paths.add(x)

    walk(cfg)
    return cfg, sorted(paths), sorted(set(re.findall(r"\$\{(\w+)\}", text)))


def test_production_names_the_paths_and_variables_checked_below():
    cfg, paths, env = production()
    assert {cfg["model"]["path"], cfg["expert"]["vllm"]["model"]} <= set(paths) and "CTD_BUCKET" in env


def cluster_spec(name):
    doc = load(name)
    return {
        "RayCluster": lambda s: s,
        "RayJob": lambda s: s["rayClusterSpec"],
        "RayCronJob": lambda s: s["jobTemplate"]["rayClusterSpec"],
    }[doc["kind"]](doc["spec"])


def pods(spec):
    """Every pod that runs ctd code: the head (the job driver) and each worker group (tasks, actors)."""
    yield "head", spec["headGroupSpec"]
    for g in spec["workerGroupSpecs"]:
        yield g["groupName"], g


def covers(mount: str, path: str) -> bool:
    return path == mount or path.startswith(mount.rstrip("/") + "/")


@pytest.mark.parametrize("name", MANIFESTS)
def test_every_path_and_variable_of_the_production_config_is_mounted_or_set_in_every_pod(name):
    _, paths, env = production()
    claims = set()
    for group, g in pods(cluster_spec(name)):
        pod = g["template"]["spec"]
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        ray = pod["containers"][0]
        mounts = [m for m in ray.get("volumeMounts", []) if m["name"] in volumes]
        for path in paths:
            found = [m for m in mounts if covers(m["mountPath"], path)]
            assert found, f"{name}: {group} reads {path} but mounts nothing there"
            assert all(m.get("readOnly") for m in found), f"{name}: {group} mounts {path} writable"
            claims |= {volumes[m["name"]].get("persistentVolumeClaim", {}).get("claimName") for m in found}
        # a secretRef's keys cannot be checked here: the variables the config expands are plain `env`
        names = {e["name"] for e in ray.get("env", [])}
        assert set(env) <= names, f"{name}: {group} lacks {set(env) - names} in env"
    assert claims == {"ctd-models"}, claims  # one model store (a PVC, not an emptyDir), the same on every pod


def rayres(g) -> dict:
    r = g.get("rayStartParams", {}).get("resources")
    return json.loads(json.loads(r)) if r else {}  # KubeRay's format: '"{\"name\": 1}"'


@pytest.mark.parametrize("name", MANIFESTS)
def test_each_stage_lands_on_its_group_and_gpu_groups_have_dev_shm(name):
    cfg, _, _ = production()
    act, vllm = cfg["activations"], cfg["expert"]["vllm"]
    tp = vllm["tensor_parallel_size"]
    # (custom resources, GPUs, CPUs) that one activation actor / one judge replica (tp bundles) needs
    needs = {
        "activations": (act["resources"], act["num_gpus"], act["num_cpus"]),
        "expert": ({k: v * tp for k, v in vllm["resources"].items()}, vllm["num_gpus_per_replica"] * tp, 0),
    }
    groups = {n: g for n, g in pods(cluster_spec(name)) if n != "head"}
    for stage, (res, gpus, cpus) in needs.items():
        hosts = [n for n, g in groups.items() if set(res) & set(rayres(g))]
        assert len(hosts) == 1, f"{name}: {stage}'s resources {res} are advertised by {hosts}, not by one group"
        g = groups[hosts[0]]
        limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert all(rayres(g)[k] >= v for k, v in res.items()), (stage, rayres(g), res)
        assert int(limits.get("nvidia.com/gpu", 0)) >= gpus and int(limits["cpu"]) >= cpus, (stage, limits)
    cpu_groups = [
        n for n, g in groups.items() if "nvidia.com/gpu" not in g["template"]["spec"]["containers"][0]["resources"]["limits"]
    ]
    assert cpu_groups and not any(rayres(groups[n]) for n in cpu_groups), "a CPU group without custom resources for CPU stages"
    for n in set(groups) - set(cpu_groups):
        pod = groups[n]["template"]["spec"]
        shm = [m for m in pod["containers"][0].get("volumeMounts", []) if m["mountPath"] == "/dev/shm"]
        assert shm, f"{name}: GPU group {n} has no /dev/shm"
        (vol,) = [v for v in pod["volumes"] if v["name"] == shm[0]["name"]]
        assert vol["emptyDir"]["medium"] == "Memory", (n, vol)


def test_cluster_launcher_gives_every_node_the_token_the_models_and_the_variables():
    cfg, paths, env = production()
    launcher = load("cluster-launcher.yaml")
    # docker.run_options apply to the head and every worker (head_/worker_run_options only add to them)
    flags = launcher["docker"]["run_options"]
    envs = dict(o[3:].split("=", 1) for o in flags if o.startswith("-e "))
    volumes = [o[3:].split(":") for o in flags if o.startswith("-v ")]
    assert any(o.startswith("--shm-size=") for o in flags)
    assert envs.get("RAY_AUTH_MODE") == "token" and "RAY_AUTH_TOKEN" not in envs
    token_dir = os.path.dirname(envs["RAY_AUTH_TOKEN_PATH"])
    assert token_dir in launcher["file_mounts"], "the token file must be synced to every node"
    # the token is the synced one: no node generates its own, which the others would never see
    assert not any("--generate" in c for c in launcher["head_start_ray_commands"] + launcher["worker_start_ray_commands"])
    assert set(env) <= set(envs), f"lacks {set(env) - set(envs)}"
    for path in paths:
        assert any(covers(v[1], path) and v[2:] == ["ro"] for v in volumes), f"{path} is not mounted read-only"
    types = launcher["available_node_types"]
    assert types[launcher["head_node_type"]]["resources"] == {"CPU": 0}
    for res in (cfg["activations"]["resources"], cfg["expert"]["vllm"]["resources"]):
        assert any(set(res) <= set(t["resources"]) for t in types.values()), res
    assert any(n != launcher["head_node_type"] and not t["resources"] for n, t in types.items()), "a CPU node type"
    assert launcher["max_workers"] >= sum(t.get("max_workers", 0) for t in types.values())


# ----------------------------------------------------------------------------------------------
# one image, one set of versions
# ----------------------------------------------------------------------------------------------


def test_image_versions_and_entrypoint_agree():
    dockerfile = open(os.path.join(CLUSTER, "Dockerfile")).read()
    ray_version = re.search(r"^FROM rayproject/ray:([\d.]+)-py311-cu128$", dockerfile, re.M).group(1)
    pyproject = open(os.path.join(ROOT, "pyproject.toml")).read()
    assert f'"ray[default,data]=={ray_version}"' in pyproject
    assert re.search(r"^gpu = \[(.*)\]$", pyproject, re.M).group(1) == f'"ray[llm]=={ray_version}"'
    # the vLLM that Ray's `llm` extra pins is the one the image build asserts
    (pin,) = [r for r in importlib.metadata.requires("ray") if r.startswith("vllm") and 'extra == "llm"' in r]
    vllm_version = re.search(r"==([\w.]+)", pin).group(1)
    assert importlib.metadata.version("ray") == ray_version and f"'{vllm_version}'" in dockerfile
    images = {load("cluster-launcher.yaml")["docker"]["image"]}
    for name in MANIFESTS:
        spec = cluster_spec(name)
        assert spec["rayVersion"] == ray_version
        images |= {c["image"] for _, g in pods(spec) for c in g["template"]["spec"]["containers"]}
    assert len(images) == 1, images
    # the RayJob's config path is inside the image and is configs/production.yaml
    workdir = re.search(r"^WORKDIR (\S+)$", dockerfile, re.M).group(1)
    config = re.search(r"--config (\S+)", load("rayjob-audit.yaml")["spec"]["entrypoint"]).group(1)
    assert config == f"{workdir}/configs/production.yaml" and re.search(
        r"^COPY (--chown=\S+ )?configs \./configs$", dockerfile, re.M
    )
    assert os.path.exists(PRODUCTION)


def test_readme_walkthrough_names_the_versions_and_the_feature_gate():
    readme = open(os.path.join(ROOT, "README.md")).read()
    section = readme.split("### On a cluster", 1)[1].split("\n## ", 1)[0]
    values = load("kuberay-operator-values.yaml")
    assert {"name": "RayCronJob", "enabled": True} in values["featureGates"]
    for needle in ("RayCronJob", "feature gate", "v1.7.0", "2.60.0", "0.29.0", "kuberay-operator-values.yaml", "ctd-models"):
        assert needle in section, needle


# ------------------------------------------------------------------ pre-flight: a night no node can run fails fast
@pytest.mark.parametrize("name", MANIFESTS)
def test_preflight_places_the_production_requests_on_the_manifests_groups(name, monkeypatch):
    """The production config's requests fit the groups the manifest declares, each on the group meant for
    it (CPU-only work on the group labelled as ray.cpu_nodes says); a misspelt resource, a TP size no node
    has, a group removed or a label lost are refused, naming what is missing."""
    from ctd.config import load_config
    from ctd.pipeline.preflight import Request, manifest_shapes, requests, unschedulable

    monkeypatch.setenv("CTD_BUCKET", "b")
    cfg = load_config(PRODUCTION)
    shapes = manifest_shapes(os.path.join(CLUSTER, name))
    groups = {w.rsplit(" ", 1)[-1]: s for w, s in shapes}
    assert groups["activations"] == {"CPU": 12, "GPU": 1, "activations": 1} and groups["expert"]["GPU"] == 2
    reqs = requests(cfg)
    assert [r.bundles for r in reqs] == [1, 2, 1] and reqs[1].on_one_node == {"CPU": 2, "GPU": 2, "expert": 2}
    assert reqs[2].on_one_node == {"CPU": 1, "label:ctd/pool=cpu": 1} and groups["cpu"]["label:ctd/pool=cpu"] == 1
    assert unschedulable(reqs, shapes) == []
    for r, group in zip(reqs, ("activations", "expert", "cpu")):  # each fits exactly one group: the one meant for it
        assert [g for g, s in groups.items() if unschedulable([r], [("", s)]) == []] == [group]
    unlabelled = [(w, {k: v for k, v in s.items() if not k.startswith("label:")}) for w, s in shapes]
    (p,) = unschedulable(reqs, unlabelled)
    assert p.startswith("CPU-only work (ray.cpu_nodes)") and "lacking label ctd/pool=cpu" in p
    typo = Request("an activation actor (activations.*)", {"CPU": 4, "GPU": 1, "activation": 1})
    (p,) = unschedulable([typo], shapes)
    assert "activation 1 (no such resource)" in p and "activations" in p and "expert" in p  # the known resources listed
    tp4 = Request("a judge replica", {"CPU": 1, "GPU": 1, "expert": 1}, 4)
    (p,) = unschedulable([tp4], shapes)
    assert "GPU 4 (has 2)" in p and "expert 4 (has 2)" in p and "worker group expert" in p
    assert unschedulable(reqs[:1], [(w, s) for w, s in shapes if "activations" not in w])  # the group gone: refused


# ----------------------------------------------------------------------------------------------
# issue #26 item 2: during the night, a stage stuck waiting for resources, and the deadline
# ----------------------------------------------------------------------------------------------
def test_a_stage_is_stuck_only_when_none_of_its_actors_got_resources():
    from ctd.pipeline.watchdog import stuck_classes

    actor = lambda name, state, need=None: {"class_name": name, "state": state, "required_resources": need or {}}  # noqa: E731
    assert stuck_classes([]) == {}
    assert stuck_classes([actor("Act", "PENDING_CREATION", {"activations": 1.0})]) == {"Act": {"activations": 1.0}}
    assert stuck_classes([actor("Act", "PENDING_CREATION"), actor("Act", "ALIVE")]) == {}  # a smaller pool runs
    assert stuck_classes([actor("Act", "ALIVE"), actor("Judge", "DEPENDENCIES_UNREADY", {"GPU": 2.0})]) == {"Judge": {"GPU": 2.0}}
    assert stuck_classes([actor("Act", "RESTARTING")]) == {}  # restarting is Ray's own recovery, not a wait


def test_the_deadline_is_the_next_clock_time_or_a_duration_after_the_start():
    import datetime as dt

    from ctd.pipeline.watchdog import deadline_at

    start = dt.datetime(2026, 12, 4, 5, 30, tzinfo=dt.timezone.utc)  # 06:30 in Paris
    assert deadline_at(None, "UTC", start) is None
    assert deadline_at("90m", "UTC", start) == start + dt.timedelta(minutes=90)
    assert deadline_at("2.5h", "UTC", start) == start + dt.timedelta(hours=2.5)
    assert deadline_at("07:00", "UTC", start) == dt.datetime(2026, 12, 4, 7, 0, tzinfo=dt.timezone.utc)
    assert deadline_at("05:00", "UTC", start) == dt.datetime(2026, 12, 5, 5, 0, tzinfo=dt.timezone.utc)  # passed: tomorrow's
    paris = deadline_at("07:00", "Europe/Paris", start)
    assert paris is not None and paris.astimezone(dt.timezone.utc) == dt.datetime(2026, 12, 4, 6, 0, tzinfo=dt.timezone.utc)


@pytest.mark.parametrize("bad", ["7:00", "24:00", "90", "90s", "-1h", "tomorrow"])
def test_a_deadline_that_is_neither_a_clock_time_nor_a_duration_is_a_config_error(tmp_path, bad):
    from ctd.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="audit.deadline"):
        load_config(os.path.join(ROOT, "configs", "demo.yaml"), {"audit.deadline": bad})


def _blocked(seconds: float) -> None:
    """The driver waiting in C, as it does in ray.get or on the streaming executor's queue."""
    import threading

    threading.Event().wait(seconds)


def test_a_stage_stuck_past_its_wait_stops_the_body_and_a_pool_that_runs_does_not():
    import signal
    import time

    from ctd.pipeline.watchdog import StuckWaiting, watch

    stuck = lambda: [
        {"class_name": "MapWorker(Activations)", "state": "PENDING_CREATION", "required_resources": {"activations": 1.0}}
    ]  # noqa: E731
    before = signal.getsignal(signal.SIGUSR1)
    t = time.monotonic()
    with pytest.raises(StuckWaiting, match=r"MapWorker\(Activations\) waited \d+ s for resources \{'activations': 1.0\}"):
        with watch(wait_s=0.3, deadline=None, poll_s=0.1, actors=stuck):
            _blocked(60)
    assert time.monotonic() - t < 10 and signal.getsignal(signal.SIGUSR1) is before  # stopped in time; handler restored
    running = lambda: stuck() + [{"class_name": "MapWorker(Activations)", "state": "ALIVE"}]  # noqa: E731
    with watch(wait_s=0.3, deadline=None, poll_s=0.1, actors=running):
        _blocked(1.0)  # one actor of the pool got its resources: the night goes on, slower
    flaky = iter([stuck(), [], stuck(), [], stuck(), []] * 10)  # stuck, then not: the wait starts again each time
    with watch(wait_s=0.25, deadline=None, poll_s=0.1, actors=lambda: next(flaky)):
        _blocked(1.0)


def test_past_the_deadline_the_body_stops_with_exit_6():
    import datetime as dt
    import time

    from ctd.pipeline.watchdog import EXIT_DEADLINE, DeadlinePassed, watch

    t = time.monotonic()
    at = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=0.5)
    with pytest.raises(DeadlinePassed, match="stopped at its deadline .* a rerun of the same run id resumes") as e:
        with watch(wait_s=None, deadline=at, poll_s=0.1, actors=lambda: []):
            _blocked(60)
    assert 0.5 <= time.monotonic() - t < 10 and e.value.exit_code == EXIT_DEADLINE == 6
    with watch(wait_s=None, deadline=dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1), poll_s=0.1):
        _blocked(0.3)  # a night that ends before its deadline is not touched


def test_on_a_local_instance_without_a_state_api_only_the_deadline_is_watched(monkeypatch, capsys):
    """The demo's local Ray instance has no dashboard: the watch says once that waits are not watched,
    instead of a warning that it could not list the actors every night."""
    import datetime as dt

    from ctd.pipeline import raydata, watchdog

    monkeypatch.setattr(raydata, "_local_without_dashboard", True)
    monkeypatch.setattr(watchdog, "_said_local", [])

    def unavailable():
        raise RuntimeError("Failed to connect to API server")

    monkeypatch.setattr(watchdog, "_job_actors", unavailable)  # what the state API answers there
    for _ in range(2):
        with watchdog.watch(wait_s=0.1, deadline=None, poll_s=0.05):
            _blocked(0.3)
    out = capsys.readouterr().out
    assert out.count("no state API") == 1 and "could not list" not in out, out
    with pytest.raises(watchdog.DeadlinePassed):  # the deadline still is watched
        with watchdog.watch(wait_s=0.1, deadline=dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=0.2), poll_s=0.05):
            _blocked(30)


# ------------------------------------------------------------------ #26 item 4: the pools' quotas are the groups'
@pytest.mark.parametrize("name", MANIFESTS)
def test_the_pools_quotas_are_what_their_worker_groups_can_hold(name, monkeypatch):
    """`activations.max_actors` and `expert.vllm.max_replicas` in the production config equal what the
    manifest's `activations` and `expert` groups hold at their maxReplicas (nodes × actors per node); the
    pools' minimum fits one node. A drift on either side fails here."""
    from ctd.config import load_config
    from ctd.pipeline.preflight import manifest_shapes, per_node, requests

    monkeypatch.setenv("CTD_BUCKET", "b")
    cfg = load_config(PRODUCTION)
    path = os.path.join(CLUSTER, name)
    shapes = {w.rsplit(" ", 1)[-1]: s for w, s in manifest_shapes(path)}
    docs = [d for d in yaml.safe_load_all(open(path, encoding="utf-8")) if isinstance(d, dict)]
    spec = docs[0]["spec"]
    spec = spec.get("rayClusterSpec") or (spec.get("jobTemplate") or {}).get("rayClusterSpec") or spec
    max_nodes = {g["groupName"]: g["maxReplicas"] for g in spec["workerGroupSpecs"]}
    act, judge, _ = requests(cfg)
    pools = [
        ("activations", act, cfg.activations.min_actors, cfg.activations.max_actors),
        ("expert", judge, cfg.expert.vllm.min_replicas, cfg.expert.vllm.max_replicas),
    ]
    for group, req, low, quota in pools:
        held = per_node(req, shapes[group])
        assert held >= 1 and low <= held, (group, held, low)
        assert quota == max_nodes[group] * held, f"{group}: the config's quota {quota} != {max_nodes[group]} nodes × {held}"
    assert per_node(judge, {"CPU": 24, "GPU": 2, "expert": 2}) == 1 and per_node(judge, {"CPU": 24, "GPU": 4, "expert": 4}) == 2
