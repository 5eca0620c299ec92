"""Names as a DAG author writes them, and hints for the ones that miss.

Table names are SQL (``schema.table``; unquoted names fold to lower case, ``"Quoted"`` ones are
exact), because a table name is a piece of SQL everywhere else in Airflow too. Column names
are plain names, taken exactly as given: ``Id`` is the column ``Id``, with no quoting to
remember. (Airflow's ``insert_rows(target_fields=...)`` quotes only names with special
characters or reserved words, unless the connection sets ``escape_column_names``: there ``Id``
still folds to ``id``.)

Before, the ``columns`` were SQL as well (``'"Id"'`` for ``Id``, ``'ID'`` meaning ``id``). A
name that matches no column as given, but does as that SQL reading, is still accepted, with a
deprecation warning that says how to write it: DAGs that worked keep working, and say what to
change. A name that matches a column exactly always wins, so the new reading decides wherever
both readings name an existing column.

A table or column that does not exist, but whose name differs from an existing one only in
case or quoting, gets a hint saying how to write it.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg import pq

from airflow_copyman.load.catalog.names import COLUMN_NAME, PlanError, TableName, unquote

log = logging.getLogger(__name__)


class CopyManDeprecationWarning(DeprecationWarning):
    """A way of writing an argument that still works but will be refused in a later release."""


def sql_reading(text: str) -> str | None:
    """How PostgreSQL reads ``text`` as one SQL identifier (``"Id"`` -> ``Id``, ``ID`` ->
    ``id``), or None if it is not one: how column names were read before."""
    match = COLUMN_NAME.match(text)
    return unquote(match.group(1)) if match else None


def _loose(name: str) -> str:
    """What two names that differ only in case, quoting or surrounding blanks share."""
    reading = sql_reading(name)
    return (reading if reading is not None else name.strip()).lower()


def resolve_columns(given: Sequence[str], available: Sequence[str], table: str) -> list[str]:
    """The columns ``given`` names, as names of ``available`` (the table's columns).

    :raises PlanError: a name matches no column (with a hint where one differs only in case
        or quoting), or two names are the same column.
    """
    existing = set(available)
    resolved: list[str] = []
    missing: list[str] = []
    for name in given:
        if name in existing:
            resolved.append(name)
            continue
        reading = sql_reading(name)
        if reading is not None and reading in existing:
            _deprecated(
                f"table {table}: column {name!r} is read as the SQL identifier {name.strip()} "
                f"(column {reading!r}); write the plain name {reading!r}: column names are "
                "taken exactly as given, and SQL-quoted or case-folded ones will be refused "
                "in a later release"
            )
            resolved.append(reading)
            continue
        missing.append(name)
    if missing:
        problems = [with_hint(name, available) for name in missing]
        raise PlanError(
            f"table {table} has no column {', '.join(problems)}; column names are taken "
            f"exactly as given, without SQL quoting (it has {', '.join(available)})"
        )
    if len(set(resolved)) != len(resolved):
        raise PlanError(f"table {table}: a column is listed twice in {list(given)}")
    return resolved


def with_hint(name: str, available: Sequence[str]) -> str:
    """``'name'``, followed by ``(did you mean 'Name'?)`` where columns of ``available``
    differ from it only in case, quoting or surrounding blanks."""
    near = near_names(name, available)
    hint = f" (did you mean {' or '.join(map(repr, near))}?)" if near else ""
    return f"{name!r}{hint}"


def near_names(name: str, available: Sequence[str]) -> list[str]:
    """The names of ``available`` that differ from ``name`` only in case, quoting or
    surrounding blanks."""
    return [c for c in available if c != name and _loose(c) == _loose(name)]


def _deprecated(message: str) -> None:
    # The log line is what a DAG author sees (the task log); the warning is for tooling
    # and tests that turn warnings into errors.
    log.warning("Deprecated: %s", message)
    warnings.warn(message, CopyManDeprecationWarning, stacklevel=4)


_SIMILAR_TABLES = """
SELECT quote_ident(n.nspname), quote_ident(c.relname)
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE lower(c.relname) = lower(%(name)s)
  AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
  AND CASE WHEN %(schema)s::text IS NULL THEN pg_table_is_visible(c.oid)
           ELSE lower(n.nspname) = lower(%(schema)s::text) END
ORDER BY 1, 2
LIMIT 3
"""


def missing_table(conn: psycopg.Connection[Any], table: TableName, what: str = "table") -> str:
    """``table ... does not exist``, with how to write a table whose name differs only in
    case or quoting (an SQL spelling, quoted where needed)."""
    return f"{what} {table} does not exist{_table_hint(conn, table.schema, table.name)}"


# PostgreSQL's message for a relation a query names that does not exist: the name as the
# server read it (folded), schema-qualified if the query qualified it.
_UNDEFINED_RELATION = re.compile(r'relation "(?:([^".]+)\.)?(.+)" does not exist')


def undefined_table_hint(conn: psycopg.Connection[Any], exc: psycopg.Error) -> str:
    """For a query's ``relation "x" does not exist``: how to write a table whose name
    differs only in case or quoting (empty if there is none). Rolls back a failed
    transaction first: the error has ended its use anyway."""
    match = _UNDEFINED_RELATION.match(exc.diag.message_primary or "")
    if match is None:
        return ""
    if conn.info.transaction_status == pq.TransactionStatus.INERROR:
        conn.rollback()
    return _table_hint(conn, match.group(1), match.group(2))


def _table_hint(conn: psycopg.Connection[Any], schema: str | None, name: str) -> str:
    try:
        # A savepoint: a failed look-up must not abort the caller's transaction.
        with conn.transaction():
            rows = conn.execute(_SIMILAR_TABLES, {"name": name, "schema": schema}).fetchall()
    except psycopg.Error:
        return ""
    spellings = [f"{s}.{n}" if schema else n for s, n in rows]
    if not spellings:
        return ""
    return (
        f"; did you mean {' or '.join(repr(s) for s in spellings)}? Table names are SQL: "
        "unquoted names fold to lower case, double-quoted ones are exact"
    )
