"""Issue #27, items 1-3: conversations written to break the report. A night whose rows carry a PEM
header with a tab, key=value shapes at the end of a cell, quotes and markup in ids, groups and
excerpts publishes a report.json that parses, a page that Chromium renders whole (every section, every
table row of the benign night), and stays in the history. Written with the audit's own report code
(summarise, write_audit_report, publish) on rows built here, without Ray."""

import json

import numpy as np
import pyarrow as pa
import pytest
from test_audit_rules import context, facts_of, results

from ctd.audit.publish import publish, write_audit_report
from ctd.audit.results import finalize
from ctd.audit.review import REVIEW_SCHEMA
from ctd.audit.specs import PublishSpec
from ctd.audit.summary import summarise
from ctd.reporting.redact import excerpt
from ctd.runs.history import History, history
from ctd.runs.layout import RunLayout
from ctd.testing.browser import check_page, chromium

HOSTILE_TEXT = [
    "hello -----BEGIN\tPRIVATE KEY----- MIIEvQIBADANBgkqhkiG9w0BAQEFAASC and no end line",
    "my password=",
    'a quote " and </td></tr><tr><td>a cell</td> <script>alert(1)</script>',
    "=cmd|' /C calc'!A0 id ending token:",
]
HOSTILE_IDS = ["r-token:", '=HYPERLINK("http://x.example","click")', 'q"uote</td>', "@SUM(1+1)"]
HOSTILE_GROUPS = ['token=a"b', "grp secret:", "</td></tr><b>x", "password="]


def night(out: str, rid: str, day: str, hostile: bool) -> RunLayout:
    t, *_ = results(400, seed=1)
    ids, groups = t.column("id").to_pylist(), t.column("group").to_pylist()
    if hostile:
        ids[:4] = HOSTILE_IDS
        groups = [HOSTILE_GROUPS[i % 4] for i in range(len(groups))]
    else:
        groups = [f"g{i % 4}" for i in range(len(groups))]
    t = t.set_column(0, "id", pa.array(ids)).set_column(1, "group", pa.array(groups))
    res = finalize(t)
    first = res.slice(0, 4)
    texts = HOSTILE_TEXT if hostile else ["plain text"] * 4
    review = pa.table(
        {
            "list": ["flagged"] * 4,
            "rank": pa.array(np.arange(1, 5, dtype=np.int32)),
            "id": first.column("id"),
            "group": first.column("group"),
            "probe": first.column("probe"),
            "dv": first.column("dv"),
            "expert": first.column("expert"),
            "final": first.column("final"),
            "decision": first.column("decision"),
            "delegated": first.column("delegated"),
            "expert_status": first.column("expert_status"),
            "reason": pa.nulls(4, pa.string()),
            "source": ["f.jsonl:1"] * 4,
            "excerpt": [excerpt(x, 300) for x in texts],
            "similar": pa.array([1, 2, 1, 1], pa.int32()),
        }
    ).cast(REVIEW_SCHEMA)
    facts = facts_of(res)
    report = summarise(
        context(run_id=rid, audited_date=day, rows_read=400, review_rows=4, expert_calls=int(facts.counts["delegated"])),
        facts,
        History(),
    )
    layout = RunLayout.new_attempt(out, rid)
    files = write_audit_report(layout, report, facts, History(), review, [])
    publish(layout, report, files, PublishSpec(keep_staging=True, notify=None), before_commit=lambda: None)
    return layout


def test_hostile_rows_leave_the_report_whole_and_the_night_in_the_history(tmp_path):
    if chromium() is None:
        pytest.skip("chromium is not installed (Debian: apt-get install -y chromium)")
    out = str(tmp_path / "out")
    benign = night(out, "n1", "2026-11-23", hostile=False)
    hostile = night(out, "n2", "2026-11-24", hostile=True)
    body = json.load(open(f"{hostile.attempt_root}/report.json"))  # parses
    groups = {g["group"]: g["rows"] for g in body["groups"]}
    assert sum(groups.values()) == 400 and len(groups) == 4 and 'token=***"b' in groups, groups  # redacted as a value
    a, b = check_page(f"{benign.attempt_root}/report.html"), check_page(f"{hostile.attempt_root}/report.html")
    assert b["ok"], b
    assert b["headings"] == a["headings"] and len(a["headings"]) >= 8  # every section is in the DOM
    assert b["table_rows"] == a["table_rows"]  # no row merged into another's cell
    page = open(f"{hostile.attempt_root}/report.html").read()
    assert "MIIEvQIBADAN" not in page and "<script>alert(1)" not in page
    assert [n["run_id"] for n in history(out).nights] == ["n1", "n2"]  # the night stays in the drift history


def test_the_review_csv_neutralises_formulas_and_the_report_links_it(tmp_path):
    """review.csv beside review.parquet: every cell a spreadsheet would run (=, +, -, @, tab, CR
    first) starts with an apostrophe; the values are otherwise the Parquet file's; the page links it."""
    import csv

    import pyarrow.parquet as pq

    layout = night(str(tmp_path / "out"), "n2", "2026-11-24", hostile=True)
    rows = list(csv.DictReader(open(f"{layout.attempt_root}/review.csv", encoding="utf-8")))
    want = pq.read_table(f"{layout.attempt_root}/review.parquet").to_pylist()
    assert len(rows) == len(want) == 4
    for got, w in zip(rows, want):
        for k in ("id", "group", "excerpt"):
            v = w[k] or ""
            assert got[k] == ("'" + v if v[:1] in ("=", "+", "-", "@", "\t", "\r") else v)
        assert not any(c[:1] in "=+@" for c in got.values() if c)
    assert {r["id"] for r in rows} >= {'\'=HYPERLINK("http://x.example","click")', "'@SUM(1+1)"}
    page = open(f"{layout.attempt_root}/report.html").read()
    assert "href='review.csv'" in page
    files = json.load(open(f"{layout.root}/manifest.json"))
    assert "review.csv" in json.dumps(files)
