"""A split load writes each table once: two destinations that are one table however spelled
or reached, or a destination that is the source table (or a partition of it), are refused
before any range loads. The ranges cannot see it themselves: each loads into a staging
table of its own. Real servers, no Airflow."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence

import pytest
from af_support import Database

from airflow_copyman import load, split


def conflicts(src: Database, table: str, destinations: Sequence[tuple[load.Destination,
                                                                      Database]]) -> list[str]:
    with contextlib.ExitStack() as stack:
        source_conn = stack.enter_context(src.connect())
        source = split.plan_source(source_conn, table)
        opened = [(spec, stack.enter_context(db.connect())) for spec, db in destinations]
        return split.table_conflicts(source_conn, source, opened)


@pytest.fixture
def tables(pair: tuple[Database, Database]) -> tuple[Database, Database]:
    src, dst = pair
    src.execute("CREATE TABLE events (id int, v text) PARTITION BY RANGE (id);"
                " CREATE TABLE events_low PARTITION OF events FOR VALUES FROM (0) TO (100);"
                " CREATE TABLE other (id int)")
    dst.execute('CREATE TABLE events (id int, v text); CREATE TABLE "Events" (id int, v text)')
    return src, dst


def test_distinct_tables_are_no_conflict(tables: tuple[Database, Database]) -> None:
    src, dst = tables
    # The source's "events" is another database's; '"Events"' is another table than events.
    assert conflicts(src, "events", [
        (load.Destination("a", "events"), dst),
        (load.Destination("a", '"Events"'), dst),
    ]) == []


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("events", "public.events"),
        ("events", '"public"."events"'),
        ("EVENTS", "events"),
    ],
)
def test_one_table_spelled_two_ways_is_refused(
    tables: tuple[Database, Database], first: str, second: str,
) -> None:
    src, dst = tables
    found = conflicts(src, "other", [(load.Destination("a", first), dst),
                                     (load.Destination("a", second), dst)])
    assert len(found) == 1, found
    assert "is the same table as destination a:" in found[0]


def test_one_database_behind_two_connection_ids_is_refused(
    tables: tuple[Database, Database],
) -> None:
    src, dst = tables
    found = conflicts(src, "other", [(load.Destination("wh", "events", mode="append"), dst),
                                     (load.Destination("wh_again", "events"), dst)])
    assert len(found) == 1 and "destination wh_again:events is the same table as" in found[0]


def test_the_source_table_or_one_of_its_partitions_is_refused(
    tables: tuple[Database, Database],
) -> None:
    src, _ = tables
    found = conflicts(src, "events", [(load.Destination("s", "events_low"), src)])
    assert len(found) == 1 and "is a table the source reads" in found[0], found
    found = conflicts(src, "events", [(load.Destination("s", "public.events"), src)])
    assert len(found) == 1 and "is a table the source reads" in found[0], found


def test_two_destinations_creating_one_table_are_refused(
    tables: tuple[Database, Database],
) -> None:
    src, dst = tables
    found = conflicts(src, "other", [
        (load.Destination("a", "made", create="if_missing"), dst),
        (load.Destination("b", "public.made", create="if_missing"), dst),
    ])
    assert len(found) == 1 and "new table public.made" in found[0], found


def test_parallel_refuses_before_any_range_loads(tables: tuple[Database, Database]) -> None:
    src, dst = tables
    src.execute("CREATE TABLE items (id int PRIMARY KEY, v text);"
                " INSERT INTO items SELECT g, 'v' || g FROM generate_series(1, 100) g")
    dst.execute("INSERT INTO events VALUES (1, 'kept')")
    specs = [load.Destination("a", "events", mode="append"),
             load.Destination("b", "public.events", mode="append")]
    endpoints = {c: load.postgres(c, dst.uri()) for c in ("a", "b")}
    with pytest.raises(load.ConfigError, match=r"the same table as .*nothing was loaded"):
        split.run_parallel(
            load.postgres("src", src.uri()), "items", specs, endpoints=endpoints, parallel=2,
            task=split.TaskRun("dag", "copy", "run-1", -1, "L1", 1), ledger_schema=None,
            options=load.LoadOptions(), log=logging.getLogger("test.conflicts"),
        )
    assert dst.execute("SELECT * FROM events") == [(1, "kept")]
    assert dst.scalar("SELECT count(*) FROM pg_class WHERE relname LIKE 'copyman\\_stage%%'") == 0
