"""The source is only read: one read-only transaction, one snapshot, no data-modifying query.

The source connection runs everything of a transfer (the checks before the copy, then the
COPY itself) in one ``REPEATABLE READ, READ ONLY`` transaction: every check sees the rows
the copy then reads, and a function in the query that tries to write (``setval``, a
volatile function doing an ``INSERT``) fails with SQLSTATE 25006 instead of changing the
source. A query that is itself a write (``DELETE/UPDATE/INSERT ... RETURNING``, a ``WITH``
holding one) or locks rows (``SELECT ... FOR UPDATE``) is refused before it runs, from its
plan: ``EXPLAIN`` without ``ANALYZE`` plans the query and executes nothing.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any

import psycopg
from psycopg import sql

from airflow_copyman.load.catalog.tables import PlanError

#: Plan nodes of a query that writes (ModifyTable) or locks rows for writing (LockRows).
WRITING_NODES: Mapping[str, str] = {
    "ModifyTable": "modifies data",
    "LockRows": "locks rows (FOR UPDATE/SHARE)",
}


def begin(conn: psycopg.Connection[Any], snapshot: str | None = None) -> None:
    """Make ``conn``'s next transaction ``REPEATABLE READ, READ ONLY`` (psycopg sends the
    ``BEGIN`` with the first statement). The connection must be idle. With ``snapshot`` (an
    exported one), the transaction begins now and reads in it: ``SET TRANSACTION SNAPSHOT``
    must be its first statement."""
    conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
    conn.read_only = True
    if snapshot is not None:
        conn.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot)))


def refuse_writes(conn: psycopg.Connection[Any], query: sql.Composable | str) -> None:
    """Raise :class:`PlanError` if ``query`` modifies data or locks rows. Plans it (and so
    takes the locks it would take) in the current transaction; runs nothing."""
    explain = sql.SQL("EXPLAIN (FORMAT JSON) {}").format(
        query if isinstance(query, sql.Composable) else sql.SQL(query)  # type: ignore[arg-type]
    )
    row = conn.execute(explain).fetchone()
    assert row is not None
    document = row[0]
    if isinstance(document, str | bytes):  # no JSON loader registered: parse it here
        document = json.loads(document)
    for node in _nodes(document[0]["Plan"]):
        kind = str(node.get("Node Type"))
        if kind in WRITING_NODES:
            what = node.get("Operation", "").upper()
            target = node.get("Relation Name")
            detail = f" ({what} on {target})" if what and target else ""
            raise PlanError(
                f"sql {WRITING_NODES[kind]}{detail}: the source is only read. Give a query "
                "that reads (SELECT, VALUES, TABLE), with no data-modifying WITH and no "
                "FOR UPDATE/SHARE"
            )


def _nodes(plan: Mapping[str, Any]) -> Iterator[Mapping[str, Any]]:
    yield plan
    for child in plan.get("Plans", ()):
        yield from _nodes(child)
