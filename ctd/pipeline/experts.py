"""The expert stage: delegated rows → P(unsafe), on a pool separate from the activation actors.

Three kinds, all returning a dataset with columns ``id``, ``expert`` (float, null on failure) and
``expert_status``:

* ``vllm``: an LLM judge on an autoscaled vLLM actor pool built with ``ray.data.llm``
  (``vLLMEngineProcessorConfig`` + ``build_processor``); P(unsafe) from the first token's logprobs.
* ``http``: the same judge behind an OpenAI-compatible endpoint (e.g. an existing vLLM server), with
  retries, a pool-wide rate limit and an API key read from a named environment variable.
* ``classifier``: a transformers sequence classifier on its own actor pool.

When the vLLM pool's maximum size is not configured it is derived from the budget: expected
delegated rows (α × rows) ÷ per-replica throughput ÷ target wall time.
"""

from __future__ import annotations

import json
import math
import os
import random
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa

from ..config import ExpertConfig, resolve_model_path
from ..experts.judge import label_token_ids, p_unsafe_from_logprobs, render_prompt
from .stages import ClassifierStage, row_input

__all__ = ["expert_pool_max", "run_expert", "HTTPJudgeStage", "EXPERT_SCHEMA"]

EXPERT_SCHEMA = pa.schema([("id", pa.string()), ("expert", pa.float64()), ("expert_status", pa.string())])


def expert_pool_max(alpha: float, n_rows: int, rows_per_second_per_replica: float, target_wall_seconds: float, min_replicas: int = 1) -> int:
    """Replicas needed to score the expected delegated rows within the target wall time."""
    expected = alpha * n_rows
    return max(min_replicas, int(math.ceil(expected / rows_per_second_per_replica / target_wall_seconds)))


# ----------------------------------------------------------------------------------------------
# vLLM through ray.data.llm
# ----------------------------------------------------------------------------------------------
def _vllm_processor(cfg, *, alpha: float, n_rows: int, log):
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig
    from transformers import AutoTokenizer

    model = resolve_model_path(cfg.model)
    labels = label_token_ids(AutoTokenizer.from_pretrained(model), cfg.label_tokens.model_dump())
    max_replicas = cfg.max_replicas or expert_pool_max(alpha, n_rows, cfg.rows_per_second_per_replica, cfg.target_wall_seconds, cfg.min_replicas)
    max_replicas = max(max_replicas, cfg.min_replicas)
    log(f"expert pool (vLLM {cfg.model}): {cfg.min_replicas}..{max_replicas} replicas"
        + ("" if cfg.max_replicas else f" (derived: {alpha:g} x {n_rows} rows / {cfg.rows_per_second_per_replica:g} rows/s / {cfg.target_wall_seconds:g} s)"))
    engine_kwargs = {"max_model_len": cfg.max_model_len, "tensor_parallel_size": cfg.tensor_parallel_size,
                     "max_logprobs": max(cfg.top_logprobs, 20), **cfg.engine_kwargs}
    on_gpu = cfg.num_gpus_per_replica > 0
    bundle = ({"GPU": cfg.num_gpus_per_replica, "CPU": 1} if on_gpu else {"CPU": 1}) | dict(cfg.resources)
    proc_cfg = vLLMEngineProcessorConfig(
        model_source=model, engine_kwargs=engine_kwargs, concurrency=(cfg.min_replicas, max_replicas),
        batch_size=cfg.batch_size, accelerator_type=None, log_engine_metrics=False,
        placement_group_config={"bundles": [bundle] * cfg.tensor_parallel_size},
        chat_template_stage=cfg.apply_chat_template, tokenize_stage=False, detokenize_stage=False,
        should_continue_on_error=True,
    )
    template, max_chars, k, chat = cfg.prompt_template, cfg.max_input_chars, cfg.top_logprobs, cfg.apply_chat_template

    def pre(row):
        prompt = render_prompt(template, row_input(row["input"], row["is_chat"]), max_chars)
        sp = {"max_tokens": 1, "temperature": 0.0, "logprobs": k}
        if chat:
            return {"id": row["id"], "messages": [{"role": "user", "content": prompt}], "sampling_params": sp}
        return {"id": row["id"], "prompt": prompt, "sampling_params": sp}

    def post(row):
        err = row.get("__inference_error__")
        lps = row.get("logprobs")
        if err or not lps:
            return {"id": row["id"], "expert": None, "expert_status": f"error: {str(err)[:200] or 'no logprobs'}"}
        top = {int(t): v for t, v in lps[0].items()}
        p, status = p_unsafe_from_logprobs(top, labels)
        return {"id": row["id"], "expert": float(p), "expert_status": status}

    return build_processor(proc_cfg, preprocess=pre, postprocess=post)


# ----------------------------------------------------------------------------------------------
# an OpenAI-compatible endpoint
# ----------------------------------------------------------------------------------------------
class _RateLimiter:
    """Token bucket: at most ``rate`` acquisitions per second (this actor's share of the pool's)."""

    def __init__(self, rate: float):
        self.interval = 1.0 / rate
        self.next = time.monotonic()
        self.lock = threading.Lock()

    def acquire(self):
        with self.lock:
            now = time.monotonic()
            wait = self.next - now
            self.next = max(now, self.next) + self.interval
        if wait > 0:
            time.sleep(wait)


class HTTPJudgeStage:
    """The judge behind an OpenAI-compatible ``/completions`` endpoint. Retries connection errors,
    429 and 5xx with exponential backoff and jitter; other HTTP errors fail the row, not the batch."""

    RETRY = {429, 500, 502, 503, 504}

    def __init__(self, spec: dict):
        self.spec = spec
        key_env = spec.get("api_key_env")
        self.api_key = os.environ.get(key_env) if key_env else None
        if key_env and not self.api_key:
            raise RuntimeError(f"environment variable {key_env} (expert.http.api_key_env) is not set")
        self.limiter = _RateLimiter(spec["requests_per_second"] / max(1, spec["actors"]))
        self.url = spec["base_url"].rstrip("/") + "/completions"
        self.calls = 0

    def _post(self, body: dict) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        delay = 0.5
        for attempt in range(self.spec["max_retries"] + 1):
            self.limiter.acquire()
            try:
                req = urllib.request.Request(self.url, data=json.dumps(body).encode(), headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.spec["timeout_seconds"]) as r:
                    self.calls += 1
                    return json.loads(r.read())
            except urllib.error.HTTPError as e:
                if e.code not in self.RETRY or attempt == self.spec["max_retries"]:
                    raise RuntimeError(f"HTTP {e.code} from the judge endpoint") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                if attempt == self.spec["max_retries"]:
                    raise RuntimeError(f"judge endpoint unreachable after {attempt + 1} attempts: {getattr(e, 'reason', e)}") from None
            time.sleep(delay * (1 + random.random()))
            delay *= 2
        raise RuntimeError("unreachable")

    def _one(self, text: str, is_chat: bool):
        s = self.spec
        body = {"model": s["model"], "prompt": render_prompt(s["prompt_template"], row_input(text, is_chat), s["max_input_chars"]),
                "max_tokens": 1, "temperature": 0, "logprobs": s["top_logprobs"]}
        try:
            resp = self._post(body)
            top = resp["choices"][0]["logprobs"]["top_logprobs"][0]
        except (RuntimeError, KeyError, IndexError, TypeError) as e:
            return None, f"error: {e}"
        p, status = p_unsafe_from_logprobs(top, {"unsafe": s["label_tokens"]["unsafe"], "safe": s["label_tokens"]["safe"]})
        return p, status

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = list(zip(batch.column("input").to_pylist(), batch.column("is_chat").to_pylist()))
        with ThreadPoolExecutor(self.spec["concurrency_per_actor"]) as pool:
            res = list(pool.map(lambda r: self._one(*r), rows))
        return pa.table({"id": batch.column("id"), "expert": pa.array([r[0] for r in res], type=pa.float64()),
                         "expert_status": pa.array([r[1] for r in res], type=pa.string())}, schema=EXPERT_SCHEMA)


# ----------------------------------------------------------------------------------------------
# dispatch
# ----------------------------------------------------------------------------------------------
def run_expert(ds, cfg: ExpertConfig, *, alpha: float, n_rows: int, log=print):
    """The expert scores of ``ds`` (columns id, input, is_chat) as a dataset (id, expert, expert_status)."""
    from ray.data import ActorPoolStrategy

    ds = ds.select_columns(["id", "input", "is_chat"])
    if cfg.kind == "vllm":
        out = _vllm_processor(cfg.vllm, alpha=alpha, n_rows=n_rows, log=log)(ds)
        return out.select_columns(["id", "expert", "expert_status"])
    if cfg.kind == "classifier":
        c = cfg.classifier
        log(f"expert pool (classifier {c.path}): {c.pool.min_actors}..{c.pool.max_actors} actors")
        spec = {"path": resolve_model_path(c.path), "unsafe_label": c.unsafe_label, "max_length": c.max_length}
        return ds.map_batches(ClassifierStage, fn_constructor_kwargs={"spec": spec}, batch_format="pyarrow",
                              batch_size=c.pool.batch_size, num_gpus=c.pool.num_gpus or None, num_cpus=c.pool.num_cpus,
                              resources=dict(c.pool.resources) or None,
                              compute=ActorPoolStrategy(min_size=c.pool.min_actors, max_size=c.pool.max_actors))
    h = cfg.http
    log(f"expert (HTTP {h.base_url}, model {h.model}): {h.actors} actors x {h.concurrency_per_actor} concurrent, {h.requests_per_second:g} req/s")
    spec = h.model_dump()
    spec["label_tokens"] = h.label_tokens.model_dump()
    return ds.map_batches(HTTPJudgeStage, fn_constructor_kwargs={"spec": spec}, batch_format="pyarrow", batch_size=64,
                          num_cpus=0.5, compute=ActorPoolStrategy(size=h.actors))
