"""Tiny random models the tests and benchmarks build themselves (no download): a Llama that vLLM's
CPU backend accepts, with a word-level tokenizer whose vocabulary holds the judge's label words."""

from __future__ import annotations

__all__ = ["build_tiny_llama", "vocabulary"]


def vocabulary(vocab: int = 512) -> list[str]:
    words = ["<unk>", "<s>", "</s>", "<pad>", "Yes", "No", "yes", "no", "Answer", ":", "user", "assistant", "system"]
    return words + [f"w{i}" for i in range(vocab - len(words))]


CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} </s>{% endfor %}"
    "{% if add_generation_prompt %}assistant :{% endif %}"
)


def build_tiny_llama(
    path: str, *, vocab: int = 512, layers: int = 4, seed: int = 0, hidden: int = 128, classifier: bool = False
) -> str:
    """A random Llama that vLLM's CPU backend accepts (head_dim 64) with a word-level tokenizer
    whose vocabulary holds the judge's label words and a chat template, saved as a Hugging Face folder.

    The causal model is a usable judge for tests: its output layer is biased so that the label
    tokens "Yes" and "No" are in the top-20 of the first generated token for any input, while
    P(Yes | Yes or No) varies with the input (roughly 0.2 to 0.8). Hidden dimension 0 carries a
    constant (every embedding has 0.2 there and no block writes to it), so after the final norm it is
    a fixed offset that the two label rows of the output layer turn into a shared logit boost; their
    other weights are ±3 × a random direction with the mean final state projected out."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = vocabulary(vocab)
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    # a BOS on every encoding with special tokens, as Llama tokenizers do: a chat prompt tokenized
    # with special tokens on top of a template that writes BOS would show two
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    if classifier:  # a sequence classifier (unsafe = label 1), for the classifier expert
        from transformers import LlamaForSequenceClassification

        cfg.num_labels = 2
        cfg.id2label, cfg.label2id = {0: "safe", 1: "unsafe"}, {"safe": 0, "unsafe": 1}
        cfg.architectures = ["LlamaForSequenceClassification"]
        model = LlamaForSequenceClassification(cfg)
    else:
        cfg.architectures = ["LlamaForCausalLM"]
        model = LlamaForCausalLM(cfg)
        _bias_label_tokens(model, fast, words)
    fast.chat_template = CHAT_TEMPLATE
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path


def _bias_label_tokens(model, tok, words, yes: str = "Yes", no: str = "No") -> None:
    import numpy as np
    import torch

    y, n = words.index(yes), words.index(no)
    rng = np.random.default_rng(0)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 0.2
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[0, :] = 0
            layer.mlp.down_proj.weight[0, :] = 0
        texts = [
            " ".join(f"w{k}" for k in rng.integers(0, len(words) - 20, rng.integers(3, 60))) + " Answer :" for _ in range(32)
        ]
        final = torch.stack([model.model(torch.tensor([tok(t)["input_ids"]])).last_hidden_state[0, -1] for t in texts])
        mu = final.mean(0)
        mu[0] = 0
        w = model.lm_head.weight
        d = w[y].clone()
        d[0] = 0
        d -= (d @ mu) / (mu @ mu) * mu
        w[y], w[n] = 3 * d, -3 * d
        w[:, 0] = 0
        w[y, 0] = w[n, 0] = 1.0
