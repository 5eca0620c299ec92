"""The load checksum (airflow_copyman.load.verify.checksum) against real servers: equal where
the rows are, different where a value, a row or a NULL changed; the source's in its COPY's
snapshot."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from airflow_copyman import copyman
from airflow_copyman.load.verify import checksum as ck
from airflow_copyman.testing.servers import LocalServer, create_database
from tests.conftest import Databases, pinned

# The table of every type family (and its edge values) the Airflow exact-copy tests use.
sys.path.insert(0, str(Path(__file__).resolve().parent / "airflow"))
from af_support import Database
from exact_support import LOCAL_TYPE_COLUMNS, create_types, type_names

_counter = iter(range(10**6))


def copy(
    src: psycopg.Connection[Any],
    dst: psycopg.Connection[Any],
    select: str,
    table: str,
    columns: Sequence[str],
    fmt: str,
) -> int:
    """COPY through the engine; the source's transaction stays open (REPEATABLE READ)."""
    cols = ", ".join(columns)
    rows, _ = copyman.transfer(
        (src, f"COPY ({select}) TO STDOUT (FORMAT {fmt})"),
        (dst, f"COPY {table} ({cols}) FROM STDIN (FORMAT {fmt})"),
    )
    return rows


def repeatable_read(conn: psycopg.Connection[Any]) -> psycopg.Connection[Any]:
    conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
    conn.read_only = True
    return conn


def both_sides(
    src: psycopg.Connection[Any],
    dst: psycopg.Connection[Any],
    select: str,
    table: str,
    columns: Sequence[str],
    this_transaction: bool = True,
) -> tuple[ck.Checksum, ck.Checksum]:
    """The source's and the destination's checksums, computed at once (the destination's
    over the rows its transaction wrote, or all of them)."""
    where = ck.this_transaction(dst) if this_transaction else None
    relation = sql.Identifier(table)
    renderings = ck.destination_renderings(dst, relation, columns)
    source = ck.start_source_checksums(src, sql.SQL(select), [renderings])  # type: ignore[arg-type]
    dest = ck.start_destination_checksum(dst, relation, columns, where)
    return source.wait()[0], dest.wait()


# Equal where the rows are equal.


@pytest.mark.parametrize("fmt", ["text", "csv", "binary"])
def test_equal_after_a_copy_of_every_type_family(pair: tuple[Database, Database], fmt: str) -> None:
    source_db, dest_db = pair
    create_types(source_db, fill=True)
    create_types(dest_db)
    columns = type_names()
    if fmt == "binary":  # binary carries local types' OIDs: the exact tests leave them out too
        columns = [c for c in columns if c not in LOCAL_TYPE_COLUMNS]
    select = f"SELECT {', '.join(columns)} FROM types"
    # Sessions that render differently (time zone, bytea) compare all the same.
    with (
        repeatable_read(pinned(source_db, options="-c TimeZone=Asia/Kathmandu")) as src,
        pinned(dest_db, options="-c TimeZone=Pacific/Chatham -c bytea_output=escape") as dst,
    ):
        assert copy(src, dst, select, "types", columns, fmt) == 4
        source, dest = both_sides(src, dst, select, "types", columns)
        whole = ck.destination_checksum(dst, sql.Identifier("types"), columns)
    assert source.rows == 4
    assert source == dest == whole
    ck.verify("types", source, dest)


def test_source_rendered_as_the_destinations_types(pair: tuple[Database, Database]) -> None:
    """Columns whose types differ compare as COPY converted them; a destination enum (a type
    the source lacks) compares by its text form."""
    source_db, dest_db = pair
    source_db.execute(
        "CREATE TABLE t (n numeric, s text, b bool, ip inet, c text, mood text, ts timestamptz);"
        "INSERT INTO t VALUES (1.005, '42', true, '10.0.0.1', 'ab', 'ok', '2024-01-01 12:00+05'),"
        " (NULL, '', false, NULL, '', 'sad', NULL)"
    )
    dest_db.execute(
        "CREATE TYPE mood AS ENUM ('sad', 'ok');"
        "CREATE DOMAIN money2 AS numeric(12, 2);"
        "CREATE TABLE t (n money2, s varchar(5), b text, ip inet, c char(4), mood mood,"
        " ts timestamp)"
    )
    columns = ["n", "s", "b", "ip", "c", "mood", "ts"]
    select = "SELECT * FROM t"
    with repeatable_read(pinned(source_db)) as src, pinned(dest_db) as dst:
        copy(src, dst, select, "t", columns, "text")
        source, dest = both_sides(src, dst, select, "t", columns)
        # Rendered as the source's own types instead, they differ (1.005 vs 1.01, 't' vs...).
        plain = ck.Checksum(*src.execute(
            "SELECT count(*), sum(hashtextextended(ROW(n, s, b, ip, c, mood, ts)::text, 0)) "
            "FROM t"
        ).fetchone())  # type: ignore[misc]
    assert source == dest
    assert plain != dest


def test_same_in_any_order_and_any_session_time_zone(pair: tuple[Database, Database]) -> None:
    source_db, dest_db = pair
    source_db.execute(
        "CREATE TABLE t (id int, ts timestamptz, d date);"
        "INSERT INTO t SELECT g, '2024-03-10 01:30+00'::timestamptz + g * interval '7 hours',"
        " '2024-01-01'::date + g FROM generate_series(1, 500) g"
    )
    dest_db.execute("CREATE TABLE t (id int, ts timestamptz, d date)")
    columns = ["id", "ts", "d"]
    with (
        repeatable_read(pinned(source_db, options="-c TimeZone=Asia/Kolkata")) as src,
        pinned(dest_db, options="-c TimeZone=America/New_York") as dst,
    ):
        copy(src, dst, "SELECT * FROM t ORDER BY id DESC", "t", columns, "text")
        source, dest = both_sides(src, dst, "SELECT * FROM t ORDER BY id", "t", columns)
        # The session's own time zone is back after the checksum.
        assert dst.execute("SHOW TimeZone").fetchone() == ("America/New_York",)
    assert source == dest


# Different where the rows differ.


def test_a_trigger_altering_one_value_makes_it_differ(pair: tuple[Database, Database]) -> None:
    source_db, dest_db = pair
    create_types(source_db, fill=True)
    create_types(dest_db)
    dest_db.execute(
        "CREATE FUNCTION nudge() RETURNS trigger LANGUAGE plpgsql AS $$"
        " BEGIN IF NEW.id = 2 THEN NEW.i8 := NEW.i8 - 1; END IF; RETURN NEW; END $$;"
        "CREATE TRIGGER nudge BEFORE INSERT ON types FOR EACH ROW EXECUTE FUNCTION nudge()"
    )
    columns = type_names()
    select = "SELECT * FROM types"
    with repeatable_read(pinned(source_db)) as src, pinned(dest_db) as dst:
        copy(src, dst, select, "types", columns, "text")
        source, dest = both_sides(src, dst, select, "types", columns)
    assert source.rows == dest.rows == 4
    with pytest.raises(ck.ChecksumMismatch) as caught:
        ck.verify("public.types", source, dest)
    message = str(caught.value)
    assert "public.types" in message
    assert str(source.total) in message and str(dest.total) in message


ROWS = "(1, 'a', 'x'), (2, 'b', NULL), (3, '', 'z')"


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ("INSERT INTO t VALUES (2, 'b', NULL)", "a duplicated row"),
        ("DELETE FROM t WHERE id = 3", "a missing row"),
        ("UPDATE t SET v = '' WHERE id = 2", "NULL became ''"),
        ("UPDATE t SET u = NULL WHERE id = 3", "'' became NULL"),
        ("UPDATE t SET u = CASE id WHEN 1 THEN 'b' ELSE 'a' END WHERE id < 3", "swapped values"),
        ("UPDATE t SET u = 'a ' WHERE id = 1", "a trailing blank"),
    ],
)
def test_a_changed_row_set_differs(
    pair: tuple[Database, Database], change: str, why: str
) -> None:
    source_db, dest_db = pair
    for db in pair:
        db.execute(f"CREATE TABLE t (id int, u text, v text); INSERT INTO t VALUES {ROWS}")
    dest_db.execute(change)
    columns = ["id", "u", "v"]
    with repeatable_read(pinned(source_db)) as src, pinned(dest_db) as dst:
        source, dest = both_sides(
            src, dst, "SELECT * FROM t", "t", columns, this_transaction=False
        )
    assert source != dest, why


# What is counted.


@pytest.mark.parametrize("partitioned", [False, True])
def test_append_scope_is_this_transactions_rows(
    pair: tuple[Database, Database], partitioned: bool
) -> None:
    source_db, dest_db = pair
    source_db.execute(
        "CREATE TABLE t (id int, v text); INSERT INTO t SELECT g, 'new ' || g "
        "FROM generate_series(1, 300) g"
    )
    if partitioned:
        dest_db.execute(
            "CREATE TABLE t (id int, v text) PARTITION BY RANGE (id);"
            "CREATE TABLE t_low PARTITION OF t FOR VALUES FROM (MINVALUE) TO (150);"
            "CREATE TABLE t_high PARTITION OF t FOR VALUES FROM (150) TO (MAXVALUE)"
        )
    else:
        dest_db.execute("CREATE TABLE t (id int, v text)")
    dest_db.execute("INSERT INTO t SELECT g, 'old' FROM generate_series(1, 300) g")
    columns = ["id", "v"]
    with repeatable_read(pinned(source_db)) as src, pinned(dest_db) as dst:
        copy(src, dst, "SELECT * FROM t", "t", columns, "binary")
        source, dest = both_sides(src, dst, "SELECT * FROM t", "t", columns)
        whole = ck.destination_checksum(dst, sql.Identifier("t"), columns)
    assert source == dest
    assert source.rows == 300 and whole.rows == 600


def test_a_baseline_takes_out_rows_written_before_the_copy(
    pair: tuple[Database, Database],
) -> None:
    """Rows a preoperator wrote into the table in the load transaction are this transaction's
    too: the checksum taken before the COPY is subtracted."""
    source_db, dest_db = pair
    source_db.execute("CREATE TABLE t (id int, v text); INSERT INTO t VALUES (1, 'a'), (2, 'b')")
    dest_db.execute("CREATE TABLE t (id int, v text); INSERT INTO t VALUES (7, 'old')")
    columns = ["id", "v"]
    relation = sql.Identifier("t")
    with repeatable_read(pinned(source_db)) as src, pinned(dest_db) as dst:
        nothing = ck.destination_checksum(dst, relation, columns, ck.this_transaction(dst))
        dst.execute("INSERT INTO t VALUES (8, 'preoperator'); UPDATE t SET v = 'x' WHERE id = 7")
        baseline = ck.destination_checksum(dst, relation, columns, ck.this_transaction(dst))
        copy(src, dst, "SELECT * FROM t", "t", columns, "text")
        source, dest = both_sides(src, dst, "SELECT * FROM t", "t", columns)
    assert nothing == ck.Checksum(0, 0)
    assert baseline.rows == 2
    assert dest != source
    assert dest - baseline == source


def test_source_checksum_is_the_copys_snapshot(pair: tuple[Database, Database]) -> None:
    """A row committed on the source between the COPY and the checksum is in neither."""
    source_db, dest_db = pair
    source_db.execute(
        "CREATE TABLE t (id int, v text); INSERT INTO t SELECT g, 'v' FROM generate_series(1, 50) g"
    )
    dest_db.execute("CREATE TABLE t (id int, v text)")
    columns = ["id", "v"]
    with (
        repeatable_read(pinned(source_db)) as src,
        pinned(dest_db) as dst,
        pinned(source_db) as second,
    ):
        snapshot = ck.export_snapshot(src)
        source_db.execute("INSERT INTO t VALUES (0, 'early')")  # committed before the COPY
        copy(src, dst, "SELECT * FROM t", "t", columns, "text")
        source_db.execute("INSERT INTO t VALUES (51, 'late')")  # committed after it
        ck.import_snapshot(second, snapshot)
        source, dest = both_sides(src, dst, "SELECT * FROM t", "t", columns)
        renderings = ck.destination_renderings(dst, sql.Identifier("t"), columns)
        # A second source connection in the exported snapshot sees the same rows.
        imported = ck.source_checksum(second, sql.SQL("SELECT * FROM t"), renderings)
    assert source == dest == imported
    assert source.rows == 50
    with pinned(source_db) as fresh, pinned(dest_db) as dst:
        renderings = ck.destination_renderings(dst, sql.Identifier("t"), columns)
        now = ck.source_checksum(fresh, sql.SQL("SELECT * FROM t"), renderings)
    assert now.rows == 52


def test_one_scan_serves_destinations_of_different_types(
    pair: tuple[Database, Database],
) -> None:
    source_db, dest_db = pair
    source_db.execute("CREATE TABLE t (n numeric); INSERT INTO t VALUES (1.234), (NULL)")
    dest_db.execute("CREATE TABLE a (n numeric); CREATE TABLE b (n numeric(8, 1))")
    with repeatable_read(pinned(source_db)) as src, pinned(dest_db) as dst:
        wide = ck.destination_renderings(dst, sql.Identifier("a"), ["n"])
        narrow = ck.destination_renderings(dst, sql.Identifier("b"), ["n"])
        first, second, third = ck.source_checksums(
            src, sql.SQL("SELECT n FROM t"), [wide, narrow, wide]
        )
    assert first == third != second
    assert first.rows == second.rows == 2


def test_only_utf8_databases_compare(server: LocalServer, dbs: Databases) -> None:
    name = f"cklatin_{next(_counter)}"
    with psycopg.connect(server.address.conninfo(), autocommit=True) as admin:
        admin.execute(
            f"CREATE DATABASE {name} ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' "
            "TEMPLATE template0"
        )
    with psycopg.connect(server.address.conninfo(name)) as latin:
        with pytest.raises(ck.ChecksumError, match=r"needs UTF8 databases .*LATIN1"):
            ck.require_comparable(latin, "destination x")
    ck.require_comparable(dbs.new("ckutf"), "source")


def test_verify_all_fails_only_the_altered_destination(
    server: LocalServer, pair: tuple[Database, Database]
) -> None:
    """Two destinations loaded at once: the one whose trigger alters a value gets a mismatch
    naming it, the other its checksum (equal to the source's)."""
    source_db, good_db = pair
    name = f"ckbad_{next(_counter)}"
    create_database(server.address, name)
    bad_db = Database(server, name)
    source_db.execute(
        "CREATE TABLE t (id int, v text); INSERT INTO t SELECT g, 'v' || g "
        "FROM generate_series(1, 100) g"
    )
    for db in (good_db, bad_db):
        db.execute("CREATE TABLE t (id int, v text)")
    bad_db.execute(
        "CREATE FUNCTION nudge() RETURNS trigger LANGUAGE plpgsql AS $$"
        " BEGIN IF NEW.id = 50 THEN NEW.v := 'changed'; END IF; RETURN NEW; END $$;"
        "CREATE TRIGGER nudge BEFORE INSERT ON t FOR EACH ROW EXECUTE FUNCTION nudge()"
    )
    relation = sql.Identifier("t")
    with (
        repeatable_read(pinned(source_db)) as src,
        pinned(good_db) as good,
        pinned(bad_db) as bad,
    ):
        renderings = {c: ck.destination_renderings(c, relation, ["id", "v"]) for c in (good, bad)}
        copyman.transfer(
            (src, "COPY (SELECT * FROM t) TO STDOUT (FORMAT binary)"),
            (good, "COPY t FROM STDIN (FORMAT binary)"),
            (bad, "COPY t FROM STDIN (FORMAT binary)"),
        )
        written = [
            ck.Written(label, c, relation, renderings[c], ck.this_transaction(c))
            for label, c in (("good.t", good), ("bad.t", bad))
        ]
        good_result, bad_result = ck.verify_all(src, sql.SQL("SELECT * FROM t"), written)
        # Each connection is usable after it (between statements, in its transaction).
        assert good.execute("SELECT count(*) FROM t").fetchone() == (100,)
        assert bad.execute("SELECT count(*) FROM t").fetchone() == (100,)
    assert isinstance(good_result, ck.Checksum) and good_result.rows == 100
    assert isinstance(bad_result, ck.ChecksumMismatch)
    assert bad_result.table == "bad.t"
    assert bad_result.source == good_result
    assert "bad.t" in str(bad_result)
