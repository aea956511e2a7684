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
7. scans every object and file written, the job logs and the Ray session logs for the S3 keys;
8. plants issue #27's attacks (hostile rows in a night, a redirecting judge, bombs, traversing run
   copies, out-of-range settings...) and counts them tried and held
   (``--only attacks`` runs this section alone, on local files, ~5 min);
9. on a local multi-node cluster of cluster/raycluster.yaml's shape (benchmarks/cluster_shape.py), loses
   a whole activation node during stage 1 and a whole expert node during the judge stage, and counts
   the rows published (``--only node_loss``, ~6 min; not part of the full run, which keeps its section).
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


# ----------------------------------------------------------------------------------------------
# 8. attacks (issue #27): each one planted against the real code, counted tried and held
# ----------------------------------------------------------------------------------------------
HOSTILE_TEXTS = [
    "-----BEGIN\tPRIVATE KEY----- MIIEvQIBADANBgkqhkiG9w0BAQEFAASC and no end line",
    "and then my password=",
    'a quote " and </td></tr><tr><td>a cell</td> <script>alert(1)</script>',
    '=HYPERLINK("http://x.example","click") then the rest',
]
HOSTILE_IDS = ["id-token:", '=HYPERLINK("http://x.example")', 'q"uote</td>', "@SUM(1+1)"]
HOSTILE_GROUPS = ['token=a"b', "grp secret:", "</td></tr><b>x", "password="]
LOOKALIKES = ["cafe\u0301", "abc ", "a\u200bbc", "a\u202ebc"]


def _cli(*args: str) -> tuple[int, str]:
    r = subprocess.run([sys.executable, "-m", "ctd.cli", *args], capture_output=True, text=True, cwd=ROOT, timeout=120)
    return r.returncode, r.stdout + r.stderr


def _hostile_corpus(src: str, dst: str, hostile: bool) -> None:
    """The generated night, with (``hostile``) unsafe rows rewritten to carry the attacks in their text,
    id and group, lookalike ids and 120 distinct bad labels added."""
    rows: list = []
    for raw in open(src, "rb").read().split(b"\n"):  # the night's own bad rows (invalid UTF-8...) kept as they are
        try:
            rows.append(json.loads(raw))
        except ValueError:
            rows.append(raw)
    good = [r for r in rows if isinstance(r, dict) and isinstance(r.get("id"), str) and isinstance(r.get("text"), str)]
    if hostile:
        unsafe = [r for r in good if r.get("label") == 1][:16]
        for i, r in enumerate(unsafe):
            r["text"] = HOSTILE_TEXTS[i % 4] + " " + r["text"]
            r["group"] = HOSTILE_GROUPS[i % 4]
            if i < 4:
                r["id"] = HOSTILE_IDS[i]
        rows += [{"id": x, "text": "hello there"} for x in LOOKALIKES]
        rows += [{"id": f"bad-label-{i}", "text": "hello", "label": i + 2} for i in range(120)]
    with open(dst, "wb") as f:
        f.writelines((r if isinstance(r, bytes) else json.dumps(r, ensure_ascii=False).encode()) + b"\n" for r in rows)


def scenario_attacks(d: dict, work: str) -> dict:
    """Issue #27's attacks against the deployed demo: two audited nights (one benign, one carrying
    the hostile rows) into a local output, then the tools, the config loader and the readers."""
    import gzip
    import http.server
    import io
    import threading
    import tracemalloc
    import urllib.error

    import pyarrow as pa
    import pyarrow.parquet as pq

    from ctd.audit.run import run_audit
    from ctd.pipeline.corpus import MAX_ROW_BYTES, _split_lines, list_corpus_files, local_rows, stream_rows
    from ctd.runs.folder import read_run_table, run_file
    from ctd.runs.history import history
    from ctd.testing.browser import check_page, chromium
    from ctd.web import post_json

    cases: list[dict] = []

    def case(item: int, name: str, fn) -> None:
        t = time.perf_counter()
        try:
            held, detail = fn()
        except Exception as e:  # an attack that raises where it should be refused did not hold
            held, detail = False, f"raised {e!r}"[:300]
        cases.append(
            {"item": item, "case": name, "held": bool(held), "detail": detail, "seconds": round(time.perf_counter() - t, 2)}
        )
        log(f"  #{item} {name}: {'held' if held else 'DID NOT HOLD'} ({detail})")

    out = os.path.join(work, "attacks", "out")
    os.makedirs(os.path.join(work, "attacks"), exist_ok=True)
    over = {"audit.output": out, "audit.review_rows": 25, "audit.excerpt_chars": 300, "audit.resume": False}
    nights = {}
    for day, hostile in (("2026-11-23", False), ("2026-11-24", True)):
        corpus = os.path.join(work, "attacks", f"{day}.jsonl")
        _hostile_corpus(d["corpus"]["audit"], corpus, hostile)
        nights[hostile] = run_audit(
            load_config(d["config_path"], {**over, "audit.corpus": corpus}), run_id=f"night-{day}", date=day
        )
    runs = {h: RunLayout(out, r.run_id) for h, r in nights.items()}
    file_of = lambda h, name: run_file(out, runs[h].run_id, name)  # noqa: E731

    def report_whole():
        body = json.load(open(file_of(True, "report.json")))
        if chromium() is None:
            return False, "chromium is not installed"
        a, b = check_page(file_of(False, "report.html")), check_page(file_of(True, "report.html"))
        page = open(file_of(True, "report.html"), encoding="utf-8").read()
        ok = b["ok"] and a["headings"] == b["headings"] and "MIIEvQIBADAN" not in page and "<script>alert(1)" not in page
        return (
            ok,
            f"report.json parses ({len(body['groups'])} groups); {len(b['headings'])} of {len(a['headings'])} sections in Chromium's DOM",
        )

    case(1, "PEM header with a tab, no END line, in a flagged row", report_whole)

    def cells():
        rows = pq.read_table(file_of(True, "review.parquet")).to_pylist()
        shown = [r for r in rows if r["group"] in {"grp secret:", "password=", "</td></tr><b>x"} or r["id"] in HOSTILE_IDS]
        b = check_page(file_of(True, "report.html"))
        return b["ok"] and bool(shown), f"{len(shown)} hostile rows listed; {b['table_rows']} table rows rendered, no merged cell"

    case(2, "key=value shapes at the end of an id, a group and a text", cells)
    case(
        3,
        'a group token=a"b: report.json valid, the night in the history',
        lambda: (
            [n["run_id"] for n in history(out).nights] == [runs[False].run_id, runs[True].run_id],
            f"history: {[n['run_id'] for n in history(out).nights]}",
        ),
    )

    def redirect():
        seen = []

        class Elsewhere(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                seen.append(self.headers.get("Authorization"))
                self.send_response(200)
                self.end_headers()

            do_POST = do_GET  # noqa: N815

            def log_message(self, *a):
                pass

        class Redirector(Elsewhere):
            def do_POST(self):  # noqa: N802
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                self.send_response(302)
                self.send_header("Location", f"http://127.0.0.1:{srv2.server_address[1]}/")
                self.end_headers()

        srv2 = http.server.HTTPServer(("127.0.0.1", 0), Elsewhere)
        srv = http.server.HTTPServer(("127.0.0.1", 0), Redirector)
        for s in (srv, srv2):
            threading.Thread(target=s.serve_forever, daemon=True).start()
        try:
            post_json(f"http://127.0.0.1:{srv.server_address[1]}/v1/completions", {}, 5, {"Authorization": "Bearer k"})
            refused = False
        except urllib.error.HTTPError as e:
            refused = e.code == 302
        srv.shutdown(), srv2.shutdown()
        return refused and seen == [], f"redirect refused: {refused}; requests at the other host: {len(seen)}"

    case(4, "the judge endpoint redirects to another host", redirect)

    def parquet_row():
        p = os.path.join(work, "attacks", "big.parquet")
        pq.write_table(pa.table({"id": ["a", "b"], "text": ["fine", "y" * (50 << 20)]}), p, compression="zstd")
        rows = local_rows(p).to_pylist()
        return rows[1]["error"] == f"row larger than {MAX_ROW_BYTES} bytes", f"{os.path.getsize(p):,} B file: {rows[1]['error']}"

    case(5, "a Parquet file with one 50 MB text", parquet_row)

    def gzip_bomb():
        line = json.dumps({"id": "b", "text": "a" * (MAX_ROW_BYTES - 100)}).encode()
        bomb = gzip.compress(b"\n".join([line] * 400))
        tracemalloc.start()
        n = sum(len(b) for b in stream_rows(io.BytesIO(bomb), "b.jsonl.gz"))
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return n == 400 and peak < 400 << 20, f"{len(bomb):,} B .gz of 400 rows of 4 MiB: {n} rows, peak {peak / 2**20:.0f} MiB"

    case(6, "a gzip bomb of valid rows just under the size limit", gzip_bomb)
    case(
        7,
        "120 distinct bad labels",
        lambda: (
            sum(k.startswith("label must be") for k in nights[True].quarantine_reasons) == 1,
            f"reasons in the report: {len(nights[True].quarantine_reasons)}",
        ),
    )

    def secret_path():
        os.environ["AWS_SECRET_ACCESS_KEY_PLANTED"] = "planted-secret-value-123"
        try:
            load_config(d["config_path"], {"audit.corpus": "/data/${AWS_SECRET_ACCESS_KEY_PLANTED}/c.jsonl"})
            return False, "accepted"
        except ConfigError as e:
            return "planted-secret-value" not in str(e), str(e)[:120]

    case(8, "${AWS_SECRET_ACCESS_KEY} interpolated into audit.corpus", secret_path)

    def laughs():
        lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
        lines += [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
        p = os.path.join(work, "attacks", "laughs.yaml")
        open(p, "w").write("\n".join(lines) + "\n")
        try:
            load_config(p)
            return False, "accepted"
        except ConfigError as e:
            return "aliases" in str(e), str(e)[-80:]

    case(9, "a 'billion laughs' YAML config (10^9 nodes)", laughs)

    def tools_confined():
        import shutil

        held, said = [], []
        root = runs[True].root
        for bad in ("../../../../etc/passwd", "/etc/hostname", 5):
            copy = os.path.join(work, "attacks", f"copy-{abs(hash(str(bad)))}")
            shutil.copytree(root, copy)
            m = json.load(open(os.path.join(copy, "manifest.json")))
            m["report"][0]["file"] = bad
            json.dump(m, open(os.path.join(copy, "manifest.json"), "w"))
            for args in (("fetch", copy, "--to", os.path.join(work, "attacks", "dst")), ("verify", copy)):
                code, text = _cli("report", *args)
                held.append(code in (1, 2) and "Traceback" not in text)
                said.append(text.strip().splitlines()[-1][:80] if text.strip() else "")
        copy = os.path.join(work, "attacks", "zero")
        shutil.copytree(root, copy)
        html_ = next(os.path.join(p, f) for p, _, fs in os.walk(copy) for f in fs if f == "report.html")
        os.remove(html_)
        os.symlink("/dev/zero", html_)
        for args in (("fetch", copy, "--to", os.path.join(work, "attacks", "dst2")), ("verify", copy)):
            code, text = _cli("report", *args)
            held.append(code == 1 and "symbolic link" in text)
        return all(held) and not os.path.exists(
            os.path.join(work, "attacks", "dst")
        ), f"{sum(held)} of {len(held)} refused; e.g. {said[0]}"

    case(10, "fetch/verify of copies listing ../, /etc, a number, a link to /dev/zero", tools_confined)

    def device():
        folder = os.path.join(work, "attacks", "dev-corpus")
        os.makedirs(folder, exist_ok=True)
        open(os.path.join(folder, "a.jsonl"), "w").write('{"id": "a", "text": "b"}\n')
        os.symlink("/dev/zero", os.path.join(folder, "zero.jsonl"))
        try:
            list_corpus_files(folder)
            return False, "listed"
        except ConfigError as e:
            return True, str(e)[-90:]

    case(11, "/dev/zero as a corpus file", device)

    def run_id_dots():
        code, text = _cli("report", "show", os.path.join(out, "runs", ".."))
        from ctd.runs.job import expand_run_id

        try:
            expand_run_id("..", __import__("datetime").date(2026, 1, 1))
            return False, "accepted"
        except ConfigError as e:
            return code != 0, str(e)

    case(12, "--run-id ..", run_id_dots)

    def gzip_edges():
        empty = _split_lines({"path": "n.jsonl.gz", "bytes": gzip.compress(b"\n" * (64 << 20))})
        lines = [json.dumps({"id": f"r{i}", "text": "hello " * 20}).encode() for i in range(2000)]
        data = gzip.compress(b"\n".join(lines) + b"\n")
        cut = _split_lines({"path": "t.jsonl.gz", "bytes": data[: len(data) // 2]})
        kept = sum(r["error"] is None for r in cut)
        return (
            len(empty) == 1 and empty[0]["error"].startswith("empty file") and kept > 900,
            f"64 MB of newlines: {empty[0]['error']}; a half-truncated 2,000-row file: {kept} rows kept + 1 entry",
        )

    case(13, "a .gz of newlines and a truncated .gz", gzip_edges)

    def ranges():
        refused = 0
        for k, v in (
            ("audit.lease_seconds", float("inf")),
            ("activations.max_actors", 100_000),
            ("model.max_length", 10**9),
            ("activations.num_cpus", float("nan")),
        ):
            try:
                load_config(d["config_path"], {k: v})
            except ConfigError:
                refused += 1
        return refused == 4, f"{refused} of 4 refused by name"

    case(14, "out-of-range settings (.inf lease, 100000 actors, 1e9 tokens, nan CPUs)", ranges)

    def clean_exit():
        r = subprocess.run(
            [sys.executable, "-m", "jobs.audit", "--config", d["config_path"], "--set", "name.x=1"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=300,
        )
        return r.returncode == 2 and "Traceback" not in r.stderr, f"--set name.x=1: exit {r.returncode}: {r.stderr.strip()[-90:]}"

    case(15, "--set into a value that is not a section", clean_exit)

    def lookalikes_and_csv():
        q = read_run_table(out, runs[True].run_id, "quarantine", ["id", "error"]).to_pylist()
        looked = [r for r in q if r["id"] in LOOKALIKES]
        import csv

        cells = [c for row in csv.reader(open(file_of(True, "review.csv"), encoding="utf-8")) for c in row]
        formulas = [c for c in cells if c[:1] in ("=", "+", "@")]
        return (
            len(looked) == len(LOOKALIKES) and not formulas,
            f"{len(looked)} of {len(LOOKALIKES)} lookalike ids quarantined; formula cells in review.csv: {len(formulas)}",
        )

    case(16, "lookalike ids; =HYPERLINK ids and excerpts in the review files", lookalikes_and_csv)
    return {"tried": len(cases), "held": sum(c["held"] for c in cases), "cases": cases}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "reliability.json"))
    ap.add_argument(
        "--only",
        choices=["attacks", "node_loss"],
        help="run only this section (local files, a local Ray) and replace it in --out, keeping the others",
    )
    args = ap.parse_args(argv)
    if args.only == "attacks":
        return attacks_only(args.out)
    if args.only == "node_loss":
        return node_loss_only(args.out)
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
        log("8. attacks (issue #27)")
        attacks = scenario_attacks(d, work)
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
            "attacks_tried": attacks["tried"],
            "attacks_held": attacks["held"],
        },
        "actor_kills": kills,
        "driver_kill_and_resume": driver,
        "rerun_killed_midway": rerun,
        "budget_cap_under_shift": cap,
        "failed_job": failed,
        "hostile_input": hostile,
        "secrets": secrets_,
        "attacks": attacks,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    if os.path.exists(args.out):  # the node-loss section is measured apart (--only node_loss): keep it
        before = json.load(open(args.out))
        if "node_loss" in before:
            result["node_loss"] = before["node_loss"]
            result["summary"] |= {k: before["summary"][k] for k in ("nodes_lost", "node_loss_runs_published_whole")}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2, default=str)
    log(json.dumps(result["summary"], indent=2))
    log(f"wrote {args.out}")
    return (
        0
        if result["summary"]["rows_lost"] == 0 and result["summary"]["duplicate_rows"] == 0 and cap["budget_cap_overruns"] == 0
        else 1
    )


def attacks_only(path: str) -> int:
    """Section 8 alone: the demo deployed into a local folder, the attacks, the result put into
    ``path`` beside the other sections (which keep the run that measured them)."""
    t0 = time.time()
    work = tempfile.mkdtemp(prefix="ctd-attacks-")
    with RayHead(num_cpus=4, log_dir=os.path.join(work, "ray")):
        base = yaml.safe_load(open(os.path.join(ROOT, "configs", "demo.yaml")))
        d = deploy(
            os.path.join(work, "root"),
            os.path.join(work, "deploy"),
            base,
            seed=3,
            log=log,
            sizes={"train": 300, "expert_train": 500, "dev": 400, "calibration": 500, "audit": 400},
        )
        attacks = scenario_attacks(d, work)
    result = json.load(open(path)) if os.path.exists(path) else {"benchmark": "reliability", "summary": {}}
    result["attacks"] = attacks | {
        "command": "python benchmarks/reliability.py --only attacks",
        "seconds": round(time.time() - t0),
    }
    result["summary"] |= {"attacks_tried": attacks["tried"], "attacks_held": attacks["held"]}
    with open(path, "w") as f:
        json.dump(result, f, indent=2, default=str)
    log(f"attacks: {attacks['held']} of {attacks['tried']} held; wrote {path}")
    return 0 if attacks["held"] == attacks["tried"] else 1


def node_loss_only(path: str) -> int:
    """Section 9 alone: the night on a local cluster of cluster/raycluster.yaml's shape
    (benchmarks/cluster_shape.py), first whole, then losing a whole activation node during stage 1 and a
    whole expert node during the judge stage; the result put into ``path`` beside the other sections."""
    from cluster_shape import run as run_on_cluster  # benchmarks/ is this script's folder

    t0 = time.time()
    work = tempfile.mkdtemp(prefix="ctd-node-loss-")
    calm = run_on_cluster(None, [], work)
    lost = run_on_cluster(os.path.join(work, "deploy", "config.yaml"), ["activations", "expert"], work)

    def figures(r: dict) -> dict:
        v = (r.get("published") or {}).get("verify", {})
        stages = [a for a in r["placement"]["actors"] if "Stage" in a["class"]]
        return {
            "nodes_lost": [x["group"] for x in r["lost"]],
            "attempts": r["attempts"],
            "errors": r["errors"],
            "published": bool(r.get("published")),
            "rows_read": v.get("rows_read"),
            "rows_published": (v.get("results_rows") or 0) + (v.get("quarantine_rows") or 0),
            "results_rows": v.get("results_rows"),
            "quarantine_rows": v.get("quarantine_rows"),
            "expert_calls": (r.get("published") or {}).get("expert_calls"),
            "rows_lost": v.get("rows_lost"),
            "rows_extra": v.get("rows_extra"),
            "duplicate_ids": v.get("duplicate_ids"),
            "verify_ok": v.get("ok"),
            "stage_actor_restarts": {a["class"]: a["restarts"] for a in stages},
            "placement_violations": r["violations"],
            "wall_s": r["wall_s"],
        }

    result = json.load(open(path)) if os.path.exists(path) else {"benchmark": "reliability", "summary": {}}
    result["node_loss"] = {
        "command": "python benchmarks/reliability.py --only node_loss",
        "cluster": calm["nodes"],
        "cluster_when_losing": lost["nodes"],
        "whole_night": figures(calm),
        "nodes_lost_mid_stage": figures(lost),
        "seconds": round(time.time() - t0),
    }
    n = result["node_loss"]["nodes_lost_mid_stage"]
    survived = int(n["published"] and n["verify_ok"] and not n["placement_violations"])
    result["summary"] |= {"nodes_lost": len(n["nodes_lost"]), "node_loss_runs_published_whole": survived}
    with open(path, "w") as f:
        json.dump(result, f, indent=2, default=str)
    log(f"node loss: {n['nodes_lost']} lost, published whole: {bool(survived)}; wrote {path}")
    return 0 if survived else 1


if __name__ == "__main__":
    sys.exit(main())
