"""OpenLineage facets for CopyManOperator: the source as input, each destination as output.

Used only where ``apache-airflow-providers-openlineage`` is installed (its listener calls the
operator's ``get_openlineage_facets_on_*``); without it every function returns None. A
failure to build lineage must never fail the task, and building it must never delay the
task: it looks no connection up (see :func:`operator_lineage`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, cast

from airflow_copyman import load

if TYPE_CHECKING:
    from airflow_copyman._destinations import TransferReport
    from airflow_copyman.operators.copyman import CopyManOperator

log = logging.getLogger(__name__)


def _dataset_name(database: str, table: load.TableName) -> str:
    return f"{database}.{table.schema or 'public'}.{table.name}"


def _query_inputs(query: str, namespace: str, database: str) -> list[Any]:
    """Tables a query reads, as far as OpenLineage's SQL parser can tell."""
    from airflow.providers.common.compat.openlineage.facet import InputDataset

    try:
        from airflow.providers.openlineage.sqlparser import SQLParser

        meta = SQLParser(dialect="postgres", default_schema="public").parse(query)
    except Exception:
        return []
    inputs = []
    for table in getattr(meta, "in_tables", None) or []:
        name = ".".join(
            p for p in (getattr(table, "database", None) or database, table.schema or "public",
                        table.name) if p
        )
        inputs.append(InputDataset(namespace=namespace, name=name))
    return inputs


def operator_lineage(operator: CopyManOperator, report: TransferReport | None) -> Any:
    """The operator's lineage. Built from what the task resolved itself (the report's
    endpoints): never a connection look-up, which the OpenLineage listener's forked process
    cannot always make (it blocks there until the listener's timeout). So the START event
    (no report yet) carries the SQL only, and the datasets come with COMPLETE/FAIL."""
    try:
        from airflow.providers.common.compat.openlineage.facet import (
            InputDataset,
            OutputDataset,
            OutputStatisticsOutputDatasetFacet,
            SQLJobFacet,
        )
        from airflow.providers.openlineage.extractors import OperatorLineage
    except ImportError:
        return None
    try:
        inputs: list[Any] = []
        job_facets: dict[str, Any] = {}
        endpoints = report.endpoints if report is not None else {}
        parsed = load.Source.parse(operator.sql) if isinstance(operator.sql, str) else None
        if parsed is not None and parsed.query is not None:
            job_facets["sql"] = SQLJobFacet(query=parsed.query)
        source = endpoints.get(operator.source_conn_id)
        if source is not None and parsed is not None:
            namespace, database = source
            if parsed.table is not None:
                inputs.append(
                    InputDataset(namespace=namespace, name=_dataset_name(database, parsed.table))
                )
            elif parsed.query is not None:
                inputs.extend(_query_inputs(parsed.query, namespace, database))
        outputs = []
        for result in report.destinations if report is not None else []:
            table = load.TableName.parse(result.table)
            where = endpoints.get(result.conn_id)
            if table is None or where is None:
                continue
            facets: dict[str, Any] = {}
            if result.status in ("loaded", "already_loaded"):
                facets["outputStatistics"] = OutputStatisticsOutputDatasetFacet(
                    rowCount=result.rows, size=result.bytes
                )
            outputs.append(
                OutputDataset(
                    namespace=where[0],
                    name=_dataset_name(where[1], table),
                    outputFacets=facets,
                )
            )
        return OperatorLineage(inputs=inputs, outputs=outputs, job_facets=job_facets)
    except Exception:
        log.debug("CopyMan: could not build OpenLineage facets", exc_info=True)
        return None


class LineageFacets:
    """The OpenLineage hooks of a task that loads destinations (``CopyManOperator``, a split
    group's ``publish``): the source in, each destination out with the rows of the task's
    last report (``_report``, None before it has one)."""

    _report: TransferReport | None

    def get_openlineage_facets_on_start(self) -> Any:
        return operator_lineage(cast(Any, self), None)

    def get_openlineage_facets_on_complete(self, task_instance: Any) -> Any:
        return operator_lineage(cast(Any, self), self._report)

    def get_openlineage_facets_on_failure(self, task_instance: Any) -> Any:
        return operator_lineage(cast(Any, self), self._report)
