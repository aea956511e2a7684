"""An LLM judge: P(unsafe) from the first generated token's logprobs over the label tokens.

The judge is asked a yes/no question (``prompt_template`` with ``{conversation}``) and generates one
token with ``temperature=0`` and ``logprobs=k``. The returned top-k logprobs are raw (before any
logit processor), so we renormalise over the label tokens ourselves:

    P(unsafe) = sum_{t in unsafe tokens} exp(lp_t) / sum_{t in unsafe ∪ safe tokens} exp(lp_t)

Defined result when a label token is outside the top-k: its probability is at most the smallest
probability in the top-k, so we use that bound in its place (status ``"<label>_outside_topk"``);
when no label token is in the top-k at all, P(unsafe) = 0.5 (status ``"no_label_token"``): the
judge did not answer the question, and the row's final score then falls back to the probe
(:class:`ExpertStatus`: only "ok" and "<label>_outside_topk" answers are usable).

The same parsing serves the vLLM engine (token-id keyed logprobs from ``ray.data.llm``) and an
OpenAI-compatible HTTP endpoint (token-string keyed ``top_logprobs``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from ..model.activations import MAX_TOKEN_CHARS

if TYPE_CHECKING:
    import pyarrow as pa
    from transformers import PreTrainedTokenizerBase

    from ..config import HTTPExpertConfig, VLLMExpertConfig

__all__ = [
    "JudgePrompt",
    "render_prompt",
    "label_token_ids",
    "p_unsafe_from_logprobs",
    "conversation_text",
    "error_status",
    "ExpertStatus",
    "usable",
    "judge_prompt",
    "render",
    "check_llm_judge",
    "LLM_JUDGE_IDENTITY",
    "STATUS_OK",
    "CUT_MARK",
]

STATUS_OK = "ok"
NO_LABEL = "no_label_token"
OUTSIDE_TOPK = "_outside_topk"
ERROR = "error: "
CUT_MARK = "\n[... {n} characters cut ...]\n"


@dataclass(frozen=True)
class ExpertStatus:
    """The ``expert_status`` of a judged row, typed. Stored as text in the results:

    ``ok``                       answered; P(unsafe) over the label tokens
    ``<label>_outside_topk``     answered; one label's probability bounded by the top-k floor
    ``no_label_token``           no label token among the top-k: not an answer
    ``error: <reason>``          the call failed (a bounded reason, :func:`error_status`)
    """

    kind: Literal["ok", "outside_topk", "no_label_token", "error"]
    detail: str | None = None  # the label outside the top-k, or the error's reason

    @classmethod
    def parse(cls, text: str) -> ExpertStatus:
        if text == STATUS_OK:
            return cls("ok")
        if text == NO_LABEL:
            return cls("no_label_token")
        if text.endswith(OUTSIDE_TOPK):
            return cls("outside_topk", text[: -len(OUTSIDE_TOPK)])
        if text.startswith(ERROR):
            return cls("error", text[len(ERROR) :])
        return cls("error", text)

    @property
    def usable(self) -> bool:
        """The expert answered: its score replaces the probe's."""
        return self.kind in ("ok", "outside_topk")

    def __str__(self) -> str:
        return {"ok": STATUS_OK, "no_label_token": NO_LABEL}.get(self.kind) or (
            f"{self.detail}{OUTSIDE_TOPK}" if self.kind == "outside_topk" else f"{ERROR}{self.detail}"
        )


def usable(status: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """:attr:`ExpertStatus.usable` over an Arrow string array of statuses (null: not judged, False)."""
    import pyarrow.compute as pc

    s = pc.fill_null(status, "")
    return pc.or_(pc.equal(s, STATUS_OK), pc.ends_with(s, OUTSIDE_TOPK))


def conversation_text(x: str | list[dict]) -> str:
    """A row's input as plain text for the judge: chats as "role: content" lines."""
    if isinstance(x, str):
        return x
    return "\n".join(f"{m['role']}: {m['content']}" for m in x)


def render_prompt(template: str, x: str | list[dict]) -> str:
    if "{conversation}" not in template:
        raise ValueError("prompt_template must contain {conversation}")
    return template.replace("{conversation}", conversation_text(x))


class JudgePrompt:
    """The judge's input, as token ids of the judge's own tokenizer, fitted to its context.

    The prompt is ``template`` with the conversation in place of ``{conversation}``; with
    ``chat=True`` it is sent as one user message through the tokenizer's chat template (with the
    generation prompt), exactly as vLLM's chat path renders it. The vLLM pool and the HTTP judge both
    send these ids, so they are the same judge.

    A conversation longer than the room left by the template and the one-token answer
    (``max_model_len`` − template tokens − 1) is cut in tokens: the first ``head_fraction`` of the
    room is kept from its start (the request, the system prompt) and the rest from its end (the
    latest turns), with ``CUT_MARK`` between them saying how many characters were dropped.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        template: str,
        max_model_len: int,
        *,
        chat: bool = False,
        head_fraction: float = 0.25,
    ):
        if "{conversation}" not in template:
            raise ValueError("prompt_template must contain {conversation}")
        if chat and not getattr(tokenizer, "chat_template", None):
            raise ValueError("apply_chat_template is on but the judge's tokenizer has no chat template")
        self.tok, self.template, self.chat, self.head_fraction = tokenizer, template, chat, head_fraction
        self.limit = max_model_len - 1  # the answer token
        self.room = self.limit - len(self._ids(""))
        if self.room < 32:
            raise ValueError(
                f"max_model_len {max_model_len} leaves {self.room} tokens for the conversation after the prompt template"
            )

    def _ids(self, conversation: str) -> list[int]:
        text = self.template.replace("{conversation}", conversation)
        if self.chat:
            text = self.tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
            return self.tok(text, add_special_tokens=False)["input_ids"]
        return self.tok(text)["input_ids"]  # as vLLM tokenizes a text prompt

    def __call__(self, x: str | list[dict]) -> tuple[list[int], bool]:
        """(token ids, truncated) of one row's input (text or chat messages)."""
        text = conversation_text(x)
        span = self.room * MAX_TOKEN_CHARS
        offsets = lambda t: self.tok(t, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]  # noqa: E731
        if len(text) <= 2 * span:
            heads = tails = offsets(text)
            tail_base = 0
            if len(heads) <= self.room:
                ids = self._ids(text)
                if len(ids) <= self.limit:
                    return ids, False
        else:  # only the two ends can be kept: tokenise those, not the megabytes between them
            heads, tail_base = offsets(text[:span]), len(text) - span
            tails = offsets(text[tail_base:])
        keep = self.room - len(self.tok(CUT_MARK.format(n=len(text)), add_special_tokens=False)["input_ids"])
        for _ in range(8):  # tokens can merge across the cut: shrink until the rendered prompt fits
            head = min(max(1, int(keep * self.head_fraction)), len(heads))
            tail = min(max(1, keep - head), len(tails))
            h_end, t_start = heads[head - 1][1], tail_base + tails[len(tails) - tail][0]
            cut = text[:h_end] + CUT_MARK.format(n=t_start - h_end) + text[t_start:]
            ids = self._ids(cut)
            if len(ids) <= self.limit:
                return ids, True
            keep -= len(ids) - self.limit + 2
            if keep < 2:
                break
        raise ValueError(f"cannot fit the conversation into {self.limit + 1} tokens")


def error_status(reason: object) -> str:
    """``error: <reason>`` with a bounded vocabulary: numbers (except an HTTP status code), quoted
    text and anything after the first line are dropped, so that a report counts failures per kind, not per row."""
    lines = str(reason or "").strip().splitlines()
    r = lines[0] if lines else "no reason given"
    r = re.sub(r"(?<!\w)'[^']*'(?!\w)|\"[^\"]*\"", "…", r)  # quoted values (not the apostrophe of "model's")
    codes: list[str] = []  # HTTP status codes are kept (a bounded set); every other number becomes N

    def hold(m):
        codes.append(m.group(1))
        return "HTTP \x00"

    r = re.sub(r"\d+(\.\d+)*", "N", re.sub(r"\bHTTP (\d{3})\b", hold, r))
    for c in codes:
        r = r.replace("\x00", c, 1)
    return ERROR + r[:160]


def label_token_ids(tokenizer: PreTrainedTokenizerBase, label_tokens: Mapping[str, Sequence[str]]) -> dict[str, list[int]]:
    """Token ids of each label's strings; each string must be exactly one token."""
    out: dict[str, list[int]] = {}
    for label in ("unsafe", "safe"):
        ids = []
        for s in label_tokens[label]:
            enc = tokenizer.encode(s, add_special_tokens=False)
            if len(enc) != 1:
                raise ValueError(
                    f"label token {s!r} ({label}) is {len(enc)} tokens for this judge's tokenizer; use single-token labels"
                )
            ids.append(int(enc[0]))
        out[label] = sorted(set(ids))
    if set(out["unsafe"]) & set(out["safe"]):
        raise ValueError("the unsafe and safe label tokens overlap")
    return out


def p_unsafe_from_logprobs(top: Mapping, labels: Mapping[str, Sequence]) -> tuple[float, str]:
    """(P(unsafe), status) from one position's top-k logprobs ``{token: logprob}`` (token ids or
    strings, matching ``labels``' keys). Values may also be dicts with a ``logprob`` field."""
    lps = {}
    for tok, val in top.items():
        lp = val["logprob"] if isinstance(val, Mapping) else val
        lp = float(lp)
        if math.isfinite(lp):
            lps[tok] = lp
    if not lps:
        return 0.5, NO_LABEL
    floor = min(lps.values())
    mass, missing = {}, []
    for label in ("unsafe", "safe"):
        present = [math.exp(lps[t]) for t in labels[label] if t in lps]
        if present:
            mass[label] = sum(present)
        else:
            mass[label] = math.exp(floor)
            missing.append(label)
    if len(missing) == 2:
        return 0.5, NO_LABEL
    status = STATUS_OK if not missing else f"{missing[0]}{OUTSIDE_TOPK}"
    return mass["unsafe"] / (mass["unsafe"] + mass["safe"]), status


# ----------------------------------------------------------------------------------------------
# the prompt of a configured LLM judge (vLLM pool or HTTP endpoint: the same judge)
# ----------------------------------------------------------------------------------------------
# what makes two LLM judges give the same score to a row (the HTTP judge adds its tokenizer)
LLM_JUDGE_IDENTITY = (
    "model",
    "prompt_template",
    "apply_chat_template",
    "label_tokens",
    "top_logprobs",
    "max_model_len",
    "head_fraction",
)


def judge_prompt(cfg: VLLMExpertConfig | HTTPExpertConfig) -> JudgePrompt:
    """The :class:`JudgePrompt` of an ``expert.vllm`` or ``expert.http`` section (its tokenizer: the
    section's ``tokenizer`` folder, else its model's)."""
    from transformers import AutoTokenizer

    from ..config import resolve_model_path

    tokenizer = resolve_model_path(getattr(cfg, "tokenizer", None) or cfg.model)
    return JudgePrompt(
        AutoTokenizer.from_pretrained(tokenizer),
        cfg.prompt_template,
        cfg.max_model_len,
        chat=cfg.apply_chat_template,
        head_fraction=cfg.head_fraction,
    )


def check_llm_judge(cfg: VLLMExpertConfig | HTTPExpertConfig, kind: str) -> JudgePrompt:
    """Refuse, before any work, an LLM judge whose prompt cannot be built: label tokens that are not
    single tokens, a template that leaves no room in the context, chat mode without a chat template."""
    from ..config import ConfigError

    try:
        prompt = judge_prompt(cfg)
        label_token_ids(prompt.tok, cfg.label_tokens.model_dump())
    except (ValueError, OSError) as e:
        raise ConfigError(f"expert.{kind}: {e}") from None
    return prompt


def render(prompt: JudgePrompt, text: str, is_chat: bool) -> tuple[list[int] | None, bool, str | None]:
    """(ids, truncated, error) of one row; a row whose input cannot be rendered gets an error, not a crash."""
    from ..pipeline.corpus import row_input

    try:
        ids, cut = prompt(row_input(text, is_chat))
        return ids, cut, None
    except Exception as e:  # malformed chat JSON, a tokenizer failure: this row, not the batch
        return None, False, error_status(f"prompt: {type(e).__name__}: {e}")
