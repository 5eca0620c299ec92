"""The mapped ``load`` task: one range into every destination's staging table, once."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from airflow.sdk.exceptions import AirflowFailException

from airflow_copyman import load, split
from airflow_copyman.hooks.copyman import CopyManHook
from airflow_copyman.operators.split.base import SplitTask

if TYPE_CHECKING:
    from airflow.sdk import Context

class SplitLoad(SplitTask):
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
            query, staged, ledger=load.Ledger(self.ledger_schema, key),
            application_name=load.application_name_for(ti.dag_id, ti.task_id, ti.run_id, map_index),
            options=self._options(),
        )
        return report.as_dict()

    def _options(self) -> load.LoadOptions:
        """The range's options, rendered now (``max_bytes_per_second`` is templated: Jinja
        renders ``"{{ params.rate }}"`` as text): checked as ``CopyManOperator``'s."""
        try:
            return load.LoadOptions.from_rendered(
                format=self.format, verify=self.verify, receiver_timeout=self.receiver_timeout,
                lock_timeout=self.lock_timeout, progress_interval=self.progress_interval,
                max_bytes_per_second=self.max_bytes_per_second,
            )
        except load.ArgumentError as exc:
            raise AirflowFailException(f"{self.task_id}: {exc}") from None

    def _source_columns(self) -> list[load.Column]:
        """The source table's columns, with their exact types (a staging table for a table
        that ``create="if_missing"`` makes at publish)."""
        with CopyManHook(self.source_conn_id).get_conn() as conn:
            return split.describe_columns(conn, self.table)

    def on_kill(self) -> None:
        """Cancel the range's COPY and statements in flight (as CopyManOperator does):
        nothing more commits, the ledger keeps the range unloaded."""
        hook = getattr(self, "_hook", None)
        if hook is not None:
            hook.cancel()

