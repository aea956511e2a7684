"""Train/serve consistency: p(x) and d(x) computed inside the Ray activation actors (stage 1 of every
job) equal the offline probes applied to ``ActivationExtractor`` output for the same rows, for a
decoder (the tiny Llama, plain and chat rows) and an encoder (MiniLM).

Tolerance: 1e-5 absolute on P(unsafe) and d(x). Both paths run the same float32 model on the CPU;
they differ only in how rows are batched (the actor batches by token budget, per Ray block), which
moves the pooled features by float32 rounding (~1e-7 relative). A wrong layer, pooling, tokenisation
(a second BOS, chat rows rendered another way) or probe moves them by orders of magnitude more.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from conftest import base_config

TOL = 1e-5


def corpus_rows(n: int, chat: bool) -> list[dict]:
    rng = np.random.default_rng(0)
    words = "the a audit model safety probe conversation expert judge night budget shift user assistant".split()
    rows = []
    for i in range(n):
        text = " ".join(rng.choice(words, size=int(rng.integers(3, 40))))
        if chat and i % 3 == 0:
            rows.append(
                {"id": f"r{i:03d}", "messages": [{"role": "user", "content": text}, {"role": "assistant", "content": text[::-1]}]}
            )
        else:
            rows.append({"id": f"r{i:03d}", "text": text})
    return rows


@pytest.mark.parametrize("which", ["decoder", "encoder"])
def test_actor_scores_equal_offline_probes(which, request, ray_head, tmp_path):
    from ctd.config import load_config
    from ctd.model.activations import ActivationExtractor, TextEncoder
    from ctd.model.deployment import Deployment
    from ctd.model.probes import fit_dv_probe, fit_safety_probe
    from ctd.pipeline.corpus import row_input
    from ctd.pipeline.raydata import init_ray
    from ctd.pipeline.scoring import activation_spec, run_stage1
    from ctd.tables import read_parquet

    model_dir = request.getfixturevalue("tiny_llama" if which == "decoder" else "minilm_dir")
    layer, max_length = 2, 32  # short enough that some rows are cut: truncation must match too
    rows = corpus_rows(60, chat=which == "decoder")
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    inputs = [r["text"] if "text" in r else r["messages"] for r in rows]

    # offline: the extractor on the encoder's ids, probes fitted on those features
    enc = TextEncoder(model_dir, max_length=max_length)
    ids, truncated = enc.encode([row_input(json.dumps(x), True) if not isinstance(x, str) else x for x in inputs])
    assert truncated.any() and not truncated.all()
    ex = ActivationExtractor.from_pretrained(model_dir, [layer])
    z = ex.pool(ids)[layer]
    meta = {"model_fingerprint": ex.model_fingerprint, "layer": layer, "pooling": "mean"}
    rng = np.random.default_rng(1)
    a, b = np.argsort(z.std(axis=0))[-2:]  # two features that vary across rows
    safety = fit_safety_probe(z, (z[:, a] > np.median(z[:, a])).astype(int), meta=dict(meta), cv=3)
    dv = fit_dv_probe(
        z, np.clip(np.tanh((z[:, b] - z[:, b].mean()) / z[:, b].std()) + 0.1 * rng.normal(size=len(z)), -1, 1), meta=dict(meta)
    )
    probes = {"safety": str(tmp_path / "probes" / "safety"), "dv": str(tmp_path / "probes" / "dv")}
    safety.save(probes["safety"])
    dv.save(probes["dv"])
    offline = {"probe": safety.predict(z), "dv": dv.predict(z)}

    # served: stage 1 on the session's Ray head, several actor batches
    cfg_dict = base_config(
        str(tmp_path),
        "",
        **{
            "model.path": model_dir,
            "model.id": which,
            "model.layer": layer,
            "model.max_length": max_length,
            "probes.safety": probes["safety"],
            "probes.dv": probes["dv"],
            "activations.batch_size": 16,
            "ray.address": ray_head["address"],
        },
    )
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg_dict))
    cfg = load_config(str(path))
    init_ray(cfg.ray)
    dep = Deployment.load(cfg.model, cfg.probes)
    s1 = run_stage1(
        str(corpus),
        str(tmp_path / "stage1"),
        activation_spec(cfg.model, cfg.activations, safety=dep.safety, dv=dep.dv),
        cfg.activations,
    )
    assert s1.rows == len(rows)
    import pyarrow as pa

    t = pa.concat_tables([read_parquet(f, ["id", "probe", "dv", "truncated", "error"]) for f in s1.files])
    assert t.column("error").null_count == len(rows)
    got = {i: k for k, i in enumerate(t.column("id").to_pylist())}
    order = [got[r["id"]] for r in rows]
    assert np.array_equal(np.asarray(t.column("truncated").to_pylist())[order], truncated)
    for col in ("probe", "dv"):
        served = np.asarray(t.column(col).to_numpy(zero_copy_only=False), dtype=float)[order]
        gap = float(np.max(np.abs(served - offline[col])))
        assert gap <= TOL, f"{which} {col}: the actor's scores differ from the offline probe by {gap:.3g}"
    assert np.std(offline["probe"]) > 1e-3 and np.std(offline["dv"]) > 1e-3  # not a constant that trivially matches
