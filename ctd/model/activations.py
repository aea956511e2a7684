"""Mean-pooled hidden states of layer L of a Hugging Face transformers model.

Definition of "layer L" (used by training, calibration and the audit alike)
---------------------------------------------------------------------------
Layer L is the output of the L-th transformer block, counting from 1 (1 <= L <= number of blocks).
This is ``hidden_states[L]`` in transformers' ``output_hidden_states`` convention for
L < num_layers. It is always the raw block output: a model's final norm is never applied, also for
L = num_layers. The pooled vector is the mean of that output over the row's real tokens (padding
excluded).

How it is computed (the one code path, used by the benchmark and the Ray activation actor)
-----------------------------------------------------------------------------------------
* Blocks above the deepest requested layer are removed from the model: they never run.
* A forward hook on each requested block captures its output; pooling happens on the device.
* Causal decoders on CUDA: sequences are packed end to end (no padding) into batches of at most
  ``token_budget`` tokens; positions restart at each sequence and attention is causal
  FlashAttention over the packed segments (torch.nn.attention.varlen); pooling is a segment mean.
* Otherwise: rows are sorted by length and cut into padded batches (rows x padded length <=
  budget), with a masked mean; encoders get the attention mask.
* Either way peak memory is bounded by the token budget, not the corpus, and batches are launched
  back to back with one device-to-host copy at the end.
* bf16 on CUDA, fp32 on CPU. Tokenisation is separate (:class:`TextEncoder`) so a CPU stage can do
  it while the accelerator computes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import ArrayLike

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

# No token of a real vocabulary spans more characters than this, so a text is tokenised only as far
# as the characters its kept tokens can cover: a 4 MiB row costs what a long one does.
MAX_TOKEN_CHARS = 32

__all__ = [
    "MAX_TOKEN_CHARS",
    "LAYER_DEFINITION",
    "render_chat",
    "TextEncoder",
    "plan_batches",
    "plan_packs",
    "ActivationExtractor",
    "find_blocks",
    "is_causal_config",
    "token_ids_hash",
    "cached_pool",
    "model_id_of",
    "transformers_models",
    "run_encoder",
]

LAYER_DEFINITION = "layer L = output of transformer block L (1-indexed), before any final norm; mean over real tokens"


# ----------------------------------------------------------------------------------------------
# text → token ids
# ----------------------------------------------------------------------------------------------
def render_chat(messages: Any, tokenizer: PreTrainedTokenizerBase | None = None) -> str:
    """A chat (list of {role, content}) as one string: the tokenizer's chat template when it has
    one, else "role: content" lines. Plain strings pass through."""
    if isinstance(messages, str):
        return messages
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(list(messages), tokenize=False)
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


class TextEncoder:
    """Tokenises rows (text or chat messages) into id arrays, truncated to ``max_length``."""

    def __init__(self, model_dir: str, max_length: int | None = None):
        from transformers import AutoConfig, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        cfg = AutoConfig.from_pretrained(model_dir)
        limits = [x for x in (max_length, getattr(cfg, "max_position_embeddings", None)) if x]
        tok_max = getattr(self.tokenizer, "model_max_length", None)
        if tok_max and tok_max < 1_000_000:
            limits.append(tok_max)
        if not limits:
            raise ValueError(f"cannot tell the maximum input length of {model_dir}; set max_length")
        self.max_length = int(min(limits))
        self.has_template = bool(getattr(self.tokenizer, "chat_template", None))

    def encode(self, inputs: Sequence[Any]) -> tuple[list[np.ndarray], np.ndarray]:
        """(ids per row, truncated flags). Chat rows are rendered with the chat template, whose
        special tokens are already in the text (no second BOS)."""
        chats = [not isinstance(x, str) for x in inputs]
        texts = [render_chat(x, self.tokenizer) for x in inputs]
        ids: list[np.ndarray] = [None] * len(texts)  # type: ignore[list-item]
        truncated = np.zeros(len(texts), dtype=bool)
        for special in (True, False):
            sel = [i for i, c in enumerate(chats) if not (c and self.has_template) == special]
            if not sel:
                continue
            # A long text is tokenised only as far as its prefix of whole words within max_length x
            # MAX_TOKEN_CHARS characters: when that prefix alone holds more than max_length tokens, its
            # first max_length are the text's; otherwise (no whitespace to cut at, or words of more than
            # MAX_TOKEN_CHARS characters a token) the text is tokenised whole.
            heads = [_word_prefix(texts[i], self.max_length * MAX_TOKEN_CHARS) for i in sel]
            enc = self.tokenizer(heads, add_special_tokens=special, truncation=False, verbose=False)["input_ids"]
            for j, e in enumerate(enc):
                if len(heads[j]) < len(texts[sel[j]]) and len(e) <= self.max_length + 2:
                    heads[j] = texts[sel[j]]
                    enc[j] = self.tokenizer(heads[j], add_special_tokens=special, verbose=False)["input_ids"]
            long_rows = [j for j, e in enumerate(enc) if len(e) > self.max_length]
            if long_rows:  # re-tokenise with the tokenizer's own truncation, which keeps special tokens
                cut = self.tokenizer(
                    [heads[j] for j in long_rows],
                    add_special_tokens=special,
                    truncation=True,
                    max_length=self.max_length,
                )["input_ids"]
                for j, e in zip(long_rows, cut):
                    enc[j] = e
                    truncated[sel[j]] = True
            for i, e in zip(sel, enc):
                if len(e) == 0:
                    raise ValueError(f"row {i} has no tokens after tokenisation")
                ids[i] = np.asarray(e, dtype=np.int32)
        return ids, truncated


def _word_prefix(text: str, chars: int) -> str:
    """``text`` up to its last whitespace within its first ``chars`` characters (and past half of
    them); the whole text when it is not longer or has no such whitespace."""
    if len(text) <= chars:
        return text
    cut = max(text.rfind(c, chars // 2, chars) for c in " \n\t")
    return text[:cut] if cut > 0 else text


# ----------------------------------------------------------------------------------------------
# batching
# ----------------------------------------------------------------------------------------------
def plan_batches(lengths: ArrayLike, token_budget: int, pad_multiple: int = 8) -> list[np.ndarray]:
    """Length-sorted batches whose padded size (rows x padded length) stays within the budget.

    Rows are taken longest first; a batch's padded length is its first row's length rounded up to
    ``pad_multiple``. A single row longer than the budget forms a batch of its own.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if token_budget < 1:
        raise ValueError("token_budget must be positive")
    order = np.argsort(-lengths, kind="stable")
    batches, i = [], 0
    while i < order.size:
        t = int(-(-lengths[order[i]] // pad_multiple) * pad_multiple)
        b = max(1, token_budget // t)
        batches.append(order[i : i + b])
        i += b
    return batches


# ----------------------------------------------------------------------------------------------
# the model
# ----------------------------------------------------------------------------------------------
def find_blocks(model: PreTrainedModel) -> tuple[torch.nn.Module, str, torch.nn.ModuleList]:
    """(owner module, attribute name, ModuleList) of the transformer blocks: the ModuleList whose
    length equals config.num_hidden_layers (Llama: model.layers, BERT: encoder.layer, ...)."""
    import torch

    if getattr(model, "_ctd_blocks", None) is not None:  # already truncated by an extractor
        return model._ctd_blocks
    n = getattr(model.config, "num_hidden_layers", None)
    found = []
    for name, module in model.named_modules():
        for attr, child in module.named_children():
            if isinstance(child, torch.nn.ModuleList) and len(child) == n:
                found.append((name.count("."), module, attr, child))
    if not found:
        raise ValueError(f"cannot find the {n} transformer blocks of {type(model).__name__}")
    found.sort(key=lambda x: x[0])
    _, owner, attr, blocks = found[0]
    return owner, attr, blocks


def is_causal_config(config: PretrainedConfig) -> bool:
    if getattr(config, "is_decoder", False):
        return True
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs):
        return True
    return getattr(config, "model_type", "") in {
        "llama",
        "mistral",
        "qwen2",
        "qwen3",
        "gemma",
        "gemma2",
        "gemma3_text",
        "phi3",
        "gpt2",
        "olmo2",
    }


@dataclass
class _Capture:
    out: dict

    def hook(self, layer: int):
        def fn(_module, _inputs, output):
            self.out[layer] = output[0] if isinstance(output, (tuple, list)) else output

        return fn


def plan_packs(lengths: ArrayLike, token_budget: int) -> list[np.ndarray]:
    """Batches of whole sequences, longest first, whose total length stays within the budget (no
    padding: sequences are packed end to end). A sequence longer than the budget is a pack alone."""
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(-lengths, kind="stable")
    packs, cur, total = [], [], 0
    for i in order:
        if cur and total + lengths[i] > token_budget:
            packs.append(np.asarray(cur))
            cur, total = [], 0
        cur.append(i)
        total += int(lengths[i])
    if cur:
        packs.append(np.asarray(cur))
    return packs


VARLEN_ATTENTION = "ctd_varlen"


def _varlen_available() -> bool:
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def _register_varlen_attention() -> None:
    """Register packed-sequence attention with transformers: causal FlashAttention over sequences
    delimited by cumulative lengths (``cu_seq_lens_q``), via torch.nn.attention.varlen. Not
    registered as a mask function, so transformers builds no mask for it."""
    import inspect

    import torch
    from torch.nn.attention.varlen import varlen_attn
    from transformers import AttentionInterface

    params = inspect.signature(varlen_attn).parameters

    @torch.compiler.disable  # the int max length would otherwise make dynamo recompile per batch
    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # [N, heads, head_dim]
        if k.shape[1] != q.shape[1] and "enable_gqa" not in params:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        kw = {}
        if "is_causal" in params:
            kw["is_causal"] = True
        else:
            kw["window_size"] = (-1, 0)
        if "enable_gqa" in params and k.shape[1] != q.shape[1]:
            kw["enable_gqa"] = True
        if "scale" in params and scaling is not None:
            kw["scale"] = scaling
        cu, mx = kwargs["cu_seq_lens_q"], kwargs["max_length_q"]
        out = varlen_attn(q.contiguous(), k.contiguous(), v.contiguous(), cu, cu, mx, mx, **kw)
        return out.unsqueeze(0), None

    AttentionInterface.register(VARLEN_ATTENTION, attention)


class ActivationExtractor:
    """Pooled layer activations of one model, loaded once (e.g. once per Ray actor).

    Two strategies, chosen by device and model (both compute the same function):

    * ``packed`` (causal decoders on CUDA with torch.nn.attention.varlen): sequences are packed end
      to end with no padding, positions restart at each sequence, attention is causal FlashAttention
      over the packed segments, and pooling is a segment mean.
    * ``padded`` (otherwise): length-sorted batches padded to a common length, masked mean.

    Parameters
    ----------
    model : a transformers model (base model or *ForCausalLM / *ForSequenceClassification), or use
        :meth:`from_pretrained`.
    layers : the layer(s) to pool (see :data:`LAYER_DEFINITION`).
    token_budget : maximum tokens (packed) or rows x padded length (padded) per forward pass;
        bounds peak memory whatever the corpus size.
    causal : the model is a causal decoder; "auto" decides from the config.
    packing : "auto" (packed where possible), True (required) or False.
    compile : wrap the truncated model in torch.compile (measured in benchmarks/extraction.py).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        layers: int | Sequence[int],
        *,
        token_budget: int | None = None,
        causal: bool | str = "auto",
        packing: bool | str = "auto",
        pad_multiple: int = 8,
        pad_token_id: int | None = None,
        compile: bool = False,
        model_id: str | None = None,
        model_fingerprint: str | None = None,
    ):
        import torch

        self.layers = [layers] if isinstance(layers, int) else sorted(set(int(x) for x in layers))
        base = getattr(model, "base_model", model)
        owner, attr, blocks = find_blocks(base)
        n_blocks = len(blocks)
        if not self.layers or any(layer_ < 1 or layer_ > n_blocks for layer_ in self.layers):
            raise ValueError(f"layers must lie in [1, {n_blocks}] for this model ({n_blocks} blocks), got {self.layers}")
        # Blocks above the deepest requested layer are removed: they never run.
        setattr(owner, attr, torch.nn.ModuleList(list(blocks)[: max(self.layers)]))
        base._ctd_blocks = (owner, attr, getattr(owner, attr))
        if hasattr(base, "pooler"):
            base.pooler = None
        self.model = base.eval()
        self.config = base.config
        self.device = next(base.parameters()).device
        self.dtype = next(base.parameters()).dtype
        self.hidden_size = int(self.config.hidden_size)
        self.causal = is_causal_config(self.config) if causal == "auto" else bool(causal)
        cuda = self.device.type == "cuda"
        can_pack = cuda and self.causal and _varlen_available()
        if packing is True and not can_pack:
            raise ValueError("packing needs a causal decoder on CUDA and torch.nn.attention.varlen")
        self.strategy = "packed" if (can_pack and packing != False) else "padded"  # noqa: E712
        if self.strategy == "packed":
            _register_varlen_attention()
            self.config._attn_implementation = VARLEN_ATTENTION
        elif self.config._attn_implementation == VARLEN_ATTENTION:
            self.config._attn_implementation = "sdpa"
        # Padded decoders on CUDA run unmasked (right padding: a real token never attends to a pad;
        # SDPA may use its fused causal kernel). On CPU the masked path measured faster.
        self.use_mask = not (self.causal and cuda)
        self.pad_multiple = pad_multiple
        self.pad_token_id = int(pad_token_id if pad_token_id is not None else (getattr(self.config, "pad_token_id", None) or 0))
        self.token_budget = int(token_budget or (131072 if cuda else 2048))
        self.model_id = model_id
        self.model_fingerprint = model_fingerprint
        self._capture = _Capture({})
        blocks_now = getattr(owner, attr)
        for h in getattr(base, "_ctd_hooks", []):  # a model serves one extractor at a time
            h.remove()
        base._ctd_hooks = [blocks_now[layer - 1].register_forward_hook(self._capture.hook(layer)) for layer in self.layers]
        self._forward = torch.compile(self.model, dynamic=True) if compile else self.model

    @classmethod
    def from_pretrained(
        cls, model_dir: str, layers: int | Sequence[int], *, device: str = "auto", dtype: str = "auto", **kw: Any
    ) -> ActivationExtractor:
        import torch

        from .artifacts import model_fingerprint

        dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        dt = {
            "auto": torch.bfloat16 if dev.startswith("cuda") else torch.float32,
            "bf16": torch.bfloat16,
            "fp16": torch.float16,
            "fp32": torch.float32,
        }[dtype]
        model = transformers_models().AutoModel.from_pretrained(model_dir, dtype=dt, attn_implementation="sdpa").to(dev)
        kw.setdefault("model_id", model_id_of(model_dir))
        kw.setdefault("model_fingerprint", model_fingerprint(model_dir))
        return cls(model, layers, **kw)

    def _to_device(self, a: np.ndarray):
        import torch

        t = torch.from_numpy(a)
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t

    def _run_padded(self, idx, ids, lengths):
        import torch

        t = int(-(-lengths[idx[0]] // self.pad_multiple) * self.pad_multiple)
        buf = np.full((idx.size, t), self.pad_token_id, dtype=np.int64)
        for r, i in enumerate(idx):
            buf[r, : lengths[i]] = ids[i]
        lens = self._to_device(lengths[idx])
        mask = torch.arange(t, device=self.device)[None, :] < lens[:, None]
        kwargs = {"attention_mask": mask.long()} if self.use_mask else {}
        self._forward(input_ids=self._to_device(buf), use_cache=False, **kwargs)
        pooled = {}
        for layer in self.layers:
            h = self._capture.out[layer]
            pooled[layer] = (h * mask[..., None].to(h.dtype)).sum(dim=1, dtype=torch.float32) / lens[:, None]
        return pooled

    def _run_packed(self, idx, ids, lengths):
        import torch

        lens = lengths[idx]
        tokens = np.concatenate([ids[i] for i in idx]).astype(np.int64)[None, :]
        positions = (np.arange(tokens.shape[1]) - np.repeat(np.cumsum(lens) - lens, lens))[None, :]
        cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
        segment = self._to_device(np.repeat(np.arange(idx.size), lens))
        lens_d = self._to_device(lens)
        self._forward(
            input_ids=self._to_device(tokens),
            position_ids=self._to_device(positions),
            use_cache=False,
            cu_seq_lens_q=self._to_device(cu),
            cu_seq_lens_k=None,
            max_length_q=int(lens.max()),
            max_length_k=None,
        )
        pooled = {}
        for layer in self.layers:
            h = self._capture.out[layer][0]
            sums = torch.zeros((idx.size, h.shape[-1]), device=self.device, dtype=torch.float32)
            pooled[layer] = sums.index_add_(0, segment, h.float()) / lens_d[:, None]
        return pooled

    def pool(self, ids: Sequence[np.ndarray]) -> dict[int, np.ndarray]:
        """Mean-pooled activations {layer: float32 [n, hidden]} in input order.

        Batches are launched back to back without waiting for the device; results are copied to the
        host once at the end, so host-side batch preparation overlaps device compute."""
        import torch

        n = len(ids)
        out = {layer: np.empty((n, self.hidden_size), dtype=np.float32) for layer in self.layers}
        if n == 0:
            return out
        lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=n)
        if lengths.min() < 1:
            raise ValueError("every row needs at least one token")
        packed = self.strategy == "packed"
        batches = (
            plan_packs(lengths, self.token_budget) if packed else plan_batches(lengths, self.token_budget, self.pad_multiple)
        )
        results = []
        with torch.inference_mode():
            for idx in batches:
                self._capture.out.clear()
                results.append((idx, (self._run_packed if packed else self._run_padded)(idx, ids, lengths)))
            self._capture.out.clear()
            order = np.concatenate([idx for idx, _ in results])
            for layer in self.layers:
                out[layer][order] = torch.cat([r[layer] for _, r in results]).cpu().numpy()
        return out


def run_encoder(
    model: torch.nn.Module,
    ids: Sequence[np.ndarray],
    token_budget: int,
    fn: Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor],
) -> np.ndarray:
    """Run ``fn(model, input_ids, attention_mask)`` over token-budget batches; rows back in order."""
    import torch

    lengths = np.array([len(x) for x in ids], dtype=np.int64)
    device = next(model.parameters()).device
    outs: list = [None] * len(ids)
    with torch.inference_mode():
        for idx in plan_batches(lengths, token_budget):
            t = int(lengths[idx[0]])
            buf = np.zeros((idx.size, t), dtype=np.int64)
            for r, i in enumerate(idx):
                buf[r, : lengths[i]] = ids[i]
            mask = torch.from_numpy((np.arange(t)[None, :] < lengths[idx][:, None]).astype(np.int64)).to(device)
            res = fn(model, torch.from_numpy(buf).to(device), mask).float().cpu().numpy()
            for r, i in enumerate(idx):
                outs[i] = res[r]
    return np.stack(outs) if outs else np.zeros((0,))


def transformers_models() -> Any:
    """The ``transformers`` package, for loading a model, without scikit-learn.

    Loading any transformers model imports its generation utilities, and they import scikit-learn (and
    SciPy through it) whenever it is installed, for one feature we never use (the assistant-model
    threshold of assisted decoding). scikit-learn is installed here for training the probes, and in a
    fresh Ray actor that import is ~2 s of the ~9 s its start costs: ``from transformers import
    AutoModel`` took 5.6 and 6.2 s with it, 3.5 and 4.1 s without (same machine, back to back). So that
    module is imported first while transformers is told scikit-learn is absent (the module keeps that
    answer; the rest of transformers asks the real check again). Code that needs scikit-learn (the
    probes' training) imports it itself and is unaffected; the vLLM judge's engine loads its own model."""
    import sys

    if "transformers.generation.candidate_generator" not in sys.modules:
        import transformers.utils

        real = transformers.utils.is_sklearn_available
        transformers.utils.is_sklearn_available = lambda: False
        try:
            import transformers.generation.candidate_generator  # noqa: F401
        finally:
            transformers.utils.is_sklearn_available = real
    import transformers

    return transformers


def model_id_of(model_dir: str) -> str:
    """A model's id: ``_name_or_path`` from its config when it names a hub id, else the folder name."""
    try:
        with open(os.path.join(model_dir, "config.json")) as f:
            name = json.load(f).get("_name_or_path") or ""
    except OSError:
        name = ""
    if name and not os.path.isabs(name) and "/" in name:
        return name
    return os.path.basename(os.path.normpath(model_dir))


# ----------------------------------------------------------------------------------------------
# cache
# ----------------------------------------------------------------------------------------------
def token_ids_hash(ids: Sequence[np.ndarray]) -> str:
    """sha256 of the token ids of a dataset (covers the texts, the tokenizer and truncation)."""
    import hashlib

    h = hashlib.sha256()
    for x in ids:
        a = np.ascontiguousarray(x, dtype=np.int32)
        h.update(len(a).to_bytes(4, "little"))
        h.update(a.tobytes())
    return h.hexdigest()


def cached_pool(extractor: ActivationExtractor, ids: Sequence[np.ndarray], cache_dir: str | None) -> dict[int, np.ndarray]:
    """:meth:`ActivationExtractor.pool` with an on-disk cache keyed by model fingerprint, layer, the
    data's token-id hash and this module's source (any change to how activations are computed here is a
    new key) (``.npy`` files, loaded without pickle)."""
    if cache_dir is None:
        return extractor.pool(ids)
    import hashlib

    with open(__file__, "rb") as f:
        code = hashlib.sha256(f.read()).hexdigest()[:8]
    folder = os.path.join(cache_dir, f"{(extractor.model_fingerprint or 'unknown')[:16]}-{code}")
    key = token_ids_hash(ids)[:16]
    paths = {layer: os.path.join(folder, f"{key}-L{layer}.npy") for layer in extractor.layers}
    if all(os.path.exists(p) for p in paths.values()):
        return {layer: np.load(p, allow_pickle=False) for layer, p in paths.items()}
    out = extractor.pool(ids)
    os.makedirs(folder, exist_ok=True)
    for layer, p in paths.items():
        tmp = f"{p}.{os.getpid()}.tmp.npy"  # one writer's own file, renamed into place
        np.save(tmp, out[layer], allow_pickle=False)
        os.replace(tmp, p)
    return out
