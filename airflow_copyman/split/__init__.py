"""Split loads: one table in key ranges, each range loaded on its own (by a mapped Airflow
task, say), staged per destination, then published into every destination at once.

No Airflow here (an import-linter contract checks it): range planning
(:func:`plan`, pure functions in :mod:`._ranges`), the query of one range
(:func:`range_query`), staging tables (:mod:`._staging`) and publishing (:func:`publish`).
:class:`airflow_copyman.operators.split.CopyManSplitGroup` puts them in Airflow tasks.
Private needs of the load layer are in :mod:`._adapters`, one place to re-point.
"""

from __future__ import annotations

from psycopg import sql

from airflow_copyman.split._adapters import is_table_name
from airflow_copyman.split._catalog import (
    SourceTable,
    SplitPlanError,
    column_names,
    describe_columns,
    plan,
)
from airflow_copyman.split._catalog import source_table as plan_source
from airflow_copyman.split._identity import conflicts as table_conflicts
from airflow_copyman.split._parallel import RangeTransfers, TaskRun, run_parallel
from airflow_copyman.split._publish import (
    Published,
    PublishError,
    RangeLedger,
    landed,
    publish,
    staged_rows,
)
from airflow_copyman.split._ranges import MAX_PARTS, SPLITTABLE_TYPES, Range
from airflow_copyman.split._staging import (
    Identity,
    StagingError,
    Target,
    drop_leftovers,
    ensure_staging,
    leftovers,
    prepare,
    staging_name,
    target,
)

__all__ = [
    "MAX_PARTS",
    "SPLITTABLE_TYPES",
    "Identity",
    "PublishError",
    "Published",
    "Range",
    "RangeLedger",
    "RangeTransfers",
    "SourceTable",
    "SplitPlanError",
    "StagingError",
    "Target",
    "TaskRun",
    "column_names",
    "describe_columns",
    "drop_leftovers",
    "ensure_staging",
    "is_table_name",
    "landed",
    "leftovers",
    "plan",
    "plan_source",
    "prepare",
    "publish",
    "range_query",
    "run_parallel",
    "staged_rows",
    "staging_name",
    "table_conflicts",
    "target",
]


def range_query(schema: str, table: str, rng: Range, where: str | None) -> str:
    """``SELECT * FROM schema.table WHERE <range> [AND (<where>)]`` as text (bounds as
    literals: the load layer takes a query without parameters, and ``where`` may hold
    ``%``)."""
    condition = rng.predicate()
    if where and where.strip():
        condition = sql.SQL("({}) AND ({})").format(condition, sql.SQL(where))  # type: ignore[arg-type]
    return sql.SQL("SELECT * FROM {} WHERE {}").format(
        sql.Identifier(schema, table), condition
    ).as_string(None)
