"""Test tables: mixed types, NULLs and awkward text, compared by content."""

from __future__ import annotations

import psycopg

COLUMNS = """
    id bigint PRIMARY KEY,
    ts timestamptz,
    label text,
    amount numeric(14, 4),
    tags int[],
    doc jsonb,
    ref uuid
"""

# Every 7th row has NULLs; labels carry tabs, newlines, backslashes, quotes, commas and
# non-ASCII text, which each COPY format escapes differently.
_FILL = """
INSERT INTO {table}
SELECT g,
       CASE WHEN g %% 7 = 0 THEN NULL
            ELSE timestamptz '2024-01-01 00:00+00' + g * interval '1 min' END,
       CASE WHEN g %% 7 = 0 THEN NULL
            ELSE 'row ' || g || E'\\t tab \\n newline \\\\ back "quote", comma ü€' END,
       CASE WHEN g %% 7 = 0 THEN NULL ELSE g * 1.2345 END,
       CASE WHEN g %% 7 = 0 THEN NULL ELSE ARRAY[g, g + 1, -g] END,
       CASE WHEN g %% 7 = 0 THEN NULL ELSE jsonb_build_object('g', g, 's', 'x' || g) END,
       md5(g::text)::uuid
FROM generate_series(1, %s) AS g
"""


def create_table(conn: psycopg.Connection, table: str = "items") -> None:
    conn.execute(f"CREATE TABLE {table} ({COLUMNS})")
    conn.commit()


def fill_source(conn: psycopg.Connection, rows: int, table: str = "items") -> None:
    create_table(conn, table)
    conn.execute(_FILL.format(table=table), [rows])  # type: ignore[arg-type]
    conn.commit()


def fingerprint(conn: psycopg.Connection, table: str = "items") -> tuple[int, str | None]:
    """Row count and a digest of every row's text, in key order."""
    row = conn.execute(
        f"SELECT count(*), md5(string_agg(t::text, E'\\n' ORDER BY id)) FROM {table} t"
    ).fetchone()
    assert row is not None
    conn.rollback()
    return row[0], row[1]


def count(conn: psycopg.Connection, table: str = "items") -> int:
    row = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
    assert row is not None
    conn.rollback()
    return int(row[0])
