"""``expert.kind: http``: the same LLM judge behind an OpenAI-compatible endpoint (e.g. an existing vLLM
server), with retries, a pool-wide rate limit, a circuit breaker and an API key read from a named
environment variable.

It sends the token ids the vLLM path sends (:class:`ctd.experts.prompt.JudgePrompt`) and parses the
same label-token logprobs, so the two paths are the same judge.

``ray.data.llm.HttpRequestProcessorConfig`` (Ray 2.60) was read and not used here: its ``qps`` is per
actor, exhausting the retries of one request raises for the whole batch (``http_request_stage.py``:
"Reached maximum retries"), and it has no circuit breaker.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import threading
import time
import urllib.error
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import pyarrow as pa

from ..config import HTTPExpertConfig
from ..web import post_json
from .base import PoolPlan
from .prompt import (
    LLM_JUDGE_IDENTITY,
    check_llm_judge,
    error_status,
    judge_prompt,
    label_token_ids,
    p_unsafe_from_logprobs,
    render,
)

if TYPE_CHECKING:
    import ray.data

__all__ = ["HTTPExpert", "HTTPJudgeStage"]


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

    def __init__(self, cfg: HTTPExpertConfig):
        self.cfg = cfg
        key_env = cfg.api_key_env
        self.api_key = os.environ.get(key_env) if key_env else None
        if key_env and not self.api_key:
            raise RuntimeError(f"environment variable {key_env} (expert.http.api_key_env) is not set")
        self.limiter = _RateLimiter(cfg.requests_per_second / max(1, cfg.actors))
        self.url = cfg.base_url.rstrip("/") + "/completions"
        self.prompt = judge_prompt(cfg)
        label_tokens = cfg.label_tokens.model_dump()
        ids = label_token_ids(self.prompt.tok, label_tokens)
        self.labels = {k: [f"token_id:{i}" for i in v] + list(label_tokens[k]) for k, v in ids.items()}
        self.calls = 0
        self.lock = threading.Lock()
        self.consecutive_failures = 0
        self.down: str | None = None  # why the circuit opened

    def _post(self, body: dict) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        delay = self.cfg.retry_backoff_seconds
        for attempt in range(self.cfg.max_retries + 1):
            if self.down:
                raise _EndpointDown(DOWN)
            self.limiter.acquire()
            try:
                _, answer = post_json(self.url, body, self.cfg.timeout_seconds, headers)
                self.calls += 1
                return json.loads(answer)
            except urllib.error.HTTPError as e:
                if 300 <= e.code < 400:  # never followed: the API key goes to base_url and nowhere else
                    raise _EndpointDown(
                        f"the judge endpoint redirects (HTTP {e.code}); redirects are refused, so the API key is sent "
                        "only to expert.http.base_url: set it to the final URL"
                    ) from None
                if e.code not in self.RETRY:  # the endpoint answered: this row is bad, the endpoint is not down
                    raise RuntimeError(f"judge answered HTTP {e.code} {_phrase(e.code)}") from None
                if attempt == self.cfg.max_retries:
                    raise _EndpointDown(f"HTTP {e.code} from the judge endpoint after {attempt + 1} attempts") from None
            except (urllib.error.URLError, OSError, http.client.HTTPException) as e:  # refused, reset, timed out, cut short
                if attempt == self.cfg.max_retries:
                    raise _EndpointDown(
                        f"judge endpoint unreachable after {attempt + 1} attempts: {getattr(e, 'reason', e)}"
                    ) from None
            time.sleep(delay * (1 + random.random()))
            delay *= 2
        raise RuntimeError("unreachable")

    def _outcome(self, endpoint_failed: bool, reason: str = "") -> None:
        with self.lock:
            self.consecutive_failures = self.consecutive_failures + 1 if endpoint_failed else 0
            if endpoint_failed and self.down is None and self.consecutive_failures >= self.cfg.circuit_breaker_failures:
                self.down = reason
                print(
                    f"HTTP judge: {self.consecutive_failures} consecutive rows failed to reach the endpoint ({reason}); "
                    "declared down: the remaining rows of this actor keep the probe's score",
                    flush=True,
                )

    def _one(self, text: str, is_chat: bool):
        ids, cut, err = render(self.prompt, text, is_chat)
        if err:
            return None, err, cut
        if self.down:
            return None, f"error: {DOWN}", cut
        body = {
            "model": self.cfg.model,
            "prompt": ids,
            "max_tokens": 1,
            "temperature": 0,
            "logprobs": self.cfg.top_logprobs,
            "return_tokens_as_token_ids": True,
        }
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

        def timed(r):  # a row's latency: its request, retries and rate-limit waits included
            t0 = time.perf_counter()
            return (*self._one(*r), time.perf_counter() - t0)

        with ThreadPoolExecutor(self.cfg.concurrency_per_actor) as pool:
            res = list(pool.map(timed, rows))
        return (
            batch.drop_columns(["input", "is_chat"])
            .append_column("expert", pa.array([r[0] for r in res], type=pa.float64()))
            .append_column("expert_status", pa.array([r[1] for r in res], type=pa.string()))
            .append_column("expert_truncated", pa.array([r[2] for r in res], type=pa.bool_()))
            .append_column("expert_seconds", pa.array([r[3] for r in res], type=pa.float64()))
        )


class HTTPExpert:
    kind = "http"

    def __init__(self, cfg: HTTPExpertConfig):
        self.cfg = cfg

    def identity(self) -> dict:
        c = self.cfg.model_dump(mode="json")
        return {"kind": self.kind, **{k: c[k] for k in ("model", "tokenizer", *LLM_JUDGE_IDENTITY[1:])}}

    def check(self) -> None:
        check_llm_judge(self.cfg, self.kind)

    def bill_terms(self) -> dict:
        return {"gpus_each": 0.0, "gpu_hour_price": None, "token_price": self.cfg.price_per_1k_tokens, "by_tokens": True}

    def plan(self, rows: int) -> PoolPlan:
        h = self.cfg
        return PoolPlan(rows, h.actors, h.actors, rows / h.requests_per_second, None)

    def judge(self, ds: ray.data.Dataset, carry: tuple, plan: PoolPlan, log: Callable[[str], None]) -> ray.data.Dataset:
        from ray.data import ActorPoolStrategy

        h = self.cfg
        log(
            f"expert (HTTP {h.base_url}, model {h.model}): {h.actors} actors x {h.concurrency_per_actor} concurrent, "
            f"{h.requests_per_second:g} req/s; {plan.describe()}"
        )
        return ds.map_batches(
            HTTPJudgeStage,
            fn_constructor_kwargs={"cfg": h},
            batch_format="pyarrow",
            batch_size=64,
            num_cpus=0.5,
            compute=ActorPoolStrategy(size=h.actors),
        )
