"""CopyManSplitGroup: one big table in key ranges, loaded by a mapped task, published at
once into every destination.

Tasks (inside the group): ``plan`` (the ranges, frozen for the DAG run in its
``task_state_store``), ``load`` (mapped: one instance a range, each into a staging table
per destination, exactly once through the ledger keyed by its map index) and ``publish``
(per destination, one transaction: check, apply the mode, ledger row, drop the staging
table; then drop the staging tables of this group's earlier failed runs). The work itself
is in :mod:`airflow_copyman.split` (no Airflow there).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

from airflow.sdk import BaseOperator, TaskGroup
from airflow.sdk.exceptions import AirflowException, AirflowFailException

from airflow_copyman import _assets, load, split
from airflow_copyman._destinations import CopyManConfigError, destinations_from
from airflow_copyman.hooks.copyman import PROGRESS_INTERVAL, CopyManHook
from airflow_copyman.split import _adapters

if TYPE_CHECKING:
    from airflow.sdk import Context

__all__ = ["PLAN_KEY", "CopyManSplitGroup"]

#: The plan's ``task_state_store`` key: the ranges, the lineage and the max_tries it saw.
PLAN_KEY = "copyman_split_plan"

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
        super().__init__(group_id=group_id, **group_kwargs)
        common: dict[str, Any] = {
            "source_conn_id": source_conn_id, "table": table, "ledger_schema": ledger_schema,
            "lock_timeout": lock_timeout, "receiver_timeout": receiver_timeout,
            "split_group": self.group_id, "stage": stage, **task_kwargs,
        }
        with self:
            plan = _SplitPlan(
                task_id="plan", split_by=split_by, parts=parts, resume_on_clear=resume_on_clear,
                **common,
            )
            loads = _SplitLoad.partial(
                task_id="load", destinations=destinations, where=where, format=format,
                verify=verify, progress_interval=progress_interval,
                max_bytes_per_second=max_bytes_per_second,
                max_active_tis_per_dagrun=max_active_parts,
                # The UI names each instance by its range ("100 <= id < 200").
                map_index_template="{{ task.range_label }}", **common,
            ).expand(part=plan.output)
            publish = _SplitPublish(
                task_id="publish", destinations=destinations, min_rows=min_rows,
                verify=verify, plan_task_id=plan.task_id,
                load_task_id=f"{self.group_id}.load", **common,
            )
            loads >> publish
        self.plan, self.load, self.publish = plan, loads, publish


class _SplitTask(BaseOperator):
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


class _SplitPlan(_SplitTask):
    """The ranges of the table, computed once per DAG run and kept in the task's
    ``task_state_store``: a retry or a clear returns the same ranges."""

    template_fields: Sequence[str] = ("source_conn_id", "table", "split_by")

    def __init__(
        self, *, split_by: str | None, parts: int, resume_on_clear: bool, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
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


class _SplitLoad(_SplitTask):
    """One range into every destination's staging table, once (the ledger, keyed by the
    map index and the plan's lineage)."""

    template_fields: Sequence[str] = (
        "source_conn_id", "table", "where", "destinations", "max_bytes_per_second",
    )

    def __init__(
        self, *, part: dict[str, Any], destinations: Any, where: str | None,
        format: str | None, verify: str, progress_interval: float,
        max_bytes_per_second: float | None, **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.part = part
        self.destinations = destinations
        self.where = where
        self.format = format
        self.verify = verify
        self.progress_interval = progress_interval
        self.max_bytes_per_second = max_bytes_per_second
        self.range_label = ""

    def execute(self, context: Context) -> dict[str, Any]:
        ti = context["ti"]
        rng = split.Range.from_dict(self.part)
        self.range_label = rng.describe()
        lineage = str(self.part["lineage"])
        specs = self.specs(self.destinations)
        staged = []
        for spec in specs:
            if not self.stage:  # append straight into the table, each range visible
                staged.append(spec)
                continue
            identity = self.identity(context, lineage, spec)
            with CopyManHook(spec.conn_id).get_conn() as conn:
                try:
                    target = split.prepare(
                        conn, spec, identity, self.lock_timeout, self._source_columns
                    )
                except split.StagingError as exc:
                    raise AirflowFailException(str(exc)) from None
            staged.append(load.Destination(
                # The ranges of one run land side by side: the staging table is theirs.
                spec.conn_id, target.staging_text, columns=spec.columns, load_lock=False))
        hook = CopyManHook(self.source_conn_id)
        self._hook = hook
        with hook.get_conn() as conn:
            source = split.plan_source(conn, self.table)
        query = split.range_query(source.schema, source.name, rng, self.where)
        map_index = ti.map_index if ti.map_index is not None else -1
        key = load.TaskKey(ti.dag_id, ti.task_id, ti.run_id, map_index, lineage, ti.try_number)
        self.log.info("Range %d of %d: %s", rng.index + 1, self.part.get("parts"), rng.describe())
        report = hook.transfer(
            query, staged, format=self.format, ledger=load.Ledger(self.ledger_schema, key),
            progress_interval=self.progress_interval, receiver_timeout=self.receiver_timeout,
            lock_timeout=self.lock_timeout,
            application_name=load.application_name_for(ti.dag_id, ti.task_id, ti.run_id, map_index),
            max_bytes_per_second=self.max_bytes_per_second, verify=self.verify,
        )
        return report.as_dict()

    def _source_columns(self) -> list[load.Column]:
        """The source table's columns, with their exact types (a staging table for a table
        that ``create="if_missing"`` makes at publish)."""
        with CopyManHook(self.source_conn_id).get_conn() as conn:
            try:
                return load.Source.parse(self.table).describe(conn, None)
            finally:
                conn.rollback()

    def on_kill(self) -> None:
        """Cancel the range's COPY and statements in flight (as CopyManOperator does):
        nothing more commits, the ledger keeps the range unloaded."""
        hook = getattr(self, "_hook", None)
        if hook is not None:
            hook.cancel()


class _SplitPublish(_SplitTask):
    """Every destination at once, each in one transaction; then the leftovers of this
    group's failed runs are dropped."""

    template_fields: Sequence[str] = ("source_conn_id", "table", "destinations", "min_rows")

    def __init__(
        self, *, destinations: Any, min_rows: int, plan_task_id: str, load_task_id: str,
        verify: str = "count", **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.destinations = destinations
        self.min_rows = min_rows
        self.verify = verify
        self._render_settings: dict[str, str] | None = None
        self.plan_task_id = plan_task_id
        self.load_task_id = load_task_id
        self._report: load.TransferReport | None = None
        # Each destination table is an asset, its events come from here (README, Assets).
        _assets.declare(self)

    @property
    def sql(self) -> str:
        """The source as CopyManOperator's lineage reads it: the table."""
        return self.table

    def execute(self, context: Context) -> dict[str, Any]:
        ti = context["ti"]
        parts = ti.xcom_pull(task_ids=self.plan_task_id)
        if not parts:
            raise AirflowException(f"{self.task_id}: the plan task left no ranges")
        lineage = str(parts[0]["lineage"])
        columns = [str(c) for c in parts[0].get("columns") or []]
        ranges = split.RangeLedger(
            ti.dag_id, self.load_task_id, ti.run_id, lineage, len(parts), self.ledger_schema
        )
        key = load.TaskKey(ti.dag_id, ti.task_id, ti.run_id, -1, lineage, ti.try_number)
        ledger = load.Ledger(self.ledger_schema, key)
        results: list[load.DestinationResult] = []
        targets: list[tuple[load.Destination, split.Target]] = []
        specs = self.specs(self.destinations)
        if self.verify == "checksum" and self.stage:
            # A text or CSV read-back of the staging tables renders as the ranges' source did.
            with CopyManHook(self.source_conn_id).get_conn() as conn:
                self._render_settings = load.render_settings(conn)
        for spec in specs:
            results.append(
                self._publish_one(context, spec, lineage, ranges, ledger, columns, targets)
            )
        rows = max((r.rows or 0 for r in results if r.status != "failed"), default=0)
        report = load.TransferReport(
            rows, max((r.bytes or 0 for r in results), default=0), None, 0.0, results,
            self._locations(specs),
        )
        self._report = report
        if report.failed:
            permanent = all(r.permanent for r in report.failed)
            message = f"{self.task_id}: " + "; ".join(
                f"{r.label}: {r.error}" for r in report.failed
            )
            raise (AirflowFailException if permanent else AirflowException)(message)
        if self.stage:
            self._drop_leftovers(context, lineage, targets)
        _assets.emit(context, self, specs, report, ti.try_number)
        ti.xcom_push(key="rows", value=report.rows)
        ti.xcom_push(key="bytes", value=report.bytes)
        return report.as_dict()

    def _locations(self, specs: list[load.Destination]) -> dict[str, tuple[str, str]]:
        """conn_id -> (``postgres://host:port``, database) of the source and every
        destination, for lineage (best effort: a connection that cannot be named has none)."""
        found: dict[str, tuple[str, str]] = {}
        for conn_id in {self.source_conn_id, *(s.conn_id for s in specs)}:
            try:
                location = CopyManHook(conn_id).endpoint().location
            except Exception:
                location = None
            if location is not None:
                found[conn_id] = location
        return found

    # OpenLineage (where apache-airflow-providers-openlineage is installed): the source
    # table in, each destination out with the rows published, as CopyManOperator's.

    def get_openlineage_facets_on_start(self) -> Any:
        return self._lineage(None)

    def get_openlineage_facets_on_complete(self, task_instance: Any) -> Any:
        return self._lineage(self._report)

    def get_openlineage_facets_on_failure(self, task_instance: Any) -> Any:
        return self._lineage(self._report)

    def _lineage(self, report: load.TransferReport | None) -> Any:
        from airflow_copyman._lineage import operator_lineage

        return operator_lineage(cast(Any, self), report)

    def _publish_one(
        self, context: Context, spec: load.Destination, lineage: str, ranges: split.RangeLedger,
        ledger: load.Ledger, columns: list[str],
        targets: list[tuple[load.Destination, split.Target]],
    ) -> load.DestinationResult:
        hook = CopyManHook(spec.conn_id)
        try:
            with hook.get_conn() as conn:
                target = split.target(conn, spec.table, self.identity(context, lineage, spec),
                                      create=spec.create == "if_missing")
                targets.append((spec, target))
                if not self.stage:
                    done = split.landed(conn, spec, target, ranges)
                else:
                    if self.min_rows:
                        self._check_min_rows(conn, spec, target, ranges)
                    done = split.publish(
                        conn, spec, target, ledger, ranges, source_columns=columns,
                        lock_timeout=self.lock_timeout, verify=self.verify,
                        render_settings=self._render_settings, timeout=self.receiver_timeout,
                    )
        except Exception as exc:
            error = _adapters.describe_error(exc, tuple(hook.secrets))
            self.log.error("%s: not published (unchanged): %s", spec.label, error)
            return load.DestinationResult(
                spec.conn_id, spec.table, status="failed", mode=spec.mode, error=error,
                permanent=_adapters.is_permanent(exc),
            )
        status: load.Status = "already_loaded" if done.already else "loaded"
        self.log.info("%s: %s %d rows", spec.label,
                      "already published" if done.already else "published", done.rows)
        return load.DestinationResult(
            spec.conn_id, spec.table, status=status, rows=done.rows, bytes=done.bytes,
            mode=spec.mode, inserted=done.inserted, updated=done.updated,
            try_number=done.try_number or context["ti"].try_number,
            relation=_adapters.relation(
                target.database, target.schema, target.name, target.key, done.oid or target.oid
            ),
        )

    def _check_min_rows(self, conn: Any, spec: load.Destination, target: split.Target,
                        ranges: split.RangeLedger) -> None:
        staged = split.staged_rows(conn, target, ranges, spec.conn_id)
        if staged < int(self.min_rows):
            raise load.TooFewRowsError(
                f"{spec.label}: the ranges staged {staged} rows, fewer than min_rows="
                f"{self.min_rows}: nothing published"
            )

    def _drop_leftovers(
        self, context: Context, lineage: str,
        targets: list[tuple[load.Destination, split.Target]],
    ) -> None:
        ti = context["ti"]

        def still_running(run_id: str) -> bool:
            try:
                state = ti.get_dagrun_state(ti.dag_id, run_id)
            except Exception:
                return False  # the run is gone
            return str(state) in ("running", "queued", "DagRunState.RUNNING", "DagRunState.QUEUED")

        for spec, target in targets:
            try:
                with CopyManHook(spec.conn_id).get_conn() as conn:
                    dropped = split.drop_leftovers(
                        conn, target.schema, self.identity(context, lineage, spec),
                        still_running, self.lock_timeout,
                    )
            except Exception as exc:  # best effort: the next successful run tries again
                self.log.warning("%s: leftover staging tables not dropped: %s", spec.label, exc)
                continue
            if dropped:
                self.log.info("%s: dropped the staging tables of earlier runs: %s",
                              spec.label, ", ".join(dropped))
