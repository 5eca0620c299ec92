"""OpenLineage facets for CopyManOperator: the source as input, each destination as output.

Used only where ``apache-airflow-providers-openlineage`` is installed (its listener calls the
operator's ``get_openlineage_facets_on_*``); without it every function returns None. A
failure to build lineage must never fail the task, so everything here is defensive.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from airflow_copyman import _plan

if TYPE_CHECKING:
    from airflow_copyman._destinations import TransferReport
    from airflow_copyman.operators.copyman import CopyManOperator

log = logging.getLogger(__name__)


def _namespace_and_database(conn_id: str) -> tuple[str, str] | None:
    from airflow_copyman.hooks.copyman import CopyManHook

    try:
        conn = CopyManHook(conn_id).check_connection()
    except Exception:
        return None
    return f"postgres://{conn.host}:{conn.port or 5432}", conn.schema or "postgres"


def _dataset_name(database: str, table: _plan.TableName) -> str:
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
        source = _namespace_and_database(operator.source_conn_id)
        if source is not None and isinstance(operator.sql, str):
            namespace, database = source
            parsed = _plan.Source.parse(operator.sql)
            if parsed.table is not None:
                inputs.append(
                    InputDataset(namespace=namespace, name=_dataset_name(database, parsed.table))
                )
            elif parsed.query is not None:
                inputs.extend(_query_inputs(parsed.query, namespace, database))
                job_facets["sql"] = SQLJobFacet(query=parsed.query)
        results = {r.label: r for r in report.destinations} if report else {}
        outputs = []
        for value in operator.destinations if isinstance(operator.destinations, list) else []:
            conn_id, table_text = value.get("conn_id"), value.get("table")
            if not isinstance(conn_id, str) or not isinstance(table_text, str):
                continue
            table = _plan.TableName.parse(table_text)
            where = _namespace_and_database(conn_id)
            if table is None or where is None:
                continue
            result = results.get(f"{conn_id}:{table_text.strip()}")
            facets: dict[str, Any] = {}
            if result is not None and result.status in ("loaded", "already_loaded"):
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
