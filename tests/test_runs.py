"""The run layout a data engineer relies on: atomic publish through one manifest, one writer per run
id (a lease taken by conditional writes, on a local filesystem and on the real S3 server), and a
``verify`` that fails, with a clear reason and a non-zero exit, on each way a published run can be
tampered with."""

import json
import os
import subprocess
import sys
import threading
import time

import pyarrow as pa
import pytest

from ctd import storage
from ctd.reporting.pages import write_report
from ctd.runs.folder import list_runs, read_manifest, read_run_table, run_file
from ctd.runs.layout import RunLayout, describe_files
from ctd.runs.lease import Lease, LeaseHeld, LeaseLost
from ctd.tables import read_parquet, write_parquet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------------------------
# the lease
# ----------------------------------------------------------------------------------------------
@pytest.fixture(params=["local", "s3"])
def lease_uri(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "runs" / "r" / "_lease.json")
    s3 = request.getfixturevalue("s3")
    return f"s3://{s3['bucket']}/lease-test/{tmp_path.name}/_lease.json"


def test_one_writer_per_run_id_and_an_expired_lease_is_taken_over(lease_uri):
    quiet = lambda *a: None  # noqa: E731
    first = Lease(lease_uri, run_id="r", ttl_s=3, log=quiet).acquire()
    with pytest.raises(LeaseHeld, match="being written by another driver"):
        Lease(lease_uri, run_id="r", ttl_s=3, log=quiet).acquire()
    first.renew()  # the holder renews (conditioned on its own last version)
    # the holder stops renewing (a paused or dead driver): its lease expires and is taken over
    first._stop.set()
    time.sleep(3.5)
    second = Lease(lease_uri, run_id="r", ttl_s=30, log=quiet).acquire()
    with pytest.raises(LeaseLost, match="taken by"):
        first.check()  # the old holder must not publish
    with pytest.raises(LeaseHeld):
        Lease(lease_uri, run_id="r", log=quiet).acquire(wait_s=1.0)  # waited 1 s; the live holder keeps it
    second.release()
    third = Lease(lease_uri, run_id="r", log=quiet).acquire()  # released: free at once
    third.release()


def test_of_two_drivers_racing_for_an_expired_lease_exactly_one_wins(lease_uri):
    quiet = lambda *a: None  # noqa: E731
    storage.write_bytes(lease_uri, json.dumps({"owner": "dead", "expires_at": 0, "released": False}).encode())
    for _ in range(5):
        won, barrier = [], threading.Barrier(4)

        def take():
            lease = Lease(lease_uri, run_id="r", ttl_s=60, log=quiet)
            barrier.wait()  # noqa: B023 (each thread runs within its own iteration)
            try:
                lease._try_acquire()
                won.append(lease)  # noqa: B023
            except LeaseHeld:
                pass

        threads = [threading.Thread(target=take) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(won) == 1, len(won)
        won[0].release()
        storage.write_bytes(lease_uri, json.dumps({"owner": "dead", "expires_at": 0, "released": False}).encode())


# ----------------------------------------------------------------------------------------------
# atomic publish: readers see the previous run until the manifest is written, then the new one
# ----------------------------------------------------------------------------------------------
def write_attempt(output: str, run_id: str, ids: list[str], quarantined: list[str], tag: str, publish: bool = True) -> RunLayout:
    layout = RunLayout.new_attempt(output, run_id)
    half = len(ids) // 2
    for k, part in enumerate((ids[:half], ids[half:])):
        write_parquet(storage.join(layout.results, f"part-{k}.parquet"), pa.table({"id": part, "tag": [tag] * len(part)}))
    write_parquet(
        storage.join(layout.quarantine, "part-0.parquet"),
        pa.table({"id": quarantined, "error": ["empty text"] * len(quarantined)}),
    )
    report = {
        "kind": "audit",
        "run_id": run_id,
        "rows_read": len(ids) + len(quarantined),
        "rows_scored": len(ids),
        "rows_quarantined": len(quarantined),
    }
    files = write_report(layout.attempt_root, "report", report, f"<p>{tag}</p>")
    if publish:
        layout.publish({"tag": tag}, list(files.values()))
    return layout


def test_a_rerun_never_hides_the_published_run_and_publishes_in_one_step(tmp_path):
    out = str(tmp_path)
    ids = [f"r{i}" for i in range(50)]
    a = write_attempt(out, "night", ids, ["q1"], "A")
    tags = lambda: set(read_run_table(out, "night").column("tag").to_pylist())  # noqa: E731
    assert tags() == {"A"} and list_runs(out) == ["night"]
    b = write_attempt(out, "night", ids, ["q1"], "B", publish=False)  # a rerun, written but not yet published (or killed)
    assert tags() == {"A"} and read_manifest(out, "night")["attempt"] == a.attempt
    assert storage.read_json(run_file(out, "night", "report.json"))["rows_scored"] == 50
    files = write_report(b.attempt_root, "report", {"kind": "audit"}, "<p>B</p>")
    m = b.publish({"tag": "B"}, list(files.values()))
    assert tags() == {"B"} and m["replaces_attempt"] == a.attempt
    assert all(e["file"].startswith(f"attempts/{b.attempt}/") for e in m["files"]["results"] + m["report"])
    c = write_attempt(out, "night", ids, ["q1"], "C")
    # after publishing C: B (the run C replaced) is kept for readers holding B's manifest; A is gone
    assert sorted(storage.listdir(RunLayout(out, "night").path("attempts"))) == sorted([b.attempt, c.attempt])
    assert tags() == {"C"}


# ----------------------------------------------------------------------------------------------
# verify: every check can fail
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def published(tmp_path, ray_head):
    out = str(tmp_path / "out")
    ids, quarantined = [f"r{i}" for i in range(40)], ["q0", "q1"]
    layout = write_attempt(out, "night", ids, quarantined, "A")
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(
        "".join(json.dumps({"id": i, "text": "t"}) + "\n" for i in ids)
        + "".join(json.dumps({"id": i, "text": ""}) + "\n" for i in quarantined)
    )
    return {"out": out, "layout": layout, "corpus": str(corpus), "ray": ray_head["address"]}


def _tamper(p: dict, rel: str, edit, consistent: bool = True) -> None:
    """Rewrite a published file with ``edit``; ``consistent``: also fix the manifest (rows, size,
    SHA-256, totals) and the report's counts, so that only the check under test can notice."""
    out, layout = p["out"], RunLayout(p["out"], "night")
    uri = layout.path(rel)
    if rel.endswith(".parquet"):
        write_parquet(uri, edit(read_parquet(uri)))
    else:
        storage.write_json(uri, edit(storage.read_json(uri)))
    if not consistent:
        return
    m = read_manifest(out, "night")
    for kind in ("results", "quarantine"):
        for e in m["files"][kind]:
            e.update(describe_files([layout.path(e["file"])])[layout.path(e["file"])])
        m["rows"][kind] = sum(e["rows"] for e in m["files"][kind])
    rep_rel = next(e["file"] for e in m["report"] if e["file"].endswith("report.json"))
    if rel != rep_rel:
        r = storage.read_json(layout.path(rep_rel))
        r.update(rows_scored=m["rows"]["results"], rows_quarantined=m["rows"]["quarantine"], rows_read=sum(m["rows"].values()))
        storage.write_json(layout.path(rep_rel), r)
    for e in m["report"]:
        e.update(describe_files([layout.path(e["file"])], rows=lambda f: False)[layout.path(e["file"])])
    storage.write_json(layout.manifest, m)


def _verify_cli(p: dict, corpus: bool = True):
    args = [sys.executable, "-m", "ctd.cli", "report", "verify", RunLayout(p["out"], "night").root, "--json"] + (
        ["--corpus", p["corpus"]] if corpus else []
    )
    r = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, RAY_ADDRESS=p["ray"]), timeout=600)
    return r.returncode, json.loads(r.stdout[r.stdout.index("{") :]) if "{" in r.stdout else {"problems": [r.stderr[-2000:]]}


def test_verify_passes_an_untouched_run(published):
    from ctd.runs.verify import verify_run

    v = verify_run(RunLayout(published["out"], "night").root, corpus=published["corpus"])
    assert v["ok"], v["problems"]
    assert v["results_rows"] == 40 and v["quarantine_rows"] == 2 and v["rows_lost"] == v["rows_extra"] == 0


def results_file(p, k=1):
    return f"attempts/{p['layout'].attempt}/results/part-{k}.parquet"


CASES = {
    # name: (file, edit, consistent, the reason verify must give)
    "replaced file": (
        results_file,
        lambda t: t.set_column(1, "tag", pa.array(["X"] * t.num_rows)),
        False,
        "content differs from the manifest",
    ),
    "id in results twice": (
        results_file,
        lambda t: pa.concat_tables([t, t.slice(0, 1)]),
        True,
        "appear more than once among scored rows",
    ),
    "id in both tables": (
        lambda p: f"attempts/{p['layout'].attempt}/quarantine/part-0.parquet",
        lambda t: pa.concat_tables([t, pa.table({"id": ["r3"], "error": ["duplicate id (2 rows)"]})]),
        True,
        "quarantined as duplicates also appear in results",
    ),
    "missing id": (results_file, lambda t: t.slice(1), True, "in neither results nor quarantine"),
    "extra id": (
        results_file,
        lambda t: pa.concat_tables([t, pa.table({"id": ["not-in-corpus"], "tag": ["A"]})]),
        True,
        "have no input row",
    ),
    "changed count": (
        lambda p: f"attempts/{p['layout'].attempt}/report.json",
        lambda r: {**r, "rows_scored": r["rows_scored"] + 1},
        True,
        "the report says rows_scored",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_verify_fails_on_a_tampered_run(published, case):
    from ctd.runs.verify import verify_run

    rel, edit, consistent, reason = CASES[case]
    _tamper(published, rel(published), edit, consistent)
    v = verify_run(RunLayout(published["out"], "night").root, corpus=published["corpus"])
    assert not v["ok"] and any(reason in p for p in v["problems"]), v["problems"]
    if consistent:  # the manifest was fixed up: no checksum problem, only the one under test
        assert not any("content differs" in p for p in v["problems"]), v["problems"]


def test_verify_cli_exits_non_zero_with_the_reason(published):
    code, v = _verify_cli(published)
    assert code == 0 and v["ok"], v
    storage.write_bytes(
        published["layout"].path("attempts", published["layout"].attempt, "results", "stray.parquet"),
        storage.read_bytes(published["layout"].path(results_file(published))),
    )
    code, v = _verify_cli(published)
    assert code == 1 and any("does not list" in p for p in v["problems"]), v
    storage.remove(published["layout"].path("attempts", published["layout"].attempt, "results", "stray.parquet"))
    storage.remove(published["layout"].path(f"attempts/{published['layout'].attempt}/quarantine/part-0.parquet"))
    code, v = _verify_cli(published, corpus=False)
    assert code == 1 and any("listed in the manifest but missing" in p for p in v["problems"]), v


def test_abandoned_staging_and_attempts_are_swept_after_their_retention(tmp_path):
    from ctd.runs.layout import sweep

    out, day = str(tmp_path), 86400
    published = write_attempt(out, "done", ["a", "b"], [], "A")
    now = time.time()
    cases = {
        "done": {"released": True, "renewed_at": now - 30 * day, "expires_at": now - 30 * day},  # published, abandoned retry
        "crashed": {"released": False, "renewed_at": now - 9 * day, "expires_at": now - 9 * day + 120},  # died 9 days ago
        "recent": {"released": False, "renewed_at": now - 2 * day, "expires_at": now - 2 * day + 120},  # died 2 days ago
        "running": {"released": False, "renewed_at": now - 20 * day, "expires_at": now + 60},
    }  # live (long run)
    for rid, lease in cases.items():
        layout = RunLayout.new_attempt(out, rid)
        storage.write_bytes(layout.path("_staging", "stage1", "part-0.parquet"), b"text copies")
        storage.write_bytes(storage.join(layout.results, "part-0.parquet"), b"unpublished")
        storage.write_json(layout.lease, {"owner": "x", **lease})
    removed = sweep(out, retention_days=7)
    gone = lambda rid: not storage.exists(RunLayout(out, rid).staging) and storage.listdir(
        RunLayout(out, rid).path("attempts")
    ) in ([], [published.attempt])  # noqa: E731
    assert gone("done") and gone("crashed") and len(removed) == 4
    assert storage.listdir(RunLayout(out, "done").path("attempts")) == [published.attempt]  # the published attempt stays
    assert read_run_table(out, "done").num_rows == 2
    for rid in ("recent", "running"):
        assert storage.exists(RunLayout(out, rid).staging) and storage.listdir(RunLayout(out, rid).path("attempts"))


# ----------------------------------------------------------------------------------------------
# stage-1 resume keys: content, not size; a local corpus is not read again while unchanged
# ----------------------------------------------------------------------------------------------
def test_local_corpus_keys_are_content_hashes_cached_by_size_and_mtime(tmp_path, monkeypatch):
    import hashlib

    from ctd.pipeline.chunks import corpus_keys

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for k in range(3):
        (corpus / f"part-{k}.jsonl").write_bytes(f'{{"id": "r{k}", "text": "hello"}}\n'.encode())
    files = sorted(str(p) for p in corpus.iterdir())
    for f in files:  # written a minute ago: a file modified in the last 2 s is never cached
        os.utime(f, ns=(time.time_ns() - 60 * 10**9,) * 2)
    cache = str(tmp_path / "_corpus_keys.json")
    sizes, keys = corpus_keys(str(corpus), files, cache)
    assert keys == {f: "sha256:" + hashlib.sha256(open(f, "rb").read()).hexdigest() for f in files}
    assert sizes == {f: os.path.getsize(f) for f in files}
    read = []
    real = storage.content_key
    monkeypatch.setattr(storage, "content_key", lambda uri: read.append(uri) or real(uri))
    assert corpus_keys(str(corpus), files, cache)[1] == keys and read == []  # unchanged: nothing read again
    st = os.stat(files[1])
    with open(files[1], "r+b") as f:  # same size, new content: the mtime moves, so the file is hashed again
        f.write(b'{"id": "X')
    os.utime(files[1], ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    _, again = corpus_keys(str(corpus), files, cache)
    assert read == [files[1]] and again[files[1]] != keys[files[1]] and os.path.getsize(files[1]) == st.st_size
    assert {f: again[f] for f in (files[0], files[2])} == {f: keys[f] for f in (files[0], files[2])}
    fresh = str(corpus / "part-3.jsonl")  # just written: hashed, but not cached (its mtime may not have ticked yet)
    open(fresh, "wb").write(b'{"id": "r3", "text": "hi"}\n')
    corpus_keys(str(corpus), files + [fresh], cache)
    assert fresh not in storage.read_json(cache) and files[1] in storage.read_json(cache)
