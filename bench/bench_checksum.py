#!/usr/bin/env python3
"""Benchmark: what ``verify="checksum"`` costs against a plain COPY load.

Two throwaway servers (source, destination), the mixed table of ``bench_copy.py`` on the
source. Each case copies it through the engine into the destination in one transaction and
commits, in the binary and text formats:

* ``count``     the COPY load alone (what ``verify="count"`` does);
* ``checksum``  the same, plus the source's checksum in the COPY's REPEATABLE READ
                transaction and the destination's over the rows the transaction wrote
                (``xmin``), both started at once after the COPY and waited for together,
                then compared;
* ``checksum-during-copy``  the source's checksum on a second source connection that
                imports the COPY's snapshot, started before the COPY (it runs during it),
                then the destination's after it.

Cases run round-robin, the median of ``--repeat`` runs is reported. Then each side's checksum
query is taken apart (rendering only, ``hashtextextended``, ``md5``) to show where the time goes.

    .venv/bin/python bench/bench_checksum.py --rows 1000000
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
for path in (str(REPO), str(BENCH_DIR)):
    if path not in sys.path:
        sys.path.insert(0, path)

import psycopg  # noqa: E402
from bench_copy import COLUMNS, LOAD_SQL  # noqa: E402
from psycopg import sql  # noqa: E402

from airflow_copyman import copyman  # noqa: E402
from airflow_copyman.load import _checksum as ck  # noqa: E402
from airflow_copyman.load import _session  # noqa: E402
from airflow_copyman.testing.servers import create_database, throwaway_servers  # noqa: E402

DB = "bench"
NAMES = ["id", "ts", "txt", "num", "arr", "doc", "uid"]
MODES = ("count", "checksum", "checksum-during-copy")


def connect(server: Any, **kwargs: Any) -> psycopg.Connection[Any]:
    return psycopg.connect(server.address.conninfo(DB), **_session.connect_args(kwargs))


def load_once(src_server: Any, dst_server: Any, fmt: str, mode: str) -> dict[str, float]:
    with (
        connect(src_server) as src,
        connect(dst_server) as dst,
        connect(src_server) as src2,
    ):
        src.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        src.read_only = True
        select = sql.SQL("SELECT * FROM src")
        t0 = time.perf_counter()
        renderings = None
        if mode != "count":  # planning: done before any data moves
            renderings = ck.destination_renderings(dst, sql.Identifier("dst"), NAMES)
        early = None
        if mode == "checksum-during-copy":
            # The source's checksum on a second connection in the COPY's snapshot, while
            # the COPY runs.
            ck.import_snapshot(src2, ck.export_snapshot(src))
            assert renderings is not None
            early = ck.start_source_checksums(src2, select, [renderings])
        copyman.transfer(
            (src, f"COPY (SELECT * FROM src) TO STDOUT (FORMAT {fmt})"),
            (dst, f"COPY dst FROM STDIN (FORMAT {fmt})"),
        )
        t1 = time.perf_counter()
        if renderings is not None:
            pending_src = early or ck.start_source_checksums(src, select, [renderings])
            pending_dst = ck.start_destination_checksum(
                dst, sql.Identifier("dst"), NAMES, ck.this_transaction(dst)
            )
            ck.verify("dst", pending_src.wait()[0], pending_dst.wait())
        t2 = time.perf_counter()
        dst.commit()
        t3 = time.perf_counter()
    return {"total": t3 - t0, "copy": t1 - t0, "checksum": t2 - t1}


def reset(dst_server: Any) -> None:
    with connect(dst_server, autocommit=True) as conn:
        conn.execute("TRUNCATE dst")
        conn.execute("CHECKPOINT")


def parts(server: Any, table: str) -> dict[str, float]:
    """One side's checksum query taken apart (serial and with parallel workers)."""
    row = "ROW(id, ts, txt, num, arr, doc, uid)::text"
    queries = {
        "scan only (count)": f"SELECT count(*) FROM {table}",
        "render rows (sum of lengths)": f"SELECT count(*), sum(length({row})) FROM {table}",
        "render + hashtextextended": (
            f"SELECT count(*), sum(hashtextextended({row}, 0)) FROM {table}"
        ),
        "render + md5 (64 bits)": (
            f"SELECT count(*), sum(('x' || left(md5({row}), 16))::bit(64)::bigint) FROM {table}"
        ),
    }
    out: dict[str, float] = {}
    with connect(server, autocommit=True) as conn:
        for workers in (0, 2):
            conn.execute(f"SET max_parallel_workers_per_gather = {workers}")  # type: ignore[arg-type]
            for name, query in queries.items():
                times = []
                for _ in range(2):
                    t0 = time.perf_counter()
                    conn.execute(query)  # type: ignore[arg-type]
                    times.append(time.perf_counter() - t0)
                out[f"{name}, {workers} parallel workers"] = min(times)
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--formats", default="binary,text")
    args = parser.parse_args(argv)
    formats = args.formats.split(",")
    print(f"load average at start: {os.getloadavg()}", flush=True)
    with throwaway_servers(2) as (src_server, dst_server):
        for server in (src_server, dst_server):
            create_database(server.address, DB)
        with connect(src_server, autocommit=True) as conn:
            conn.execute(f"CREATE TABLE src ({COLUMNS})")  # type: ignore[arg-type]
            conn.execute(LOAD_SQL.format(table="src", rows=args.rows))  # type: ignore[arg-type]
            conn.execute("VACUUM (FREEZE, ANALYZE) src")
            conn.execute("CHECKPOINT")
        with connect(dst_server, autocommit=True) as conn:
            conn.execute(f"CREATE TABLE dst ({COLUMNS})")  # type: ignore[arg-type]
        results: dict[tuple[str, str], list[dict[str, float]]] = {}
        for _ in range(args.repeat):
            for fmt in formats:
                for mode in MODES:
                    reset(dst_server)
                    run = load_once(src_server, dst_server, fmt, mode)
                    results.setdefault((fmt, mode), []).append(run)
                    print(f"{fmt} {mode}: {run}", flush=True)
        print(f"\n{args.rows:,} rows, median of {args.repeat}; load average now "
              f"{os.getloadavg()}\n")
        print("| format | verify | total s | COPY s | checksums s | x count |")
        print("|---|---|---:|---:|---:|---:|")
        for fmt in formats:
            base = statistics.median(r["total"] for r in results[(fmt, "count")])
            for mode in MODES:
                runs = results[(fmt, mode)]
                total = statistics.median(r["total"] for r in runs)
                print(
                    f"| {fmt} | {mode} | {total:.2f} | "
                    f"{statistics.median(r['copy'] for r in runs):.2f} | "
                    f"{statistics.median(r['checksum'] for r in runs):.2f} | "
                    f"{total / base:.2f} |"
                )
        print("\nOne side's checksum query taken apart (source table, best of 2):\n")
        print("| query | s |")
        print("|---|---:|")
        for name, seconds in parts(src_server, "src").items():
            print(f"| {name} | {seconds:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
