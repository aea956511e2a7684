"""The data engineer's tools on published runs written with the real run layout (no Ray): one identity
per calibration, fetched runs that show/verify/history read as they are, verify on any copy, show and
history that check what they read, errors that name the file and the fix, the webhook message and the
index of the nights. The same tools on runs the real audit wrote, on the S3 server, are in
tests/test_pipeline.py."""

import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pyarrow as pa
import pytest
from test_report import report_body

from ctd import storage
from ctd.cli import main
from ctd.reporting.pages import write_report
from ctd.runs.layout import RunLayout
from ctd.tables import write_parquet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def night(output: str, rid: str, day: str, *, calibration: str = "cal-A", n: int = 40, q: int = 2) -> RunLayout:
    """A published audit run with data: results, quarantine, report.json and report.html."""
    layout = RunLayout.new_attempt(output, rid)
    ids = [f"{rid}-r{i}" for i in range(n)]
    write_parquet(storage.join(layout.results, "part-0.parquet"), pa.table({"id": ids, "final": np.linspace(0, 1, n)}))
    write_parquet(
        storage.join(layout.quarantine, "part-0.parquet"),
        pa.table({"id": [f"{rid}-q{i}" for i in range(q)], "error": ["empty text"] * q}),
    )
    body = report_body(
        rid, day, f"{day}T23:00:00+00:00", calibration=calibration, scored=n, quarantined=q, passed=4, by_judge=2, unsafe=5
    )
    files = write_report(layout.attempt_root, "report", body, "<!doctype html><html><body><p>the night</p></body></html>")
    layout.publish({"audited_date": day, "calibration_hash": calibration}, list(files.values()))
    return layout


def cli(*args: str) -> tuple[int, str, str]:
    r = subprocess.run([sys.executable, "-m", "ctd.cli", *args], capture_output=True, text=True, cwd=ROOT, timeout=120)
    return r.returncode, r.stdout, r.stderr


@pytest.fixture
def out(tmp_path):
    out = str(tmp_path / "out")
    night(out, "audit-2026-11-20", "2026-11-20")
    night(out, "audit-2026-11-21", "2026-11-21")
    return out


def test_one_identity_per_calibration(tmp_path):
    """The hash `show` prints for a calibration is the one the audit reports carry and `history
    --calibration` takes (a prefix of it too)."""
    import pyarrow.parquet as pq
    from test_cli_and_evaluate import scores_table

    src = tmp_path / "scores.parquet"
    pq.write_table(pa.table(scores_table()), src)
    assert main(["calibrate", "--scores", str(src), "--alpha", "0.2", "--delta", "0.1", "--out", str(tmp_path / "cal")]) == 0
    code, shown, _ = cli("report", "show", str(tmp_path / "cal"))
    assert code == 0
    h = json.load(open(tmp_path / "cal" / "calibration.json"))["artifact_hash"]
    assert f"calibration {h}" in shown and json.load(open(tmp_path / "cal" / "calibration_report.json"))["artifact_hash"] == h
    from ctd.calibration.artifact import load_calibration

    assert load_calibration(str(tmp_path / "cal")).hash == h
    code, text, err = cli("report", "fetch", str(tmp_path / "cal"), "--to", str(tmp_path / "fetched"))  # into a new folder
    assert code == 0, err
    assert load_calibration(str(tmp_path / "fetched" / "cal")).hash == h
    out = str(tmp_path / "out")
    night(out, "n1", "2026-11-20", calibration=h)
    night(out, "n2", "2026-11-21", calibration="another")
    code, text, _ = cli("report", "history", out, "--calibration", h[:8])
    assert code == 0 and "1 audited night(s) with calibration " + h[:12] in text and "n1" in text and "n2" not in text


def test_fetched_runs_are_read_as_they_are(out, tmp_path):
    rid = "audit-2026-11-21"
    dst = str(tmp_path / "fetched")
    code, text, err = cli("report", "fetch", RunLayout(out, rid).root, "--to", dst)
    assert code == 0, err
    assert f"fetched into {dst}/runs/{rid}" in text
    assert cli("report", "show", f"{dst}/runs/{rid}")[0] == 0
    code, text, _ = cli("report", "history", dst)
    assert code == 0 and "1 audited night(s)" in text and rid in text
    code, text, _ = cli("report", "verify", f"{dst}/runs/{rid}")  # the report only: the data files are not there
    assert code == 1 and "listed in the manifest but missing" in text and "results" in text
    assert cli("report", "fetch", RunLayout(out, rid).root, "--to", dst, "--data")[0] == 0
    code, text, _ = cli("report", "verify", f"{dst}/runs/{rid}")
    assert code == 0 and text.startswith(f"{dst}/runs/{rid}: ok"), text


def test_verify_checks_any_copy_without_ray_and_says_what_is_wrong(out, tmp_path):
    from ctd.runs.verify import verify_run

    copy = str(tmp_path / "a copy of the run")
    shutil.copytree(RunLayout(out, "audit-2026-11-20").root, copy)
    t0 = time.perf_counter()
    v = verify_run(copy)
    assert v["ok"] and v["results_rows"] == 40 and v["counted_with"] == "pyarrow on this process", v  # no Ray
    assert time.perf_counter() - t0 < 5
    m = os.path.join(copy, "manifest.json")
    body = open(m).read()
    open(m, "w").write(body[:40])  # a torn manifest
    code, text, _ = cli("report", "verify", copy, "--json")
    res = json.loads(text)
    assert code == 1 and not res["ok"] and "manifest.json: not valid JSON" in res["problems"][0] and copy in res["problems"][0]
    os.remove(m)
    code, text, _ = cli("report", "verify", copy)
    assert code == 1 and "no manifest" in text and m in text
    assert cli("report", "verify", str(tmp_path / "nowhere"))[0] == 2  # bad usage: not a folder at all
    open(m, "w").write(body)
    part = [p for p in (os.path.join(d, f) for d, _, fs in os.walk(copy) for f in fs) if p.endswith("report.json")][0]
    open(part, "a").write(" ")  # one byte more
    raw = subprocess.run(
        [sys.executable, "-m", "ctd.cli", "report", "verify", copy, "--json"], capture_output=True, cwd=ROOT
    ).stdout
    res = json.loads(raw.decode("utf-8"))
    assert not res["ok"] and "modified after publishing" in res["problems"][0]
    assert b"\\u2026" not in raw  # UTF-8, not escapes


def test_show_and_history_check_what_they_read(out):
    rid = "audit-2026-11-21"
    layout = RunLayout(out, rid)
    report = next(os.path.join(d, f) for d, _, fs in os.walk(layout.root) for f in fs if f == "report.json")
    body = json.load(open(report))
    body["unsafe_by_judge"], body["decisions_unsafe"] = 87, 12  # "-75 by the probe alone"
    json.dump(body, open(report, "w"))
    code, text, err = cli("report", "show", layout.root)
    assert code == 1 and "modified after publishing" in err and "-75" not in text and report in err
    code, text, _ = cli("report", "history", out)
    assert code == 0 and "1 audited night(s)" in text and "1 published run(s) could not be read" in text and rid in text
    assert "modified after publishing" in text
    assert cli("report", "history", out, "--strict")[0] == 1
    open(report, "w").write(json.dumps(body)[:50])  # truncated: a gap too, with its reason
    code, text, _ = cli("report", "history", out)
    assert "could not be read" in text and rid in text
    from ctd.reporting.plots import plot_history
    from ctd.runs.history import history

    h = history(out)
    assert len(h.gaps) == 1 and h.gaps[0].audited_date == "2026-11-21"  # the day from the manifest
    assert plot_history(h.nights, h.gaps)[:4] == b"\x89PNG"


def test_errors_name_the_file_and_the_fix(out, tmp_path):
    code, _, err = cli("report", "show", out)
    assert code == 2 and "an audit output with 2 published run(s)" in err and "audit-2026-11-21" in err and "history" in err
    code, _, err = cli("report", "show", f"{out}/runs/audit-2099-01-01")
    assert code == 2 and "no run 'audit-2099-01-01'" in err and "audit-2026-11-20, audit-2026-11-21" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    rid = "audit-2026-11-20"
    layout = RunLayout(out, rid)
    report = next(os.path.join(d, f) for d, _, fs in os.walk(layout.root) for f in fs if f == "report.json")
    body = json.load(open(report))
    del body["rows_read"]
    open(report, "w").write(json.dumps(body))
    m = json.load(open(layout.manifest))  # a report some other writer published: consistent, but not ours
    for e in m["report"]:
        if e["file"].endswith("report.json"):
            e["bytes"], e["sha256"] = storage.file_digest(report)
    json.dump(m, open(layout.manifest, "w"))
    code, _, err = cli("report", "show", layout.root)
    assert code == 1 and "field rows_read: Field required" in err and "pydantic" not in err.lower() and len(err.splitlines()) == 1


def test_quarantine_reasons_read_well_and_keep_the_readable_id():
    from ctd.pipeline.corpus import _line_row

    row = _line_row(b'{"id": "bad-json", "text": "unterminated', "f.jsonl:3")
    assert row["id"] == "bad-json" and row["error"] == "malformed JSON (Unterminated string starting at, column 28)"
    assert _line_row(b"not json", "f:1")["id"] is None


def test_fetch_and_verify_keep_to_the_run_folder(out, tmp_path):
    """A copied run whose manifest lists paths outside it, a symbolic link to /dev/zero, or a
    destination that holds a symbolic link: refused with the reason, within seconds."""
    rid = "audit-2026-11-20"
    victim = tmp_path / "victim.txt"
    victim.write_text("untouched")
    for bad in ("../../../../etc/passwd", "/etc/hostname"):
        copy = str(tmp_path / f"copy-{abs(hash(bad))}")
        shutil.copytree(RunLayout(out, rid).root, copy)
        m = json.load(open(os.path.join(copy, "manifest.json")))
        m["report"][0]["file"] = bad
        json.dump(m, open(os.path.join(copy, "manifest.json"), "w"))
        for args in (("fetch", copy, "--to", str(tmp_path / "dst")), ("verify", copy)):
            code, text, err = cli("report", *args)
            assert code == 1 and "not a relative path inside the run" in text + err, (bad, args, text, err)
    assert not (tmp_path / "dst").exists()
    copy = str(tmp_path / "typed")
    shutil.copytree(RunLayout(out, rid).root, copy)
    m = json.load(open(os.path.join(copy, "manifest.json")))
    m["report"][0]["file"] = 5
    json.dump(m, open(os.path.join(copy, "manifest.json"), "w"))
    for args in (("fetch", copy, "--to", str(tmp_path / "dst")), ("verify", copy), ("show", copy)):
        code, text, err = cli("report", *args)
        assert code in (1, 2) and "manifest" in text + err and "Traceback" not in err, (args, code, text, err)
    copy = str(tmp_path / "zero")
    shutil.copytree(RunLayout(out, rid).root, copy)
    review = next(os.path.join(d, f) for d, _, fs in os.walk(copy) for f in fs if f == "report.html")
    os.remove(review)
    os.symlink("/dev/zero", review)
    t0 = time.perf_counter()
    for args in (("fetch", copy, "--to", str(tmp_path / "dst2")), ("verify", copy)):
        code, text, err = cli("report", *args)
        assert code == 1 and "symbolic link" in text + err, (args, text, err)
    assert time.perf_counter() - t0 < 30
    dst = tmp_path / "dst3"
    assert cli("report", "fetch", RunLayout(out, rid).root, "--to", str(dst))[0] == 0
    planted = next(os.path.join(d, f) for d, _, fs in os.walk(dst) for f in fs if f == "report.json")
    os.remove(planted)
    os.symlink(victim, planted)
    code, _, err = cli("report", "fetch", RunLayout(out, rid).root, "--to", str(dst))
    assert code == 1 and "symbolic link in the destination" in err and victim.read_text() == "untouched"


class _Hook(http.server.BaseHTTPRequestHandler):
    got: list = []
    redirect_to: str | None = None

    def do_POST(self):  # noqa: N802
        n = int(self.headers.get("Content-Length", 0))
        type(self).got.append(
            {"path": self.path, "body": json.loads(self.rfile.read(n)), "auth": self.headers.get("Authorization")}
        )
        if type(self).redirect_to:
            self.send_response(302)
            self.send_header("Location", type(self).redirect_to)
        else:
            self.send_response(200)
        self.end_headers()

    def log_message(self, *a):
        pass


def serve(handler) -> tuple[http.server.HTTPServer, str]:
    srv = http.server.HTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, f"http://127.0.0.1:{srv.server_address[1]}/hook"


def test_the_night_message_reaches_a_webhook_and_a_dead_one_costs_nothing(monkeypatch):
    from ctd.config import NotifyConfig
    from ctd.runs.notify import notify

    live = type("Live", (_Hook,), {"got": []})
    srv, url = serve(live)
    summary = {
        "run_id": "n1",
        "audited_date": "2026-11-24",
        "attention": ["Drift: the delegation rate has moved."],
        "headline": ["1,000 conversations were read."],
        "report": "s3://b/runs/n1/report.html",
        "rows_read": 1000,
    }
    monkeypatch.setenv("CTD_TEST_HOOK", url)
    assert notify(NotifyConfig(url_env="CTD_TEST_HOOK"), summary)
    assert live.got[-1]["body"] == summary
    assert notify(NotifyConfig(url_env="CTD_TEST_HOOK", format="slack"), summary)
    text = live.got[-1]["body"]["text"]
    assert "needs attention" in text and "Drift" in text and "s3://b/runs/n1/report.html" in text
    assert not notify(NotifyConfig(url_env="CTD_TEST_HOOK"), summary | {"attention": []})  # when: attention
    assert len(live.got) == 2
    other = type("Other", (_Hook,), {"got": []})
    srv2, url2 = serve(other)
    live.redirect_to = url2  # a webhook that redirects elsewhere: not followed
    assert not notify(NotifyConfig(url_env="CTD_TEST_HOOK", retries=1), summary) and other.got == []
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    dead = f"http://127.0.0.1:{s.getsockname()[1]}/hook"  # bound, never listening: refused at once
    s.close()
    monkeypatch.setenv("CTD_TEST_HOOK", dead)
    t0 = time.perf_counter()
    assert not notify(NotifyConfig(url_env="CTD_TEST_HOOK", retries=2, timeout_seconds=1), summary)  # never raises
    assert time.perf_counter() - t0 < 10
    monkeypatch.delenv("CTD_TEST_HOOK")
    assert not notify(NotifyConfig(url_env="CTD_TEST_HOOK"), summary)
    srv.shutdown(), srv2.shutdown()


def test_the_index_lists_every_night_with_its_status(out, tmp_path):
    from conftest import missing

    from ctd.testing.browser import check_page, chromium

    night(out, "audit-2026-11-22", "2026-11-22")
    bad = RunLayout(out, "audit-2026-11-22")
    report = next(os.path.join(d, f) for d, _, fs in os.walk(bad.root) for f in fs if f == "report.json")
    open(report, "a").write(" ")
    code, text, _ = cli("report", "index", out)
    assert code == 0 and text.strip() == f"{out}/index.html"
    page = open(f"{out}/index.html").read()
    assert page.count("<tr>") == 4 and "unreadable" in page and "modified after publishing" in page
    assert page.index("2026-11-21") < page.index("2026-11-20")  # newest first
    assert "href='runs/audit-2026-11-20/attempts/" in page
    if chromium() is None:
        missing("chromium is not installed (Debian: apt-get install -y chromium)")
    r = check_page(f"{out}/index.html")
    assert r["ok"], r


def test_no_storage_credentials_is_one_line_that_says_what_to_set(s3, tmp_path):
    """Against the real S3 server, with the credentials taken out of the environment: fetch and show
    print one line naming the URI and the variables to set, exit 2, no traceback (--debug adds it)."""
    out = f"s3://{s3['bucket']}/tools"
    night(out, "audit-2026-11-20", "2026-11-20")
    uri = f"{out}/runs/audit-2026-11-20"
    assert cli("report", "show", uri)[0] == 0  # with credentials
    env = {k: v for k, v in os.environ.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")}
    env |= {
        "AWS_CONFIG_FILE": str(tmp_path / "none"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    for args in (("report", "show", uri), ("report", "fetch", uri, "--to", str(tmp_path / "f"))):
        r = subprocess.run(
            [sys.executable, "-m", "ctd.cli", *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120
        )
        assert r.returncode == 2, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
        assert uri in r.stderr and "AWS_ACCESS_KEY_ID" in r.stderr and "AWS_SECRET_ACCESS_KEY" in r.stderr
    r = subprocess.run(
        [sys.executable, "-m", "ctd.cli", "--debug", "report", "show", uri],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=120,
    )
    assert r.returncode == 2 and "Traceback" in r.stderr
