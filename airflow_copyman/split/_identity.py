"""Which tables a split load writes, by what their servers say: two destinations that are one
table (``events`` and ``public.events``, or one database behind two connection ids) would
each get every row once more at publish, and a destination that is the source table (or a
partition of it) would have its rows written back into it. The ranges cannot see this: each
loads into a staging table of its own. Checked by ``plan``, before any range loads, with the
load layer's table identities. Imports no Airflow module.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg

from airflow_copyman import load
from airflow_copyman.split._catalog import SourceTable


def conflicts(
    source: psycopg.Connection[Any], table: SourceTable,
    destinations: Sequence[tuple[load.Destination, psycopg.Connection[Any]]],
) -> list[str]:
    """Each destination that is the source table (or under it) or another destination,
    said in one line naming both; [] when every table is written once. Ends the
    transactions it opens."""
    source_text = load.TableName(table.schema, table.name).regclass_text
    try:
        found = load.table_identity(source, source_text, f"the source table {table}")
    finally:
        source.rollback()
    identities = []
    for spec, conn in destinations:
        name = load.TableName.parse(spec.table)
        if name is None:
            continue  # not a table name: the range says so
        new = (name.schema, name.name) if spec.create == "if_missing" else None
        try:
            identity = load.table_identity(conn, name.regclass_text, f"destination {spec.label}",
                                           new)
        finally:
            conn.rollback()
        if identity is not None:  # a missing table: the range names it
            identities.append(identity)
    return load.identity_conflicts(found, identities)
