"""The expert stage: delegated rows → P(unsafe), on a pool separate from the activation actors.

Three kinds. Each takes rows with ``input`` and ``is_chat`` plus the stage-1 columns they carry
(:data:`ctd.pipeline.ops.EXPERT_CARRY`) and returns those rows without their text, with ``expert``
(float, null on failure) and ``expert_status`` added:

* ``vllm``: an LLM judge on an autoscaled vLLM actor pool built with ``ray.data.llm``
  (``vLLMEngineProcessorConfig`` + ``build_processor``); P(unsafe) from the first token's logprobs.
* ``http``: the same judge behind an OpenAI-compatible endpoint (e.g. an existing vLLM server), with
  retries, a pool-wide rate limit and an API key read from a named environment variable.
* ``classifier``: a transformers sequence classifier on its own actor pool.

When the vLLM pool's maximum size is not configured it is derived from the work that is there: the
rows still to judge (known exactly after stage 1) ÷ per-replica throughput ÷ target wall time.
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
import pyarrow.compute as pc

from ..config import ExpertConfig, resolve_model_path
from ..experts.judge import label_token_ids, p_unsafe_from_logprobs, render_prompt
from .stages import ClassifierStage, row_input

__all__ = ["expert_pool_max", "run_expert", "HTTPJudgeStage"]


def expert_pool_max(n_todo: int, rows_per_second_per_replica: float, target_wall_seconds: float, min_replicas: int = 1) -> int:
    """Replicas needed to score ``n_todo`` rows within the target wall time."""
    return max(min_replicas, int(math.ceil(n_todo / rows_per_second_per_replica / target_wall_seconds)))


# ----------------------------------------------------------------------------------------------
# vLLM through ray.data.llm
# ----------------------------------------------------------------------------------------------
def _vllm_processor(cfg, *, n_todo: int, carry: tuple, log):
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig
    from transformers import AutoTokenizer

    model = resolve_model_path(cfg.model)
    labels = label_token_ids(AutoTokenizer.from_pretrained(model), cfg.label_tokens.model_dump())
    max_replicas = cfg.max_replicas or expert_pool_max(n_todo, cfg.rows_per_second_per_replica, cfg.target_wall_seconds, cfg.min_replicas)
    max_replicas = max(max_replicas, cfg.min_replicas)
    log(f"expert pool (vLLM {cfg.model}): {cfg.min_replicas}..{max_replicas} replicas"
        + ("" if cfg.max_replicas else f" (derived: {n_todo} rows / {cfg.rows_per_second_per_replica:g} rows/s / {cfg.target_wall_seconds:g} s)"))
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
        kept = {c: row.get(c) for c in carry}
        err = row.get("__inference_error__")
        lps = row.get("logprobs")
        if err or not lps:
            return kept | {"expert": None, "expert_status": f"error: {str(err)[:200] or 'no logprobs'}"}
        top = {int(t): v for t, v in lps[0].items()}
        p, status = p_unsafe_from_logprobs(top, labels)
        return kept | {"expert": float(p), "expert_status": status}

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
        return batch.drop_columns(["input", "is_chat"]).append_column("expert", pa.array([r[0] for r in res], type=pa.float64())).append_column(
            "expert_status", pa.array([r[1] for r in res], type=pa.string()))


# ----------------------------------------------------------------------------------------------
# dispatch
# ----------------------------------------------------------------------------------------------
def _normalise(batch: pa.Table, carry: tuple) -> pa.Table:
    """One shape for every expert's output, whatever the processor returned: the carried columns,
    ``expert`` and ``expert_status``. A row that failed inference inside ``ray.data.llm`` bypasses
    our postprocess and comes back as the processor's raw row with ``__inference_error__``; it
    becomes expert = null, expert_status = "error: <reason>"."""
    n = batch.num_rows
    cols = {c: batch.column(c) if c in batch.column_names else pa.nulls(n) for c in carry}
    expert = pc.cast(batch.column("expert"), pa.float64()) if "expert" in batch.column_names else pa.nulls(n, pa.float64())
    status = pc.cast(batch.column("expert_status"), pa.string()) if "expert_status" in batch.column_names else pa.nulls(n, pa.string())
    if "__inference_error__" in batch.column_names:
        err = pc.utf8_slice_codeunits(pc.cast(batch.column("__inference_error__"), pa.string()), 0, 200)
        failed = pc.and_(pc.is_valid(err), pc.not_equal(pc.fill_null(err, ""), ""))
        status = pc.if_else(failed, pc.binary_join_element_wise("error: ", err, ""), status)
        expert = pc.if_else(failed, pa.scalar(None, pa.float64()), expert)
    status = pc.fill_null(status, "error: the expert returned no status")
    return pa.table({**cols, "expert": expert, "expert_status": status})


def run_expert(ds, cfg: ExpertConfig, *, n_todo: int, carry: tuple = ("id",), log=print):
    """Expert scores of ``ds`` (columns input, is_chat and ``carry``) as a dataset of the carried
    columns with ``expert`` and ``expert_status``."""
    from ray.data import ActorPoolStrategy

    ds = ds.select_columns(list(dict.fromkeys([*carry, "input", "is_chat"])))
    if cfg.kind == "vllm":
        out = _vllm_processor(cfg.vllm, n_todo=n_todo, carry=carry, log=log)(ds)
    elif cfg.kind == "classifier":
        c = cfg.classifier
        log(f"expert pool (classifier {c.path}): {c.pool.min_actors}..{c.pool.max_actors} actors")
        spec = {"path": resolve_model_path(c.path), "unsafe_label": c.unsafe_label, "max_length": c.max_length}
        out = ds.map_batches(ClassifierStage, fn_constructor_kwargs={"spec": spec}, batch_format="pyarrow",
                             batch_size=c.pool.batch_size, num_gpus=c.pool.num_gpus or None, num_cpus=c.pool.num_cpus,
                             resources=dict(c.pool.resources) or None,
                             compute=ActorPoolStrategy(min_size=c.pool.min_actors, max_size=c.pool.max_actors))
    else:
        h = cfg.http
        log(f"expert (HTTP {h.base_url}, model {h.model}): {h.actors} actors x {h.concurrency_per_actor} concurrent, {h.requests_per_second:g} req/s")
        spec = h.model_dump()
        spec["label_tokens"] = h.label_tokens.model_dump()
        out = ds.map_batches(HTTPJudgeStage, fn_constructor_kwargs={"spec": spec}, batch_format="pyarrow", batch_size=64,
                             num_cpus=0.5, compute=ActorPoolStrategy(size=h.actors))
    return out.map_batches(_normalise, fn_kwargs={"carry": tuple(carry)}, batch_format="pyarrow", batch_size=None)
