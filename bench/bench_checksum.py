#!/usr/bin/env python3
"""Benchmark: what ``verify="checksum"`` costs against a plain COPY load.

Two throwaway servers (source, destination), the mixed table of ``bench_copy.py`` on the
source. Each case loads it into the destination through ``airflow_copyman.load.run`` (what
the operator runs: plan, one COPY, commit), in the binary and text formats:

* ``count``     ``verify="count"``: the COPY load alone;
* ``checksum``  ``verify="checksum"``: the engine digests the rows as it forwards them, the
                destination's rows are read back as the same COPY in the load
                transaction and digested (``load/readback.py``), then compared; the
                source is read once;
* ``checksum-by-text``  the same load with the other method forced (the one used where a
                column's type differs between the sides): both servers render every
                row as ``ROW(...)::text`` and hash it, the source running its query a
                second time.

Cases run round-robin, the median of ``--repeat`` runs is reported. Then the parts are timed
alone on the source table (the server-side query, serial and with parallel workers; the
read-back with its client CPU) to show where the time goes.

    .venv/bin/python bench/bench_checksum.py --rows 1000000
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
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

from airflow_copyman import load  # noqa: E402
from airflow_copyman.load.catalog import tables as load_tables  # noqa: E402
from airflow_copyman.load.connection import settings as session_settings  # noqa: E402
from airflow_copyman.load.connection.bounded import Bounds  # noqa: E402
from airflow_copyman.load.verify import readback  # noqa: E402
from airflow_copyman.testing.servers import create_database, throwaway_servers  # noqa: E402

DB = "bench"
NAMES = ["id", "ts", "txt", "num", "arr", "doc", "uid"]
MODES = ("count", "checksum", "checksum-by-text")


def connect(server: Any, **kwargs: Any) -> psycopg.Connection[Any]:
    return psycopg.connect(server.address.conninfo(DB), **session_settings.connect_args(kwargs))


def load_once(src_server: Any, dst_server: Any, fmt: str, mode: str) -> dict[str, float]:
    source = load.postgres("src", src_server.address.conninfo(DB))
    destination = load.postgres("dst", dst_server.address.conninfo(DB))
    quiet = logging.getLogger("bench.quiet")
    quiet.setLevel(logging.WARNING)
    # Planning verifies by the COPY stream where both sides' types are the same.
    same_types = load_tables.same_types
    if mode == "checksum-by-text":
        load_tables.same_types = lambda source, dest: False  # type: ignore[assignment]
    try:
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        report = load.run(
            source,
            "src",
            [{"conn_id": "dst", "table": "dst"}],
            endpoints={"dst": destination},
            format=fmt,
            verify="count" if mode == "count" else "checksum",
            log=quiet,
        )
        t1 = time.perf_counter()
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    finally:
        load_tables.same_types = same_types  # type: ignore[assignment]
    (result,) = report.destinations
    assert result.status == "loaded", result
    if mode != "count":
        assert result.checksum is not None, result
    return {"total": t1 - t0, "client cpu": cpu1.ru_utime - cpu0.ru_utime + cpu1.ru_stime
            - cpu0.ru_stime}


def reset(dst_server: Any) -> None:
    with connect(dst_server, autocommit=True) as conn:
        conn.execute("TRUNCATE dst")
        conn.execute("CHECKPOINT")


def parts(server: Any, table: str) -> dict[str, str]:
    """One side's checksum taken apart: the server-side query (serial and with parallel
    workers), the read-back as COPY digested by the client (wall and client CPU)."""
    row = "ROW(id, ts, txt, num, arr, doc, uid)::text"
    queries = {
        "scan only (count)": f"SELECT count(*) FROM {table}",
        "render rows (sum of lengths)": f"SELECT count(*), sum(length({row})) FROM {table}",
        "render + hashtextextended (by-text method)": (
            f"SELECT count(*), sum(hashtextextended({row}, 0)) FROM {table}"
        ),
    }
    out: dict[str, str] = {}
    with connect(server, autocommit=True) as conn:
        for workers in (0, 2):
            conn.execute(f"SET max_parallel_workers_per_gather = {workers}")  # type: ignore[arg-type]
            for name, query in queries.items():
                times = []
                for _ in range(2):
                    t0 = time.perf_counter()
                    conn.execute(query)  # type: ignore[arg-type]
                    times.append(time.perf_counter() - t0)
                out[f"{name}, {workers} parallel workers"] = f"{min(times):.2f}"
        conn.execute("RESET max_parallel_workers_per_gather")
        bounds = Bounds(600.0)
        for fmt in ("binary", "text"):
            settings = None if fmt == "binary" else readback.render_settings(conn)
            best = (float("inf"), 0.0)
            for _ in range(2):
                cpu0 = resource.getrusage(resource.RUSAGE_SELF)
                t0 = time.perf_counter()
                with conn.transaction():  # the settings' savepoint needs one
                    (got,) = readback.digests(
                        [(conn, readback.query(conn, sql.Identifier(table), NAMES, None, fmt))],
                        settings,
                        bounds,
                    )
                wall = time.perf_counter() - t0
                cpu1 = resource.getrusage(resource.RUSAGE_SELF)
                assert not isinstance(got, BaseException), got
                best = min(best, (wall, cpu1.ru_utime - cpu0.ru_utime))
            out[f"read-back as COPY {fmt}, digested (checksum method)"] = (
                f"{best[0]:.2f} (client CPU {best[1]:.2f})"
            )
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
        print("| format | verify | total s | client CPU s | x count | x count, each run |")
        print("|---|---|---:|---:|---:|---|")
        for fmt in formats:
            bases = [r["total"] for r in results[(fmt, "count")]]
            base = statistics.median(bases)
            for mode in MODES:
                runs = results[(fmt, mode)]
                total = statistics.median(r["total"] for r in runs)
                # Each run against the count run of the same round: the pairs share the load.
                each = ", ".join(f"{r['total'] / b:.2f}" for r, b in zip(runs, bases, strict=True))
                print(
                    f"| {fmt} | {mode} | {total:.2f} | "
                    f"{statistics.median(r['client cpu'] for r in runs):.2f} | "
                    f"{total / base:.2f} | {each} |"
                )
        print("\nOne side's checksum taken apart (source table, best of 2):\n")
        print("| part | s |")
        print("|---|---:|")
        for name, seconds in parts(src_server, "src").items():
            print(f"| {name} | {seconds} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
