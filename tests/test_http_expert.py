"""The HTTP expert against a real OpenAI-compatible server: vLLM's own, serving the tiny Llama. It is
the same judge as the vLLM pool (the same token ids, the same label tokens): checked row by row
against a direct computation from the same weights. A dead endpoint costs a bounded time."""

import os
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from conftest import (
    JUDGE_KEY_ENV,
    _stop,
    assert_not_in_files,
    connected_session_logs,
    direct_p_unsafe,
    free_port,
    judge_rows,
    ray_session_logs,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def vllm_server(tiny_llama, tmp_path_factory):
    port = free_port()
    log = open(tmp_path_factory.mktemp("vllm") / "server.log", "w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            tiny_llama,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--max-model-len",
            "256",
            "--max-logprobs",
            "20",
            "--enforce-eager",
            "--dtype",
            "float32",
            "--served-model-name",
            "tiny-judge",
            "--api-key",
            os.environ[JUDGE_KEY_ENV],
        ],
        env=dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1"),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.time() + 300
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)  # /v1 needs the key
            break
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                _stop(proc)
                pytest.fail("vLLM server did not start: " + open(log.name).read()[-2000:])
            time.sleep(2)
    yield url
    _stop(proc)


def http_config(base_url, tokenizer, **kw):
    from ctd.config import ExpertConfig

    http = {
        "base_url": base_url,
        "model": "tiny-judge",
        "tokenizer": tokenizer,
        "max_model_len": 256,
        "top_logprobs": 20,
        "label_tokens": {"unsafe": ["Yes"], "safe": ["No"]},
        "actors": 1,
        "concurrency_per_actor": 4,
        "requests_per_second": 50.0,
        "max_retries": 2,
        "timeout_seconds": 20,
        "api_key_env": JUDGE_KEY_ENV,
        **kw,
    }
    return ExpertConfig.model_validate({"kind": "http", "http": http})


def stage_spec(cfg):
    return cfg.http


def run_expert(ds, cfg, n_todo):
    """The expert stage on ``ds`` (:func:`ctd.experts.base.judge_rows`)."""
    from ctd.experts.base import judge_rows
    from ctd.experts.registry import expert_for

    return judge_rows(expert_for(cfg), ds, rows=n_todo)


def rows(n):
    import ray

    return ray.data.from_items([{"id": f"r{i}", "input": f"w{i} w{i + 1} w{i + 2}", "is_chat": False} for i in range(n)])


def test_http_judge_is_the_same_judge_row_by_row(ray_head, vllm_server, tiny_llama):
    import ray
    from transformers import AutoTokenizer

    from ctd.config import JUDGE_TEMPLATE
    from ctd.experts.prompt import JudgePrompt
    from ctd.pipeline.corpus import row_input

    data = judge_rows()
    t0 = time.time()
    out = {
        r["id"]: r
        for r in run_expert(
            ray.data.from_items(data), http_config(vllm_server, tiny_llama, requests_per_second=5.0), n_todo=len(data)
        ).take_all()
    }
    took = time.time() - t0
    assert sorted(out) == sorted(r["id"] for r in data)
    jp = JudgePrompt(AutoTokenizer.from_pretrained(tiny_llama), JUDGE_TEMPLATE, 256)
    expected = [jp(row_input(r["input"], r["is_chat"])) for r in data]
    direct = direct_p_unsafe(tiny_llama, [ids for ids, _ in expected])
    assert [out[r["id"]]["expert_status"] for r in data] == ["ok"] * len(data)
    np.testing.assert_allclose([out[r["id"]]["expert"] for r in data], direct, atol=2e-3)
    assert np.std(direct) > 0.05
    assert [out[r["id"]]["expert_truncated"] for r in data] == [cut for _, cut in expected] and sum(c for _, c in expected) == 3
    assert took >= (len(data) - 1) / 5.0  # the pool-wide rate limit (5 requests/s) held


def test_unreachable_endpoint_is_retried_then_fails_the_row_not_the_batch(ray_head, tiny_llama):
    dead = f"http://127.0.0.1:{free_port()}/v1"
    out = run_expert(rows(3), http_config(dead, tiny_llama, max_retries=2), n_todo=3).take_all()
    assert len(out) == 3 and all(r["expert"] is None for r in out)
    assert all(
        r["expert_status"] == "error: judge endpoint unreachable after N attempts: [Errno N] Connection refused" for r in out
    )


def test_a_dead_endpoint_opens_the_circuit_breaker_in_bounded_time(ray_head, tiny_llama):
    """After K consecutive failed rows the actor declares the endpoint down: the remaining rows keep
    the probe's score at once instead of each paying the retries."""

    dead = f"http://127.0.0.1:{free_port()}/v1"
    quick = {"max_retries": 3, "circuit_breaker_failures": 3, "retry_backoff_seconds": 0.25}
    cfg = http_config(dead, tiny_llama, concurrency_per_actor=1, **quick)
    t0 = time.time()
    out = run_expert(rows(40), cfg, n_todo=40).take_all()
    took = time.time() - t0
    status = [r["expert_status"] for r in out]
    assert len(out) == 40 and all(r["expert"] is None for r in out)
    assert sum(s.startswith("error: judge endpoint unreachable") for s in status) == 3
    assert sum(s == "error: judge endpoint down (circuit breaker open)" for s in status) == 37
    # each failed row waits 0.25..0.5 + 0.5..1 + 1..2 s of backoff: 3 rows <= 10.5 s; without the breaker
    # 40 rows, one at a time, >= 70 s (the rest is starting the actor and its tokenizer)
    assert took < 60, took
    # with 4 rows in flight per actor the breaker still bounds the damage: at most K + 3 rows try the
    # endpoint (the ones already in flight when it opens), every other row gets the breaker's status
    t0 = time.time()
    out = run_expert(rows(40), http_config(dead, tiny_llama, concurrency_per_actor=4, **quick), n_todo=40).take_all()
    status = [r["expert_status"] for r in out]
    assert len(out) == 40 and all(r["expert"] is None for r in out)
    tried = sum(s.startswith("error: judge endpoint unreachable") for s in status)
    assert 3 <= tried <= 3 + 3 and sum(s == "error: judge endpoint down (circuit breaker open)" for s in status) == 40 - tried
    assert time.time() - t0 < 60


def test_api_key_only_from_a_named_environment_variable(vllm_server, tiny_llama, monkeypatch):
    """The server requires the planted key (--api-key): every judged row of this module proves the key
    reached the Ray workers through api_key_env and was sent. Unset, the stage refuses to start; wrong,
    each row fails with a bounded reason that holds neither key."""
    import pyarrow as pa

    from ctd.experts.http import HTTPJudgeStage

    spec = stage_spec(http_config(vllm_server, tiny_llama))
    good = os.environ[JUDGE_KEY_ENV]
    monkeypatch.delenv(JUDGE_KEY_ENV)
    with pytest.raises(RuntimeError, match=JUDGE_KEY_ENV):
        HTTPJudgeStage(spec)
    monkeypatch.setenv(JUDGE_KEY_ENV, "sk-wrong-key-0123456789")
    t = HTTPJudgeStage(spec.model_copy(update={"max_retries": 0}))(
        pa.table({"id": ["a"], "input": ["w1 w2"], "is_chat": [False]})
    )
    status = t.column("expert_status")[0].as_py()
    assert t.column("expert")[0].as_py() is None and status.startswith("error: judge answered HTTP 401"), status
    assert "sk-wrong-key" not in status and good not in status
    monkeypatch.setenv(JUDGE_KEY_ENV, good)
    t = HTTPJudgeStage(spec)(pa.table({"id": ["a"], "input": ["w1 w2"], "is_chat": [False]}))
    assert np.isfinite(t.column("expert")[0].as_py())


def test_chat_prompts_are_the_tokens_vllm_renders(ray_head, vllm_server, tiny_llama):
    """With apply_chat_template the judge's prompt is one user message through the tokenizer's chat
    template, exactly as vLLM's own chat endpoint renders and tokenizes it (one BOS, not two: the
    tiny tokenizer adds BOS to encodings with special tokens and its template writes BOS too); and
    the HTTP judge in chat mode still matches the direct computation row by row."""
    import json as _json

    import ray
    from transformers import AutoTokenizer

    from ctd.config import JUDGE_TEMPLATE
    from ctd.experts.prompt import JudgePrompt, render_prompt
    from ctd.pipeline.corpus import row_input

    data = judge_rows(n_short=6, n_long=1)
    jp = JudgePrompt(AutoTokenizer.from_pretrained(tiny_llama), JUDGE_TEMPLATE, 256, chat=True)
    expected = [jp(row_input(r["input"], r["is_chat"])) for r in data]
    for r, (ids, cut) in zip(data, expected):
        if cut:
            continue
        body = {
            "model": "tiny-judge",
            "messages": [{"role": "user", "content": render_prompt(JUDGE_TEMPLATE, row_input(r["input"], r["is_chat"]))}],
            "max_tokens": 1,
            "temperature": 0,
            "return_token_ids": True,
        }
        req = urllib.request.Request(
            vllm_server + "/chat/completions",
            data=_json.dumps(body).encode(),
            method="POST",
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {os.environ[JUDGE_KEY_ENV]}"},
        )
        with urllib.request.urlopen(req, timeout=60) as resp:
            assert _json.loads(resp.read())["prompt_token_ids"] == ids, r["id"]
        assert ids.count(1) == 1  # one BOS
    out = {
        x["id"]: x
        for x in run_expert(
            ray.data.from_items(data), http_config(vllm_server, tiny_llama, apply_chat_template=True), n_todo=len(data)
        ).take_all()
    }
    direct = direct_p_unsafe(tiny_llama, [ids for ids, _ in expected])
    assert [out[r["id"]]["expert_status"] for r in data] == ["ok"] * len(data)
    np.testing.assert_allclose([out[r["id"]]["expert"] for r in data], direct, atol=2e-3)
    assert [out[r["id"]]["expert_truncated"] for r in data] == [c for _, c in expected] and any(c for _, c in expected)


def test_a_night_with_the_http_judge_leaks_no_key(deployment, vllm_server, tiny_llama, s3, ray_head):
    """A whole audit with the HTTP judge on S3: the planted judge key (read through api_key_env by every
    judge actor) and the S3 secret key (read by the storage layer) appear in no object written to the
    bucket and in no Ray session log (drivers, workers, raylet, dashboard)."""
    from ctd.audit.run import run_audit
    from ctd.config import load_config

    http = http_config(vllm_server, tiny_llama).http.model_dump()
    cfg = load_config(
        deployment["config_path"],
        {"expert.kind": "http", "expert.http": http, "audit.output": f"{deployment['root']}/http-audit"},
    )
    report = run_audit(cfg, run_id="http-night")
    assert report.expert_kind == "http" and report.expert_calls > 10 and report.expert_failures == 0
    planted = [os.environ[JUDGE_KEY_ENV], s3["secret"]]
    objects = s3["fs"].find(f"{s3['bucket']}/")
    for path in objects:
        data = s3["fs"].cat(path)
        assert not [p for p in planted if p.encode() in data], path
    assert len(objects) >= 20 and any("http-audit" in p and p.endswith("report.json") for p in objects)
    logs = ray_session_logs()
    assert any(f.startswith(connected_session_logs()) for f in logs)  # the shared head's own session is among them
    assert assert_not_in_files(planted, logs) >= 10
