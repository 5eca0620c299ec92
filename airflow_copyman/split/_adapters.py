"""What the split load takes from the load layer beyond running loads: names, error
classification and the ledger's rows, all through :mod:`airflow_copyman.load`'s public
names (an import-linter contract keeps every shell to them). Imports no Airflow module.
"""

from __future__ import annotations

from airflow_copyman.load import Relation, TableName, describe_error, is_permanent, ledger_rows

__all__ = [
    "describe_error", "is_permanent", "is_table_name", "range_ledger_rows", "relation",
]


def relation(database: str, schema: str, name: str, key: str, oid: int | None) -> Relation:
    """A destination table as the load layer names it (for its result: asset URIs)."""
    return Relation(database, schema, name, key=key, oid=oid)


def is_table_name(text: str) -> bool:
    """Whether ``text`` names a table (``t``, ``s.t``, ``"S"."T"``) rather than a query."""
    return TableName.parse(text.strip()) is not None


#: The rows of the mapped load task's ranges in a ledger (the ledger's own layout).
range_ledger_rows = ledger_rows
