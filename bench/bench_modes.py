#!/usr/bin/env python3
"""Benchmark of the load modes: append, replace (truncate / delete) and merge, one run.

Starts 2 throwaway PostgreSQL servers (source, destination), fills the source with the mixed
table of ``bench_copy.py`` and loads it through ``airflow_copyman.load.run`` (no Airflow) in
each mode, the cases interleaved, ``--repeat`` times each; each case's set-up (emptying or
filling the destination, a CHECKPOINT) is outside the timing. Reports the median seconds and
the ratio to append.

* ``append``            into an empty table;
* ``replace/truncate``  over a table holding every row: TRUNCATE, then ``COPY ... FREEZE``;
* ``replace/delete``    over a table holding every row: DELETE, then COPY;
* ``merge``             over a table holding a tenth of the keys (no index on the key):
                        COPY into a staging table, duplicate-key check, UPDATE, INSERT.

``--baseline REV`` runs every case at git revision REV too (its ``airflow_copyman`` from
``git archive``), interleaved with this tree's, each load in a fresh worker process of its
own (``--worker``) for both, and reports the ratio of the two medians per case.

    .venv/bin/python bench/bench_modes.py --rows 1000000
    .venv/bin/python bench/bench_modes.py --rows 300000 --repeat 3   # a busy machine
    .venv/bin/python bench/bench_modes.py --rows 300000 --baseline a746cd8
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import psycopg

REPO = Path(__file__).resolve().parent.parent
# A worker of --baseline imports the package from its PYTHONPATH (BENCH_TREE), not this tree.
if str(REPO) not in sys.path and "BENCH_TREE" not in os.environ:
    sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_copy import COLUMNS, LOAD_SQL  # noqa: E402

if os.environ.get("BENCH_TREE", str(REPO)) != str(REPO):
    # bench_copy put this tree first: a baseline worker imports its own tree instead.
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO]

from airflow_copyman import load  # noqa: E402
from airflow_copyman.testing.servers import ServerPool, create_database  # noqa: E402

CASES: dict[str, dict[str, object]] = {
    "append": {},
    "replace/truncate": {"mode": "replace", "replace_with": "truncate"},
    "replace/delete": {"mode": "replace", "replace_with": "delete"},
    "merge": {"mode": "merge", "key": ["id"]},
}


def prepare(dst: str, case: str, rows: int) -> None:
    """The destination's state before the case (untimed). Every case writes the same amount
    before it (the rows the table holds, the rest into a ballast table), so that the
    server's and the kernel's write-back after the set-up weighs on every case alike."""
    kept = {"append": 0, "merge": rows // 10}.get(case, rows)
    with psycopg.connect(dst, autocommit=True) as conn:
        for table in ("mixed", "ballast"):
            conn.execute(f"DROP TABLE IF EXISTS {table}")  # type: ignore[arg-type]
            conn.execute(f"CREATE TABLE {table} ({COLUMNS})")  # type: ignore[arg-type]
        for table, count in (("mixed", kept), ("ballast", rows - kept)):
            if count:
                conn.execute(LOAD_SQL.format(table=table, rows=count))  # type: ignore[arg-type]
            conn.execute(f"VACUUM ANALYZE {table}")  # type: ignore[arg-type]
        conn.execute("CHECKPOINT")


def run_case(src: load.Endpoint, dst: load.Endpoint, case: str) -> float:
    spec = {"conn_id": "dst", "table": "mixed", **CASES[case]}
    started = time.perf_counter()
    report = load.run(src, "mixed", [spec], endpoints={"dst": dst}, progress_interval=3600)
    seconds = time.perf_counter() - started
    (result,) = report.destinations
    if result.status != "loaded":
        raise SystemExit(f"{case}: {result.error}")
    return seconds


def worker(argv: list[str]) -> int:
    """``--worker SRC DST CASE``: one load, in this process's ``airflow_copyman`` (the
    tree's, or a baseline's on PYTHONPATH); prints its seconds as JSON."""
    src_info, dst_info, case = argv
    src, dst = load.postgres("src", src_info), load.postgres("dst", dst_info)
    print(json.dumps({"seconds": run_case(src, dst, case), "package": load.__file__}))
    return 0


def baseline_tree(rev: str, workdir: Path) -> Path:
    """The package at ``rev`` (``git archive``), extracted under ``workdir``."""
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", rev, "airflow_copyman"],
        check=True, capture_output=True,
    ).stdout
    target = workdir / f"baseline-{rev}"
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(target, filter="data")
    return target


def run_in_worker(tree: Path, src_info: str, dst_info: str, case: str) -> float:
    """One load in a fresh process importing ``airflow_copyman`` from ``tree``."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree), str(REPO / "bench")]),
           "BENCH_TREE": str(tree)}
    done = subprocess.run(
        [sys.executable, __file__, "--worker", src_info, dst_info, case],
        check=True, capture_output=True, text=True, env=env,
    )
    found = json.loads(done.stdout.strip().splitlines()[-1])
    if not str(found["package"]).startswith(str(tree)):
        raise SystemExit(f"the worker imported {found['package']}, not the tree {tree}")
    return float(found["seconds"])


def main(argv: list[str]) -> int:
    if argv[:1] == ["--worker"]:
        return worker(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--baseline", help="git revision to compare with, in the same run")
    args = parser.parse_args(argv)
    if args.baseline:
        return compare(args)
    pool = ServerPool()
    try:
        src_server, dst_server = pool.new(), pool.new()
        for server in (src_server, dst_server):
            create_database(server.address, "bench")
        src_info = src_server.address.conninfo("bench")
        dst_info = dst_server.address.conninfo("bench")
        with psycopg.connect(src_info, autocommit=True) as conn:
            conn.execute(f"CREATE TABLE mixed ({COLUMNS})")  # type: ignore[arg-type]
            conn.execute(LOAD_SQL.format(table="mixed", rows=args.rows))  # type: ignore[arg-type]
            conn.execute("VACUUM ANALYZE mixed")
        src, dst = load.postgres("src", src_info), load.postgres("dst", dst_info)
        times: dict[str, list[float]] = {case: [] for case in CASES}
        for i in range(args.repeat):
            for case in CASES:
                prepare(dst_info, case, args.rows)
                seconds = run_case(src, dst, case)
                times[case].append(seconds)
                print(f"  round {i + 1} {case}: {seconds:.2f} s", flush=True)
        base = statistics.median(times["append"])
        print(f"\n{args.rows:,} rows of the mixed table, median of {args.repeat}:\n")
        print("| mode | seconds (median) | all runs | vs append |")
        print("|---|---:|---|---:|")
        for case, values in times.items():
            median = statistics.median(values)
            runs = ", ".join(f"{v:.2f}" for v in values)
            print(f"| {case} | {median:.2f} | {runs} | {median / base:.2f}x |")
    finally:
        pool.close()
    return 0


def compare(args: argparse.Namespace) -> int:
    """Every case at this tree and at ``--baseline``, interleaved, each in a worker."""
    pool = ServerPool()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-modes-") as tmp:
            trees = {"this tree": REPO, args.baseline: baseline_tree(args.baseline, Path(tmp))}
            src_info, dst_info = fill_servers(pool, args.rows)
            times = {(case, name): [] for case in CASES for name in trees}
            for i in range(args.repeat):
                for case in CASES:
                    # Each round in the other order: neither tree always goes first.
                    order = list(trees.items())
                    for name, tree in order if i % 2 == 0 else order[::-1]:
                        prepare(dst_info, case, args.rows)
                        seconds = run_in_worker(tree, src_info, dst_info, case)
                        times[(case, name)].append(seconds)
                        print(f"  round {i + 1} {case} {name}: {seconds:.2f} s", flush=True)
        print(f"\n{args.rows:,} rows of the mixed table, median of {args.repeat}:\n")
        print(f"| mode | this tree (s) | {args.baseline} (s) | this / {args.baseline} |")
        print("|---|---:|---:|---:|")
        for case in CASES:
            now = statistics.median(times[(case, "this tree")])
            then = statistics.median(times[(case, args.baseline)])
            print(f"| {case} | {now:.2f} | {then:.2f} | {now / then:.2f}x |")
    finally:
        pool.close()
    return 0


def fill_servers(pool: ServerPool, rows: int) -> tuple[str, str]:
    """A source holding the mixed table and an empty destination; their conninfos."""
    src_server, dst_server = pool.new(), pool.new()
    for server in (src_server, dst_server):
        create_database(server.address, "bench")
    src_info = src_server.address.conninfo("bench")
    dst_info = dst_server.address.conninfo("bench")
    with psycopg.connect(src_info, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE mixed ({COLUMNS})")  # type: ignore[arg-type]
        conn.execute(LOAD_SQL.format(table="mixed", rows=rows))  # type: ignore[arg-type]
        conn.execute("VACUUM ANALYZE mixed")
    return src_info, dst_info


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
