"""Planning a split load from the source's catalog: which column, which cuts.

Reads only the catalog and, without statistics, the column's minimum and maximum. Imports
no Airflow module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from airflow_copyman import load
from airflow_copyman.split._ranges import (
    SPLITTABLE_TYPES,
    KeyKind,
    Range,
    ctid_ranges,
    cuts_from_bounds,
    cuts_from_histogram,
    ranges_from_cuts,
)


class SplitPlanError(ValueError):
    """The table cannot be split as asked (no retry can fix it)."""


@dataclass(frozen=True)
class SourceTable:
    oid: int
    schema: str
    name: str
    #: 'r' table, 'p' partitioned table (and whether it has children: inheritance).
    relkind: str
    has_children: bool

    @property
    def identifier(self) -> sql.Identifier:
        return sql.Identifier(self.schema, self.name)

    def __str__(self) -> str:
        return f"{self.schema}.{self.name}"


@dataclass(frozen=True)
class KeyColumn:
    name: str
    kind: KeyKind
    not_null: bool


def resolve(conn: psycopg.Connection[Any], table: str) -> SourceTable:
    row = conn.execute(
        "SELECT c.oid::bigint, n.nspname::text, c.relname::text, c.relkind::text,"
        " c.relhassubclass FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE c.oid = to_regclass(%s)",
        [table],
    ).fetchone()
    if row is None:
        raise SplitPlanError(f"table: {table!r} does not exist on the source")
    if row[3] not in ("r", "p"):
        raise SplitPlanError(
            f"table: {table!r} is not a table (relkind {row[3]!r}): only tables and "
            "partitioned tables split"
        )
    return SourceTable(int(row[0]), row[1], row[2], row[3], bool(row[4]))


def key_column(
    conn: psycopg.Connection[Any], table: SourceTable, split_by: str | None
) -> KeyColumn | None:
    """``split_by``'s column, else the table's single-column integer primary key, else
    None (split by ``ctid``)."""
    if split_by is None:
        row = conn.execute(
            "SELECT a.attname::text, format_type(a.atttypid, NULL), a.attnotnull"
            " FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid"
            " AND a.attnum = i.indkey[0]"
            " WHERE i.indrelid = %s AND i.indisprimary AND i.indnkeyatts = 1",
            [table.oid],
        ).fetchone()
        if row is None or SPLITTABLE_TYPES.get(row[1]) != "integer":
            return None
    else:
        row = conn.execute(
            "SELECT a.attname::text, format_type(a.atttypid, NULL), a.attnotnull"
            " FROM pg_attribute a WHERE a.attrelid = %s AND a.attname = %s"
            " AND a.attnum > 0 AND NOT a.attisdropped",
            [table.oid, split_by],
        ).fetchone()
        if row is None:
            raise SplitPlanError(f"split_by: {table} has no column {split_by!r}")
    kind = SPLITTABLE_TYPES.get(row[1])
    if kind is None:
        raise SplitPlanError(
            f"split_by: column {row[0]!r} of {table} is {row[1]}; only integer, numeric, "
            "date and timestamp columns split"
        )
    return KeyColumn(row[0], kind, bool(row[2]))


def histogram(conn: psycopg.Connection[Any], table: SourceTable, column: str) -> list[str]:
    """The column's histogram bounds as text (ascending), [] without statistics. For a
    table with children, the statistics of the whole tree where ANALYZE made them."""
    row = conn.execute(
        "SELECT histogram_bounds::text::text[] FROM pg_stats WHERE schemaname = %s"
        " AND tablename = %s AND attname = %s ORDER BY inherited DESC LIMIT 1",
        [table.schema, table.name, column],
    ).fetchone()
    return list(row[0]) if row and row[0] else []


def bounds(
    conn: psycopg.Connection[Any], table: SourceTable, column: KeyColumn
) -> tuple[str, str] | None:
    """The column's minimum and maximum as text (timestamps: seconds since the epoch),
    None for an empty table. Uses the column's index where it has one."""
    col = sql.Identifier(column.name)
    if column.kind in ("timestamp", "timestamptz"):
        fetch = sql.SQL("extract(epoch FROM min({c}))::text, extract(epoch FROM max({c}))::text")
    else:
        fetch = sql.SQL("min({c})::text, max({c})::text")
    row = conn.execute(
        sql.SQL("SELECT {} FROM {}").format(fetch.format(c=col), table.identifier)
    ).fetchone()
    if row is None or row[0] is None:
        return None
    return row[0], row[1]


def heap_blocks(conn: psycopg.Connection[Any], table: SourceTable) -> int:
    row = conn.execute(
        "SELECT pg_relation_size(%s::oid), current_setting('block_size')::bigint",
        [table.oid],
    ).fetchone()
    assert row is not None
    return max(1, math.ceil(int(row[0]) / int(row[1])))


def plan(
    conn: psycopg.Connection[Any], table: str, split_by: str | None, parts: int
) -> tuple[SourceTable, list[Range]]:
    """The ranges of ``table`` in at most ``parts`` parts (plus the NULL range where the
    key may be NULL). Ends the transaction it opens."""
    try:
        source = resolve(conn, table)
        column = key_column(conn, source, split_by)
        if column is None:
            if source.relkind == "p" or source.has_children:
                # Each child has its own ctids: block ranges of a tree overlap.
                raise SplitPlanError(
                    f"split_by: {source} has children (partitions or inheritance) and no "
                    "single-column integer primary key: give split_by (a column)"
                )
            return source, ctid_ranges(heap_blocks(conn, source), parts)
        found = histogram(conn, source, column.name)
        if len(found) > parts:
            cuts = cuts_from_histogram(found, parts)
        else:
            minmax = bounds(conn, source, column)
            cuts = cuts_from_bounds(column.kind, *minmax, parts) if minmax else []
        return source, ranges_from_cuts(column.name, cuts, nulls=not column.not_null)
    finally:
        conn.rollback()


def column_names(conn: psycopg.Connection[Any], table: SourceTable) -> list[str]:
    """The source table's columns, in order (what ``SELECT *`` returns)."""
    try:
        found = conn.execute(
            "SELECT attname::text FROM pg_attribute WHERE attrelid = %s AND attnum > 0"
            " AND NOT attisdropped ORDER BY attnum",
            [table.oid],
        ).fetchall()
    finally:
        conn.rollback()
    return [r[0] for r in found]


def describe_columns(conn: psycopg.Connection[Any], table: str) -> list[load.Column]:
    """The source table's columns with their exact types, as the load layer describes a
    source (for a staging table of a table ``create="if_missing"`` makes at publish).
    Ends the transaction it opens."""
    try:
        return load.Source.parse(table).describe(conn, None)
    finally:
        conn.rollback()


def source_table(conn: psycopg.Connection[Any], table: str) -> SourceTable:
    """``table`` as the source resolves it. Ends the transaction it opens."""
    try:
        return resolve(conn, table)
    finally:
        conn.rollback()
