"""``expert.kind: vllm``: an LLM judge on an autoscaled vLLM actor pool, through ``ray.data.llm``.

The judge's prompt is rendered in its own tokens on CPU actors (:class:`JudgePromptStage`: the
template, the chat template where configured, the conversation cut to the judge's context), then the
engine generates one token; P(unsafe) comes from that token's logprobs over the label tokens.

The pool is sized from the work that is there (:meth:`VLLMExpert.plan`): the rows still to judge
(exact after stage 1 and resume) ÷ per-replica throughput ÷ target wall time, capped by the quota
``max_replicas``; when the cap makes the target unreachable, the plan says how long it will take.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pyarrow as pa

from ..config import VLLMExpertConfig, resolve_model_path
from ..pipeline.raydata import accelerated
from .base import PoolPlan, replicas_needed
from .prompt import LLM_JUDGE_IDENTITY, check_llm_judge, judge_prompt, label_token_ids, p_unsafe_from_logprobs, render

if TYPE_CHECKING:
    import ray.data

__all__ = ["VLLMExpert", "JudgePromptStage"]


class JudgePromptStage:
    """Rows → ``prompt_ids`` (the judge's token ids, cut to its context), ``expert_truncated`` and
    ``prompt_error`` (null unless the row could not be rendered); the text is dropped."""

    def __init__(self, cfg: VLLMExpertConfig):
        self.prompt = judge_prompt(cfg)

    def __call__(self, batch: pa.Table) -> pa.Table:
        res = [render(self.prompt, t, c) for t, c in zip(batch.column("input").to_pylist(), batch.column("is_chat").to_pylist())]
        return (
            batch.drop_columns(["input", "is_chat"])
            .append_column("prompt_ids", pa.array([r[0] for r in res], type=pa.list_(pa.int32())))
            .append_column("expert_truncated", pa.array([r[1] for r in res], type=pa.bool_()))
            .append_column("prompt_error", pa.array([r[2] for r in res], type=pa.string()))
        )


def _vllm_processor(cfg, *, plan: PoolPlan, labels: dict, carry: tuple, log):
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    log(f"expert pool (vLLM {cfg.model}): {cfg.min_replicas}..{plan.replicas} replicas; {plan.describe()}")
    engine_kwargs = {
        "max_model_len": cfg.max_model_len,
        "tensor_parallel_size": cfg.tensor_parallel_size,
        "max_logprobs": max(cfg.top_logprobs, 20),
        **cfg.engine_kwargs,
    }
    on_gpu = cfg.num_gpus_per_replica > 0
    bundle = ({"GPU": cfg.num_gpus_per_replica, "CPU": 1} if on_gpu else {"CPU": 1}) | dict(cfg.resources)
    proc_cfg = vLLMEngineProcessorConfig(
        model_source=resolve_model_path(cfg.model),
        engine_kwargs=engine_kwargs,
        concurrency=(cfg.min_replicas, plan.replicas),
        batch_size=cfg.batch_size,
        accelerator_type=None,
        log_engine_metrics=False,
        # the tensor-parallel workers of one replica on one node (NVLink), never spread
        placement_group_config={"bundles": [bundle] * cfg.tensor_parallel_size, "strategy": "STRICT_PACK"},
        chat_template_stage=False,
        tokenize_stage=False,
        detokenize_stage=False,  # JudgePromptStage made the ids
        should_continue_on_error=True,
    )
    sp = {"max_tokens": 1, "temperature": 0.0, "logprobs": cfg.top_logprobs}
    keep = tuple(dict.fromkeys([*carry, "expert_truncated", "prompt_error"]))

    def pre(row):  # a row whose prompt could not be rendered is sent one token; normalise voids its answer
        ids = row["prompt_ids"]
        return {"tokenized_prompt": [int(i) for i in ids] if ids is not None and len(ids) else [0], "sampling_params": sp}

    def post(row):  # success rows only: ray.data.llm returns failed rows raw (see normalise)
        kept = {c: row.get(c) for c in keep}
        took = row.get("time_taken_llm")  # the engine's time for this request (-1 where it failed)
        kept["expert_seconds"] = float(took) if took is not None and took >= 0 else None
        lps = row.get("logprobs")
        if not lps:
            return kept | {"expert": None, "expert_status": "error: the engine returned no logprobs"}
        p, status = p_unsafe_from_logprobs({int(t): v for t, v in lps[0].items()}, labels)
        return kept | {"expert": float(p), "expert_status": status}

    proc = build_processor(proc_cfg, preprocess=pre, postprocess=post)
    # the engine's replicas go to the GPU bundles' nodes, never held to ray.cpu_nodes as its CPU stages are
    # (updated in place: assigning the field would run the stage's validator again, which pops its placement
    # group config the first time and would then ask for a whole GPU per replica)
    for stage in proc.stages.values():
        if type(stage).__name__ == "vLLMEngineStage":
            stage.map_batches_kwargs.update(accelerated(cfg.num_gpus_per_replica, cfg.resources))
    return proc


class VLLMExpert:
    kind = "vllm"

    def __init__(self, cfg: VLLMExpertConfig):
        self.cfg = cfg

    def identity(self) -> dict:
        c = self.cfg.model_dump(mode="json")
        return {"kind": self.kind, **{k: c[k] for k in LLM_JUDGE_IDENTITY}}

    def bill_terms(self) -> dict:
        c = self.cfg
        return {
            "gpus_each": c.num_gpus_per_replica * c.tensor_parallel_size,
            "gpu_hour_price": c.gpu_hour_price,
            "token_price": None,
            "by_tokens": False,
        }

    def check(self) -> None:
        check_llm_judge(self.cfg, self.kind)

    def plan(self, rows: int) -> PoolPlan:
        v = self.cfg
        needed = replicas_needed(rows, v.rows_per_second_per_replica, v.target_wall_seconds, v.min_replicas)
        replicas = max(v.min_replicas, min(needed, v.max_replicas or needed))
        return PoolPlan(rows, replicas, needed, rows / (replicas * v.rows_per_second_per_replica), v.target_wall_seconds)

    def judge(self, ds: ray.data.Dataset, carry: tuple, plan: PoolPlan, log: Callable[[str], None]) -> ray.data.Dataset:
        from ray.data import ActorPoolStrategy
        from transformers import AutoTokenizer

        v = self.cfg
        labels = label_token_ids(AutoTokenizer.from_pretrained(resolve_model_path(v.model)), v.label_tokens.model_dump())
        prompts = ds.map_batches(
            JudgePromptStage,
            fn_constructor_kwargs={"cfg": v},
            batch_format="pyarrow",
            batch_size=v.batch_size * 4,
            num_cpus=1,
            compute=ActorPoolStrategy(min_size=1, max_size=v.prompt_actors),
        )
        return _vllm_processor(v, plan=plan, labels=labels, carry=carry, log=log)(prompts)
