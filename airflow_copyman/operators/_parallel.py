"""``CopyManOperator(..., parallel=N)``: N ranges of the table inside the task, all in one
exported snapshot, through the split load's staging and publish (:func:`split.run_parallel`)."""

from __future__ import annotations

from typing import Any

from airflow_copyman import load, split
from airflow_copyman._destinations import CopyManConfigError
from airflow_copyman.hooks.copyman import CopyManHook


def checked(task_id: str, parallel: Any, sql: Any, ledger: Any) -> int:
    """``parallel`` as given, or :class:`ValueError` naming it: an int 1..MAX_PARTS; above 1,
    ``sql`` names a table (ranges are of a table) and the ledger is on (ranges and the
    publish record themselves there)."""
    if isinstance(parallel, bool) or not isinstance(parallel, int):
        raise ValueError(f"{task_id}: parallel must be an int, got {type(parallel).__name__}")
    if not 1 <= parallel <= split.MAX_PARTS:
        raise ValueError(f"{task_id}: parallel must be 1..{split.MAX_PARTS}, got {parallel}")
    if parallel > 1:
        if isinstance(sql, str) and not load.is_deferred(sql) and not split.is_table_name(sql):
            raise ValueError(
                f"{task_id}: parallel={parallel} splits a table into ranges: sql must name a "
                "table, not a query"
            )
        if ledger is not True:
            raise ValueError(f"{task_id}: parallel={parallel} needs ledger=True (each range "
                             "and the publish record themselves in it)")
    return parallel


def load_parallel(
    operator: Any, ti: Any, pending: list[load.Destination], options: load.LoadOptions,
    lineage: str, transfers: split.RangeTransfers,
) -> load.TransferReport:
    """Run the operator's load as ``operator.parallel`` ranges in one snapshot; the running
    ranges are kept in ``transfers`` (the operator's ``on_kill`` cancels them)."""
    conn_ids = {s.conn_id for s in pending}
    endpoints = {c: CopyManHook(c).endpoint() for c in conn_ids}
    task = split.TaskRun(
        ti.dag_id, ti.task_id, ti.run_id, ti.map_index if ti.map_index is not None else -1,
        lineage, ti.try_number,
    )
    try:
        return split.run_parallel(
            CopyManHook(operator.source_conn_id).endpoint(), operator.sql, pending,
            endpoints=endpoints, parallel=operator.parallel, task=task,
            ledger_schema=operator.ledger_schema, options=options, log=operator.log,
            transfers=transfers,
        )
    except load.ConfigError as exc:  # bad input, found before any range loaded: no retry
        raise CopyManConfigError(str(exc)) from None
