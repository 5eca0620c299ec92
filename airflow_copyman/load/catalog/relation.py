"""Which table a destination name is, as its server names it: database, schema, table.

An unqualified name (``orders``) is whatever the session's ``search_path`` makes of it:
``sales.orders`` where ``search_path = sales, public`` and ``sales.orders`` exists. So the
server resolves the name (``to_regclass``, like any statement would) and the catalog says
the schema and the table as stored (folded, or truncated to 63 bytes, as PostgreSQL did).
A table that does not exist yet (created by the load) is named where ``CREATE TABLE``
puts it: its own schema, or the first schema of the ``search_path`` that exists.

No Airflow import: the asset URIs of the Airflow provider are built from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import psycopg

from airflow_copyman.load.catalog.tables import TableName

_LOCATE = """
SELECT current_database()::text, t.schema, t.name,
       quote_ident(t.schema) || '.' || quote_ident(t.name), t.oid
FROM (
    SELECT coalesce(n.nspname::text, %(schema)s::name::text, current_schema()::text) AS schema,
           -- A name CREATE TABLE would truncate to 63 bytes is known truncated already.
           coalesce(c.relname::text, %(name)s::name::text) AS name,
           c.oid::int8 AS oid
    FROM (SELECT to_regclass(%(regclass)s)::oid AS oid) r
    LEFT JOIN pg_class c ON c.oid = r.oid
    LEFT JOIN pg_namespace n ON n.oid = c.relnamespace
) t
"""


@dataclass(frozen=True)
class Relation:
    """A table as its server names it."""

    database: str
    schema: str
    name: str
    #: The table's one spelling (``quote_ident(schema).quote_ident(name)``), the key the
    #: ledger knows it by whichever way a destination spells it; None where not resolved.
    key: str | None = field(default=None, compare=False)
    #: Its OID (None: the table does not exist yet, create="if_missing" will make it).
    oid: int | None = field(default=None, compare=False)

    @property
    def parts(self) -> tuple[str, str, str]:
        return (self.database, self.schema, self.name)

    def __str__(self) -> str:
        return f"{self.database}.{self.schema}.{self.name}"


def locate(conn: psycopg.Connection[Any], table: TableName) -> Relation | None:
    """The relation ``table`` names at ``conn`` (in the connection's current transaction),
    or None where no schema can be had (an empty ``search_path`` and no such table)."""
    row = conn.execute(
        _LOCATE,  # type: ignore[arg-type]
        {"schema": table.schema, "name": table.name, "regclass": table.regclass_text},
    ).fetchone()
    if row is None or row[1] is None:
        return None
    database, schema, name, key, oid = row
    return Relation(database, schema, name, key, oid)
