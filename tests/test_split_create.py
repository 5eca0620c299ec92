"""Split loads into a table that does not exist yet (``create="if_missing"``), without
Airflow: the ranges stage with the source's exact types, publish creates the table in its
transaction (the merge key as primary key), and a table missing until publish is checked as
a load that creates it would be; real servers."""

from __future__ import annotations

import threading
import time

import pytest
from af_support import Database

from airflow_copyman import load, split

SOURCE = (
    "CREATE TABLE items (id bigint PRIMARY KEY, amount numeric(12,2), code varchar(5),"
    " name text COLLATE \"C\", at timestamptz);"
    " INSERT INTO items SELECT g, g / 3.0, 'c' || (g % 100), 'n' || g,"
    " timestamptz '2024-01-01' + g * interval '1 minute' FROM generate_series(1, 400) g;"
    " ANALYZE items"
)
TYPES = (
    "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), co.collname::text"
    " FROM pg_attribute a LEFT JOIN pg_collation co ON co.oid = a.attcollation"
    " AND a.attcollation <> 100"  # the type's default collation
    " WHERE a.attrelid = %s::regclass AND a.attnum > 0 AND NOT a.attisdropped"
    " ORDER BY a.attnum"
)


def identity(table: str, lineage: str) -> split.Identity:
    return split.Identity("dag", "grp", "run-1", lineage, "dst", table)


def stage(src: Database, dst: Database, spec: load.Destination, ident: split.Identity,
          parts: int = 3) -> tuple[split.Target, int, list[str]]:
    """What the group's plan and mapped load tasks do: plan, then each range into the
    staging table (made by :func:`split.prepare`, as the load task makes it)."""
    source_endpoint = load.postgres("src", src.uri())
    with src.connect() as conn:
        source, ranges = split.plan(conn, "items", None, parts)
        columns = split.column_names(conn, source)

    def describe() -> list[load.Column]:
        with src.connect() as conn:
            return load.Source.parse("items").describe(conn, None)

    with dst.connect() as conn:
        target = split.prepare(conn, spec, ident, 5, describe)
    for rng in ranges:
        key = load.TaskKey("dag", "grp.load", ident.run_id, rng.index, ident.lineage, 1)
        report = load.run(
            source_endpoint, split.range_query(source.schema, source.name, rng, None),
            [load.Destination("dst", target.staging_text, columns=spec.columns,
                              load_lock=False)],
            endpoints={"dst": load.postgres("dst", dst.uri())}, ledger=load.Ledger(None, key),
        )
        assert not report.failed, report
    return target, len(ranges), columns


def publish(dst: Database, spec: load.Destination, target: split.Target, parts: int,
            columns: list[str], ident: split.Identity) -> split.Published:
    key = load.TaskKey("dag", "grp.publish", ident.run_id, -1, ident.lineage, 1)
    ranges = split.RangeLedger("dag", "grp.load", ident.run_id, ident.lineage, parts)
    with dst.connect() as conn:
        return split.publish(conn, spec, target, load.Ledger(None, key), ranges,
                             source_columns=columns, lock_timeout=5)


@pytest.fixture
def items(pair: tuple[Database, Database]) -> tuple[Database, Database]:
    src, dst = pair
    src.execute(SOURCE)
    return src, dst


def test_the_table_appears_only_at_publish_with_the_sources_types_and_key(
    items: tuple[Database, Database],
) -> None:
    src, dst = items
    spec = load.Destination("dst", "public.made", mode="merge", key=("id",),
                            create="if_missing")
    first, second = identity("public.made", "L1"), identity("public.made", "L2")
    # Two lineages staged while the table is missing (say, two runs of the group).
    target1, parts1, columns = stage(src, dst, spec, first)
    target2, parts2, _ = stage(src, dst, spec, second, parts=2)
    assert target1.oid is None and target2.oid is None
    # Until publish, readers (and everyone else) see no table.
    assert dst.scalar("SELECT to_regclass('public.made') IS NULL")
    done = publish(dst, spec, target1, parts1, columns, first)
    assert (done.rows, done.inserted, done.updated) == (400, 400, 0)
    assert done.oid == dst.scalar("SELECT 'public.made'::regclass::oid::bigint")
    # Exact types (typmods), the source's collation, the key as primary key.
    assert dst.execute(TYPES, ["public.made"]) == src.execute(TYPES, ["items"])
    assert dst.execute(
        "SELECT pg_get_constraintdef(oid) FROM pg_constraint"
        " WHERE conrelid = 'public.made'::regclass AND contype <> 'n'"  # 18 lists NOT NULLs
    ) == [("PRIMARY KEY (id)",)]
    assert dst.scalar("SELECT relpersistence FROM pg_class WHERE oid = 'made'::regclass") == "p"
    # The other lineage, planned while the table was missing, merges into it (not a second
    # CREATE): the rows are equal, so nothing is updated.
    again = publish(dst, spec, target2, parts2, columns, second)
    assert (again.rows, again.inserted, again.updated) == (400, 0, 0)
    assert dst.execute("SELECT * FROM made ORDER BY id") == src.execute(
        "SELECT * FROM items ORDER BY id")
    assert dst.scalar("SELECT count(*) FROM pg_class WHERE relname LIKE 'copyman\\_stage%%'") == 0


def test_columns_rename_and_replace_creates_without_a_key(
    items: tuple[Database, Database],
) -> None:
    src, dst = items
    spec = load.Destination("dst", "Made", mode="replace", create="if_missing",
                            columns=["Id", "amount", "code", "name", "at"])
    ident = identity("Made", "L1")
    target, parts, _ = stage(src, dst, spec, ident)
    assert (target.schema, target.name) == ("public", "made")  # unquoted: folded
    done = publish(dst, spec, target, parts, list(spec.columns or ()), ident)
    assert done.rows == 400
    assert [r[0] for r in dst.execute(TYPES, ["made"])] == ["Id", "amount", "code", "name", "at"]
    assert dst.scalar("SELECT count(*) FROM pg_constraint WHERE conrelid = 'made'::regclass"
                      " AND contype <> 'n'") == 0


@pytest.mark.parametrize(
    ("table", "options", "message"),
    [
        ("nowhere.made", {}, "nor its schema 'nowhere'"),
        ("made", {"columns": ["a", "b"]}, "'columns' names 2 columns, the source has 5"),
        ("made", {"mode": "merge", "key": ("nope",)}, "merge key column 'nope'"),
    ],
)
def test_a_table_that_cannot_be_created_is_refused_before_anything_is_staged(
    items: tuple[Database, Database], table: str, options: dict[str, object], message: str,
) -> None:
    src, dst = items
    spec = load.Destination("dst", table, create="if_missing", **options)  # type: ignore[arg-type]
    with pytest.raises(split.StagingError, match=message):
        stage(src, dst, spec, identity(table, "L1"))
    assert dst.scalar("SELECT count(*) FROM pg_class WHERE relname LIKE 'copyman\\_stage%%'") == 0


def test_without_create_a_missing_table_still_fails_naming_the_option(
    items: tuple[Database, Database],
) -> None:
    src, dst = items
    with pytest.raises(split.StagingError, match=r"does not exist .*create='if_missing'"):
        stage(src, dst, load.Destination("dst", "made"), identity("made", "L1"))


def test_two_runs_publishing_one_missing_table_at_once_create_it_once(
    items: tuple[Database, Database],
) -> None:
    """Two runs' publishes reach the missing table together: both wait for its load lock
    (held here until both are waiting); the first creates the table, the second finds it
    (read from pg_class, not a cached name) and merges into it."""
    src, dst = items
    spec = load.Destination("dst", "made", mode="merge", key=("id",), create="if_missing")
    runs = [identity("made", lineage) for lineage in ("L1", "L2")]
    staged = [stage(src, dst, spec, ident) for ident in runs]
    done: dict[str, split.Published] = {}
    errors: list[BaseException] = []

    def publish_one(ident: split.Identity, target: split.Target, parts: int,
                    columns: list[str]) -> None:
        try:
            done[ident.lineage] = publish(dst, spec, target, parts, columns, ident)
        except BaseException as exc:  # reported below
            errors.append(exc)

    with dst.connect() as holder:
        load.take_load_lock(holder, "public.made", 5, new_table=("public", "made"))
        threads = [threading.Thread(target=publish_one, args=(ident, *found))
                   for ident, found in zip(runs, staged, strict=True)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 10
        while dst.scalar("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
                         " AND NOT granted") < 2:
            assert time.monotonic() < deadline, "the publishes never waited for the lock"
            time.sleep(0.05)
        holder.rollback()
    for thread in threads:
        thread.join(30)
    assert errors == []
    assert sorted((p.inserted, p.updated) for p in done.values()) == [(0, 0), (400, 0)]
    assert dst.execute("SELECT * FROM made ORDER BY id") == src.execute(
        "SELECT * FROM items ORDER BY id")
