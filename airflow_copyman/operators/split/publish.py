"""The ``publish`` task: every destination at once, each in one transaction; then the
leftovers of the group's failed runs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from airflow.sdk.exceptions import AirflowException, AirflowFailException

from airflow_copyman import _assets, load, split
from airflow_copyman._lineage import LineageFacets
from airflow_copyman.hooks.copyman import CopyManHook
from airflow_copyman.operators.split.base import SplitTask
from airflow_copyman.split import _adapters

if TYPE_CHECKING:
    from airflow.sdk import Context

class SplitPublish(LineageFacets, SplitTask):
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
