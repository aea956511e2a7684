"""What a report, a log or a review file may show of a conversation: credentials out, cut short.

Redaction works on values (a string, or every string in a JSON-like object), never on finished HTML
or JSON text: a pattern over a rendered page could eat its markup. Nothing here imports matplotlib,
so Ray workers (which cut excerpts) stay light.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any

__all__ = ["redact", "redact_values", "excerpt", "cut", "EXCERPT_SOURCE_CHARS"]

# Stage 1 keeps excerpts this long (the longest audit.excerpt_chars allows); a report cuts them to its
# own length, so the excerpt length is a presentation setting, not part of what stage 1 computes.
EXCERPT_SOURCE_CHARS = 2000

# Anything shaped like a credential: AWS key ids, bearer and basic auth, provider API keys (OpenAI-,
# GitHub-, Slack-style), JWTs, PEM private keys, and key=value secrets. (Not any long hex run: the
# reports carry content hashes.)
_SHAPED = [
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?(-----END [A-Z ]*PRIVATE KEY-----|$)", re.S),
    re.compile(r"\b(AKIA|ASIA)[A-Z0-9]{16}\b"),
    re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=\-]{8,}"),
    re.compile(r"\bsk-[A-Za-z0-9_\-]{20,}"),
    re.compile(r"\bgh[pousr]_[A-Za-z0-9]{30,}"),
    re.compile(r"\bxox[abprs]-[A-Za-z0-9\-]{10,}"),
    re.compile(r"\beyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}"),
]
_KEY_VALUE = re.compile(
    r"(?i)(aws_secret_access_key|secret|password|passwd|token|api[_-]?key)(\s*[=:]\s*\"?|\"\s*:\s*\"|\s+is\s+)([^\s\"',;]+)"
)


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """Replace known secret values and anything shaped like a credential with ``***``."""
    for s in secrets:
        if s and len(s) >= 4:
            text = text.replace(s, "***")
    for pat in _SHAPED:  # before key=value, which would otherwise eat "Bearer" and leave the token
        text = pat.sub("***", text)
    return _KEY_VALUE.sub(lambda m: m.group(1) + m.group(2) + "***", text)


def redact_values(obj: Any, secrets: Iterable[str] = ()) -> Any:
    """Every string inside a JSON-like object (dict keys included) through :func:`redact`."""
    secrets = list(secrets)
    if isinstance(obj, str):
        return redact(obj, secrets)
    if isinstance(obj, dict):
        out: dict = {}
        for k, v in obj.items():
            k, v = redact_values(k, secrets), redact_values(v, secrets)
            if k in out and isinstance(out[k], int) and isinstance(v, int):
                v += out[k]  # two counts whose keys redact alike (two reasons naming two secrets) are one count
            out[k] = v
        return out
    if isinstance(obj, (list, tuple)):
        return [redact_values(v, secrets) for v in obj]
    return obj


def cut(text: str | None, chars: int) -> str | None:
    """``text`` cut to ``chars`` characters, the last one "…" when anything was cut."""
    if text is None:
        return None
    return text if len(text) <= chars else text[: max(chars - 1, 0)].rstrip() + "…"


def excerpt(text: str | None, chars: int, secrets: Iterable[str] = (), is_chat: bool = False) -> str | None:
    """A short, redacted, one-line excerpt of a conversation for a reviewer: a chat's messages as
    "role: content / ...", whitespace collapsed, then secrets and credential-shaped strings replaced
    (:func:`redact`, on the whole text before it is cut, so a cut never leaves part of a key), cut to
    ``chars`` characters with "…". ``chars`` 0: no excerpt (None)."""
    if chars <= 0 or text is None or not str(text).strip():
        return None
    if is_chat:
        try:
            msgs = json.loads(text)
            text = " / ".join(f"{m.get('role', '?')}: {m.get('content', '')}" for m in msgs if isinstance(m, dict))
        except (ValueError, AttributeError):
            pass
    return cut(redact(" ".join(str(text).split()), secrets), chars)
