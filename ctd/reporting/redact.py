"""What a report, a log or a review file may show of a conversation: credentials and personal data out,
cut short.

Redaction works on values (a string, or every string in a JSON-like object), never on finished HTML
or JSON text: a pattern over a rendered page could eat its markup. Nothing here imports matplotlib,
so Ray workers (which cut excerpts) stay light.
"""

from __future__ import annotations

import importlib.abc
import json
import re
import sys
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["redact", "redact_values", "redact_personal", "excerpt", "shown", "cut", "EXCERPT_SOURCE_CHARS"]

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


# A name said as such ("my name is Jane Doe", "I'm Jane", "Name: Jane Doe", "Dr. Doe", "signed, Jane"): one to
# three capitalised words after the cue. Presidio finds names only with a spaCy NER model, which the package
# registries do not carry (spaCy's models come from GitHub: on 2026-12-08, `pip index versions en-core-web-sm`
# answered "No matching distribution"), so a name that no cue introduces passes.
_NAME = re.compile(r"(?i:\b(?:i am|i'm|im|this is|signed,?|regards,|sincerely,?|from:?)\s+)|\b(?:Mr|Mrs|Ms|Miss|Dr|Prof)\.?\s+")
_CAPITALISED = re.compile(r"(?:[A-Z][a-z'\-]+)(?:\s+[A-Z][a-z'\-]+){0,2}\b")
# after a cue that can only introduce a name, any two words are taken as one ("my name is bob smith")
_NAMED = re.compile(
    r"(?i)\b(?:my name is|name is|call me|name\s*:)\s+(?!(?:at|on|in|back|later|now|tomorrow|tonight|when|if|asap)(?:\s|[,.!?;]|$))"
    r"([a-z'\-]+(?:\s+[a-z'\-]+)?)"
)
# Presidio's recognizers: a match below this score is a bare digit run (e.g. any 9 digits as an SSN), kept only
# when one of its recognizer's context words ("ssn", "social security", "phone", ...) stands among the
# _CONTEXT_WORDS words before it: "my SSN is 536221947". Presidio's own context enhancer does the same, but
# on the lemmas of a spaCy model (5 words before, by default), and its analyzer engine needs that model.
_MIN_SCORE = 0.3
_CONTEXT_WORDS = 5
_recognizers: list | None = None


def _presidio() -> list:
    """Presidio's pattern and checksum recognizers for the kinds of personal data an excerpt must not show,
    built once per process (no NLP model is loaded; see :func:`_build` for what its import costs)."""
    global _recognizers
    if _recognizers is None:
        _recognizers = _build()
    return _recognizers


class _Refuse(importlib.abc.MetaPathFinder):
    """Refuses to find ``names`` (ImportError, as for a package that is not installed), only for imports
    made by the thread that created it: the driver's other threads (lease, watch, Ray's) import as usual."""

    def __init__(self, names: Iterable[str]):
        self.names, self.thread = frozenset(names), threading.get_ident()

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> None:
        if fullname in self.names and threading.get_ident() == self.thread:
            raise ModuleNotFoundError(f"No module named {fullname!r} (not loaded for Presidio)", name=fullname)
        return None


@contextmanager
def _unimportable(names: Iterable[str]) -> Iterator[None]:
    """Inside the block, this thread cannot import those of ``names`` not imported yet (one imported
    already is simply there). What was imported inside keeps what it concluded: here spaCy's thinc takes
    torch as absent and Presidio's device detector says "cpu", for the rest of the process; nothing of
    ours uses either."""
    refuse = _Refuse(names)
    sys.meta_path.insert(0, refuse)
    try:
        yield
    finally:
        sys.meta_path.remove(refuse)


def _build() -> list:
    """Presidio's package imports every NLP engine it supports, and with them the optional packages they
    would use: transformers' pipelines and torch (through spaCy's thinc), ~7 of the ~9 s its import took in
    a fresh audit driver, for recognizers that use neither. While it loads they are made unimportable (if
    not imported already) for this thread, so Presidio and thinc take them as absent: 8.6 s -> 1.4 s
    (measured in a fresh process), and a driver that loads no model never imports torch. This runs in the
    calling thread: an earlier attempt imported Presidio in a background thread and the main thread's own
    imports failed."""
    import tldextract

    with _unimportable(("torch", "transformers", "transformers.pipelines")):
        from presidio_analyzer.predefined_recognizers import (
            CreditCardRecognizer,
            EmailRecognizer,
            IbanRecognizer,
            IpRecognizer,
            NhsRecognizer,
            PhoneRecognizer,
            UkNinoRecognizer,
            UsItinRecognizer,
            UsSsnRecognizer,
        )

    offline = tldextract.TLDExtract(suffix_list_urls=())  # the public suffix list shipped with tldextract

    class Email(EmailRecognizer):  # Presidio's check fetches the suffix list from the web; a night does not
        def validate_result(self, pattern_text: str) -> bool:
            return offline(pattern_text).fqdn != ""

    class Ssn(UsSsnRecognizer):  # Presidio passes the well-known example numbers; an excerpt does not show them
        def invalidate_result(self, pattern_text: str) -> bool:
            digits = "".join(c for c in pattern_text if c.isdigit())
            return False if digits in ("123456789", "987654320", "078051120") else super().invalidate_result(pattern_text)

    return [  # the more specific first: where two find the same span, the first names it
        Email(),
        Ssn(),
        UsItinRecognizer(),
        UkNinoRecognizer(),
        NhsRecognizer(),
        CreditCardRecognizer(),
        IbanRecognizer(),
        IpRecognizer(),
        PhoneRecognizer(),  # also matches an IP address or an NHS number
    ]


def _in_context(text: str, start: int, words: list[str] | None) -> bool:
    """One of ``words`` (a recognizer's context words; several-word ones too) among the
    :data:`_CONTEXT_WORDS` words before ``start``, case ignored."""
    before = " ".join(re.findall(r"[^\W_]+", text[:start].lower())[-_CONTEXT_WORDS:])
    return any(re.search(rf"\b{re.escape(w.strip())}\b", before) for w in words or () if w.strip())


def redact_personal(text: str) -> str:
    """Personal data replaced by its kind in angle brackets: e-mail addresses, phone numbers, national ids
        (US SSN and ITIN, UK NINO and NHS number), card numbers (Luhn checksum), IBANs (checksum) and IP
        addresses, found by Presidio's recognizers; and names a cue introduces (``_NAME``), e.g.
        "I am Jane Doe" → "I am <PERSON>". Overlapping finds are merged into one span, named by the find that
    starts first (the longer, then the more specific recognizer, on a tie)."""
    spans: list[tuple[int, int, int, str]] = []  # start, end, priority, kind
    for k, rec in enumerate(_presidio()):
        found = rec.analyze(text, rec.supported_entities, None)
        spans += [
            (r.start, r.end, k, r.entity_type) for r in found if r.score >= _MIN_SCORE or _in_context(text, r.start, rec.context)
        ]
    for m in _NAME.finditer(text):
        name = _CAPITALISED.match(text, m.end())
        if name:
            spans.append((name.start(), name.end(), -1, "PERSON"))
    spans += [(m.start(1), m.end(1), -1, "PERSON") for m in _NAMED.finditer(text)]
    merged: list[list] = []
    for start, stop, _, kind in sorted(spans, key=lambda s: (s[0], -s[1], s[2])):
        if merged and start < merged[-1][1]:  # overlaps the previous find: one span, the first find's kind
            merged[-1][1] = max(merged[-1][1], stop)
        else:
            merged.append([start, stop, kind])
    out, at = [], 0
    for start, stop, kind in merged:
        out += [text[at:start], f"<{kind}>"]
        at = stop
    return "".join(out) + text[at:]


def shown(text: str | None, chars: int) -> str | None:
    """An excerpt as a reader is shown it: personal data out (:func:`redact_personal`), then cut to
    ``chars``. Only the first ``chars`` + 256 characters are searched (a find that starts within the cut
    is caught whole unless longer than 256 characters), so the cost does not grow with the text."""
    if text is None or chars <= 0:
        return None
    return cut(redact_personal(text[: chars + 256]), chars)


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
