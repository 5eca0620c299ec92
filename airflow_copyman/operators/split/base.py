"""What the group's tasks share: the source, the table, the destinations' waits and the
staging identity of a DAG run."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowFailException

from airflow_copyman import load, split
from airflow_copyman._destinations import CopyManConfigError, destinations_from

if TYPE_CHECKING:
    from airflow.sdk import Context


class SplitTask(BaseOperator):
    """What the group's tasks share: the source, the table and the destinations' waits."""

    template_fields: Sequence[str] = ("source_conn_id", "table")
    ui_color = "#d5e8f5"

    def __init__(
        self, *, source_conn_id: str, table: str, split_group: str,
        ledger_schema: str | None, lock_timeout: float, receiver_timeout: float,
        stage: bool = True, **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.stage = stage
        self.source_conn_id = source_conn_id
        self.table = table
        self.split_group = split_group
        self.ledger_schema = ledger_schema
        self.lock_timeout = lock_timeout
        self.receiver_timeout = receiver_timeout

    def identity(self, context: Context, lineage: str, spec: load.Destination) -> split.Identity:
        ti = context["ti"]
        return split.Identity(
            ti.dag_id, self.split_group, ti.run_id, lineage, spec.conn_id, spec.table
        )

    def specs(self, destinations: Any) -> list[load.Destination]:
        try:
            if isinstance(destinations, Mapping):
                destinations = [destinations]
            return destinations_from(destinations)
        except CopyManConfigError as exc:
            raise AirflowFailException(f"{self.task_id}: {exc}") from None

