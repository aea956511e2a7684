"""The high-stakes loader: counts, groups, and no label-derived field reaching a probe or expert."""

import numpy as np

from ctd.evaluation.datasets import LABEL_DERIVED, load_high_stakes


def test_high_stakes_splits_counts_and_no_label_leak(data_dir):
    expected = {
        "train": {"synthetic_prompts": 1319},
        "dev": {"anthropic": 1004, "mt": 192, "mts": 364, "toolace": 236},
        "test": {"anthropic": 312, "mt": 722, "mts": 132, "toolace": 654},
    }
    for split, groups in expected.items():
        sp = load_high_stakes(split, data_dir)
        assert dict(zip(*np.unique(sp.groups, return_counts=True))) == groups
        assert set(np.unique(sp.labels)) == {0, 1}
        assert len(set(sp.ids.tolist())) == len(sp)  # file:line ids are unique...
        if split == "test":  # ...although the source ids are not: 22 in mts.jsonl name two different rows
            src = [m["source_id"] for m, g in zip(sp.metadata, sp.groups) if g == "mts"]
            assert len(src) - len(set(src)) == 22
        for meta in sp.metadata:
            assert not any(k in LABEL_DERIVED or k.startswith("scale_label") for k in meta), meta.keys()
        # the inputs a model sees are the text or chat only
        assert all(isinstance(x, str) or (isinstance(x, list) and set(x[0]) == {"role", "content"}) for x in sp.inputs)
