"""Tables many tasks create at the same moment: the ledger table (every range of a split
load, every mapped CopyManOperator, into a fresh destination) and a split load's staging
table (every range of a run). ``CREATE TABLE IF NOT EXISTS`` is not safe against itself:
the loser gets a unique violation on the catalog or, when the winner commits between the
name check and the row type's, "type ... already exists" (DuplicateObject). Neither may fail
the task. Eight sessions at once, on a real server."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import psycopg
from af_support import Database

from airflow_copyman import load, split

SESSIONS = 8
ROUNDS = 12


def at_once(db: Database, create: Callable[[psycopg.Connection[Any], int], object]) -> list[str]:
    """Run ``create(conn, round)`` in :data:`SESSIONS` sessions released together, for
    :data:`ROUNDS` rounds; what any of them raised."""
    conns = [db.connect() for _ in range(SESSIONS)]
    failures: list[str] = []
    try:
        for n in range(ROUNDS):
            barrier = threading.Barrier(SESSIONS)

            def one(conn: psycopg.Connection[Any], n: int = n,
                    barrier: threading.Barrier = barrier) -> None:
                barrier.wait()
                try:
                    create(conn, n)
                except Exception as exc:
                    failures.append(f"{type(exc).__name__}: {exc}")

            threads = [threading.Thread(target=one, args=(c,)) for c in conns]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(30)
    finally:
        for conn in conns:
            conn.close()
    return failures


def test_the_ledger_table_created_by_many_tasks_at_once(pair: tuple[Database, Database]) -> None:
    _, dst = pair
    dst.execute("; ".join(f"CREATE SCHEMA s{n}" for n in range(ROUNDS)))
    ledger = load.Ledger(None, load.TaskKey("d", "t", "r", -1, "lineage", 1))
    assert at_once(dst, lambda conn, n: ledger.ensure_table(conn, f"s{n}")) == []
    assert dst.scalar("SELECT count(*) FROM pg_class WHERE relname = 'copyman_ledger'") == ROUNDS


def test_a_staging_table_created_by_many_ranges_at_once(pair: tuple[Database, Database]) -> None:
    src, dst = pair
    src.execute("CREATE TABLE items (id int PRIMARY KEY, v numeric(8,2))")
    dst.execute("; ".join(f"CREATE TABLE t{n} (id int, v text)" for n in range(ROUNDS)))
    ident = split.Identity("dag", "grp", "run", "L1", "dst", "t")

    def stage(conn: psycopg.Connection[Any], n: int) -> None:
        # Half the rounds into tables that exist, half into ones create="if_missing" makes.
        table = f"t{n}" if n % 2 else f"new{n}"
        spec = load.Destination("dst", table, create="if_missing")

        def columns() -> list[load.Column]:
            with src.connect() as source:
                return split.describe_columns(source, "items")

        split.prepare(conn, spec, ident, 5, columns)

    assert at_once(dst, stage) == []
    assert dst.scalar(
        "SELECT count(*) FROM pg_class WHERE relname LIKE 'copyman\\_stage\\_%%'") == ROUNDS
