"""The expert stage: delegated rows → P(unsafe), on a pool separate from the activation actors.

Three kinds. Each takes rows with ``input`` and ``is_chat`` plus the stage-1 columns they carry
(:data:`ctd.pipeline.ops.EXPERT_CARRY`) and returns those rows without their text, with ``expert``
(float, null on failure), ``expert_status`` ("ok", "<label>_outside_topk", "no_label_token" or
"error: <reason>") and ``expert_truncated`` added. No row is dropped and no failure of one row fails a
block: a failed row keeps the probe's score downstream.

* ``vllm``: an LLM judge on an autoscaled vLLM actor pool built with ``ray.data.llm``
  (``vLLMEngineProcessorConfig`` + ``build_processor``); P(unsafe) from the first token's logprobs.
* ``http``: the same judge behind an OpenAI-compatible endpoint (e.g. an existing vLLM server), with
  retries, a pool-wide rate limit, a circuit breaker and an API key read from a named environment
  variable.
* ``classifier``: a transformers sequence classifier on its own actor pool.

Both LLM paths send the same token ids (:class:`ctd.experts.judge.JudgePrompt`: the template, the
chat template where configured, the conversation cut in tokens to the judge's context) and parse
the same label-token logprobs by token id.

``ray.data.llm.HttpRequestProcessorConfig`` (Ray 2.60) was read and not used for the HTTP judge: its
``qps`` is per actor, exhausting the retries of one request raises for the whole batch
(``http_request_stage.py``: "Reached maximum retries"), and it has no circuit breaker.

The vLLM pool is sized from the work that is there (:func:`plan_pool`): the rows still to judge
(exact after stage 1 and resume) ÷ per-replica throughput ÷ target wall time, capped by the quota
``max_replicas``; when the cap makes the target unreachable, the plan says how long it will take.
"""

from __future__ import annotations

import dataclasses
import http.client
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
from ..experts.judge import JudgePrompt, error_status, label_token_ids, p_unsafe_from_logprobs
from .stages import ClassifierStage, row_input

__all__ = ["expert_pool_max", "plan_pool", "PoolPlan", "judge_identity", "check_judge", "run_expert", "JudgePromptStage", "HTTPJudgeStage"]

OUT_COLUMNS = ("expert", "expert_status", "expert_truncated")


def expert_pool_max(n_todo: int, rows_per_second_per_replica: float, target_wall_seconds: float, min_replicas: int = 1) -> int:
    """Replicas needed to score ``n_todo`` rows within the target wall time."""
    return max(min_replicas, int(math.ceil(n_todo / rows_per_second_per_replica / target_wall_seconds)))


@dataclasses.dataclass(frozen=True)
class PoolPlan:
    """How big the expert pool is and how long it is expected to take."""

    rows: int
    replicas: int                      # the pool's maximum size (or fixed size)
    needed: int                        # replicas the target wall time needs
    expected_seconds: float | None     # rows / (replicas × rows/s per replica); None where unknown
    target_seconds: float | None

    @property
    def target_met(self) -> bool:
        return self.target_seconds is None or self.expected_seconds is None or self.expected_seconds <= self.target_seconds

    def describe(self) -> str:
        s = f"{self.rows} rows on up to {self.replicas} replica(s)"
        if self.expected_seconds is not None:
            s += f", expected {self.expected_seconds / 3600:.2f} h"
        if not self.target_met:
            s += (f": OVER the target of {self.target_seconds / 3600:.2f} h, which needs {self.needed} replicas "
                  f"(raise expert.vllm.max_replicas, the quota, or the target)")
        return s


def plan_pool(cfg: ExpertConfig, n_todo: int) -> PoolPlan:
    if cfg.kind == "vllm":
        v = cfg.vllm
        needed = expert_pool_max(n_todo, v.rows_per_second_per_replica, v.target_wall_seconds, v.min_replicas)
        replicas = max(v.min_replicas, min(needed, v.max_replicas or needed))
        return PoolPlan(n_todo, replicas, needed, n_todo / (replicas * v.rows_per_second_per_replica), v.target_wall_seconds)
    if cfg.kind == "http":
        h = cfg.http
        return PoolPlan(n_todo, h.actors, h.actors, n_todo / h.requests_per_second, None)
    p = cfg.classifier.pool
    return PoolPlan(n_todo, p.max_actors, p.max_actors, None, None)


def judge_identity(cfg: ExpertConfig) -> dict:
    """What makes two experts give the same score to a row (not how big the pool is): resumed
    expert scores are reused only for the same identity."""
    keys = {"vllm": ("model", "prompt_template", "apply_chat_template", "label_tokens", "top_logprobs", "max_model_len", "head_fraction"),
            "http": ("model", "tokenizer", "prompt_template", "apply_chat_template", "label_tokens", "top_logprobs", "max_model_len",
                     "head_fraction"),
            "classifier": ("path", "unsafe_label", "max_length")}[cfg.kind]
    c = getattr(cfg, cfg.kind).model_dump(mode="json")
    return {"kind": cfg.kind, **{k: c[k] for k in keys}}


# ----------------------------------------------------------------------------------------------
# the judge's prompt, in tokens, on CPU actors
# ----------------------------------------------------------------------------------------------
def _prompt_spec(c) -> dict:
    return {"tokenizer": resolve_model_path(getattr(c, "tokenizer", None) or c.model), "template": c.prompt_template,
            "max_model_len": c.max_model_len, "chat": c.apply_chat_template, "head_fraction": c.head_fraction}


def _judge_prompt(spec: dict) -> JudgePrompt:
    from transformers import AutoTokenizer

    return JudgePrompt(AutoTokenizer.from_pretrained(spec["tokenizer"]), spec["template"], spec["max_model_len"],
                       chat=spec["chat"], head_fraction=spec["head_fraction"])


def check_judge(cfg: ExpertConfig) -> None:
    """Refuse, before any work, an LLM judge whose prompt cannot be built: label tokens that are not
    single tokens, a template that leaves no room in the context, chat mode without a chat template."""
    from ..config import ConfigError

    c = getattr(cfg, cfg.kind)
    if cfg.kind == "classifier":
        return
    try:
        prompt = _judge_prompt(_prompt_spec(c))
        label_token_ids(prompt.tok, c.label_tokens.model_dump())
    except (ValueError, OSError) as e:
        raise ConfigError(f"expert.{cfg.kind}: {e}") from None


def _render(prompt: JudgePrompt, text, is_chat) -> tuple[list[int] | None, bool, str | None]:
    """(ids, truncated, error) of one row; a row whose input cannot be rendered gets an error, not a crash."""
    try:
        ids, cut = prompt(row_input(text, is_chat))
        return ids, cut, None
    except Exception as e:  # malformed chat JSON, a tokenizer failure: this row, not the batch
        return None, False, error_status(f"prompt: {type(e).__name__}: {e}")


class JudgePromptStage:
    """Rows → ``prompt_ids`` (the judge's token ids, cut to its context), ``expert_truncated`` and
    ``prompt_error`` (null unless the row could not be rendered); the text is dropped."""

    def __init__(self, spec: dict):
        self.prompt = _judge_prompt(spec)

    def __call__(self, batch: pa.Table) -> pa.Table:
        res = [_render(self.prompt, t, c) for t, c in zip(batch.column("input").to_pylist(), batch.column("is_chat").to_pylist())]
        return (batch.drop_columns(["input", "is_chat"])
                .append_column("prompt_ids", pa.array([r[0] for r in res], type=pa.list_(pa.int32())))
                .append_column("expert_truncated", pa.array([r[1] for r in res], type=pa.bool_()))
                .append_column("prompt_error", pa.array([r[2] for r in res], type=pa.string())))


# ----------------------------------------------------------------------------------------------
# vLLM through ray.data.llm
# ----------------------------------------------------------------------------------------------
def _vllm_processor(cfg, *, plan: PoolPlan, labels: dict, carry: tuple, log):
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    log(f"expert pool (vLLM {cfg.model}): {cfg.min_replicas}..{plan.replicas} replicas; {plan.describe()}")
    engine_kwargs = {"max_model_len": cfg.max_model_len, "tensor_parallel_size": cfg.tensor_parallel_size,
                     "max_logprobs": max(cfg.top_logprobs, 20), **cfg.engine_kwargs}
    on_gpu = cfg.num_gpus_per_replica > 0
    bundle = ({"GPU": cfg.num_gpus_per_replica, "CPU": 1} if on_gpu else {"CPU": 1}) | dict(cfg.resources)
    proc_cfg = vLLMEngineProcessorConfig(
        model_source=resolve_model_path(cfg.model), engine_kwargs=engine_kwargs, concurrency=(cfg.min_replicas, plan.replicas),
        batch_size=cfg.batch_size, accelerator_type=None, log_engine_metrics=False,
        # the tensor-parallel workers of one replica on one node (NVLink), never spread
        placement_group_config={"bundles": [bundle] * cfg.tensor_parallel_size, "strategy": "STRICT_PACK"},
        chat_template_stage=False, tokenize_stage=False, detokenize_stage=False,  # JudgePromptStage made the ids
        should_continue_on_error=True,
    )
    sp = {"max_tokens": 1, "temperature": 0.0, "logprobs": cfg.top_logprobs}
    keep = tuple(dict.fromkeys([*carry, "expert_truncated", "prompt_error"]))

    def pre(row):  # a row whose prompt could not be rendered is sent one token; _normalise voids its answer
        ids = row["prompt_ids"]
        return {"tokenized_prompt": [int(i) for i in ids] if ids is not None and len(ids) else [0], "sampling_params": sp}

    def post(row):  # success rows only: ray.data.llm returns failed rows raw (see _normalise)
        kept = {c: row.get(c) for c in keep}
        lps = row.get("logprobs")
        if not lps:
            return kept | {"expert": None, "expert_status": "error: the engine returned no logprobs"}
        p, status = p_unsafe_from_logprobs({int(t): v for t, v in lps[0].items()}, labels)
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


DOWN = "judge endpoint down (circuit breaker open)"


class _EndpointDown(RuntimeError):
    """The endpoint, not the row: unreachable, or 429/5xx after every retry."""


def _phrase(code: int) -> str:
    """The standard reason phrase of an HTTP status (never the server's own text)."""
    import http as _http

    try:
        return _http.HTTPStatus(code).phrase
    except ValueError:
        return "(non-standard status)"


class HTTPJudgeStage:
    """The judge behind an OpenAI-compatible ``/completions`` endpoint, sent the same token ids as
    the vLLM path (:class:`JudgePromptStage`) and asked for token-id keyed logprobs
    (``return_tokens_as_token_ids``, a vLLM server extension; other servers' token strings are matched
    against the label strings). Retries connection errors, 429 and 5xx with exponential backoff and
    jitter; other HTTP errors fail the row, not the batch.

    Circuit breaker: after ``circuit_breaker_failures`` consecutive rows that could not reach the
    endpoint (connection errors, timeouts, 429/5xx after every retry; a 4xx answer or a malformed body
    is the row's failure and resets the count), this actor declares the endpoint down for the rest of
    the stage and fails its remaining rows at once (``error: judge endpoint down (circuit breaker
    open)``). A dead endpoint then costs each actor about ceil(K / concurrency_per_actor) rows' worth
    of retries, instead of every row's."""

    RETRY = {429, 500, 502, 503, 504}

    def __init__(self, spec: dict):
        self.spec = spec
        key_env = spec.get("api_key_env")
        self.api_key = os.environ.get(key_env) if key_env else None
        if key_env and not self.api_key:
            raise RuntimeError(f"environment variable {key_env} (expert.http.api_key_env) is not set")
        self.limiter = _RateLimiter(spec["requests_per_second"] / max(1, spec["actors"]))
        self.url = spec["base_url"].rstrip("/") + "/completions"
        self.prompt = _judge_prompt(spec["prompt"])
        ids = label_token_ids(self.prompt.tok, spec["label_tokens"])
        self.labels = {k: [f"token_id:{i}" for i in v] + list(spec["label_tokens"][k]) for k, v in ids.items()}
        self.calls = 0
        self.lock = threading.Lock()
        self.consecutive_failures = 0
        self.down: str | None = None  # why the circuit opened

    def _post(self, body: dict) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        delay = 0.5
        for attempt in range(self.spec["max_retries"] + 1):
            if self.down:
                raise _EndpointDown(DOWN)
            self.limiter.acquire()
            try:
                req = urllib.request.Request(self.url, data=json.dumps(body).encode(), headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.spec["timeout_seconds"]) as r:
                    self.calls += 1
                    return json.loads(r.read())
            except urllib.error.HTTPError as e:
                if e.code not in self.RETRY:  # the endpoint answered: this row is bad, the endpoint is not down
                    raise RuntimeError(f"judge answered HTTP {e.code} {_phrase(e.code)}") from None
                if attempt == self.spec["max_retries"]:
                    raise _EndpointDown(f"HTTP {e.code} from the judge endpoint after {attempt + 1} attempts") from None
            except (urllib.error.URLError, OSError, http.client.HTTPException) as e:  # refused, reset, timed out, cut short
                if attempt == self.spec["max_retries"]:
                    raise _EndpointDown(f"judge endpoint unreachable after {attempt + 1} attempts: {getattr(e, 'reason', e)}") from None
            time.sleep(delay * (1 + random.random()))
            delay *= 2
        raise RuntimeError("unreachable")

    def _outcome(self, endpoint_failed: bool, reason: str = "") -> None:
        with self.lock:
            self.consecutive_failures = self.consecutive_failures + 1 if endpoint_failed else 0
            if endpoint_failed and self.down is None and self.consecutive_failures >= self.spec["circuit_breaker_failures"]:
                self.down = reason
                print(f"HTTP judge: {self.consecutive_failures} consecutive rows failed to reach the endpoint ({reason}); "
                      "declared down: the remaining rows of this actor keep the probe's score", flush=True)

    def _one(self, text: str, is_chat: bool):
        ids, cut, err = _render(self.prompt, text, is_chat)
        if err:
            return None, err, cut
        if self.down:
            return None, f"error: {DOWN}", cut
        body = {"model": self.spec["model"], "prompt": ids, "max_tokens": 1, "temperature": 0, "logprobs": self.spec["top_logprobs"],
                "return_tokens_as_token_ids": True}
        try:
            resp = self._post(body)
        except _EndpointDown as e:  # unreachable, or 429/5xx after every retry: counts towards the breaker
            self._outcome(True, str(e))
            return None, error_status(e), cut
        except Exception as e:  # the endpoint answered, but not for this row (4xx, a body that is not JSON)
            self._outcome(False)
            return None, error_status(e), cut
        self._outcome(False)
        try:
            p, status = p_unsafe_from_logprobs(resp["choices"][0]["logprobs"]["top_logprobs"][0], self.labels)
        except Exception as e:  # an answer without logprobs in the expected place
            return None, error_status(f"malformed answer: {type(e).__name__}: {e}"), cut
        return p, status, cut

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = list(zip(batch.column("input").to_pylist(), batch.column("is_chat").to_pylist()))
        with ThreadPoolExecutor(self.spec["concurrency_per_actor"]) as pool:
            res = list(pool.map(lambda r: self._one(*r), rows))
        return (batch.drop_columns(["input", "is_chat"])
                .append_column("expert", pa.array([r[0] for r in res], type=pa.float64()))
                .append_column("expert_status", pa.array([r[1] for r in res], type=pa.string()))
                .append_column("expert_truncated", pa.array([r[2] for r in res], type=pa.bool_())))


# ----------------------------------------------------------------------------------------------
# dispatch
# ----------------------------------------------------------------------------------------------
def _normalise(batch: pa.Table, carry: tuple) -> pa.Table:
    """One shape for every expert's output, whatever the processor returned: the carried columns,
    ``expert``, ``expert_status`` and ``expert_truncated``. A row that failed inference inside
    ``ray.data.llm`` bypasses our postprocess and comes back as the processor's raw row with
    ``__inference_error__``; it becomes expert = null, expert_status = "error: <reason>" (a bounded
    reason, see :func:`ctd.experts.judge.error_status`)."""
    n = batch.num_rows
    has = batch.column_names
    cols = {c: batch.column(c) if c in has else pa.nulls(n) for c in carry}
    expert = pc.cast(batch.column("expert"), pa.float64()) if "expert" in has else pa.nulls(n, pa.float64())
    status = pc.cast(batch.column("expert_status"), pa.string()) if "expert_status" in has else pa.nulls(n, pa.string())
    cut = pc.cast(batch.column("expert_truncated"), pa.bool_()) if "expert_truncated" in has else pa.nulls(n, pa.bool_())
    if "__inference_error__" in has:
        err = pc.cast(batch.column("__inference_error__"), pa.string()).to_pylist()
        failed = pa.array([bool(e) for e in err])
        status = pc.if_else(failed, pa.array([error_status(e) if e else None for e in err], type=pa.string()), status)
        expert = pc.if_else(failed, pa.scalar(None, pa.float64()), expert)
    if "prompt_error" in has:  # the prompt could not be rendered: whatever the engine said is void
        perr = pc.cast(batch.column("prompt_error"), pa.string())
        status = pc.if_else(pc.is_valid(perr), perr, status)
        expert = pc.if_else(pc.is_valid(perr), pa.scalar(None, pa.float64()), expert)
    status = pc.fill_null(status, "error: the expert returned no status")
    return pa.table({**cols, "expert": expert, "expert_status": status, "expert_truncated": pc.fill_null(cut, False)})


def run_expert(ds, cfg: ExpertConfig, *, n_todo: int, carry: tuple = ("id",), plan: PoolPlan | None = None, log=print):
    """Expert scores of ``ds`` (columns input, is_chat and ``carry``) as a dataset of the carried
    columns with ``expert``, ``expert_status`` and ``expert_truncated``: one output row per input row."""
    from ray.data import ActorPoolStrategy

    plan = plan or plan_pool(cfg, n_todo)
    ds = ds.select_columns(list(dict.fromkeys([*carry, "input", "is_chat"])))
    if cfg.kind == "vllm":
        v = cfg.vllm
        from transformers import AutoTokenizer

        labels = label_token_ids(AutoTokenizer.from_pretrained(resolve_model_path(v.model)), v.label_tokens.model_dump())
        prompts = ds.map_batches(JudgePromptStage, fn_constructor_kwargs={"spec": _prompt_spec(v)}, batch_format="pyarrow",
                                 batch_size=v.batch_size * 4, num_cpus=1, compute=ActorPoolStrategy(min_size=1, max_size=v.prompt_actors))
        out = _vllm_processor(v, plan=plan, labels=labels, carry=tuple(carry), log=log)(prompts)
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
        log(f"expert (HTTP {h.base_url}, model {h.model}): {h.actors} actors x {h.concurrency_per_actor} concurrent, "
            f"{h.requests_per_second:g} req/s; {plan.describe()}")
        spec = h.model_dump() | {"label_tokens": h.label_tokens.model_dump(), "prompt": _prompt_spec(h)}
        out = ds.map_batches(HTTPJudgeStage, fn_constructor_kwargs={"spec": spec}, batch_format="pyarrow", batch_size=64,
                             num_cpus=0.5, compute=ActorPoolStrategy(size=h.actors))
    return out.map_batches(_normalise, fn_kwargs={"carry": tuple(carry)}, batch_format="pyarrow", batch_size=None)
