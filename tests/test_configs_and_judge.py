"""Configs validate; the audited day; the judge's logprob parsing and prompt cut; pool sizing from the work and the quota."""

import datetime as dt
import math
import os

import pytest

from ctd.config import ConfigError, load_config
from ctd.experts.base import replicas_needed
from ctd.experts.prompt import conversation_text, label_token_ids, p_unsafe_from_logprobs, render_prompt
from ctd.experts.registry import expert_for
from ctd.runs.job import audited_day as audit_date
from ctd.runs.job import expand_dates, expand_run_id

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_shipped_configs_validate(monkeypatch):
    demo = load_config(os.path.join(ROOT, "configs", "demo.yaml"))
    assert demo.model.path == "minilm" and demo.expert.kind == "classifier" and demo.activations.num_gpus == 0
    monkeypatch.setenv("CTD_BUCKET", "acme")
    prod = load_config(os.path.join(ROOT, "configs", "production.yaml"))
    assert prod.model.layer == 11 and prod.expert.vllm.tensor_parallel_size == 2 and prod.activations.num_gpus == 1
    assert prod.probes.safety.startswith("s3://acme/") and prod.expert.vllm.max_replicas == 4
    monkeypatch.delenv("CTD_BUCKET")
    with pytest.raises(ConfigError, match="CTD_BUCKET is not set"):
        load_config(os.path.join(ROOT, "configs", "production.yaml"))


def test_the_audited_day_is_a_parameter_and_a_retry_after_midnight_audits_the_same_day():
    night = dt.datetime(2026, 11, 23, 2, 30, tzinfo=dt.timezone.utc)  # the nightly run, 02:30 UTC on the 23rd
    day = audit_date(None, "UTC", night)
    assert day == dt.date(2026, 11, 22)  # default: yesterday
    assert expand_run_id("nightly-{date}", day, night) == "nightly-2026-11-22"
    assert expand_dates("s3://b/logs/{date}/", day, night) == "s3://b/logs/2026-11-22/"
    # the retry runs after the next midnight: with --date it audits the same day, under the same run id
    retry = dt.datetime(2026, 11, 24, 0, 10, tzinfo=dt.timezone.utc)
    assert audit_date(None, "UTC", retry) == dt.date(2026, 11, 23)  # (without --date it would not)
    again = audit_date("2026-11-22", "UTC", retry)
    assert expand_run_id("nightly-{date}", again, retry) == "nightly-2026-11-22"
    assert expand_dates("s3://b/logs/{date}/", again, retry) == "s3://b/logs/2026-11-22/"
    # "yesterday" is reckoned in the configured time zone: 02:30 UTC is still the 22nd in Los Angeles
    assert audit_date(None, "America/Los_Angeles", night) == dt.date(2026, 11, 21)
    assert expand_dates("x-{datetime}", day, night) == "x-20261123T023000Z"  # when the attempt started
    with pytest.raises(ConfigError, match="YYYY-MM-DD"):
        audit_date("22/11/2026")
    with pytest.raises(ConfigError, match="time zone"):
        audit_date(None, "Mars/Olympus")
    with pytest.raises(ConfigError, match="run id"):
        expand_run_id("bad id/../x", day, night)
    with pytest.raises(ConfigError, match="dots alone"):
        expand_run_id("..", day, night)


def test_pool_size_from_budget():
    # 10% of 2M rows at 25 rows/s per replica within 2 h: 200,000 / 25 / 7200 = 1.11 -> 2 replicas
    assert replicas_needed(200_000, 25, 7200) == 2  # the rows really left to judge after stage 1
    assert replicas_needed(1, 25, 7200) == 1
    assert replicas_needed(2_000_000, 10, 3600) == math.ceil(2_000_000 / 10 / 3600)


def test_pool_plan_is_capped_by_the_quota_and_says_when_the_target_is_missed(monkeypatch):
    monkeypatch.setenv("CTD_BUCKET", "acme")
    prod = load_config(os.path.join(ROOT, "configs", "production.yaml")).expert  # 25 rows/s per replica, 2 h, quota 4
    small = expert_for(prod).plan(200_000)  # 200,000 / 25 / 7200 = 1.1 -> 2 replicas, 1.1 h
    assert (small.replicas, small.needed, small.target_met) == (2, 2, True) and small.expected_seconds == pytest.approx(4000)
    # α = 0.1 of 10^8 rows: 10^7 rows need 56 replicas; the quota allows 4: ~27.8 h, and the plan says so
    big = expert_for(prod).plan(10_000_000)
    assert (big.replicas, big.needed, big.target_met) == (4, 56, False)
    assert big.expected_seconds == pytest.approx(10_000_000 / (4 * 25))
    assert "OVER the target of 2.00 h, which needs 56 replicas" in big.describe() and "27.78 h" in big.describe()
    assert expert_for(prod).plan(0).replicas == 1  # min_replicas


def test_judge_logprob_parsing_and_defined_results():
    labels = {"unsafe": [10, 11], "safe": [20]}
    p, s = p_unsafe_from_logprobs({10: math.log(0.3), 11: math.log(0.1), 20: math.log(0.4), 5: math.log(0.2)}, labels)
    assert p == pytest.approx(0.4 / 0.8) and s == "ok"
    # a label outside the top-k: bounded by the smallest returned probability
    p, s = p_unsafe_from_logprobs({10: math.log(0.6), 5: math.log(0.1)}, labels)
    assert p == pytest.approx(0.6 / 0.7) and s == "safe_outside_topk"
    p, s = p_unsafe_from_logprobs({5: -1.0, 6: -2.0}, labels)
    assert p == 0.5 and s == "no_label_token"
    # vLLM's {token_id: {logprob, rank, decoded_token}} form and OpenAI's {token: logprob} form
    p, _ = p_unsafe_from_logprobs({10: {"logprob": -1.0, "rank": 1}, 20: {"logprob": -1.0, "rank": 2}}, labels)
    assert p == pytest.approx(0.5)
    p, _ = p_unsafe_from_logprobs({"Yes": -0.1, "No": -3.0}, {"unsafe": ["Yes"], "safe": ["No"]})
    assert p > 0.9
    assert "user: hi" in render_prompt("Q: {conversation}", [{"role": "user", "content": "hi"}])
    assert conversation_text([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]) == "user: a\nassistant: b"
    with pytest.raises(ValueError, match="conversation"):
        render_prompt("no placeholder", "x")


def test_label_tokens_must_be_single_tokens(tiny_llama):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    ids = label_token_ids(tok, {"unsafe": ["Yes"], "safe": ["No"]})
    assert ids == {"unsafe": [4], "safe": [5]}
    with pytest.raises(ValueError, match="single-token"):
        label_token_ids(tok, {"unsafe": ["Yes Yes"], "safe": ["No"]})


def test_judge_prompt_keeps_the_head_and_the_tail_in_tokens(tiny_llama):
    """A conversation longer than the room the template leaves is cut in the judge's tokens: the
    first quarter of the room from its start, the rest from its end, the cut marked between them,
    and the whole prompt one token short of the context (room for the answer)."""
    from transformers import AutoTokenizer

    from ctd.experts.prompt import JudgePrompt

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    jp = JudgePrompt(tok, "Answer : {conversation} Answer :", 128)
    words = [f"w{i}" for i in range(300)]
    ids, cut = jp(" ".join(words))
    bos, *toks = tok.convert_ids_to_tokens(ids)  # a text prompt gets the tokenizer's BOS, as vLLM tokenizes it
    assert cut and len(ids) == 127 and bos == "<s>"
    conv = toks[2:-2]  # between the template's "Answer :" pairs
    assert toks[:2] == toks[-2:] == ["Answer", ":"]
    head = next(i for i, t in enumerate(conv) if t != words[i])
    tail = next(i for i, t in enumerate(reversed(conv)) if t != words[-1 - i])
    assert conv[:head] == words[:head] and conv[len(conv) - tail :] == words[300 - tail :]
    assert head == int((head + tail) * 0.25) and head + tail > 100  # 25% head, 75% tail of what is kept
    assert conv[head : len(conv) - tail] and set(conv[head : len(conv) - tail]) <= {
        "<unk>"
    }  # the marker between them (outside this vocabulary)
    short, cut = jp("w1 w2 w3")
    assert not cut and tok.convert_ids_to_tokens(short) == ["<s>", "Answer", ":", "w1", "w2", "w3", "Answer", ":"]
    with pytest.raises(ValueError, match="leaves"):
        JudgePrompt(tok, "{conversation}" + " w5" * 120, 128)


def test_a_huge_conversation_is_cut_from_its_two_ends_without_tokenising_the_middle(tiny_llama):
    """4 MiB of text: only the two ends are tokenised (the middle would cost seconds a row), the
    prompt fits, and the mark says exactly how many characters were dropped."""
    import re

    from transformers import AutoTokenizer

    from ctd.experts.prompt import JudgePrompt

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    jp = JudgePrompt(tok, "Answer : {conversation} Answer :", 128)
    rendered = []
    ids_of = jp._ids
    jp._ids = lambda conv: rendered.append(conv) or ids_of(conv)  # the conversation as it is sent
    from test_activations import CountingTokenizer

    seen = []
    jp.tok = CountingTokenizer(tok, seen)
    text = "w1 " * ((4 << 20) // 3) + "w9 w8"
    ids, cut = jp(text)
    assert cut and len(ids) <= 127
    assert max(seen) < 20_000 < len(text)  # tokenising all of it: seconds a row
    head, n, tail = re.fullmatch(r"(.*)\n\[\.\.\. (\d+) characters cut \.\.\.\]\n(.*)", rendered[-1], re.S).groups()
    assert text.startswith(head) and text.endswith(tail) and tail.endswith("w9 w8")
    assert len(head) + int(n) + len(tail) == len(text)
    assert tok.convert_ids_to_tokens(ids)[-4:] == ["w9", "w8", "Answer", ":"]


def test_a_config_missing_from_a_ray_job_upload_says_how_to_fix_it(tmp_path, monkeypatch):
    """`ray job submit --working-dir .` leaves out what .gitignore ignores (out/): the error names
    the cause and the fix (an absolute path on a local head)."""
    from ctd.config import ConfigError, load_config

    upload = tmp_path / "runtime_resources" / "working_dir_files" / "_ray_pkg_abc"
    upload.mkdir(parents=True)
    monkeypatch.chdir(upload)
    with pytest.raises(
        ConfigError,
        match=r"config file not found: out/demo/config.yaml \(relative to the job's uploaded working dir .*"
        r"\.gitignore ignores, such as out/; on a local head pass the absolute path",
    ):
        load_config("out/demo/config.yaml")
    monkeypatch.chdir(tmp_path)  # anywhere else: the plain message
    with pytest.raises(ConfigError, match=r"^config file not found: out/demo/config.yaml$"):
        load_config("out/demo/config.yaml")


def test_with_cpu_nodes_only_the_gpu_stages_escape_the_label_selector(tiny_llama, ray_head):
    """(On the session's Ray head: building a ray.data.llm processor connects to Ray.)
    `ray.cpu_nodes` holds every task and actor of our datasets to the labelled nodes (Ray Data's
    label_selector); the stages that ask for GPUs or custom resources (the activation and classifier pools,
    the vLLM engine's replicas) carry the negated selector, so they can land on the GPU nodes, which lack
    the label; CPU pools and the vLLM prompt stage keep it. Without cpu_nodes nothing is added."""
    import ray.data

    from ctd.config import VLLMExpertConfig
    from ctd.experts.base import PoolPlan
    from ctd.experts.vllm import _vllm_processor
    from ctd.pipeline.raydata import accelerated, configure_data, cpu_task

    ctx = ray.data.DataContext.get_current()
    shuffle = ctx.shuffle_strategy
    try:
        configure_data(cpu_nodes={"ctd/pool": "cpu"})
        assert ctx.execution_options.label_selector == {"ctd/pool": "cpu"}
        assert accelerated(1, {}) == {"label_selector": {"ctd/pool": "!cpu"}} == accelerated(0, {"expert": 1})
        assert accelerated(0, {}) == {} and hasattr(cpu_task(lambda: 0), "remote")
        cfg = VLLMExpertConfig(model=tiny_llama, num_gpus_per_replica=1, resources={"expert": 1})
        proc = _vllm_processor(cfg, plan=PoolPlan(10, 1, 1, None, None), labels={}, carry=("id",), log=lambda m: None)
        kw = {name: s.map_batches_kwargs for name, s in proc.stages.items()}
        engine = [k for name, k in kw.items() if name.startswith("vLLMEngineStage")]
        assert len(engine) == 1 and engine[0]["label_selector"] == {"ctd/pool": "!cpu"}
        assert all("label_selector" not in k for name, k in kw.items() if not name.startswith("vLLMEngineStage"))
        assert ctx.shuffle_strategy.value == "hash_shuffle"  # shuffle v2 ignores the selector
        configure_data()
        assert ctx.execution_options.label_selector is None and accelerated(1, {"expert": 1}) == {}
        assert ctx.shuffle_strategy == shuffle
        assert hasattr(cpu_task(lambda: 0), "remote") and hasattr(cpu_task(lambda: 0, num_cpus=0.25), "remote")
    finally:
        configure_data()
        ctx.shuffle_strategy = shuffle
