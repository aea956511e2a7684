"""Loaders for the public datasets in ``../shared/data`` (used by benchmarks and tests).

``high-stakes`` (McKenzie et al. 2025): JSON lines with ``ids``, ``inputs`` (text, or a JSON string
holding a chat) and ``labels``. Label-derived fields (``labels``, ``scale_labels``, ``scale_label_*``,
``label_explanation``, ``high_stakes``) are dropped here, at the boundary: the label is returned as
a separate 0/1 array and nothing that a probe or expert sees can carry it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

__all__ = ["LABEL_DERIVED", "Split", "load_high_stakes", "default_data_dir", "parse_input"]

LABEL_DERIVED = ("labels", "scale_labels", "label_explanation", "high_stakes")


def _label_derived(key: str) -> bool:
    return key in LABEL_DERIVED or key.startswith("scale_label")


def default_data_dir() -> str:
    """``$CTD_DATA_DIR``, else ``../shared/data`` next to the repository."""
    env = os.environ.get("CTD_DATA_DIR")
    if env:
        return env
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # ctd/evaluation/ → the repository
    return os.path.normpath(os.path.join(repo, "..", "shared", "data"))


def parse_input(x: str) -> str | list[dict[str, str]]:
    """A row's input: a chat list when the string is a JSON list of {role, content}, else text."""
    if isinstance(x, str) and x.startswith("["):
        try:
            msgs = json.loads(x)
        except json.JSONDecodeError:
            return x
        if isinstance(msgs, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in msgs):
            return [{"role": str(m["role"]), "content": str(m["content"])} for m in msgs]
    return x


@dataclass
class Split:
    ids: np.ndarray
    inputs: list  # str or list of {role, content}
    labels: np.ndarray  # 0/1, 1 = high-stakes ("unsafe")
    groups: np.ndarray
    metadata: list[dict]

    def __len__(self) -> int:
        return len(self.inputs)

    def subset(self, idx: ArrayLike) -> Split:
        idx = np.asarray(idx)
        return Split(
            self.ids[idx], [self.inputs[i] for i in idx], self.labels[idx], self.groups[idx], [self.metadata[i] for i in idx]
        )


def load_high_stakes(split: str, data_dir: str | None = None) -> Split:
    """One split (train, dev or test) of the high-stakes data; group = file name."""
    root = os.path.join(data_dir or default_data_dir(), "high-stakes", split)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"high-stakes data not found at {root}")
    ids, inputs, labels, groups, meta = [], [], [], [], []
    for fname in sorted(os.listdir(root)):
        if not fname.endswith(".jsonl"):
            continue
        group = fname[: -len(".jsonl")]
        with open(os.path.join(root, fname), encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                row = json.loads(line)
                label = row["labels"]
                if label not in ("high-stakes", "low-stakes"):
                    raise ValueError(f"{fname}: unexpected label {label!r}")
                # The source ids are not unique (test/mts.jsonl has 22 ids naming two different rows
                # each), so a row's id is its file and line; the source id stays in the metadata.
                ids.append(f"{group}:{lineno}")
                inputs.append(parse_input(row["inputs"]))
                labels.append(1 if label == "high-stakes" else 0)
                groups.append(group)
                meta.append(
                    {
                        "source_id": str(row["ids"]),
                        **{k: v for k, v in row.items() if k not in ("ids", "inputs") and not _label_derived(k)},
                    }
                )
    return Split(np.array(ids), inputs, np.array(labels, dtype=np.int64), np.array(groups), meta)
