"""Artifacts: arrays as safetensors plus JSON metadata with a content hash. Never pickle.

An artifact at ``<uri>`` is two objects: ``<uri>.safetensors`` (the arrays) and ``<uri>.json``
(metadata, including ``content_hash`` = sha256 over the arrays' names, dtypes, shapes and bytes and
over the canonical JSON of the rest of the metadata). Loading recomputes the hash and refuses a
tampered artifact; callers then check that the metadata fits what they are about to do
(:func:`require_match`).
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from .. import storage
from ..hashing import canonical_json

__all__ = [
    "ArtifactError",
    "content_hash",
    "save_artifact",
    "load_artifact",
    "require_match",
    "model_fingerprint",
    "tokenizer_fingerprint",
]


class ArtifactError(ValueError):
    """A missing, tampered or mismatched artifact."""


def content_hash(arrays: dict[str, np.ndarray], meta: dict) -> str:
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(name.encode())
        h.update(str(a.dtype).encode())
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    h.update(canonical_json({k: v for k, v in meta.items() if k != "content_hash"}))
    return h.hexdigest()


def save_artifact(uri: str, arrays: dict[str, np.ndarray], meta: dict) -> dict:
    """Write ``<uri>.safetensors`` then ``<uri>.json``; returns the metadata with its content hash."""
    arrays = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    meta = dict(meta)
    meta["content_hash"] = content_hash(arrays, meta)
    storage.write_bytes(f"{uri}.safetensors", st_save(arrays))
    storage.write_json(f"{uri}.json", meta)
    return meta


def load_artifact(uri: str) -> tuple[dict[str, np.ndarray], dict]:
    try:
        meta = storage.read_json(f"{uri}.json")
        raw = storage.read_bytes(f"{uri}.safetensors")
    except FileNotFoundError as e:
        raise ArtifactError(f"artifact not found: {uri} ({e})") from None
    except json.JSONDecodeError as e:
        raise ArtifactError(f"artifact metadata {uri}.json is not valid JSON: {e}") from None
    try:
        arrays = st_load(raw)
    except Exception as e:  # safetensors raises its own error types
        raise ArtifactError(f"artifact {uri}.safetensors is not a valid safetensors file: {e}") from None
    expected = meta.get("content_hash")
    actual = content_hash(arrays, meta)
    if expected != actual:
        raise ArtifactError(
            f"artifact {uri} failed its integrity check: content hash {actual[:12]}… != recorded {str(expected)[:12]}… "
            "(the weights or metadata were modified after it was written)"
        )
    return arrays, meta


def require_match(meta: dict, what: str, **expected) -> None:
    """Raise ArtifactError naming every field of ``meta`` that differs from ``expected``."""
    bad = [
        f"{k}: artifact has {meta.get(k)!r}, expected {v!r}" for k, v in expected.items() if v is not None and meta.get(k) != v
    ]
    if bad:
        raise ArtifactError(f"{what} does not match this run: " + "; ".join(bad))


def model_fingerprint(model_dir: str) -> str:
    """A cheap identity for a Hugging Face model folder: sha256 of config.json and of each weights
    file's size and safetensors header (tensor names, dtypes, shapes, offsets) plus its first and
    last MiB. Reading whole multi-GB checkpoints on every start is not worth it; a swapped or
    re-trained checkpoint changes these bytes."""
    h = hashlib.sha256()
    names = sorted(os.listdir(model_dir))
    if "config.json" not in names:
        raise ArtifactError(f"{model_dir} is not a Hugging Face model folder (no config.json)")
    with open(os.path.join(model_dir, "config.json"), "rb") as f:
        h.update(canonical_json(json.load(f)))
    for name in names:
        if not name.endswith((".safetensors", ".bin")):
            continue
        path = os.path.join(model_dir, name)
        size = os.path.getsize(path)
        h.update(name.encode())
        h.update(str(size).encode())
        with open(path, "rb") as f:
            h.update(f.read(1 << 20))
            if size > 2 << 20:
                f.seek(-(1 << 20), os.SEEK_END)
                h.update(f.read(1 << 20))
    return h.hexdigest()


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
    "added_tokens.json",
)


def tokenizer_fingerprint(model_dir: str) -> str:
    """sha256 of a model folder's tokenizer files (vocabulary, merges, special tokens, chat template):
    what turns a conversation into token ids, which the model's own fingerprint does not cover."""
    h = hashlib.sha256()
    for name in sorted(n for n in os.listdir(model_dir) if n in TOKENIZER_FILES):
        h.update(name.encode() + b"\0")
        with open(os.path.join(model_dir, name), "rb") as f:
            h.update(hashlib.sha256(f.read()).digest())
    return h.hexdigest()
