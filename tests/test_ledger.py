"""The ledger table's extras (what a load measured beyond rows and bytes) on a real server:
written and read back where the table has their columns; a table of an earlier version
(without them) records and reads as before, and is never altered."""

from __future__ import annotations

from typing import Any

import psycopg
from af_support import OLD_LEDGER, OLD_LEDGER_COLUMNS

from airflow_copyman.load.ledger.table import Entry, Extras, Ledger, TaskKey
from tests.conftest import Databases


def _columns(conn: psycopg.Connection[Any], schema: str) -> list[str]:
    rows = conn.execute(
        "SELECT column_name::text FROM information_schema.columns WHERE table_schema = %s "
        "AND table_name = 'copyman_ledger' ORDER BY ordinal_position", [schema],
    ).fetchall()
    conn.rollback()
    return [r[0] for r in rows]


def test_extras_where_the_table_has_them_and_an_old_table_left_as_it_is(
    dbs: Databases,
) -> None:
    conn = dbs.new("ledger")
    conn.execute(OLD_LEDGER)
    conn.commit()
    ledger = Ledger(None, TaskKey("d", "t", "r", -1, "lineage-1", 1))
    # Created with the columns; found with them; an old table found without them.
    assert ledger.ensure_table(conn, "public") is True
    assert ledger.ensure_table(conn, "public") is True
    assert ledger.ensure_table(conn, "old") is False
    assert _columns(conn, "old") == OLD_LEDGER_COLUMNS
    assert _columns(conn, "public") == [
        *OLD_LEDGER_COLUMNS, "inserted", "updated", "checksum", "table_oid"
    ]

    measured = Extras(9, 1, "10:copy-binary:42")
    for schema in ("public", "old"):
        # Not told whether the table has the columns (has_extras=None): it looks.
        assert ledger.record(conn, schema, "c", "t", 10, 100, measured)
        conn.commit()
    assert ledger.lookup(conn, "public", "c", "t") == Entry(
        "lineage-1", 1, 10, 100, 9, 1, "10:copy-binary:42"
    )
    assert ledger.lookup(conn, "old", "c", "t") == Entry("lineage-1", 1, 10, 100)
    assert _columns(conn, "old") == OLD_LEDGER_COLUMNS

    # A try of the same lineage finds the row taken.
    assert not ledger.record(conn, "public", "c", "t", 10, 100, measured, has_extras=True)
    conn.rollback()
    # A new lineage's row replaces all of it: nothing measured, nothing kept of the old one.
    cleared = Ledger(None, TaskKey("d", "t", "r", -1, "lineage-2", 2))
    assert cleared.record(conn, "public", "c", "t", 5, 50, has_extras=True)
    conn.commit()
    assert cleared.lookup(conn, "public", "c", "t") == Entry("lineage-2", 2, 5, 50)


def test_a_table_with_the_extras_but_no_oid_column_records_the_extras(dbs: Databases) -> None:
    """The version before the OID column: its extras still recorded, the table unaltered."""
    conn = dbs.new("ledger")
    conn.execute(OLD_LEDGER)
    conn.execute("ALTER TABLE old.copyman_ledger ADD COLUMN inserted bigint, "
                 "ADD COLUMN updated bigint, ADD COLUMN checksum text")
    conn.execute("CREATE TABLE t (id int)")
    conn.commit()
    ledger = Ledger(None, TaskKey("d", "t", "r", -1, "lineage-1", 1))
    assert ledger.ensure_table(conn, "old") is True
    assert ledger.record(conn, "old", "c", "public.t", 1, 10, Extras(1, 0, "1:x"), True)
    conn.commit()
    assert ledger.lookup(conn, "old", "c", "public.t") == Entry("lineage-1", 1, 1, 10, 1, 0, "1:x")
    assert "table_oid" not in _columns(conn, "old")
    # A table of this version records the destination's OID.
    assert ledger.ensure_table(conn, "public") is True
    assert ledger.record(conn, "public", "c", "public.t", 1, 10)
    conn.commit()
    row = conn.execute("SELECT table_oid = 'public.t'::regclass FROM copyman_ledger").fetchone()
    assert row == (True,)
