"""Progress lines against real servers: a percentage and the time left where the source's size
can be estimated before the copy (table statistics, the planner), nothing where it cannot; and
the connections a task holds."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
import structlog
from af_support import Database, PgServers, create_orders, create_orders_table

from airflow_copyman.hooks.copyman import CopyManHook, Destination
from airflow_copyman.load.catalog import estimates
from airflow_copyman.load.catalog.tables import Source

ROWS = 20_000
PERCENT = re.compile(r", ~(\d+)% of ~([\d,]+) rows \(estimate\), ~(\w+) left \(estimate\)$")


@pytest.fixture(scope="module")
def databases(pg: PgServers) -> tuple[Database, Database, Database]:
    """A source of ~2.5 MiB (about ten of the engine's read batches), analyzed, and a copy of
    it never analyzed; two destinations."""
    src = pg.database(pg.src, "psrc")
    create_orders(src, ROWS)
    src.execute("ANALYZE orders")
    src.execute("CREATE TABLE fresh (LIKE orders) WITH (autovacuum_enabled = false)")
    src.execute("INSERT INTO fresh SELECT * FROM orders")
    d1, d2 = pg.database(pg.dst1, "pd1"), pg.database(pg.dst2, "pd2")
    for db in (d1, d2):
        create_orders_table(db)
        create_orders_table(db, "fresh")
    return src, d1, d2


@pytest.fixture
def hook(
    databases: tuple[Database, Database, Database], monkeypatch: pytest.MonkeyPatch
) -> Iterator[CopyManHook]:
    for conn_id, db in zip(("pg_psrc", "pg_pd1", "pg_pd2"), databases, strict=True):
        monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", db.uri())
    yield CopyManHook("pg_psrc")
    for db in databases[1:]:
        db.execute("TRUNCATE orders, fresh")


def _transfer(hook: CopyManHook, sql: str, table: str, **kwargs: Any) -> list[str]:
    """The hook's log lines of a transfer that logs progress after every read batch."""
    with structlog.testing.capture_logs() as logs:
        report = hook.transfer(
            sql,
            [Destination("pg_pd1", table), Destination("pg_pd2", table)],
            progress_interval=0.0,
            **kwargs,
        )
    assert [d.status for d in report.destinations] == ["loaded", "loaded"], report
    return [str(entry["event"]) for entry in logs]


def _progress(lines: list[str]) -> list[str]:
    return [line for line in lines if line.startswith("Progress: source pg_psrc:")]


def test_a_table_source_shows_percent_and_time_left(hook: CopyManHook) -> None:
    lines = _transfer(hook, "orders", "orders")
    assert f"Source size estimate: ~{ROWS:,} rows (table statistics)" in lines
    progress = _progress(lines)
    assert len(progress) >= 3, lines
    matches = [PERCENT.search(line) for line in progress]
    assert all(matches), "\n".join(progress)
    percents = [int(m.group(1)) for m in matches if m]
    assert percents == sorted(percents) and percents[0] < 50 <= 90 <= percents[-1] <= 99
    assert {m.group(2) for m in matches if m} == {f"{ROWS:,}"}
    # One connection to the source and one per destination, for the whole transfer.
    assert (
        "Holding 3 PostgreSQL connection(s) until the transfer ends: 1 to the source "
        "(pg_psrc), 2 to destinations (pg_pd1, pg_pd2)"
    ) in lines


def test_a_query_source_shows_the_planners_estimate(hook: CopyManHook) -> None:
    lines = _transfer(
        hook, "SELECT * FROM orders WHERE id > %(skip)s", "orders", parameters={"skip": 2000}
    )
    estimate = next(line for line in lines if line.startswith("Source size estimate"))
    assert estimate.endswith("rows (the planner's estimate)")
    rows = int(re.sub(r"\D", "", estimate))
    assert 0.8 * (ROWS - 2000) <= rows <= 1.2 * (ROWS - 2000), estimate
    progress = _progress(lines)
    assert progress and all(PERCENT.search(line) for line in progress), progress


@pytest.mark.parametrize("sql", ["fresh", "SELECT * FROM fresh"])
def test_no_statistics_no_percentage(hook: CopyManHook, sql: str) -> None:
    """A table never analyzed (reltuples = -1): no guess, whether read as a table or by a
    query (where the planner would make one up)."""
    lines = _transfer(hook, sql, "fresh")
    assert any(line.startswith("No size estimate for the source") for line in lines), lines
    progress = _progress(lines)
    assert progress and not any("%" in line or "left" in line for line in progress), progress


def test_partitions_and_children_are_summed(pg: PgServers) -> None:
    """A table's estimate sums its partitions and its inheritance children: a table as
    ``sql`` is copied as ``SELECT ... FROM`` it, children included."""
    db = pg.database(pg.src, "pest")
    db.execute("CREATE TABLE parted (id int, day date) PARTITION BY RANGE (day)")
    db.execute("CREATE TABLE parted_1 PARTITION OF parted FOR VALUES FROM ('2024-01-01') "
               "TO ('2024-02-01')")
    db.execute("CREATE TABLE parted_2 PARTITION OF parted FOR VALUES FROM ('2024-02-01') "
               "TO ('2024-03-01')")
    db.execute("INSERT INTO parted SELECT g, date '2024-01-01' + g % 60 FROM "
               "generate_series(1, 6000) g")
    db.execute("CREATE TABLE parent (id int)")
    db.execute("CREATE TABLE child () INHERITS (parent)")
    db.execute("INSERT INTO parent SELECT generate_series(1, 1000)")
    db.execute("INSERT INTO child SELECT generate_series(1, 4000)")
    db.execute("ANALYZE")
    with db.connect() as conn:
        def rows(sql: str) -> int | None:
            estimate = estimates.estimate_source(conn, Source.parse(sql), None)
            return None if estimate is None else estimate.rows

        assert rows("parted") == 6000
        assert rows("parent") == 5000
        assert rows("SELECT * FROM parted") == 6000
        assert rows("SELECT * FROM parent") == 5000  # the query reads the children too
        # A table never analyzed among the partitions: no estimate.
        db.execute("CREATE TABLE parted_3 PARTITION OF parted FOR VALUES FROM ('2024-03-01') "
                   "TO ('2024-04-01') WITH (autovacuum_enabled = false)")
        db.execute("INSERT INTO parted VALUES (1, '2024-03-02')")
        assert rows("parted") is None
        assert rows("SELECT * FROM parted") is None
