"""An LLM judge: P(unsafe) from the first generated token's logprobs over the label tokens.

The judge is asked a yes/no question (``prompt_template`` with ``{conversation}``) and generates one
token with ``temperature=0`` and ``logprobs=k``. The returned top-k logprobs are raw (before any
logit processor), so we renormalise over the label tokens ourselves:

    P(unsafe) = sum_{t in unsafe tokens} exp(lp_t) / sum_{t in unsafe ∪ safe tokens} exp(lp_t)

Defined result when a label token is outside the top-k: its probability is at most the smallest
probability in the top-k, so we use that bound in its place (status ``"<label>_outside_topk"``);
when no label token is in the top-k at all, P(unsafe) = 0.5 (status ``"no_label_token"``): the
judge did not answer the question, and the row's final score then falls back to the probe (see
:func:`ctd.policies.cascade_scores` callers in the pipeline).

The same parsing serves the vLLM engine (token-id keyed logprobs from ``ray.data.llm``) and an
OpenAI-compatible HTTP endpoint (token-string keyed ``top_logprobs``).
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

__all__ = ["render_prompt", "label_token_ids", "p_unsafe_from_logprobs", "conversation_text", "STATUS_OK"]

STATUS_OK = "ok"


def conversation_text(x, max_chars: int = 16000) -> str:
    """A row's input as plain text for the judge: chats as "role: content" lines, cut to max_chars
    (keeping the end, where the latest turn is)."""
    if isinstance(x, str):
        text = x
    else:
        text = "\n".join(f"{m['role']}: {m['content']}" for m in x)
    return text if len(text) <= max_chars else "…" + text[-max_chars:]


def render_prompt(template: str, x, max_chars: int = 16000) -> str:
    if "{conversation}" not in template:
        raise ValueError("prompt_template must contain {conversation}")
    return template.replace("{conversation}", conversation_text(x, max_chars))


def label_token_ids(tokenizer, label_tokens: Mapping[str, Sequence[str]]) -> dict[str, list[int]]:
    """Token ids of each label's strings; each string must be exactly one token."""
    out: dict[str, list[int]] = {}
    for label in ("unsafe", "safe"):
        ids = []
        for s in label_tokens[label]:
            enc = tokenizer.encode(s, add_special_tokens=False)
            if len(enc) != 1:
                raise ValueError(f"label token {s!r} ({label}) is {len(enc)} tokens for this judge's tokenizer; use single-token labels")
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
        return 0.5, "no_label_token"
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
        return 0.5, "no_label_token"
    status = STATUS_OK if not missing else f"{missing[0]}_outside_topk"
    return mass["unsafe"] / (mass["unsafe"] + mass["safe"]), status
