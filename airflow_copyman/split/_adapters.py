"""Every dependency of the split load on private parts of the load layer, in one place.

The load layer is being reorganised (its private modules move into sub-packages); when
they move, re-point the imports below and nothing else. Everything else in
:mod:`airflow_copyman.split` uses only :mod:`airflow_copyman.load`'s public names.
Imports no Airflow module.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import sql

from airflow_copyman.load import _classify
from airflow_copyman.load._ledger import TABLE as LEDGER_TABLE
from airflow_copyman.load._plan import TableName
from airflow_copyman.load._relation import Relation

__all__ = [
    "describe_error", "is_permanent", "is_table_name", "range_ledger_rows", "relation",
]


def relation(database: str, schema: str, name: str, key: str, oid: int) -> Relation:
    """A destination table as the load layer names it (for its result: asset URIs)."""
    return Relation(database, schema, name, key=key, oid=oid)


def is_table_name(text: str) -> bool:
    """Whether ``text`` names a table (``t``, ``s.t``, ``"S"."T"``) rather than a query."""
    return TableName.parse(text.strip()) is not None


def is_permanent(exc: BaseException) -> bool:
    """Whether no retry can fix ``exc`` (the load layer's classification)."""
    return _classify.is_permanent(exc)


def describe_error(exc: BaseException, secrets: tuple[str, ...] = ()) -> str:
    """``Class [SQLSTATE]: message`` and the server's detail, passwords removed."""
    return _classify.describe(exc, secrets)


def range_ledger_rows(
    conn: psycopg.Connection[Any], schema: str, *, dag_id: str, task_id: str, run_id: str,
    lineage: str, conn_id: str, destination: str,
) -> list[tuple[int, int, int]]:
    """(map_index, rows, bytes) of every range the ledger in ``schema`` records as loaded
    into ``destination`` (the staging table, as its server resolved it) by the mapped load
    task ``task_id`` for this DAG run and lineage, in the current transaction. Reads the
    ledger table's layout, which belongs to :mod:`airflow_copyman.load._ledger`."""
    exists = conn.execute(
        "SELECT to_regclass(%s) IS NOT NULL",
        [sql.Identifier(schema, LEDGER_TABLE).as_string(conn)],
    ).fetchone()
    if not exists or not exists[0]:
        return []
    found = conn.execute(
        sql.SQL(
            "SELECT map_index, rows, bytes FROM {} WHERE dag_id = %s AND task_id = %s"
            " AND run_id = %s AND lineage = %s AND conn_id = %s AND destination = %s"
            " ORDER BY map_index"
        ).format(sql.Identifier(schema, LEDGER_TABLE)),
        [dag_id, task_id, run_id, lineage, conn_id, destination],
    ).fetchall()
    return [(int(m), int(r), int(b)) for m, r, b in found]
