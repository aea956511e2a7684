"""The HTTP expert against a real OpenAI-compatible server: vLLM's own, serving the tiny Llama."""

import os
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

from conftest import _stop, free_port

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def vllm_server(tiny_llama, tmp_path_factory):
    port = free_port()
    log = open(tmp_path_factory.mktemp("vllm") / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", tiny_llama, "--host", "127.0.0.1",
                             "--port", str(port), "--max-model-len", "256", "--max-logprobs", "20", "--enforce-eager",
                             "--served-model-name", "tiny-judge"], env=dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1"),
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.time() + 300
    while True:
        try:
            urllib.request.urlopen(url + "/models", timeout=2)
            break
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                _stop(proc)
                pytest.fail("vLLM server did not start: " + open(log.name).read()[-2000:])
            time.sleep(2)
    yield url
    _stop(proc)


def http_config(base_url, **kw):
    from ctd.config import ExpertConfig

    http = {"base_url": base_url, "model": "tiny-judge", "top_logprobs": 20, "max_input_chars": 300, "actors": 1,
            "concurrency_per_actor": 4, "requests_per_second": 50.0, "max_retries": 2, "timeout_seconds": 20, **kw}
    return ExpertConfig.model_validate({"kind": "http", "http": http})


def rows(n):
    import ray

    return ray.data.from_items([{"id": f"r{i}", "input": f"w{i} w{i + 1} w{i + 2}", "is_chat": False} for i in range(n)])


def test_http_judge_scores_rows_through_a_real_endpoint(ray_head, vllm_server):
    from ctd.pipeline.experts import run_expert

    t0 = time.time()
    out = run_expert(rows(12), http_config(vllm_server, requests_per_second=5.0), n_todo=12).take_all()
    took = time.time() - t0
    assert sorted(r["id"] for r in out) == sorted(f"r{i}" for i in range(12))
    assert all(r["expert_status"] in {"ok", "unsafe_outside_topk", "safe_outside_topk", "no_label_token"} for r in out)
    assert all(0 <= r["expert"] <= 1 for r in out)
    assert took >= 11 / 5.0  # the pool-wide rate limit (5 requests/s) held


def test_unreachable_endpoint_is_retried_then_fails_the_row_not_the_batch(ray_head):
    from ctd.pipeline.experts import run_expert

    dead = f"http://127.0.0.1:{free_port()}/v1"
    out = run_expert(rows(3), http_config(dead, max_retries=2), n_todo=3).take_all()
    assert len(out) == 3 and all(r["expert"] is None for r in out)
    assert all("unreachable after 3 attempts" in r["expert_status"] for r in out)


def test_api_key_only_from_a_named_environment_variable(vllm_server):
    from ctd.pipeline.experts import HTTPJudgeStage

    cfg = http_config(vllm_server, api_key_env="CTD_TEST_JUDGE_KEY").http
    spec = {**cfg.model_dump(), "label_tokens": cfg.label_tokens.model_dump()}
    os.environ.pop("CTD_TEST_JUDGE_KEY", None)
    with pytest.raises(RuntimeError, match="CTD_TEST_JUDGE_KEY"):
        HTTPJudgeStage(spec)
    os.environ["CTD_TEST_JUDGE_KEY"] = "sk-test-value"
    stage = HTTPJudgeStage(spec)  # vLLM without --api-key accepts any bearer token
    assert stage.api_key == "sk-test-value"
    import pyarrow as pa

    t = stage(pa.table({"id": ["a"], "input": ["w1 w2"], "is_chat": [False]}))
    assert np.isfinite(t.column("expert")[0].as_py())
