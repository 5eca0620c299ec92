"""Split loads (issue 18) without Airflow: ranges loaded through the load layer into
staging tables, then published; real servers."""

from __future__ import annotations

import threading
import time

import psycopg
import pytest
from af_support import Database

from airflow_copyman import load, split

RUN = "run-1"


def identity(table: str, run_id: str = RUN, lineage: str = "L1") -> split.Identity:
    return split.Identity("dag", "grp", run_id, lineage, "dst", table)


def stage_all(src: Database, dst: Database, spec: load.Destination, ident: split.Identity,
              parts: int = 3, where: str | None = None, ledger_schema: str | None = None,
              verify: str = "count", fmt: str | None = None,
              ) -> tuple[split.Target, int, list[str]]:
    """Plan ``spec``'s source table, load every range into the staging table as the
    group's mapped load task does; return the target, the number of ranges, the columns."""
    with src.connect() as conn:
        source, ranges = split.plan(conn, "items", None, parts)
        columns = split.column_names(conn, source)
    with dst.connect() as conn:
        target = split.target(conn, spec.table, ident)
        split.ensure_staging(conn, target, ident, 5)
    for rng in ranges:
        key = load.TaskKey("dag", "grp.load", ident.run_id, rng.index, ident.lineage, 1)
        query = split.range_query(source.schema, source.name, rng, where)
        report = load.run(
            load.postgres("src", src.uri()), query,
            [load.Destination("dst", target.staging_text)],
            endpoints={"dst": load.postgres("dst", dst.uri())},
            ledger=load.Ledger(ledger_schema, key), verify=verify, format=fmt,
        )
        assert not report.failed, report
    return target, len(ranges), columns


def publish(dst: Database, spec: load.Destination, target: split.Target, parts: int,
            columns: list[str], ident: split.Identity, try_number: int = 1,
            ledger_schema: str | None = None, lock_timeout: float = 5, verify: str = "count",
            settings: dict[str, str] | None = None) -> split.Published:
    key = load.TaskKey("dag", "grp.publish", ident.run_id, -1, ident.lineage, try_number)
    ranges = split.RangeLedger("dag", "grp.load", ident.run_id, ident.lineage, parts,
                               ledger_schema)
    with dst.connect() as conn:
        return split.publish(conn, spec, target, load.Ledger(ledger_schema, key), ranges,
                             source_columns=columns, lock_timeout=lock_timeout,
                             verify=verify, render_settings=settings)


@pytest.fixture
def items(pair: tuple[Database, Database]) -> tuple[Database, Database]:
    src, dst = pair
    src.execute("CREATE TABLE items (id int PRIMARY KEY, v text);"
                " INSERT INTO items SELECT g, 'v' || g FROM generate_series(1, 300) g")
    dst.execute("CREATE TABLE items (id int, v text, note text DEFAULT 'd');"
                " INSERT INTO items VALUES (1, 'old', 'kept'), (1000, 'other', 'kept')")
    return src, dst


def test_append_published_once_even_when_the_publish_runs_again(
    items: tuple[Database, Database],
) -> None:
    src, dst = items
    spec = load.Destination("dst", "items")
    ident = identity("items")
    target, parts, columns = stage_all(src, dst, spec, ident)
    first = publish(dst, spec, target, parts, columns, ident)
    assert (first.rows, first.already) == (300, False)
    # A retry after a lost COMMIT reply: the ledger says it is done; nothing changes.
    again = publish(dst, spec, target, parts, columns, ident, try_number=2)
    assert (again.rows, again.already) == (300, True)
    assert dst.scalar("SELECT count(*) FROM items") == 302
    # A load cleared after the publish (same lineage) made its staging table again, empty:
    # the next publish, finding its ledger row, drops it.
    with dst.connect() as conn:
        split.ensure_staging(conn, target, ident, 5)
    assert publish(dst, spec, target, parts, columns, ident, try_number=3).already
    assert dst.scalar("SELECT count(*) FROM items WHERE note = 'd'") == 300  # a default
    assert dst.scalar("SELECT to_regclass(%s) IS NULL", [target.staging_text])


def test_replace_and_merge(items: tuple[Database, Database]) -> None:
    src, dst = items
    dst.execute("INSERT INTO items VALUES (2, 'v2', 'same')")  # equal: not updated
    spec = load.Destination("dst", "items", mode="merge", key=("id",))
    ident = identity("items")
    target, parts, columns = stage_all(src, dst, spec, ident)
    done = publish(dst, spec, target, parts, columns, ident)
    assert (done.inserted, done.updated) == (298, 1)
    assert dst.execute("SELECT v, note FROM items WHERE id IN (1, 1000) ORDER BY id") == [
        ("v1", "kept"), ("other", "kept")
    ]
    replace = load.Destination("dst", "items", mode="replace")
    ident2 = identity("items", lineage="L2")
    target, parts, columns = stage_all(src, dst, replace, ident2, parts=2)
    publish(dst, replace, target, parts, columns, ident2)
    assert dst.scalar("SELECT count(*) FROM items") == 300


def test_a_ledger_in_a_schema_of_its_own(items: tuple[Database, Database]) -> None:
    src, dst = items
    dst.execute("CREATE SCHEMA books")
    spec = load.Destination("dst", "items", mode="replace")
    ident = identity("items")
    target, parts, columns = stage_all(src, dst, spec, ident, ledger_schema="books")
    assert publish(dst, spec, target, parts, columns, ident, ledger_schema="books").rows == 300
    assert dst.scalar("SELECT count(*) FROM books.copyman_ledger") == parts + 1


def test_replace_waits_for_a_reader_in_tries_and_gives_up_at_lock_timeout(
    items: tuple[Database, Database],
) -> None:
    src, dst = items
    spec = load.Destination("dst", "items", mode="replace")
    ident = identity("items")
    target, parts, columns = stage_all(src, dst, spec, ident)
    with dst.connect() as reader:
        reader.execute("SELECT count(*) FROM items")  # its transaction holds the table
        started = time.monotonic()
        with pytest.raises(psycopg.errors.LockNotAvailable):
            publish(dst, spec, target, parts, columns, ident, lock_timeout=1.2)
        assert time.monotonic() - started < 10  # the wait ends
        assert dst.scalar("SELECT count(*) FROM items") == 2  # unchanged, staging kept
        # The reader ends during the next publish's tries: that one publishes.
        threading.Timer(0.8, reader.rollback).start()
        done = publish(dst, spec, target, parts, columns, ident, try_number=2, lock_timeout=20)
    assert done.rows == 300 and dst.scalar("SELECT count(*) FROM items") == 300


def test_staged_rows_that_do_not_add_up_leave_the_destination_unchanged(
    items: tuple[Database, Database],
) -> None:
    src, dst = items
    spec = load.Destination("dst", "items", mode="replace")
    ident = identity("items")
    target, parts, columns = stage_all(src, dst, spec, ident)
    dst.execute(f"INSERT INTO {target.staging_text} VALUES (7, 'stray')")
    with pytest.raises(split.PublishError, match="holds 301 rows, the ranges reported 300"):
        publish(dst, spec, target, parts, columns, ident)
    with pytest.raises(split.PublishError, match=f"3 of {parts + 1} ranges"):
        publish(dst, spec, target, parts + 1, columns, ident)
    assert dst.scalar("SELECT count(*) FROM items") == 2


def test_merge_refuses_a_key_twice_and_changes_nothing(pair: tuple[Database, Database]) -> None:
    src, dst = pair
    src.execute("CREATE TABLE items (id int, v text); INSERT INTO items VALUES (1, 'a'), (1, 'b')")
    dst.execute("CREATE TABLE items (id int, v text); INSERT INTO items VALUES (1, 'old')")
    spec = load.Destination("dst", "items", mode="merge", key=("id",))
    ident = identity("items")
    target, parts, columns = stage_all(src, dst, spec, ident, parts=2)
    with pytest.raises(split.PublishError, match=r"occurs more than once.*\(id\)=\(1\)"):
        publish(dst, spec, target, parts, columns, ident)
    assert dst.execute("SELECT * FROM items") == [(1, "old")]


def test_merge_null_keys_refused_or_matched_and_equal_rows_not_rewritten(
    pair: tuple[Database, Database],
) -> None:
    src, dst = pair
    src.execute("CREATE TABLE items (id int, v text);"
                " INSERT INTO items VALUES (1, 'same'), (2, 'new'), (NULL, 'n')")
    dst.execute("CREATE TABLE items (id int, v text);"
                " INSERT INTO items VALUES (1, 'same'), (2, 'old'), (NULL, 'was')")
    before = dst.scalar("SELECT xmin::text FROM items WHERE id = 1")
    refuse = load.Destination("dst", "items", mode="merge", key=("id",))
    ident = identity("items")
    target, parts, columns = stage_all(src, dst, refuse, ident, parts=2)
    with pytest.raises(split.PublishError, match=r"1 staged row\(s\) have a NULL .*id: 1"):
        publish(dst, refuse, target, parts, columns, ident)
    match = load.Destination("dst", "items", mode="merge", key=("id",), key_nulls="match")
    done = publish(dst, match, target, parts, columns, ident, try_number=2)
    assert (done.inserted, done.updated) == (0, 2)  # id 2 and the NULL key; id 1 equal
    assert dst.scalar("SELECT xmin::text FROM items WHERE id = 1") == before  # not rewritten
    assert dst.execute("SELECT id, v FROM items ORDER BY id") == [
        (1, "same"), (2, "new"), (None, "n")
    ]


def test_publish_waits_for_the_tables_load_lock_and_names_its_holder(
    items: tuple[Database, Database],
) -> None:
    src, dst = items
    spec = load.Destination("dst", "items", mode="append")
    ident = identity("items")
    target, parts, columns = stage_all(src, dst, spec, ident)
    with dst.connect() as other:  # a load of the table in its transaction holds the lock
        other.execute("SET application_name = 'copyman other.load run'")
        load.take_load_lock(other, "items", 5)
        started = time.monotonic()
        with pytest.raises(load.LockWaitTimeout, match=r"load lock.*'copyman other\.load run'"):
            publish(dst, spec, target, parts, columns, ident, lock_timeout=0.5)
        assert time.monotonic() - started < 10
        assert dst.scalar("SELECT count(*) FROM items") == 2  # unchanged
        other.rollback()
    assert publish(dst, spec, target, parts, columns, ident, try_number=2).rows == 300


@pytest.mark.parametrize("fmt", ["binary", "csv"])
def test_checksum_of_the_staging_table_must_equal_the_ranges_sum(
    items: tuple[Database, Database], fmt: str,
) -> None:
    src, dst = items
    spec = load.Destination("dst", "items", mode="replace")
    ident = identity("items")
    target, parts, columns = stage_all(src, dst, spec, ident, verify="checksum", fmt=fmt)
    with src.connect() as conn:
        settings = load.render_settings(conn)
    dst.execute(f"UPDATE {target.staging_text} SET v = 'changed' WHERE id = 7")  # same count
    with pytest.raises(split.PublishError, match=r"checksum of staging table .* differs from "
                       rf"the sum of its {parts} ranges' \(300 rows, copy-{fmt}"):
        publish(dst, spec, target, parts, columns, ident, verify="checksum", settings=settings)
    assert dst.scalar("SELECT count(*) FROM items") == 2  # unchanged
    dst.execute(f"UPDATE {target.staging_text} SET v = 'v7' WHERE id = 7")
    done = publish(dst, spec, target, parts, columns, ident, try_number=2, verify="checksum",
                   settings=settings)
    assert done.rows == 300 and dst.scalar("SELECT count(*) FROM items") == 300


def test_checksum_by_row_text_where_types_differ_and_none_recorded(
    pair: tuple[Database, Database],
) -> None:
    src, dst = pair
    src.execute("CREATE TABLE items (id int, v numeric);"
                " INSERT INTO items SELECT g, g / 3.0 FROM generate_series(1, 50) g")
    dst.execute("CREATE TABLE items (id bigint, v numeric(12, 2))")
    spec = load.Destination("dst", "items", mode="append")
    ident = identity("items")
    target, parts, columns = stage_all(src, dst, spec, ident, verify="checksum")
    assert dst.scalar("SELECT bool_and(checksum LIKE '%:row-text:%') FROM copyman_ledger")
    assert publish(dst, spec, target, parts, columns, ident, verify="checksum").rows == 50
    ident2 = identity("items", lineage="L2")
    target, parts, columns = stage_all(src, dst, spec, ident2)  # no checksum per range
    with pytest.raises(split.PublishError, match="recorded no checksum"):
        publish(dst, spec, target, parts, columns, ident2, verify="checksum")


def test_staging_names_differ_per_run_lineage_and_destination() -> None:
    names = {
        split.staging_name("events", identity("events", run_id=r, lineage=lin))
        for r in ("a", "b") for lin in ("L1", "L2")
    }
    names.add(split.staging_name("events", split.Identity("dag", "grp", "a", "L1", "d2", "events")))
    assert len(names) == 5
    assert all(n.startswith("copyman_stage_events_") and len(n) <= 63 for n in names)
    assert len(split.staging_name("x" * 200, identity("x"))) <= 63


def test_leftovers_of_finished_runs_are_dropped_not_those_of_running_ones(
    pair: tuple[Database, Database],
) -> None:
    _, dst = pair
    dst.execute("CREATE TABLE items (id int)")
    made = {}
    with dst.connect() as conn:
        for run_id in ("failed-run", "running-run", "this-run"):
            ident = identity("items", run_id=run_id)
            made[run_id] = split.target(conn, "items", ident)
            split.ensure_staging(conn, made[run_id], ident, 5)
        other = split.Identity("dag", "other-group", "x", "L1", "dst", "items")
        split.ensure_staging(conn, split.target(conn, "items", other), other, 5)
        dropped = split.drop_leftovers(
            conn, "public", identity("items", run_id="this-run"),
            lambda run_id: run_id == "running-run", 5,
        )
    assert dropped == [made["failed-run"].staging]
    left = {r[0] for r in dst.execute("SELECT relname FROM pg_class WHERE relname LIKE"
                                      " 'copyman\\_stage\\_%'")}
    assert made["running-run"].staging in left and made["this-run"].staging in left
    assert len(left) == 3  # the other group's is not this group's to drop


def test_a_missing_destination_table_is_named(pair: tuple[Database, Database]) -> None:
    _, dst = pair
    with dst.connect() as conn, pytest.raises(split.StagingError, match="'nope' does not exist"):
        split.target(conn, "nope", identity("nope"))


