"""``create="if_missing"``: create a missing destination table from the source's columns.

The table gets the source query's result columns with their exact types (type modifiers
included; domains as their base type, as the query's row description gives them) and, where
it is known and not the type's default, their collation (a table source's columns, and a
query's plain references to a table's columns; not an expression's), in the load
transaction: a load that fails leaves no table behind. With ``mode="merge"`` its key
becomes the primary key (``key_nulls="match"``: ``UNIQUE NULLS NOT DISTINCT``, as a primary
key forbids NULLs). The schema must exist: a typo in a schema name is an error, not a
new schema.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg import sql

from airflow_copyman.load.catalog import keytypes, tables


def schema_for(conn: psycopg.Connection[Any], table: tables.TableName) -> str | None:
    """The schema the table would be created in (its own, else the first of the
    search path that exists), or None."""
    if table.schema is not None:
        return table.schema
    row = conn.execute("SELECT current_schema()::text").fetchone()
    return row[0] if row else None


def check(conn: psycopg.Connection[Any], table: tables.TableName) -> str | None:
    """Why the table cannot be created here, or None."""
    schema = schema_for(conn, table)
    if schema is None:
        return (
            f"table {table} does not exist, and create='if_missing' finds no schema to "
            "create it in (none of the search_path exists): name the schema"
        )
    row = conn.execute(
        "SELECT to_regnamespace(%s) IS NOT NULL, "
        "to_regnamespace(%s) IS NOT NULL AND has_schema_privilege(%s, 'CREATE')",
        [tables.quote_ident(schema), tables.quote_ident(schema), schema],
    ).fetchone()
    if not row or not row[0]:
        return (
            f"table {table} does not exist, nor its schema {schema!r}: create='if_missing' "
            "creates tables, not schemas"
        )
    if not row[1]:
        return f"table {table} does not exist; permission denied: no CREATE privilege on " \
            f"schema {schema!r}"
    return None


#: The name PostgreSQL gives a result column that is an expression without an alias.
UNNAMED = "?column?"


def unnamed(names: Sequence[str]) -> str | None:
    """Why the source's result column names cannot name a new table's columns (an
    expression without an alias, a name given twice), or None."""
    anonymous = [f"#{i + 1}" for i, name in enumerate(names) if name == UNNAMED]
    if anonymous:
        several = len(anonymous) > 1
        return (
            f"create='if_missing': the source's column{'s' if several else ''} "
            f"{', '.join(anonymous)} {'have' if several else 'has'} no name (an expression "
            f"without an alias, which PostgreSQL calls {UNNAMED!r}): give "
            f"{'each' if several else 'it'} an alias (SELECT ... AS name) or give 'columns'"
        )
    twice = list(dict.fromkeys(n for n in names if names.count(n) > 1))
    if twice:
        return (
            f"create='if_missing': the source names a column twice: "
            f"{', '.join(map(repr, twice))} (give each column its own alias, or give 'columns')"
        )
    return None


def missing_collation(
    conn: psycopg.Connection[Any], columns: Sequence[tables.Column]
) -> str | None:
    """Why a column's collation cannot be kept here (this server lacks it), or None."""
    for column in columns:
        if column.collation is None:
            continue
        name = ".".join(tables.quote_ident(part) for part in column.collation)
        row = conn.execute("SELECT to_regcollation(%s) IS NOT NULL", [name]).fetchone()
        if not row or not row[0]:
            return (
                f"create='if_missing': column {column.name} has the collation "
                f"{column.collation_name}, which this server does not have: create it here, "
                "or give the column another collation in the query"
            )
    return None


def refusal(
    conn: psycopg.Connection[Any],
    table: tables.TableName,
    columns: Sequence[tables.Column],
    key: Sequence[str] | None,
) -> str | None:
    """Why ``table`` cannot be created here with ``columns`` (named as the new table's
    columns) and the merge ``key``, or None: what planning a load that creates its table
    checks, for callers that create it from their own plan (a split load's staging)."""
    names = [c.name for c in columns]
    missing = [k for k in key or () if k not in names]
    if missing:
        return f"the merge key column {missing[0]!r} is not a column of the source"
    return (
        check(conn, table)
        or unnamed(names)
        or missing_collation(conn, columns)
        or keytypes.refusal(
            conn, [(c.name, c.type_name) for c in columns if c.name in (key or ())],
            created=True,
        )
    )


def statement(
    table: tables.TableName,
    columns: Sequence[tables.Column],
    key: Sequence[str] | None,
    nulls_match: bool = False,
    *,
    unlogged: bool = False,
) -> sql.Composed:
    """``CREATE TABLE`` with the columns' exact types and collations (and the key as primary
    key, or as a unique key whose NULLs are equal when ``nulls_match``); ``unlogged``: an
    ``UNLOGGED`` table (a split load's staging)."""
    parts: list[sql.Composable] = [_column(c) for c in columns]
    if key:
        parts.append(key_constraint(key, nulls_match))
    return sql.SQL("CREATE {}TABLE {} ({})").format(
        sql.SQL("UNLOGGED " if unlogged else ""), table.identifier, sql.SQL(", ").join(parts)
    )


def key_constraint(key: Sequence[str], nulls_match: bool) -> sql.Composed:
    """A created table's merge key: its primary key, or (``nulls_match``) a unique key whose
    NULLs are equal, as a primary key forbids NULLs."""
    constraint = "UNIQUE NULLS NOT DISTINCT ({})" if nulls_match else "PRIMARY KEY ({})"
    return sql.SQL(constraint).format(sql.SQL(", ").join(map(sql.Identifier, key)))


def _column(column: tables.Column) -> sql.Composed:
    definition = sql.SQL("{} {}").format(
        sql.Identifier(column.name), sql.SQL(column.type_sql or column.type_name)
    )
    if column.collation is None:
        return definition
    return sql.SQL("{} COLLATE {}").format(definition, sql.Identifier(*column.collation))

