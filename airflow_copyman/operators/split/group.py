"""The group a DAG author writes: its arguments, checked when the DAG is parsed, and the
three tasks it holds (``plan``, the mapped ``load``, ``publish``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from airflow.sdk import TaskGroup

from airflow_copyman import load, split
from airflow_copyman._destinations import CopyManConfigError, destinations_from
from airflow_copyman.hooks.copyman import PROGRESS_INTERVAL
from airflow_copyman.operators.split.plan import PLAN_KEY, SplitPlan
from airflow_copyman.operators.split.publish import SplitPublish
from airflow_copyman.operators.split.range_load import SplitLoad
from airflow_copyman.split import _adapters

__all__ = ["PLAN_KEY", "CopyManSplitGroup", "check_arguments"]

#: Keyword arguments that configure the TaskGroup itself; every other goes to its tasks.
_GROUP_KEYS = frozenset({
    "prefix_group_id", "parent_group", "dag", "default_args", "tooltip", "ui_color",
    "ui_fgcolor", "add_suffix_on_collision",
})


def check_arguments(
    group_id: str, *, table: Any, split_by: Any, parts: Any, where: Any,
    destinations: Any, max_active_parts: Any, stage: Any = True,
) -> None:
    """What can be checked when the DAG is parsed; ValueError names the argument."""
    def fail(message: str) -> None:
        raise ValueError(f"{group_id}: {message}")

    if not isinstance(parts, int) or isinstance(parts, bool) or not 1 <= parts <= split.MAX_PARTS:
        fail(f"parts must be a whole number from 1 to {split.MAX_PARTS} (Airflow's "
             f"max_map_length), got {parts!r}")
    if not isinstance(table, str) or not table.strip():
        fail("table must be a table name (schema.table)")
    if "{{" not in table and not _adapters.is_table_name(table):
        fail(f"table must be a table name (schema.table), not a query: got {table[:60]!r}")
    if split_by is not None and (
        not isinstance(split_by, str) or not split_by or split_by.lower() == "ctid"
    ):
        fail("split_by must be the name of an integer, numeric, date or timestamp column "
             f"(None: the table's integer primary key, else ctid block ranges); got {split_by!r}")
    if where is not None and not isinstance(where, str):
        fail(f"where must be SQL text (a condition), got {type(where).__name__}")
    if max_active_parts is not None and (
        not isinstance(max_active_parts, int) or isinstance(max_active_parts, bool)
        or max_active_parts < 1
    ):
        fail(f"max_active_parts must be a whole number of at least 1, got {max_active_parts!r}")
    if not isinstance(stage, bool):
        fail(f"stage must be true or false, got {type(stage).__name__}")
    if isinstance(destinations, list | tuple):
        if not destinations:
            fail("destinations is empty: give at least one")
        try:
            specs = destinations_from(destinations, rendered=False)
        except CopyManConfigError as exc:
            raise ValueError(f"{group_id}: {exc}") from None
        for spec in specs:
            if not stage and (spec.mode != "append" or spec.statements
                              or spec.post_statements or spec.create == "if_missing"):
                fail(f"stage: {spec.label}: stage=False loads each range straight into the "
                     "table: only for mode='append' into a table that exists, without "
                     "preoperator or postoperator")


class CopyManSplitGroup(TaskGroup):
    """A table split into key ranges, loaded by one mapped task, published at once.

    :param source_conn_id: the source's ``postgres`` connection. (templated)
    :param table: the source table (``schema.table``), not a query; partitioned and
        inherited tables too. (templated)
    :param where: a condition every range also applies. (templated)
    :param split_by: the column to split by (integer, numeric, date, timestamp); default:
        the table's single-column integer primary key, else ``ctid`` block ranges.
    :param parts: how many key ranges (1..1024); rows with a NULL key are one more range.
    :param destinations: as ``CopyManOperator``'s; ``create="if_missing"`` stages with the
        source's columns and creates the table when it publishes. (templated)
    :param max_active_parts: at most this many ranges load at once in one DAG run.
    :param resume_on_clear: a cleared DAG run keeps what its ranges staged (default: a
        cleared run loads every range again, into a new staging table).
    :param stage: False (append only): each range loads straight into the table and is
        visible as it lands (faster: the rows are written once); ``publish`` then checks
        that every range landed and reports.
    Every other ``CopyManOperator`` option (``format``, ``verify``, ``receiver_timeout``,
    ``lock_timeout``, ``max_bytes_per_second`` per range, ``min_rows`` for the whole
    table, ``ledger_schema``) and ``BaseOperator`` argument (``retries``, ``pool``...)
    applies to the group's tasks.
    """

    def __init__(
        self,
        group_id: str,
        *,
        source_conn_id: str,
        table: str,
        destinations: Sequence[Mapping[str, Any]] | Any,
        where: str | None = None,
        split_by: str | None = None,
        parts: int = 8,
        max_active_parts: int | None = None,
        resume_on_clear: bool = False,
        format: str | None = None,
        verify: str = "count",
        ledger_schema: str | None = None,
        progress_interval: float = PROGRESS_INTERVAL,
        receiver_timeout: float = 300.0,
        lock_timeout: float = load.LOCK_TIMEOUT,
        min_rows: int = 0,
        max_bytes_per_second: float | None = None,
        stage: bool = True,
        **kwargs: Any,
    ) -> None:
        check_arguments(
            group_id, table=table, split_by=split_by, parts=parts, where=where,
            destinations=destinations, max_active_parts=max_active_parts, stage=stage,
        )
        group_kwargs = {k: v for k, v in kwargs.items() if k in _GROUP_KEYS}
        task_kwargs = {k: v for k, v in kwargs.items() if k not in _GROUP_KEYS}
        # The destination tables change when publish commits: only publish announces them
        # (a static Asset among them gets its event from publish alone, not from every range).
        outlets = task_kwargs.pop("outlets", None)
        super().__init__(group_id=group_id, **group_kwargs)
        common: dict[str, Any] = {
            "source_conn_id": source_conn_id, "table": table, "ledger_schema": ledger_schema,
            "lock_timeout": lock_timeout, "receiver_timeout": receiver_timeout,
            "split_group": self.group_id, "stage": stage, **task_kwargs,
        }
        with self:
            plan = SplitPlan(
                task_id="plan", split_by=split_by, parts=parts, resume_on_clear=resume_on_clear,
                destinations=destinations,
                **common,
            )
            loads = SplitLoad.partial(
                task_id="load", destinations=destinations, where=where, format=format,
                verify=verify, progress_interval=progress_interval,
                max_bytes_per_second=max_bytes_per_second,
                max_active_tis_per_dagrun=max_active_parts,
                # The UI names each instance by its range ("100 <= id < 200").
                map_index_template="{{ task.range_label }}", **common,
            ).expand(part=plan.output)
            publish = SplitPublish(
                task_id="publish", destinations=destinations, min_rows=min_rows,
                verify=verify, plan_task_id=plan.task_id,
                load_task_id=f"{self.group_id}.load", outlets=outlets, **common,
            )
            loads >> publish
        self.plan, self.load, self.publish = plan, loads, publish

