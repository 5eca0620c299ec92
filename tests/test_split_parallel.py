"""N ranges in one process, all reading one exported snapshot (``parallel=N``), staged and
published as a split load; real servers, the source updated all the while."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from af_support import Database

from airflow_copyman import load, split

ROWS = 20000


class SnapshotReader(logging.Handler):
    """Reads the table in the snapshot the moment the runner logs its export (the exporting
    transaction is open then): what every destination must equal."""

    def __init__(self, src: Database) -> None:
        super().__init__()
        self.src = src
        self.rows: list[tuple[Any, ...]] | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if not record.getMessage().startswith("Snapshot "):
            return
        snapshot = str(record.args[0]) if isinstance(record.args, tuple) else ""
        with self.src.connect() as conn:
            conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
            conn.execute(f"SET TRANSACTION SNAPSHOT '{snapshot}'")
            self.rows = conn.execute("SELECT id, v FROM items ORDER BY id").fetchall()


@pytest.fixture
def updating(pair: tuple[Database, Database]) -> Iterator[tuple[Database, Database, list[int]]]:
    """The source's rows updated, inserted and deleted without pause while the test runs."""
    src, dst = pair
    src.execute("CREATE TABLE items (id int PRIMARY KEY, v int);"
                f" INSERT INTO items SELECT g, 0 FROM generate_series(1, {ROWS}) g; ANALYZE items")
    dst.execute("CREATE TABLE items (id int, v int); CREATE TABLE merged (id int, v int)")
    stop, done = threading.Event(), [0]

    def update() -> None:
        with src.connect(autocommit=True) as conn:
            while not stop.is_set():
                conn.execute(f"UPDATE items SET v = v + 1 WHERE id = 1 + (random() * {ROWS})::int"
                             f" OR id = {ROWS} - (random() * 10)::int")
                conn.execute("INSERT INTO items SELECT max(id) + 1, -1 FROM items")
                done[0] += 1

    worker = threading.Thread(target=update)
    worker.start()
    try:
        yield src, dst, done
    finally:
        stop.set()
        worker.join()


def test_parallel_ranges_read_one_exported_snapshot_under_concurrent_updates(
    updating: tuple[Database, Database, list[int]],
) -> None:
    src, dst, updates = updating
    log = logging.getLogger("test.parallel")
    log.setLevel(logging.INFO)
    reader = SnapshotReader(src)
    log.addHandler(reader)
    task = split.TaskRun("dag", "copy", "run-1", -1, "L1", 1)
    specs = [load.Destination("dst", "items", mode="replace"),
             load.Destination("dst", "merged", mode="merge", key=("id",)),
             # Missing: staged with the source's types, created when published.
             load.Destination("dst", "created", mode="merge", key=("id",),
                              create="if_missing")]
    before = updates[0]
    report = split.run_parallel(
        load.postgres("src", src.uri()), "items", specs,
        endpoints={"dst": load.postgres("dst", dst.uri())}, parallel=2, task=task,
        ledger_schema=None, options=load.LoadOptions(verify="checksum"), log=log,
    )
    assert not report.failed, report
    assert updates[0] > before  # the source changed while the ranges read
    assert reader.rows is not None and len(reader.rows) >= ROWS
    assert dst.execute("SELECT id, v FROM items ORDER BY id") == reader.rows
    assert dst.execute("SELECT id, v FROM merged ORDER BY id") == reader.rows
    assert dst.execute("SELECT id, v FROM created ORDER BY id") == reader.rows
    assert [r.rows for r in report.destinations] == [len(reader.rows)] * 3
    # Every range recorded itself, and no staging table is left.
    assert dst.scalar("SELECT count(*) FROM copyman_ledger WHERE task_id = 'copy.range'") == 6
    assert dst.scalar("SELECT count(*) FROM pg_class WHERE relname LIKE 'copyman_stage_%'") == 0


def test_a_snapshot_that_is_not_exported_is_refused() -> None:
    with pytest.raises(load.ArgumentError, match="snapshot must be None or an id"):
        load.LoadOptions(snapshot="x; DROP TABLE t")
