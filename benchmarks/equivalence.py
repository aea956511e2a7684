"""Old audit vs new audit on the demo corpus: the same published answers.

    python benchmarks/equivalence.py [--before a6e22ac] [--work out/equivalence] [--out benchmarks/results/equivalence.json]

Deploys the demo once (corpus, expert, probes, calibration: `ctd.testing.demo.deploy`), then audits the same
corpus with the same artifacts twice per setting, once with the implementation at ``--before`` (a git
worktree of that commit, run as ``python -m jobs.audit`` with it first on the path) and once with
this checkout, without and with a hard budget cap. It compares, id by id, what each run published:
ids, decisions, delegated set, over-cap set, quarantine (id, reason) and the report's counts and
alarms. Three changes of the quarantine since a6e22ac are intended and normalised before comparing (and
counted): a malformed-JSON reason reads "(<message>, column N)" instead of "(<message> at column N)",
such a row keeps its readable id when its line shows one, and a bad type or label is named in a short
detail ("label must be 0 or 1 (got a string: 'maybe')" for "label must be 0 or 1, got 'maybe'").
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

COUNTS = (
    "drift_alarm",
    "judge_alarm",
    "expert_truncated",
    "unsafe_by_judge",
    "judge_overruled",
    "expert_tokens",
    "rows_read",
    "rows_scored",
    "rows_quarantined",
    "rows_truncated",
    "delegated_by_threshold",
    "delegated",
    "over_cap",
    "budget_cap",
    "decisions_unsafe",
    "expert_calls",
    "expert_failures",
    "quarantine_reasons",
    "expert_status",
    "groups",
    "realised_rate",
    "rate_pvalue",
)


def audit(code_dir: str, config: str, run_id: str, cap: float | None) -> float:
    env = dict(os.environ, PYTHONPATH=code_dir, RAY_AUTH_MODE="token")
    cmd = [sys.executable, "-m", "jobs.audit", "--config", config, "--run-id", run_id, "--set", "audit.resume=false"]
    if cap is not None:
        cmd += ["--set", f"audit.budget_cap={cap}"]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=code_dir, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{code_dir} audit {run_id} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return time.perf_counter() - t0


def published(output: str, run_id: str) -> dict:
    from ctd import storage
    from ctd.runs.folder import read_run_table, run_file

    res = read_run_table(output, run_id)
    q = read_run_table(output, run_id, "quarantine")
    col = lambda t, c: t.column(c).to_pylist() if t.num_rows else []  # noqa: E731
    ids = col(res, "id")
    report = storage.read_json(run_file(output, run_id, "report.json"))  # either layout (v1 before attempts, v2)
    return {
        "ids": sorted(ids),
        "decision": dict(zip(ids, col(res, "decision"))),
        "delegated": sorted(i for i, d in zip(ids, col(res, "delegated")) if d),
        "over_cap": sorted(i for i, d in zip(ids, col(res, "over_cap")) if d),
        "quarantine": sorted((i or "", e) for i, e in zip(col(q, "id"), col(q, "error"))),
        "probe": dict(zip(ids, col(res, "probe"))),
        "dv": dict(zip(ids, col(res, "dv"))),
        "final": dict(zip(ids, col(res, "final"))),
        "report": {k: report.get(k) for k in COUNTS},
    }


def _reason(e: str) -> str:
    e = re.sub(r"^malformed JSON \((.*) at column (\d+)\)$", r"malformed JSON (\1, column \2)", e or "")
    return re.sub(r"^(label must be 0 or 1|(?:id|text|group) must be a string), got .*$", r"\1", e)


def compare(a: dict, b: dict) -> dict:
    # the intended quarantine changes (module docstring): the old reasons in the new wording, and the new
    # run's malformed-JSON rows without the readable id the old run could not give them
    salvaged = [i for i, e in b["quarantine"] if i and e.startswith("malformed JSON")]
    a = dict(a, quarantine=sorted((i, _reason(e)) for i, e in a["quarantine"]))
    b = dict(
        b,
        quarantine=sorted(
            ("" if e.startswith("malformed JSON") else i, re.sub(r"^((?:label|id|text|group) must be .*?) \(got .*\)$", r"\1", e))
            for i, e in b["quarantine"]
        ),
    )
    out = {k: a[k] == b[k] for k in ("ids", "decision", "delegated", "over_cap", "quarantine")}
    out["quarantine_rows_with_a_readable_id_now"] = len(salvaged)
    out["malformed_json_rows_compared_by_reason_only"] = sum(e.startswith("malformed JSON") for _, e in a["quarantine"])
    reasons = lambda r: {_reason(k): v for k, v in (r.get("quarantine_reasons") or {}).items()}  # noqa: E731
    out["report_counts"] = {
        k: (reasons(a["report"]) == reasons(b["report"])) if k == "quarantine_reasons" else a["report"][k] == b["report"][k]
        for k in COUNTS
    }
    out["max_abs_diff"] = {
        k: max((abs(a[k][i] - b[k][i]) for i in a[k] if i in b[k]), default=0.0) for k in ("probe", "dv", "final")
    }
    out["n"] = {
        "rows": len(a["ids"]),
        "delegated": len(a["delegated"]),
        "over_cap": len(a["over_cap"]),
        "quarantine": len(a["quarantine"]),
    }
    out["identical"] = all(out[k] for k in ("ids", "decision", "delegated", "over_cap", "quarantine")) and all(
        out["report_counts"].values()
    )
    if not out["identical"]:
        out["report_before"] = {k: v for k, v in a["report"].items() if a["report"][k] != b["report"][k]}
        out["report_after"] = {k: v for k, v in b["report"].items() if a["report"][k] != b["report"][k]}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--before", default="a6e22ac", help="the commit of the implementation to compare against")
    ap.add_argument("--work", default="out/equivalence")
    ap.add_argument("--cap", type=float, default=0.05)
    ap.add_argument("--out", default="benchmarks/results/equivalence.json")
    args = ap.parse_args(argv)
    os.environ["RAY_AUTH_MODE"] = "token"
    work = os.path.abspath(args.work)
    old = os.path.join(work, "before-code")
    if not os.path.isdir(old):
        subprocess.run(["git", "worktree", "add", "--detach", old, args.before], cwd=ROOT, check=True, capture_output=True)
    out = os.path.join(work, "demo")
    if not os.path.exists(os.path.join(out, "config.yaml")):
        # deploy in a child process, so that this one holds no Ray connection of its own
        code = (
            f"import yaml; from ctd.testing.demo import deploy; from ctd.config import load_config; from ctd.pipeline.raydata import init_ray; "
            f"init_ray(load_config('configs/demo.yaml').ray); deploy({out!r}, {out!r}, yaml.safe_load(open('configs/demo.yaml')))"
        )
        subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, env=dict(os.environ, PYTHONPATH=ROOT))
    config = os.path.join(out, "config.yaml")
    result = {
        "command": "python benchmarks/equivalence.py " + " ".join(argv or sys.argv[1:]),
        "before": args.before,
        "after": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        + " (+ working tree)",
        "corpus": os.path.join(out, "corpus", "audit.jsonl"),
        "settings": {},
    }
    for name, cap in (("no cap", None), (f"cap {args.cap}", args.cap)):
        tag = "cap" if cap else "plain"
        t_old = audit(old, config, f"before-{tag}", cap)
        t_new = audit(ROOT, config, f"after-{tag}", cap)
        a, b = published(out, f"before-{tag}"), published(out, f"after-{tag}")
        c = compare(a, b)
        c["seconds"] = {"before": round(t_old, 1), "after": round(t_new, 1)}
        result["settings"][name] = c
        print(f"{name}: identical={c['identical']}  rows {c['n']}  max |Δ| {c['max_abs_diff']}  wall {c['seconds']}", flush=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")
    return 0 if all(s["identical"] for s in result["settings"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
