"""The SQL of every load mode, built by pure functions: no server, no connection.

Each returns a :class:`psycopg.sql.Composable` that the mode runs in the destination's load
transaction (tests/test_mode_sql.py renders them with ``as_string(None)``). Names are
always :class:`~psycopg.sql.Identifier`\\ s, so quoting and case are psycopg's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from psycopg import sql

#: The merge's staging table, in the session's own temporary schema.
STAGE = sql.Identifier("pg_temp", "copyman_merge_stage")
#: The alias the checksum and the read-back give the relation a mode's rows are read from.
READ_ALIAS = "r"
#: The staging table's alias in the merge's statements.
STAGE_ALIAS = "s"
#: The target table's alias in the merge's statements.
TABLE_ALIAS = "t"


def names(columns: Sequence[str]) -> sql.Composable:
    """``a, "B"``: column names as a list."""
    return sql.SQL(", ").join(map(sql.Identifier, columns))


def _only(only: bool) -> sql.Composable:
    return sql.SQL("ONLY " if only else "")


# Replace.


def truncate(table: sql.Composable, *, only: bool, cascade: bool) -> sql.Composed:
    """``TRUNCATE TABLE [ONLY] t [CASCADE]``: an inheritance parent's own rows only where
    ``only``; the tables referencing it too where ``cascade``."""
    return sql.SQL("TRUNCATE TABLE {}{}{}").format(
        _only(only), table, sql.SQL(" CASCADE" if cascade else "")
    )


def delete_all(table: sql.Composable, *, only: bool) -> sql.Composed:
    """``DELETE FROM [ONLY] t``."""
    return sql.SQL("DELETE FROM {}{}").format(_only(only), table)


# Merge.


def create_stage(table: sql.Composable, columns: Sequence[str]) -> sql.Composed:
    """The staging table: exactly the loaded columns with the table's types (typmods and
    collations included), no constraints, dropped at the transaction's end."""
    return sql.SQL(
        "CREATE TEMPORARY TABLE {} ON COMMIT DROP AS SELECT {} FROM {} WITH NO DATA"
    ).format(STAGE, names(columns), table)


def copy_into_stage(columns: Sequence[str], fmt: str) -> sql.Composed:
    """The merge's COPY: into the staging table."""
    return sql.SQL("COPY {} ({}) FROM STDIN (FORMAT {})").format(
        STAGE, names(columns), sql.SQL(fmt)
    )


def null_key_count(key: Sequence[str], stage: sql.Composable = STAGE) -> sql.Composed:
    """One row: the staged rows with a NULL in the key, then how many per key column.
    ``stage``: the staging table (a split load's publish has one of its own)."""
    return sql.SQL("SELECT count(*), {per_key} FROM {s} WHERE {any_null}").format(
        per_key=sql.SQL(", ").join(
            sql.SQL("count(*) FILTER (WHERE {} IS NULL)").format(sql.Identifier(k))
            for k in key
        ),
        s=stage,
        any_null=sql.SQL(" OR ").join(
            sql.SQL("{} IS NULL").format(sql.Identifier(k)) for k in key
        ),
    )


def unique_key_index(
    key: Sequence[str], *, nulls_match: bool, stage: sql.Composable = STAGE
) -> sql.Composed:
    """A unique index on the staged keys: its error names a key that repeats. Where NULLs
    match (``key_nulls="match"``), repeated NULL keys are duplicates too."""
    return sql.SQL("CREATE UNIQUE INDEX ON {} ({}){}").format(
        stage, names(key), sql.SQL(" NULLS NOT DISTINCT" if nulls_match else "")
    )


def key_match(
    table_alias: str, stage_alias: str, key: Sequence[str], *, nulls_match: bool
) -> sql.Composable:
    """The key condition between two aliases (``IS NOT DISTINCT FROM`` where NULLs match)."""
    operator = sql.SQL("IS NOT DISTINCT FROM" if nulls_match else "=")
    return sql.SQL(" AND ").join(
        sql.SQL("{t}.{k} {op} {s}.{k}").format(
            t=sql.Identifier(table_alias), s=sql.Identifier(stage_alias), k=sql.Identifier(k),
            op=operator,
        )
        for k in key
    )


def exact_value(send: sql.Identifier | None, alias: str, column: str) -> sql.Composable:
    """A column's exact value, comparable whatever its type: its send function's bytes
    (``1.0`` and ``1.00`` differ), else its text."""
    value = sql.SQL("{}.{}").format(sql.Identifier(alias), sql.Identifier(column))
    if send is None:
        return sql.SQL("{}::text").format(value)
    return sql.SQL("{}({})").format(send, value)


def update_changed(
    table: sql.Composable,
    columns: Sequence[str],
    key: Sequence[str],
    send: Mapping[str, sql.Identifier | None],
    *,
    nulls_match: bool,
    stage: sql.Composable = STAGE,
) -> sql.Composed | None:
    """``UPDATE`` the rows whose key was staged and whose values differ (compared exactly,
    ``send``: each column's send function); None where only key columns load (a found row
    has nothing to change)."""
    others = [c for c in columns if c not in key]
    if not others:
        return None
    t, s = TABLE_ALIAS, STAGE_ALIAS
    return sql.SQL(
        "UPDATE {t} AS {ta} SET {sets} FROM {s} AS {sa} WHERE {match} "
        "AND ({old}) IS DISTINCT FROM ({new})"
    ).format(
        t=table,
        ta=sql.Identifier(t),
        sets=sql.SQL(", ").join(
            sql.SQL("{c} = {sa}.{c}").format(c=sql.Identifier(c), sa=sql.Identifier(s))
            for c in others
        ),
        s=stage,
        sa=sql.Identifier(s),
        match=key_match(t, s, key, nulls_match=nulls_match),
        old=sql.SQL(", ").join(exact_value(send.get(c), t, c) for c in others),
        new=sql.SQL(", ").join(exact_value(send.get(c), s, c) for c in others),
    )


def insert_missing(
    table: sql.Composable,
    columns: Sequence[str],
    key: Sequence[str],
    *,
    nulls_match: bool,
    stage: sql.Composable = STAGE,
) -> sql.Composed:
    """``INSERT`` the staged rows whose key is not in the table."""
    t, s = TABLE_ALIAS, STAGE_ALIAS
    return sql.SQL(
        "INSERT INTO {t} ({cols}) SELECT {scols} FROM {s} AS {sa} WHERE NOT EXISTS "
        "(SELECT FROM {t} AS {ta} WHERE {match})"
    ).format(
        t=table,
        cols=names(columns),
        scols=sql.SQL(", ").join(
            sql.SQL("{}.{}").format(sql.Identifier(s), sql.Identifier(c)) for c in columns
        ),
        s=stage,
        sa=sql.Identifier(s),
        ta=sql.Identifier(t),
        match=key_match(t, s, key, nulls_match=nulls_match),
    )


def merged_rows(key: Sequence[str], *, nulls_match: bool) -> sql.Composed:
    """The condition on the target (read as :data:`READ_ALIAS`) that selects the rows whose
    key was staged, matched as the merge matched them: what a merge's checksum reads back."""
    return sql.SQL("EXISTS (SELECT FROM {} AS {} WHERE {})").format(
        STAGE,
        sql.Identifier(STAGE_ALIAS),
        key_match(READ_ALIAS, STAGE_ALIAS, key, nulls_match=nulls_match),
    )

