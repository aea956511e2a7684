"""Tiny random models the tests and benchmarks build themselves (no download): a Llama that vLLM's
CPU backend accepts, with a word-level tokenizer whose vocabulary holds the judge's label words."""

from __future__ import annotations

__all__ = ["build_tiny_llama", "vocabulary"]


def vocabulary(vocab: int = 512) -> list[str]:
    words = ["<unk>", "<s>", "</s>", "<pad>", "Yes", "No", "yes", "no", "Answer", ":", "user", "assistant", "system"]
    return words + [f"w{i}" for i in range(vocab - len(words))]


def build_tiny_llama(path: str, *, vocab: int = 512, layers: int = 4, seed: int = 0, hidden: int = 128, classifier: bool = False) -> str:
    """A random Llama that vLLM's CPU backend accepts (head_dim 64) with a word-level tokenizer
    whose vocabulary holds the judge's label words, saved as a Hugging Face folder."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = vocabulary(vocab)
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=512,
                      bos_token_id=1, eos_token_id=2, pad_token_id=3, tie_word_embeddings=False)
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
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path
