"""Reliability under faults, shift and hostile input, measured on real parts; writes
benchmarks/results/reliability.json.

    .venv/bin/python benchmarks/reliability.py        # ~10 min on 2 cores

Starts a SeaweedFS S3 server and a Ray head (token authentication on), deploys the demo (corpus,
classifier expert, probes, calibration) into S3, then:

1. kills an activation actor and an expert actor (SIGKILL to their processes) during an audit;
2. kills the driver while it writes expert scores, checks readers do not see the run, and reruns the
   same run id, counting expert calls across both runs;
2b. reruns the published run of step 1 without resume and kills that driver mid-way, while a reader
   polls the run: the reader must see the previous run, whole, every time;
3. audits a shifted night (90% ambiguous rows) with a hard budget cap and ``--fail-on-drift``;
4. runs a job that fails mid-way (a missing expert model) and checks nothing is published;
5. throws hostile input at the corpus reader, the config loader and the artifact loaders;
6. (the drift alarm is simulated apart: benchmarks/drift.py);
7. scans every object and file written, the job logs and the Ray session logs for the S3 keys.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time

os.environ["RAY_AUTH_MODE"] = "token"  # before ray is imported: the head keeps token authentication on
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import yaml  # noqa: E402

from ctd import storage  # noqa: E402
from ctd.config import ConfigError, load_config  # noqa: E402
from ctd.runs.layout import RunLayout  # noqa: E402
from ctd.testing.demo import BAD_ROWS, deploy, generate_corpus  # noqa: E402
from ctd.testing.localstack import RayHead, SeaweedFS, find_secrets, ray_session_logs  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def scenario_actor_kills(d, corpus, out):
    from ctd.audit.run import run_audit
    from ctd.runs.verify import verify_run
    from ctd.testing.chaos import ActorKiller

    cfg = load_config(
        d["config_path"],
        {"audit.corpus": corpus, "audit.output": out, "activations.batch_size": 32, "expert.classifier.pool.batch_size": 8},
    )
    killers = {
        "activation actor": ActorKiller("ActivationStage", after_seconds=6),
        "expert actor": ActorKiller("ClassifierStage", 2, poll=0.1),
    }
    for k in killers.values():
        k.start()
    try:
        report = run_audit(cfg, run_id="actor-kills")
    finally:
        for k in killers.values():
            k.stop()
    v = verify_run(RunLayout(out, "actor-kills").root, corpus=corpus)
    return {
        "faults": [
            {
                "fault": f"SIGKILL {name} mid-run",
                "killed_pids": k.killed,
                "restarted": k.restarted,
                "survived": bool(k.killed) and v["ok"],
            }
            for name, k in killers.items()
        ],
        "rows_read": report.rows_read,
        "rows_lost": v["rows_lost"],
        "duplicate_rows": v["duplicate_ids"],
        "verify": v,
    }


def scenario_driver_kill(d, corpus, out, head):
    from ctd.audit.run import run_audit
    from ctd.runs.folder import list_runs, read_manifest
    from ctd.runs.verify import verify_run
    from ctd.testing.chaos import kill_audit_driver

    env = dict(os.environ, RAY_ADDRESS=head.address)
    overrides = {
        "audit.corpus": corpus,
        "audit.output": out,
        "expert.classifier.pool.batch_size": 8,
        "audit.commit_rows": 32,
        "audit.lease_seconds": 10,
    }
    killed = kill_audit_driver(d["config_path"], out, "resumed", overrides, env=env, cwd=ROOT)
    interrupted, committed = killed["interrupted"], killed["committed_rows"]
    hidden = read_manifest(out, "resumed") is None and "resumed" not in list_runs(out)
    report = run_audit(load_config(d["config_path"], {"audit.corpus": corpus, "audit.output": out}), run_id="resumed")
    v = verify_run(RunLayout(out, "resumed").root, corpus=corpus)
    return {
        "fault": "SIGKILL the driver while it writes expert scores",
        "interrupted_mid_run": interrupted,
        "readers_saw_unfinished_run": not hidden,
        "expert_rows_committed_before_kill": committed,
        "resumed_run": {
            "stage1_reused": report.resumed.get("stage1_rows") == report.rows_read,
            "expert_rows_reused": report.resumed.get("expert_rows", 0),
            "expert_calls": report.expert_calls,
            "delegated": report.delegated,
        },
        "expert_calls_saved_by_resume": report.resumed.get("expert_rows", 0),
        "survived": interrupted
        and hidden
        and v["ok"]
        and report.expert_calls + report.resumed.get("expert_rows", 0) == report.delegated,
        "rows_lost": v["rows_lost"],
        "duplicate_rows": v["duplicate_ids"],
    }


def scenario_rerun_kill(d, corpus, out, head, run_id="actor-kills"):
    """Kill a rerun of a published run mid-way while a reader polls it."""
    from ctd.runs.folder import read_manifest
    from ctd.runs.verify import verify_run
    from ctd.testing.chaos import RunReader, kill_audit_driver

    reader = RunReader(out, run_id)
    before = reader.before
    reader.start()
    env = dict(os.environ, RAY_ADDRESS=head.address)
    overrides = {
        "audit.corpus": corpus,
        "audit.output": out,
        "audit.resume": "false",
        "expert.classifier.pool.batch_size": 8,
        "audit.commit_rows": 32,
        "audit.lease_seconds": 10,
    }
    killed = kill_audit_driver(d["config_path"], out, run_id, overrides, env=env, cwd=ROOT)
    reads = reader.stop()
    after = read_manifest(out, run_id)
    v = verify_run(RunLayout(out, run_id).root, corpus=corpus)
    ok = killed["interrupted"] and reader.saw_previous_run_whole and after == before and v["ok"]
    return {
        "fault": "SIGKILL the driver of a rerun of a published run mid-way",
        "interrupted_mid_run": killed["interrupted"],
        "reader_polls": len(reads),
        "polls_that_saw_the_previous_run_whole": sum(r["whole_previous_run"] for r in reads),
        "manifest_unchanged": after == before,
        "verify_ok_after": v["ok"],
        "survived": ok,
    }


def scenario_budget_cap(d, shifted, out, head, cap_fraction=0.05):
    from ctd.runs.folder import read_run_table, run_file
    from ctd.runs.layout import RunLayout
    from ctd.tables import read_parquet

    env = dict(os.environ, RAY_ADDRESS=head.address)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "jobs.audit",
            "--config",
            d["config_path"],
            "--run-id",
            "shifted",
            "--fail-on-drift",
            "--set",
            f"audit.corpus={shifted}",
            "--set",
            f"audit.output={out}",
            "--set",
            f"audit.budget_cap={cap_fraction}",
            "--set",
            "audit.keep_staging=true",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    rep = storage.read_json(run_file(out, "shifted", "report.json"))
    exp = RunLayout(out, "shifted").path("_staging", "expert")
    calls = sum(read_parquet(storage.join(exp, n)).num_rows for n in storage.listdir(exp) if n.endswith(".parquet"))
    cap = math.ceil(cap_fraction * rep["rows_scored"])
    res = read_run_table(out, "shifted", columns=["over_cap", "final", "probe"])
    over = [o for o in res.column("over_cap").to_pylist()]
    fell_back = all(f == p for o, f, p in zip(over, res.column("final").to_pylist(), res.column("probe").to_pylist()) if o)
    return {
        "rows_scored": rep["rows_scored"],
        "calibrated_alpha": rep["alpha"],
        "passed_threshold": rep["delegated_by_threshold"],
        "cap": cap,
        "expert_calls": calls,
        "budget_cap_overruns": max(0, calls - cap),
        "over_cap_rows_flagged": sum(over),
        "over_cap_rows_fell_back_to_probe": fell_back,
        "drift_alarm": rep["drift_alarm"],
        "exit_code": r.returncode,
        "fail_on_drift_exit_code_3": r.returncode == 3,
        "log": r.stdout + r.stderr,
    }


def scenario_failed_job(d, corpus, out):
    from ctd.audit.run import run_audit
    from ctd.runs.folder import list_runs
    from ctd.runs.layout import RunLayout

    cfg = load_config(
        d["config_path"], {"audit.corpus": corpus, "audit.output": out, "expert.classifier.path": "/nonexistent/model"}
    )
    try:
        run_audit(cfg, run_id="failed")
        failed = False
    except Exception:
        failed = True
    fs, attempts = storage.filesystem(RunLayout(out, "failed").path("attempts"))
    written = [p for p in fs.find(attempts) if p.endswith(".parquet")] if fs.exists(attempts) else []
    return {
        "fault": "expert model missing: the job fails after stage 1",
        "job_failed": failed,
        "published": "failed" in list_runs(out),
        "results_written": bool(written),
    }


def fuzz_corpus(n=3000, seed=0) -> dict:
    """Hostile JSON lines through the corpus reader: no crash, one row per non-empty line, each row
    reconciled with the line it came from."""
    from ctd.pipeline.corpus import _split_lines

    rng = random.Random(seed)

    def word():
        return "".join(rng.choice('ab \u00e9\U0001f600"\\\n') for _ in range(rng.randint(0, 8)))

    def record():  # a JSON value shaped like a row, each field wrong in a random way (or right)
        pick = lambda *xs: rng.choice(xs)  # noqa: E731
        obj = {
            k: pick(word(), rng.randint(-9, 9), None, [word()], {"x": word()}, True)
            for k in rng.sample(["id", "text", "messages", "label", "group", "extra"], rng.randint(0, 4))
        }
        if rng.random() < 0.3:
            obj["messages"] = [
                {"role": pick("user", "assistant", 1, None), "content": pick(word(), None, 3)} for _ in range(rng.randint(0, 3))
            ]
        return pick(obj, obj, obj, [obj], word(), rng.randint(0, 9))

    junk = [bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 120))) for _ in range(n // 3)]
    junk += [json.dumps(record()).encode() for _ in range(n // 3)]
    junk += [
        b"{" * rng.randint(1, 50) + b"\xff" * rng.randint(0, 3) + bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 8)))
        for _ in range(n - 2 * (n // 3))
    ]
    lines = junk + BAD_ROWS
    crashes, rows, unreconciled = 0, 0, 0
    for line in lines:
        try:
            out = _split_lines({"path": "fuzz.jsonl", "bytes": line})
        except Exception:
            crashes += 1
            continue
        rows += len(out)
        # reconciled: one row per non-empty line of the input, each naming its own line
        expected = [f"fuzz.jsonl:{i + 1}" for i, x in enumerate(line.split(b"\n")) if x.strip()]
        unreconciled += [r["source"] for r in out] != expected or any(not (r["error"] or r["id"]) for r in out)
    return {
        "corpus_lines_fuzzed": len(lines),
        "distinct_corpus_lines": len(set(lines)),
        "reader_crashes": crashes,
        "rows_out": rows,
        "rows_expected": sum(1 for line in lines for x in line.split(b"\n") if x.strip()),
        "lines_not_reconciled": unreconciled,
    }


def scenario_hostile(d, root, n=3000, seed=0):
    from ctd.audit.run import run_audit
    from ctd.calibration.artifact import CalibrationArtifact, load_calibration
    from ctd.model.artifacts import ArtifactError

    fuzz = fuzz_corpus(n, seed)
    base = yaml.safe_load(open(d["config_path"]))
    cfg_cases, cfg_other = 0, 0
    tmp = tempfile.mkdtemp()
    mutations = [
        ("model.laeyr", 1),
        ("calibration.alpha", 2.0),
        ("calibration.alpha", "x"),
        ("expert.kind", "oracle"),
        ("expert.http", {"base_url": "x", "model": "m", "api_key": "sk-1"}),
        ("audit.run_id", "../../etc"),
        ("activations.max_actors", 0),
        ("ray", [1, 2]),
        ("model", None),
        ("bogus", {"a": 1}),
    ]
    for key, val in mutations:
        c = json.loads(json.dumps(base))
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = val
        p = os.path.join(tmp, "c.yaml")
        yaml.safe_dump(c, open(p, "w"))
        try:
            cfg = load_config(p)
            if key == "audit.run_id":
                import datetime as dt

                from ctd.runs.job import expand_run_id

                expand_run_id(cfg.audit.run_id, dt.date(2026, 1, 1))
        except ConfigError:
            cfg_cases += 1
        except Exception:
            cfg_other += 1
    art = d["calibration"]
    refused = []
    other = CalibrationArtifact(art.result, {**art.provenance, "dv_probe_hash": "0" * 64})
    storage.write_json(f"{root}/hostile/cal-other/calibration.json", other.body())
    body = other.body()
    body["calibration"]["lambda_hat"] = -1.0
    storage.write_json(f"{root}/hostile/cal-tampered/calibration.json", body)
    probe_uri = load_config(d["config_path"]).probes.dv
    raw = bytearray(storage.read_bytes(probe_uri + ".safetensors"))
    raw[-1] ^= 0xFF
    storage.write_bytes(f"{root}/hostile/probe-tampered.safetensors", bytes(raw))
    storage.write_bytes(f"{root}/hostile/probe-tampered.json", storage.read_bytes(probe_uri + ".json"))
    cases = {
        "calibration for other probes": {"audit.calibration": f"{root}/hostile/cal-other"},
        "tampered calibration": {"audit.calibration": f"{root}/hostile/cal-tampered"},
        "tampered DV probe": {"probes.dv": f"{root}/hostile/probe-tampered"},
        "probes of another layer": {"model.layer": 5},
        "missing calibration": {"audit.calibration": f"{root}/hostile/nothing-here"},
    }
    for name, over in cases.items():
        try:
            run_audit(load_config(d["config_path"], {**over, "audit.output": f"{root}/hostile/out"}), run_id="x")
            refused.append({"case": name, "refused": False})
        except (ArtifactError, FileNotFoundError) as e:
            refused.append({"case": name, "refused": True, "error": str(e)[:160]})
    nothing_written = not storage.exists(f"{root}/hostile/out")
    load_calibration(f"{root}/calibration")  # the real one still loads
    return {
        **fuzz,
        "config_mutations": len(mutations),
        "config_errors_reported": cfg_cases,
        "config_other_exceptions": cfg_other,
        "artifact_cases": refused,
        "artifacts_refused": sum(r["refused"] for r in refused),
        "nothing_written_on_refusal": nothing_written,
    }


def scenario_secrets(s3, work, logs, since):
    """The S3 keys the jobs used (the storage layer reads them for every object): in no object written
    to the bucket, no file under the work folder, no job log and no Ray session log."""
    planted = [s3.secret, s3.key]
    hits, scanned = [], 0
    objects = s3.fs.find(f"{s3.bucket}/")
    for path in objects:
        data = s3.fs.cat(path)
        scanned += 1
        hits += [path for s in planted if s.encode() in data]
    files = [os.path.join(d, f) for d, _, fs in os.walk(work) for f in fs]
    ray_logs = ray_session_logs(since)
    n_files, file_hits = find_secrets(planted, files + ray_logs)
    hits += file_hits + ["job log" for s in planted for text in logs if s in text]
    return {
        "planted": "S3 access key id and secret key (read by every job and Ray worker)",
        "objects_scanned": len(objects),
        "files_scanned": n_files,
        "ray_session_logs_scanned": len(ray_logs),
        "job_logs_scanned": len(logs),
        "occurrences": len(hits),
        "where": hits[:5],
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "reliability.json"))
    args = ap.parse_args(argv)
    t0 = time.time()
    work = tempfile.mkdtemp(prefix="ctd-reliability-")
    with SeaweedFS(os.path.join(work, "s3")) as s3, RayHead(num_cpus=4, log_dir=os.path.join(work, "ray")) as head:
        root = f"s3://{s3.bucket}/rel"
        base = yaml.safe_load(open(os.path.join(ROOT, "configs", "demo.yaml")))
        base["expert"]["classifier"]["pool"]["batch_size"] = 16
        log("deploying the demo into S3 (corpus, expert, probes, calibration)")
        d = deploy(
            root,
            os.path.join(work, "deploy"),
            base,
            seed=3,
            log=log,
            sizes={"train": 300, "expert_train": 500, "dev": 400, "calibration": 500, "audit": 10},
        )
        corpus = generate_corpus(
            f"{root}/night", seed=4, sizes={k: 1 for k in ("train", "expert_train", "dev", "calibration")} | {"audit": 1500}
        )["audit"]
        shifted = generate_corpus(
            f"{root}/shifted",
            seed=5,
            sizes={k: 1 for k in ("train", "expert_train", "dev", "calibration")} | {"audit": 800},
            ambiguous=0.9,
            bad_rows=False,
        )["audit"]
        out = f"{root}/audits"
        log("1. actor kills")
        kills = scenario_actor_kills(d, corpus, out)
        log("2. driver kill and resume")
        driver = scenario_driver_kill(d, corpus, out, head)
        log("2b. a rerun of a published run killed mid-way, a reader polling")
        rerun = scenario_rerun_kill(d, corpus, out, head)
        log("3. hard budget cap on a shifted night")
        cap = scenario_budget_cap(d, shifted, out, head)
        log("4. a job that fails mid-way")
        failed = scenario_failed_job(d, corpus, out)
        log("5. hostile input")
        hostile = scenario_hostile(d, root)
        log("7. secrets")
        secrets_ = scenario_secrets(s3, work, [cap.pop("log")], t0)
    faults = kills["faults"] + [
        {"fault": driver["fault"], "survived": driver["survived"]},
        {"fault": rerun["fault"], "survived": rerun["survived"]},
        {"fault": failed["fault"], "survived": not failed["published"]},
    ]
    result = {
        "benchmark": "reliability",
        "command": "python benchmarks/reliability.py",
        "seconds": round(time.time() - t0),
        "summary": {
            "faults_injected": len(faults),
            "faults_survived": sum(bool(f["survived"]) for f in faults),
            "rows_lost": kills["rows_lost"] + driver["rows_lost"],
            "duplicate_rows": kills["duplicate_rows"] + driver["duplicate_rows"],
            "budget_cap_overruns": cap["budget_cap_overruns"],
            "bad_inputs_tried": hostile["corpus_lines_fuzzed"] + hostile["config_mutations"] + len(hostile["artifact_cases"]),
            "bad_inputs_handled": (hostile["corpus_lines_fuzzed"] - hostile["reader_crashes"] - hostile["lines_not_reconciled"])
            + hostile["config_errors_reported"]
            + hostile["artifacts_refused"],
            "distinct_corpus_lines_fuzzed": hostile["distinct_corpus_lines"],
            "secret_occurrences_in_outputs": secrets_["occurrences"],
        },
        "actor_kills": kills,
        "driver_kill_and_resume": driver,
        "rerun_killed_midway": rerun,
        "budget_cap_under_shift": cap,
        "failed_job": failed,
        "hostile_input": hostile,
        "secrets": secrets_,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2, default=str)
    log(json.dumps(result["summary"], indent=2))
    log(f"wrote {args.out}")
    return (
        0
        if result["summary"]["rows_lost"] == 0 and result["summary"]["duplicate_rows"] == 0 and cap["budget_cap_overruns"] == 0
        else 1
    )


if __name__ == "__main__":
    sys.exit(main())
