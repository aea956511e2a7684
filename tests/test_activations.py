"""The activation extractor against transformers' own output_hidden_states, on a decoder and an encoder."""

import numpy as np
import pytest
import torch

from ctd.model.activations import ActivationExtractor, TextEncoder, cached_pool, plan_batches, plan_packs, render_chat


def reference_pooled(model_dir, ids, layer, auto_cls):
    model = auto_cls.from_pretrained(model_dir).eval()
    out = []
    with torch.inference_mode():
        for x in ids:
            hs = model(input_ids=torch.tensor(np.asarray(x, dtype=np.int64)[None]), output_hidden_states=True).hidden_states
            out.append(hs[layer][0].mean(0).numpy())
    return np.stack(out)


def test_plan_batches_and_packs_cover_every_row_within_budget():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 300, 500)
    for budget in (64, 512, 4096):
        batches = plan_batches(lengths, budget, pad_multiple=8)
        assert sorted(np.concatenate(batches).tolist()) == list(range(500))
        for b in batches:
            t = -(-lengths[b[0]] // 8) * 8
            assert lengths[b].max() == lengths[b[0]] and (len(b) * t <= budget or len(b) == 1)
        packs = plan_packs(lengths, budget)
        assert sorted(np.concatenate(packs).tolist()) == list(range(500))
        assert all(lengths[p].sum() <= budget or len(p) == 1 for p in packs)


def test_decoder_layer_matches_hidden_states_and_upper_blocks_never_run(tiny_llama):
    from transformers import AutoModel

    enc = TextEncoder(tiny_llama, max_length=64)
    texts = ["w1 w2 w3", "w5 " * 80, [{"role": "user", "content": "w9 w10"}, {"role": "assistant", "content": "No"}], "Yes"]
    ids, truncated = enc.encode(texts)
    assert truncated.tolist() == [False, True, False, False] and len(ids[1]) == 64
    ex = ActivationExtractor.from_pretrained(tiny_llama, [2, 3], token_budget=64)
    assert ex.causal and ex.strategy == "padded" and len(ex.model.layers) == 3  # block 4 removed
    calls = []
    ex.model.layers[2].register_forward_hook(lambda *a: calls.append(1))
    got = ex.pool(ids)
    assert len(calls) == len(plan_batches([len(x) for x in ids], 64, 8))
    for layer in (2, 3):
        ref = reference_pooled(tiny_llama, ids, layer, AutoModel)
        assert np.allclose(got[layer], ref, atol=1e-5, rtol=1e-4)


def test_encoder_with_padding_matches_unpadded_reference(minilm_dir):
    from transformers import AutoModel

    enc = TextEncoder(minilm_dir, max_length=32)
    texts = ["a short one", "a much longer text that will certainly be truncated " * 8, "x"]
    ids, truncated = enc.encode(texts)
    assert truncated.tolist() == [False, True, False]
    assert ids[1][-1] == enc.tokenizer.sep_token_id  # truncation keeps the special tokens
    ex = ActivationExtractor.from_pretrained(minilm_dir, 4, token_budget=40)
    assert not ex.causal
    got = ex.pool(ids)[4]
    assert np.allclose(got, reference_pooled(minilm_dir, ids, 4, AutoModel), atol=1e-5)


class CountingTokenizer:
    """The real tokenizer, noting the length of every text it is given."""

    def __init__(self, tok, seen: list):
        self.tok, self.seen = tok, seen

    def __getattr__(self, name):
        return getattr(self.tok, name)

    def __call__(self, batch, **kw):
        self.seen.extend(len(t) for t in batch) if isinstance(batch, list) else self.seen.append(len(batch))
        return self.tok(batch, **kw)


def test_a_huge_row_is_tokenised_only_as_far_as_its_kept_tokens(minilm_dir, tiny_llama):
    """The ids of a 512 KiB text are exactly the tokenizer's own truncation of it (an encoder with
    [SEP], a decoder without), and the tokenizer never sees more than max_length x MAX_TOKEN_CHARS
    characters of it; a text of tokens longer than that on average is still cut exactly."""
    from ctd.model.activations import MAX_TOKEN_CHARS

    for model, n in ((minilm_dir, 32), (tiny_llama, 64)):
        enc = TextEncoder(model, max_length=n)
        tok = enc.tokenizer
        huge = "a much longer text w1 w2 " * ((512 << 10) // 25)
        odd = ("x" * 120 + " ") * (n * 2)  # words longer than MAX_TOKEN_CHARS, each one token
        seen = []

        enc.tokenizer = CountingTokenizer(tok, seen)
        ids, truncated = enc.encode([huge, odd, "w1 w2"])
        assert truncated.tolist() == [True, True, False]
        for got, text in zip(ids, (huge, odd)):
            assert got.tolist() == tok(text, truncation=True, max_length=n)["input_ids"]
        assert max(x for x in seen if x != len(odd)) <= n * MAX_TOKEN_CHARS < len(huge)  # only the odd row is read whole


def test_bad_layers_and_empty_rows(tiny_llama):
    with pytest.raises(ValueError, match=r"layers must lie in \[1, 4\]"):
        ActivationExtractor.from_pretrained(tiny_llama, 5)
    ex = ActivationExtractor.from_pretrained(tiny_llama, 1)
    assert ex.pool([])[1].shape == (0, 128)
    with pytest.raises(ValueError, match="at least one token"):
        ex.pool([np.array([], dtype=np.int32)])
    with pytest.raises(ValueError, match="packing needs"):
        ActivationExtractor.from_pretrained(tiny_llama, 1, packing=True)


def test_render_chat_without_template():
    assert render_chat([{"role": "user", "content": "hi"}]) == "user: hi"
    assert render_chat("plain") == "plain"


def test_cache_returns_the_same_and_skips_compute(tiny_llama, tmp_path):
    enc = TextEncoder(tiny_llama)
    ids, _ = enc.encode(["w1 w2", "w3"])
    ex = ActivationExtractor.from_pretrained(tiny_llama, 2)
    first = cached_pool(ex, ids, str(tmp_path))[2]
    ex.pool = None  # a cache hit must not call the model
    assert np.array_equal(cached_pool(ex, ids, str(tmp_path))[2], first)
