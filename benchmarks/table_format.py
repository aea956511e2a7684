"""Our run manifest against a Delta Lake table (delta-rs, the ``deltalake`` package) and an Apache
Iceberg table (``pyiceberg``, SQL catalogue) as the way to publish a night's results atomically, on
the real S3 server (SeaweedFS); writes benchmarks/results/table_format.json.

    .venv/bin/pip install deltalake==1.6.6 "pyiceberg[sql-sqlite,pyarrow]==0.12.0"   # only for this benchmark
    .venv/bin/python benchmarks/table_format.py [--rows 1000000] [--out benchmarks/results/table_format.json]

Both publish the same results table (N rows shaped like ``results/*.parquet``; ours in files of
250,000 rows, Delta in the files its writer chooses) five times under one name, as five reruns of one
night would, and the benchmark records:

- seconds to publish (ours: the Parquet files under a new attempt, then ``RunLayout.publish``, which
  reads every file back for its SHA-256; Delta: ``write_deltalake(mode="overwrite")`` with
  ``aws_conditional_put: etag``, its safe-concurrency mode for S3 stores with conditional writes),
  and to read the run back whole;
- what a reader polling all along saw while three reruns replaced the run: every read is classified as
  the old version whole, the new one whole, or anything else (a mix, a part, nothing, an error);
- two writers replacing the same run at the same moment: which of them won, and when each learnt it
  (ours: the lease, taken before any compute; Delta and Iceberg: their commit, after the data files
  are written);
- bytes left under the run after the five publishes (Delta: before and after VACUUM keeping the last
  two versions, what ours keeps), and what each lists per file (checksums or not).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time

import numpy as np
import pyarrow as pa

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from ctd import storage  # noqa: E402
from ctd.runs.folder import read_manifest, read_run_table  # noqa: E402
from ctd.runs.layout import RunLayout  # noqa: E402
from ctd.runs.lease import Lease  # noqa: E402
from ctd.tables import write_parquet  # noqa: E402
from ctd.testing.localstack import SeaweedFS  # noqa: E402

ROWS_PER_FILE = 250_000


def results_table(n: int, tag: str, seed: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    probe = rng.random(n)
    deleg = rng.random(n) < 0.1
    expert = np.where(deleg, rng.random(n), np.nan)
    final = np.where(deleg, expert, probe)
    return pa.table(
        {
            "id": [f"{tag}-{i:09d}" for i in range(n)],
            "group": rng.choice(["medical", "finance", "travel"], n).tolist(),
            "probe": probe,
            "dv": rng.normal(0, 0.4, n),
            "expert": pa.array(expert, mask=~deleg),
            "final": final,
            "decision": final >= 0.5,
            "delegated": deleg,
            "over_cap": np.zeros(n, bool),
        }
    )


# ----------------------------------------------------------------------------------------------
# the two ways to publish
# ----------------------------------------------------------------------------------------------
def publish_ours(output: str, run_id: str, table: pa.Table) -> dict:
    layout = RunLayout.new_attempt(output, run_id)
    t0 = time.perf_counter()
    for k, start in enumerate(range(0, table.num_rows, ROWS_PER_FILE)):
        write_parquet(storage.join(layout.results, f"part-{k:04d}.parquet"), table.slice(start, ROWS_PER_FILE))
    t1 = time.perf_counter()
    layout.publish({"rows": table.num_rows}, [])
    t2 = time.perf_counter()
    return {"write_s": round(t1 - t0, 3), "commit_s": round(t2 - t1, 3), "publish_s": round(t2 - t0, 3)}


def read_ours(output: str, run_id: str) -> pa.Table:
    return read_run_table(output, run_id, columns=["id"])


def delta_options(server: SeaweedFS) -> dict:
    return {
        "AWS_ENDPOINT_URL": server.endpoint,
        "AWS_ACCESS_KEY_ID": server.key,
        "AWS_SECRET_ACCESS_KEY": server.secret,
        "AWS_REGION": "us-east-1",
        "AWS_ALLOW_HTTP": "true",
        "aws_conditional_put": "etag",
    }


def publish_delta(uri: str, table: pa.Table, opts: dict) -> dict:
    from deltalake import write_deltalake

    t0 = time.perf_counter()
    write_deltalake(uri, table, mode="overwrite", storage_options=opts)
    return {"publish_s": round(time.perf_counter() - t0, 3)}


def read_delta(uri: str, opts: dict) -> pa.Table:
    from deltalake import DeltaTable

    return pa.table(DeltaTable(uri, storage_options=opts).to_pyarrow_table(columns=["id"]))


def iceberg_catalog(server: SeaweedFS, db: str):
    """A SQL catalogue (SQLite: the smallest Iceberg catalogue there is) over the S3 warehouse; a
    production one is a REST, Glue or Hive service to run beside the store."""
    from pyiceberg.catalog.sql import SqlCatalog

    return SqlCatalog(
        "bench",
        uri=f"sqlite:///{db}",
        warehouse=f"s3://{server.bucket}/iceberg",
        **{
            "s3.endpoint": server.endpoint,
            "s3.access-key-id": server.key,
            "s3.secret-access-key": server.secret,
            "s3.region": "us-east-1",
        },
    )


def publish_iceberg(catalog, name: str, table: pa.Table) -> dict:
    t0 = time.perf_counter()
    try:
        tbl = catalog.load_table(name)
    except Exception:  # noqa: BLE001 (the first publish creates it)
        tbl = catalog.create_table(name, schema=table.schema)
    tbl.overwrite(table)
    return {"publish_s": round(time.perf_counter() - t0, 3)}


def read_iceberg(catalog, name: str) -> pa.Table:
    return catalog.load_table(name).scan(selected_fields=("id",)).to_arrow()


# ----------------------------------------------------------------------------------------------
# a reader polling while a rerun replaces the run
# ----------------------------------------------------------------------------------------------
class Poller(threading.Thread):
    def __init__(self, read, n: int, every: float = 0.05):
        super().__init__(daemon=True)
        self.read, self.n, self.every = read, n, every
        self.seen: list[str] = []
        self._halt = threading.Event()

    def classify(self) -> str:
        try:
            ids = self.read().column("id")
        except Exception as e:  # noqa: BLE001 (what a reader got is the measurement)
            return f"error: {type(e).__name__}"
        tags = {x.split("-", 1)[0] for x in ids.unique().to_pylist()}
        if len(ids) == self.n and len(tags) == 1:
            return f"whole {tags.pop()}"
        return f"other: {len(ids)} rows, versions {sorted(tags)}"

    def run(self):
        while not self._halt.is_set():
            self.seen.append(self.classify())
            time.sleep(self.every)

    def stop(self) -> dict:
        self._halt.set()
        self.join()
        counts: dict[str, int] = {}
        for s in self.seen:
            counts[s] = counts.get(s, 0) + 1
        return counts


def replace_under_a_reader(read, publish, n: int, new: pa.Table) -> dict:
    p = Poller(read, n)
    p.start()
    time.sleep(0.3)
    t0 = time.perf_counter()
    publish(new)
    dt = time.perf_counter() - t0
    time.sleep(0.3)
    return {"reads": p.stop(), "replace_s": round(dt, 3)}


# ----------------------------------------------------------------------------------------------
# two writers at once
# ----------------------------------------------------------------------------------------------
def two_writers(start_write) -> list[dict]:
    """Start two writers together; each returns (outcome, seconds until it knew)."""
    barrier = threading.Barrier(2)
    out: list[dict] = [{}, {}]

    def go(i):
        barrier.wait()
        t0 = time.perf_counter()
        try:
            start_write(i)
            out[i] = {"writer": i, "outcome": "committed", "knew_after_s": round(time.perf_counter() - t0, 3)}
        except Exception as e:  # noqa: BLE001
            out[i] = {
                "writer": i,
                "outcome": f"refused: {type(e).__name__}: {str(e)[:160]}",
                "knew_after_s": round(time.perf_counter() - t0, 3),
            }

    threads = [threading.Thread(target=go, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def summarise_reads(runs: list[dict]) -> dict:
    """Reads during the replaces by kind: a whole version (old or new) or anything else."""
    out = {"whole": 0, "other": 0, "replace_s": [r["replace_s"] for r in runs]}
    for r in runs:
        for kind, k in r["reads"].items():
            out["whole" if kind.startswith("whole") else "other"] += k
    return out


def prefix_bytes(server: SeaweedFS, prefix: str) -> dict:
    files = server.fs.find(f"{server.bucket}/{prefix}", detail=True)
    return {"objects": len(files), "bytes": int(sum(v["size"] for v in files.values()))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "table_format.json"))
    args = ap.parse_args(argv)
    import deltalake

    n = args.rows
    tables = {tag: results_table(n, tag, seed) for seed, tag in enumerate(["a", "b", "c"])}
    result: dict = {
        "command": "python benchmarks/table_format.py" + (f" --rows {n}" if n != 1_000_000 else ""),
        "rows": n,
        "rows_per_file": ROWS_PER_FILE,
        "deltalake": deltalake.__version__,
        "store": "SeaweedFS (weed mini) on loopback",
        "machine": f"{os.cpu_count()} cores",
    }
    with tempfile.TemporaryDirectory() as tmp, SeaweedFS(os.path.join(tmp, "s3")) as server:
        output = f"s3://{server.bucket}/ours"
        uri, opts = f"s3://{server.bucket}/delta/night", delta_options(server)
        ours, delta = {"publish": []}, {"publish": []}
        for tag in ("a", "b"):
            ours["publish"].append(publish_ours(output, "night", tables[tag]))
            delta["publish"].append(publish_delta(uri, tables[tag], opts))
        t0 = time.perf_counter()
        assert read_ours(output, "night").num_rows == n
        ours["read_s"] = round(time.perf_counter() - t0, 3)
        t0 = time.perf_counter()
        assert read_delta(uri, opts).num_rows == n
        delta["read_s"] = round(time.perf_counter() - t0, 3)
        print(
            f"publish: ours {ours['publish']}, delta {delta['publish']}; read whole: ours {ours['read_s']} s, delta {delta['read_s']} s",
            flush=True,
        )

        # three more reruns, each replacing the run while a reader polls it (c, b, c)
        ours["replace_under_reader"], delta["replace_under_reader"] = [], []
        for tag in ("c", "b", "c"):
            ours["replace_under_reader"].append(
                replace_under_a_reader(
                    lambda: read_ours(output, "night"),
                    lambda t: ours["publish"].append(publish_ours(output, "night", t)),
                    n,
                    tables[tag],
                )
            )
            delta["replace_under_reader"].append(
                replace_under_a_reader(
                    lambda: read_delta(uri, opts), lambda t: delta["publish"].append(publish_delta(uri, t, opts)), n, tables[tag]
                )
            )
        for d in (ours, delta):
            d["reads_during_replaces"] = summarise_reads(d["replace_under_reader"])
        print(
            f"reads during three replaces: ours {ours['reads_during_replaces']}, delta {delta['reads_during_replaces']}",
            flush=True,
        )

        from deltalake import DeltaTable

        m = read_manifest(output, "night")
        ours["per_file"] = sorted(m["files"]["results"][0])
        ours["data_files_per_publish"] = len(m["files"]["results"])
        dt = DeltaTable(uri, storage_options=opts)
        adds = pa.table(dt.get_add_actions(flatten=True))
        delta["per_file"] = sorted(adds.column_names)
        delta["data_files_per_publish"] = adds.num_rows
        delta["versions"] = dt.version() + 1
        # what stays after five publishes: ours keeps the published attempt and the one it replaced;
        # Delta keeps every version until VACUUM (here also run keeping the last two versions, as ours)
        ours["bytes_after_5_publishes"] = prefix_bytes(server, "ours/runs/night")
        delta["bytes_after_5_publishes"] = prefix_bytes(server, "delta/night")
        t0 = time.perf_counter()
        dt.vacuum(
            retention_hours=0, enforce_retention_duration=False, dry_run=False, keep_versions=[dt.version() - 1, dt.version()]
        )
        delta["vacuum_s"] = round(time.perf_counter() - t0, 3)
        delta["bytes_after_vacuum_keeping_2_versions"] = prefix_bytes(server, "delta/night")

        # two writers on one run: ours takes the lease before any compute; Delta finds out at commit
        def lease_writer(i):
            lease = Lease(f"{output}/runs/race/_lease.json", run_id="race", ttl_s=60, wait_s=0, log=lambda *a: None).acquire()
            publish_ours(output, "race", tables["ab"[i]])
            lease.release()

        ours["two_writers"] = two_writers(lease_writer)
        ours["two_writers_published"] = read_ours(output, "race").column("id")[0].as_py().split("-")[0]

        def delta_writer(i):
            publish_delta(f"s3://{server.bucket}/delta/race", tables["ab"[i]], opts)

        delta["two_writers"] = two_writers(delta_writer)
        race = DeltaTable(f"s3://{server.bucket}/delta/race", storage_options=opts)
        delta["two_writers_versions"] = race.version() + 1
        delta["two_writers_published"] = (
            read_delta(f"s3://{server.bucket}/delta/race", opts).column("id")[0].as_py().split("-")[0]
        )
        print(
            f"two writers: ours {ours['two_writers']}, delta {delta['two_writers']} ({delta['two_writers_versions']} versions)",
            flush=True,
        )

        # Apache Iceberg (pyiceberg), the same steps
        import pyiceberg

        db = os.path.join(tmp, "catalog.db")
        cat = iceberg_catalog(server, db)
        cat.create_namespace("ctd")
        ice = {"version": pyiceberg.__version__, "catalog": "SqlCatalog on SQLite", "publish": []}
        for tag in ("a", "b"):
            ice["publish"].append(publish_iceberg(cat, "ctd.night", tables[tag]))
        t0 = time.perf_counter()
        assert read_iceberg(cat, "ctd.night").num_rows == n
        ice["read_s"] = round(time.perf_counter() - t0, 3)
        ice["replace_under_reader"] = [
            replace_under_a_reader(
                lambda: read_iceberg(iceberg_catalog(server, db), "ctd.night"),
                lambda t: ice["publish"].append(publish_iceberg(cat, "ctd.night", t)),
                n,
                tables[tag],
            )
            for tag in ("c", "b", "c")
        ]
        ice["reads_during_replaces"] = summarise_reads(ice["replace_under_reader"])
        files = cat.load_table("ctd.night").inspect.files()
        ice["per_file"] = sorted(c for c in files.column_names if not c.startswith("readable_metrics"))
        ice["data_files_per_publish"] = files.num_rows
        ice["snapshots"] = len(cat.load_table("ctd.night").snapshots())
        ice["bytes_after_5_publishes"] = prefix_bytes(server, "iceberg")
        publish_iceberg(cat, "ctd.race", tables["a"])  # the table exists before the race, as a rerun's would
        ice["two_writers"] = two_writers(lambda i: publish_iceberg(iceberg_catalog(server, db), "ctd.race", tables["ab"[i]]))
        ice["two_writers_published"] = read_iceberg(cat, "ctd.race").column("id")[0].as_py().split("-")[0]
        print(
            f"iceberg: publish {ice['publish']}, read {ice['read_s']} s, reads {ice['reads_during_replaces']}, "
            f"two writers {ice['two_writers']}",
            flush=True,
        )
        result.update(ours=ours, delta=delta, iceberg=ice)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
