"""The ``plan`` task: the table's ranges, computed once per DAG run and frozen."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from airflow.sdk.exceptions import AirflowFailException

from airflow_copyman import split
from airflow_copyman.hooks.copyman import CopyManHook
from airflow_copyman.operators.split.base import SplitTask

if TYPE_CHECKING:
    from airflow.sdk import Context

#: The plan's ``task_state_store`` key: the ranges, the lineage and the max_tries it saw.
PLAN_KEY = "copyman_split_plan"


class SplitPlan(SplitTask):
    """The ranges of the table, computed once per DAG run and kept in the task's
    ``task_state_store``: a retry or a clear returns the same ranges."""

    template_fields: Sequence[str] = ("source_conn_id", "table", "split_by", "destinations")

    def __init__(
        self, *, split_by: str | None, parts: int, resume_on_clear: bool, destinations: Any,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.destinations = destinations
        self.split_by = split_by
        self.parts = parts
        self.resume_on_clear = resume_on_clear

    def execute(self, context: Context) -> list[dict[str, Any]]:
        ti = context["ti"]
        store = context.get("task_state_store")
        saved: Any = store.get(PLAN_KEY) if store is not None else None
        ranges: list[dict[str, Any]]
        if isinstance(saved, dict) and isinstance(saved.get("ranges"), list):
            ranges = [dict(r) for r in saved["ranges"] if isinstance(r, dict)]
            columns = [str(c) for c in saved.get("columns") or []]
            lineage = str(saved["lineage"])
            if saved.get("max_tries") != ti.max_tries and not self.resume_on_clear:
                # Cleared: the same ranges, a new lineage (every range loads again, into a
                # new staging table), as a re-run of CopyManOperator loads again.
                lineage = uuid.uuid4().hex
            self.log.info("The plan of this DAG run is frozen: %d range(s), lineage %s",
                          len(ranges), lineage)
        else:
            with CopyManHook(self.source_conn_id).get_conn() as conn:
                try:
                    source, planned = split.plan(conn, self.table, self.split_by, self.parts)
                except split.SplitPlanError as exc:
                    raise AirflowFailException(f"{self.task_id}: {exc}") from None
                columns = split.column_names(conn, source)
                self._check_tables(conn, source)
            ranges = [r.as_dict() for r in planned]
            lineage = uuid.uuid4().hex
            self.log.info("%s splits into %d range(s): %s", source, len(ranges),
                          "; ".join(r.describe() for r in planned))
        if store is not None:
            record: Any = {
                "ranges": ranges, "columns": columns, "lineage": lineage,
                "max_tries": ti.max_tries,
            }
            store.set(PLAN_KEY, record)
        # Each part says what the loads and the publish need beyond its bounds.
        return [{**r, "lineage": lineage, "parts": len(ranges), "columns": columns}
                for r in ranges]


    def _check_tables(self, conn: Any, source: split.SourceTable) -> None:
        """Every table written once: no two destinations one table, none the source's
        (the ranges, each into a staging table of its own, cannot see it)."""
        specs = self.specs(self.destinations)
        with contextlib.ExitStack() as stack:
            opened = [(spec, stack.enter_context(CopyManHook(spec.conn_id).get_conn()))
                      for spec in specs]
            problems = split.table_conflicts(conn, source, opened)
        if problems:
            raise AirflowFailException(
                f"{self.task_id}: " + "; ".join(problems) + ": nothing was loaded"
            )
