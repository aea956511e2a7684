"""The README's demo figures from a finished demo run (``python -m jobs.demo --out <out>``): per night,
the probe's and the final score's AUROC and accuracy on the published results, the share sent to the
judge and the drift e-detector; the report's estimate of what the probe misses and
the quality alarms that fired; per group on the calibration rows (expert on every row), probe and
expert accuracy and the mean DV score. Reads only published files; writes JSON.

    python benchmarks/demo_figures.py --out out/demo2 --json benchmarks/results/demo_figures.json
"""

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ctd import storage  # noqa: E402
from ctd.runs.folder import list_runs, read_run_table, run_file  # noqa: E402
from ctd.stats.metrics import auroc  # noqa: E402
from ctd.tables import read_parquet  # noqa: E402


def accuracy(score, y) -> float:
    return float(((score >= 0.5) == (y == 1)).mean())


def recall(score, y) -> float:
    """Share of the labelled-unsafe rows flagged (score >= 0.5)."""
    return float((score[y == 1] >= 0.5).mean()) if (y == 1).any() else float("nan")


def corpus_stats(uri: str) -> dict:
    """What the night's traffic looks like: rows, distinct texts, words per conversation, multi-turn share."""
    texts, chats = [], 0
    for line in open(uri, "rb"):
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if not isinstance(r, dict) or r.get("label") not in (0, 1):
            continue
        msgs = r.get("messages")
        if isinstance(msgs, list) and all(isinstance(m, dict) for m in msgs):
            texts.append(" ".join(str(m.get("content", "")) for m in msgs))
            chats += len(msgs) > 1
        elif isinstance(r.get("text"), str):
            texts.append(r["text"])
    words = np.array([len(t.split()) for t in texts])
    return {
        "rows": len(texts),
        "distinct_texts": round(len(set(texts)) / max(len(texts), 1), 3),
        "median_words": float(np.median(words)) if len(words) else None,
        "multi_turn": round(chats / max(len(texts), 1), 3),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="out/demo", help="the demo's output folder")
    ap.add_argument("--json", default="benchmarks/results/demo_figures.json")
    args = ap.parse_args(argv)
    nights = []
    for rid in list_runs(args.out):
        t = read_run_table(args.out, rid).to_pydict()
        rep = storage.read_json(run_file(args.out, rid, "report.json"))
        y, p, f = np.array(t["label"], float), np.array(t["probe"]), np.array(t["final"])
        nights.append(
            {
                "run_id": rid,
                "audited_date": rep["audited_date"],
                "probe_auroc": round(auroc(y, p), 3),
                "final_auroc": round(auroc(y, f), 3),
                "probe_accuracy": round(accuracy(p, y), 3),
                "final_accuracy": round(accuracy(f, y), 3),
                "unsafe_prevalence": round(float(y.mean()), 4),
                "probe_recall": round(recall(p, y), 3),
                "final_recall": round(recall(f, y), 3),
                "sent_to_judge": round(float(np.mean(t["delegated"])), 4),
                "probe_scores_in_0.1_0.9": round(float(((p > 0.1) & (p < 0.9)).mean()), 3),
                "drift_e_value": rep["drift_e_value"],
                "drift_alarm": rep["drift_alarm"],
                # what the probe misses, as the report estimates it from the control sample (PPI++, 95%)
                "miss_rate": {k: (rep.get("quality") or {}).get("miss_rate", {}).get(k) for k in ("value", "low", "high", "n")},
                "quality_alarms_fired": sorted(k for k, a in (rep.get("quality_alarms") or {}).items() if a.get("fired")),
                # the truth the estimate aims at (the demo's labels stand in for the judge's verdicts here)
                "probe_passed_label_unsafe": round(float(y[p < 0.5].mean()), 3),
            }
        )
        day_file = os.path.join(args.out, "corpus", "audit", f"{rep['audited_date']}.jsonl")
        if os.path.exists(day_file):
            nights[-1]["traffic"] = corpus_stats(day_file)
    c = read_parquet(os.path.join(args.out, "calibration", "calibration_scores.parquet")).to_pydict()
    y, p, e, d, g = (np.array(c[k]) for k in ("label", "probe", "expert", "dv", "group"))
    groups = {
        str(k): {
            "rows": int((g == k).sum()),
            "probe_accuracy": round(accuracy(p[g == k], y[g == k]), 3),
            "expert_accuracy": round(accuracy(e[g == k], y[g == k]), 3),
            "mean_dv": round(float(d[g == k].mean()), 3),
        }
        for k in sorted(set(g.tolist()))
    }
    overall = {
        "rows": int(len(y)),
        "unsafe_prevalence": round(float(y.mean()), 4),
        **{
            f"{who}_{m}": round(fn(s_, y), 3)
            for who, s_ in (("probe", p), ("expert", e))
            for m, fn in (("auroc", lambda s_, y: auroc(y, s_)), ("accuracy", accuracy), ("recall", recall))
        },
        "expert_scores_in_0.05_0.95": round(float(((e > 0.05) & (e < 0.95)).mean()), 3),
    }
    cal = storage.read_json(os.path.join(args.out, "calibration", "calibration_report.json"))
    result = {
        "command": "python benchmarks/demo_figures.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "nights": nights,
        "calibration_overall": overall,
        "calibration_groups": groups,
        "calibration": cal["message"],
    }
    timing = os.path.join(args.out, "timing.json")  # written by `python -m jobs.demo`: seconds per step, on this machine
    if os.path.exists(timing):
        with open(timing, encoding="utf-8") as fh:
            result["demo_timing"] = json.load(fh)
    print(json.dumps(result, indent=1))
    with open(args.json, "w") as fh:
        json.dump(result, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
