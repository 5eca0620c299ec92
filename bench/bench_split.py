#!/usr/bin/env python3
"""Benchmark: the fixed cost of a split load (issue 18) against one load of the same table.

Two throwaway servers (source, destination), the mixed table of ``bench_copy.py``. Cases,
each into a destination table that is replaced:

* ``single``   one ``load.run`` of the whole table (what ``CopyManOperator`` runs);
* ``split-N``  what ``CopyManSplitGroup``'s tasks run, one after another in this process:
               plan (catalog, min/max), for each range a staging check and ``load.run`` of
               the range into the (UNLOGGED) staging table with its ledger row, then publish
               (checks, load lock, TRUNCATE, INSERT ... SELECT from staging, ledger row, DROP);
* ``logged-N`` (``--logged-staging``) the same with a logged staging table;
* ``direct-N`` (``--direct``) append without staging (``stage=False``): each range straight
               into the table, no publish; against ``append``, one ``load.run`` appending the
               whole table (the table is emptied before each, outside the timing).

Nothing runs in parallel here: the split figures are the serial sum of its parts, so they
show its overhead. Airflow's own cost per task instance (scheduling, a worker process,
about 1-3 s each) is not in them. Median of ``--repeat`` runs.

    .venv/bin/python bench/bench_split.py --rows 1000000 --parts 4
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
for path in (str(REPO), str(BENCH_DIR)):
    if path not in sys.path:
        sys.path.insert(0, path)

import psycopg  # noqa: E402
from bench_copy import COLUMNS, LOAD_SQL  # noqa: E402

from airflow_copyman import load, split  # noqa: E402
from airflow_copyman.testing.servers import create_database, throwaway_servers  # noqa: E402

DB = "bench"


def single(src: load.Endpoint, dst: load.Endpoint) -> dict[str, float]:
    start = time.perf_counter()
    report = load.run(src, "src", [load.Destination("dst", "dst", mode="replace")],
                      endpoints={"dst": dst})
    assert not report.failed, report.failed
    return {"total": time.perf_counter() - start}


def single_append(src: load.Endpoint, dst: load.Endpoint) -> dict[str, float]:
    _empty(dst)
    start = time.perf_counter()
    report = load.run(src, "src", [load.Destination("dst", "dst")], endpoints={"dst": dst})
    assert not report.failed, report.failed
    return {"total": time.perf_counter() - start}


def direct_load(src: load.Endpoint, dst: load.Endpoint, parts: int) -> dict[str, float]:
    """``stage=False``: the ranges append straight into the table (each with its ledger
    row); publish only reads the ledger, so it is not timed."""
    _empty(dst)
    lineage = uuid.uuid4().hex
    times: dict[str, float] = {"publish": 0.0}
    t0 = time.perf_counter()
    with src.connect() as conn:
        source, ranges = split.plan(conn, "src", "id", parts)
    times["plan"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    for rng in ranges:
        key = load.TaskKey("bench", "grp.load", "run", rng.index, lineage, 1)
        report = load.run(
            src, split.range_query(source.schema, source.name, rng, None),
            [load.Destination("dst", "dst", load_lock=False)], endpoints={"dst": dst},
            ledger=load.Ledger(None, key),
        )
        assert not report.failed, report.failed
    times["ranges"] = time.perf_counter() - t1
    times["total"] = time.perf_counter() - t0
    return times


def _empty(dst: load.Endpoint) -> None:
    with dst.connect() as conn:
        conn.execute("TRUNCATE dst")
        conn.commit()


def split_load(
    src: load.Endpoint, dst: load.Endpoint, parts: int, unlogged: bool = True
) -> dict[str, float]:
    times: dict[str, float] = {}
    lineage = uuid.uuid4().hex
    ident = split.Identity("bench", "grp", "run", lineage, "dst", "dst")
    spec = load.Destination("dst", "dst", mode="replace")
    t0 = time.perf_counter()
    with src.connect() as conn:
        source, ranges = split.plan(conn, "src", "id", parts)
        columns = split.column_names(conn, source)
    times["plan"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    for rng in ranges:
        with dst.connect() as conn:
            target = split.target(conn, "dst", ident)
            split.ensure_staging(conn, target, ident, 60, unlogged=unlogged)
        key = load.TaskKey("bench", "grp.load", "run", rng.index, lineage, 1)
        report = load.run(
            src, split.range_query(source.schema, source.name, rng, None),
            [load.Destination("dst", target.staging_text)], endpoints={"dst": dst},
            ledger=load.Ledger(None, key),
        )
        assert not report.failed, report.failed
    times["ranges"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    with dst.connect() as conn:
        split.publish(
            conn, spec, target, load.Ledger(None, load.TaskKey("bench", "grp.publish", "run",
                                                                  -1, lineage, 1)),
            split.RangeLedger("bench", "grp.load", "run", lineage, len(ranges)),
            source_columns=columns, lock_timeout=60,
        )
    times["publish"] = time.perf_counter() - t2
    times["total"] = time.perf_counter() - t0
    return times


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--parts", type=int, nargs="+", default=[4])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--wal-minimal", action="store_true",
                        help="the destination server with wal_level=minimal (restarted)")
    parser.add_argument("--logged-staging", action="store_true",
                        help="also the split with a logged staging table (logged-N)")
    parser.add_argument("--direct", action="store_true",
                        help="also append without staging (direct-N, against append)")
    args = parser.parse_args(argv)
    with throwaway_servers(2) as (src_server, dst_server):
        for server in (src_server, dst_server):
            create_database(server.address, DB)
        if args.wal_minimal:
            # A table truncated in the writing transaction then skips the WAL (the single
            # load's COPY FREEZE and the publish's INSERT ... SELECT alike).
            with psycopg.connect(dst_server.address.conninfo(DB), autocommit=True) as conn:
                conn.execute("ALTER SYSTEM SET wal_level = minimal")
                conn.execute("ALTER SYSTEM SET max_wal_senders = 0")
            dst_server.stop()
            dst_server.start()
        with psycopg.connect(src_server.address.conninfo(DB), autocommit=True) as conn:
            conn.execute(f"CREATE TABLE src ({COLUMNS}, PRIMARY KEY (id))")  # type: ignore[arg-type]
            conn.execute(LOAD_SQL.format(table="src", rows=args.rows))  # type: ignore[arg-type]
            conn.execute("VACUUM ANALYZE src")
        with psycopg.connect(dst_server.address.conninfo(DB), autocommit=True) as conn:
            conn.execute(f"CREATE TABLE dst ({COLUMNS})")  # type: ignore[arg-type]
        src = load.postgres("src", src_server.address.conninfo(DB))
        dst = load.postgres("dst", dst_server.address.conninfo(DB))
        cases: dict[str, Any] = {"single": lambda: single(src, dst)}
        if args.direct:
            cases["append"] = lambda: single_append(src, dst)
        for parts in args.parts:
            cases[f"split-{parts}"] = lambda parts=parts: split_load(src, dst, parts)
            if args.logged_staging:
                cases[f"logged-{parts}"] = lambda parts=parts: split_load(
                    src, dst, parts, unlogged=False
                )
            if args.direct:
                cases[f"direct-{parts}"] = lambda parts=parts: direct_load(src, dst, parts)
        results: dict[str, list[dict[str, float]]] = {name: [] for name in cases}
        for _ in range(args.repeat):
            for name, case in cases.items():  # round-robin
                results[name].append(case())
    _print_results(results, args)
    return 0


def _print_results(results: dict[str, list[dict[str, float]]], args: argparse.Namespace) -> None:
    """Each case's median total, its ratio to its single load, and its parts."""
    base = statistics.median(r["total"] for r in results["single"])
    # direct-N appends: against the single append, not the single replace.
    append_base = statistics.median(r["total"] for r in results.get("append", results["single"]))
    wal = "minimal" if args.wal_minimal else "replica (the default)"
    print(f"{args.rows} rows, median of {args.repeat}, destination wal_level {wal}")
    print(f"{'case':<10} {'total s':>8} {'x single':>9}  parts (plan / ranges / publish)")
    for name, runs in results.items():
        total = statistics.median(r["total"] for r in runs)
        detail = ""
        if "plan" in runs[0]:
            detail = " / ".join(f"{statistics.median(r[k] for r in runs):.2f}"
                                for k in ("plan", "ranges", "publish"))
        against = append_base if name.startswith(("direct", "append")) else base
        print(f"{name:<10} {total:8.2f} {total / against:9.2f}  {detail}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
