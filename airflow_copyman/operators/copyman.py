"""CopyManOperator: one pass over a PostgreSQL source, loaded into many destinations.

Retries load only what failed. Each destination loads in its own transaction, and a small
ledger table in the destination database (:class:`airflow_copyman.load.Ledger`) records the
load in that same transaction: the data and the record of having loaded it commit together.
The next try of the task skips every destination the ledger lists for this lineage of
tries, so no destination is ever loaded twice by retries, not even when a try dies right
after a commit. Airflow 3.3's ``task_state_store`` holds the lineage (which tries belong
together) and mirrors the ledger, for the Airflow UI and REST API.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowException

from airflow_copyman import _assets, copyman, load, split
from airflow_copyman._destinations import (
    CopyManConfigError,
    Destination,
    TransferReport,
    destinations_from,
)
from airflow_copyman._lineage import LineageFacets
from airflow_copyman._outcome import (
    CopyManDestinationsFailed,
    CopyManPermanentFailure,
    failure_of,
)
from airflow_copyman._task_state import STATE_KEY, TaskStateLedger
from airflow_copyman.hooks.copyman import PROGRESS_INTERVAL, CopyManHook
from airflow_copyman.load import Ledger, TaskKey
from airflow_copyman.operators import _parallel

if TYPE_CHECKING:
    from airflow.sdk import Context

__all__ = [
    "LEDGER_SCHEMA",
    "STATE_KEY",
    "CopyManDestinationsFailed",
    "CopyManOperator",
    "CopyManPermanentFailure",
]

#: Default schema of the ledger table: None, the destination table's own schema (a role
#: that may create tables only there, as PostgreSQL 15+ gives no CREATE on ``public``).
LEDGER_SCHEMA = None


class CopyManOperator(LineageFacets, BaseOperator):
    """Copy the rows of a query (or table) from a PostgreSQL source into many PostgreSQL
    destinations in one pass, with COPY streams and bounded memory.

    Each destination loads in its own transaction and commits only once it received
    every row, so none is ever left with part of the data. When destinations fail, the
    others still commit; the task then fails naming the failed ones, and its next try
    loads only those. Failures that no retry can fix (an undefined table or column, a
    type mismatch, bad data, a permission denied, bad SQL) fail the task without retrying.

    :param source_conn_id: the source's ``postgres`` connection id. (templated)
    :param sql: a query that only reads, a table name (``schema.table``: every row
        ``SELECT * FROM`` it returns, children and partitions included), or a ``.sql`` file
        holding either; not a COPY statement: the operator builds the COPY itself. A query
        that modifies data or locks rows is refused. (templated)
    :param destinations: a list of mappings, one per destination: ``conn_id``, ``table``
        (SQL: ``schema.table``, quoted where needed) and optionally ``columns`` (the
        table's columns to fill, in the source's column order: plain names, exactly as the
        table spells them), ``mode`` (``append``, ``replace`` with ``replace_with``
        ``truncate``/``delete`` and ``cascade``, ``merge`` with ``key`` and ``key_nulls``),
        ``create`` (``if_missing``), ``truncate`` (shorthand for ``mode="replace"``),
        ``preoperator`` and ``postoperator`` (SQL, or a list of SQL, run before / after the
        COPY): all in the load's one transaction, with its ledger row (see
        :class:`airflow_copyman.load.Destination`). (templated)
    :param format: ``binary``, ``text`` or ``csv``; by default (None) binary when every
        destination's column types equal the source's, text otherwise. ``binary`` where
        they differ is refused before any data moves.
    :param parameters: query parameters for ``sql`` (``%s`` / ``%(name)s``). (templated)
    :param ledger_schema: the schema of the ``copyman_ledger`` table created in each
        destination database; None (the default): the destination table's own schema.
    :param ledger: keep the ledger (default); False relies on ``task_state_store`` only
        (then a try that dies between a commit and its bookkeeping may load that
        destination again on the next try).
    :param resume_on_clear: when the task is cleared and run again for the same DAG run,
        load only the destinations that were never loaded (default: load all again, as a
        re-run normally does).
    :param progress_interval: seconds between two progress lines in the log.
    :param receiver_timeout: seconds a source or destination may move nothing before it
        fails; every statement the task runs itself (ledger, planning, truncate,
        preoperators, commits) must answer within it too.
    :param lock_timeout: seconds any one lock wait in a destination may last (at most
        ``receiver_timeout``; default 60): the table's load lock (one load at a time per
        table), TRUNCATE, DELETE, CREATE, the merge's statements. A wait that times out
        fails that destination transient, naming the table, the lock and the sessions in
        the way; the destinations' sessions are named ``copyman <dag_id>.<task_id>
        <run_id>`` so that a waiting load names this one.
    :param min_rows: a source that yields fewer rows fails the task before any destination
        commits (a transient failure: late data may still arrive); default 0. (templated:
        the rendered text of a whole number is taken as that number)
    :param max_bytes_per_second: a bandwidth cap: the copy reads at most this many bytes
        from the source in any second (None, the default: no cap). Its waits count
        towards no time-out. (templated)
    :param verify: ``"count"`` (default: the COPYs' row counts) or ``"checksum"``: also
        compare an order-independent checksum of the rows the source sent with the rows
        each destination wrote (append: the rows this load inserted; replace: the table;
        merge: the staging table) before it commits; a mismatch fails that destination
        (permanently, rolled back), the others commit. XCom and asset events carry it.
    """

    template_fields: Sequence[str] = (
        "source_conn_id", "sql", "destinations", "parameters", "max_bytes_per_second",
        "min_rows",
    )
    template_ext: Sequence[str] = (".sql",)
    template_fields_renderers: ClassVar[dict[str, str]] = {
        "sql": "sql",
        "destinations": "json",
        "parameters": "json",
    }
    ui_color = "#d5e8f5"

    def __init__(
        self,
        *,
        source_conn_id: str,
        sql: str,
        destinations: Sequence[Mapping[str, Any] | Destination] | Any,
        format: str | None = None,
        parameters: Sequence[Any] | Mapping[str, Any] | None = None,
        ledger_schema: str | None = LEDGER_SCHEMA,
        ledger: bool = True,
        resume_on_clear: bool = False,
        progress_interval: float = PROGRESS_INTERVAL,
        receiver_timeout: float = 300.0,
        lock_timeout: float = load.LOCK_TIMEOUT,
        min_rows: int | str = 0,
        max_bytes_per_second: float | str | None = None,
        verify: str = "count",
        parallel: int = 1,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.source_conn_id = source_conn_id
        self.sql = sql
        self.destinations = destinations
        self.format = format
        self.parameters = parameters
        self.ledger_schema = ledger_schema
        self.ledger = ledger
        self.resume_on_clear = resume_on_clear
        self.progress_interval = progress_interval
        self.receiver_timeout = receiver_timeout
        self.lock_timeout = lock_timeout
        self.min_rows = min_rows
        self.max_bytes_per_second = max_bytes_per_second
        self.verify = verify
        self.parallel = _parallel.checked(self.task_id, parallel, sql, ledger)
        self._hook: CopyManHook | None = None
        #: parallel > 1: the ranges running now (on_kill cancels them).
        self._ranges: split.RangeTransfers | None = None
        self._killed = False
        self._report: TransferReport | None = None
        # Check what can be checked before templates are rendered: a DAG with bad
        # arguments fails when it is parsed, not when it runs. Templated values are
        # checked after rendering, before any connection is used.
        try:
            if not load.is_deferred(sql):
                load.check_sql(sql)
            load.LoadOptions.check_known(
                templated=self.template_fields,
                format=format, parameters=parameters, verify=verify,
                receiver_timeout=receiver_timeout, lock_timeout=lock_timeout,
                progress_interval=progress_interval, min_rows=min_rows,
                max_bytes_per_second=max_bytes_per_second,
            )
            load.check_ledger_schema(ledger_schema)
            if not isinstance(ledger, bool):
                raise load.ArgumentError(
                    f"ledger must be true or false, got {type(ledger).__name__}"
                )
        except load.ArgumentError as exc:
            raise ValueError(f"{self.task_id}: {exc}") from None
        if isinstance(sql, str) and copyman.is_copy_statement(sql):
            raise ValueError(
                f"{self.task_id}: sql must be a query or a table name, not a COPY "
                "statement: the operator builds the COPY itself"
            )
        if isinstance(destinations, list | tuple):
            if not destinations:
                raise ValueError(f"{self.task_id}: destinations is empty: give at least one")
            try:
                destinations_from(destinations, rendered=False)
            except CopyManConfigError as exc:
                raise ValueError(f"{self.task_id}: {exc}") from None
        # Each destination table is an asset: events go through this alias (README, Assets).
        _assets.declare(self)

    def render_template(
        self,
        content: Any,
        context: Any,
        jinja_env: Any = None,
        seen_oids: set[int] | None = None,
    ) -> Any:
        # Destination objects are templated like mappings; frozen, so rebuilt, not set.
        if isinstance(content, Destination):
            return content.rendered(
                lambda value: self.render_template(value, context, jinja_env, seen_oids)
            )
        return super().render_template(content, context, jinja_env, seen_oids)

    # Execution.

    def execute(self, context: Context) -> dict[str, Any]:
        ti = context["ti"]
        specs, options = self._checked_arguments()
        # Retries share one lineage (kept in the store); it keys the ledger's rows too.
        state = TaskStateLedger(
            context.get("task_state_store"), ti.max_tries,
            resume_on_clear=self.resume_on_clear, try_number=ti.try_number,
        )
        # The ledger table, or without one the state store: what decides "loaded already".
        ledger = self._table_ledger(ti, state.lineage) or state
        self.log.info(
            "Try %d, lineage %s: %d destination(s); the ledger %s says which are loaded",
            ti.try_number, state.lineage, len(specs), ledger.name,
        )
        report = self._load(ti, specs, options, ledger, state)
        self._report = report
        state.sync(report, ti.try_number)
        self._check_counts(report)
        if self._killed:
            raise AirflowException("the task was killed: nothing was committed after the kill")
        if report.failed:
            raise failure_of(report)
        ti.xcom_push(key="rows", value=report.rows)
        ti.xcom_push(key="bytes", value=report.bytes)
        _assets.emit(context, self, specs, report, ti.try_number)
        return report.as_dict()

    def _checked_arguments(self) -> tuple[list[Destination], load.LoadOptions]:
        """The destinations and the options, rendered now: checked like the others."""
        try:
            specs = self._destination_specs()
            options = load.LoadOptions.from_rendered(
                format=self.format, parameters=self.parameters, verify=self.verify,
                receiver_timeout=self.receiver_timeout, lock_timeout=self.lock_timeout,
                progress_interval=self.progress_interval, min_rows=self.min_rows,
                max_bytes_per_second=self.max_bytes_per_second,
            )
        except load.ArgumentError as exc:
            raise CopyManPermanentFailure(f"{self.task_id}: {exc}") from None
        except CopyManConfigError as exc:
            raise CopyManPermanentFailure(str(exc)) from None
        return specs, options

    def _table_ledger(self, ti: Any, lineage: str) -> Ledger | None:
        if not self.ledger:
            return None
        map_index = ti.map_index if ti.map_index is not None else -1
        key = TaskKey(ti.dag_id, ti.task_id, ti.run_id, map_index, lineage, ti.try_number)
        return Ledger(self.ledger_schema, key, resume_on_clear=self.resume_on_clear)

    def _load(
        self,
        ti: Any,
        specs: list[Destination],
        options: load.LoadOptions,
        ledger: load.LoadLedger,
        state: TaskStateLedger,
    ) -> TransferReport:
        """Load ``specs``: ``ledger`` decides which are loaded already."""
        hook = CopyManHook(self.source_conn_id)
        self._hook = hook
        # Before the check below: a kill after it finds the ranges to cancel.
        self._ranges = split.RangeTransfers()
        try:
            if self._killed:
                raise AirflowException("the task was killed before the copy started")
            if self.parallel > 1:
                # N ranges in one snapshot; publish's ledger rows say what is loaded already.
                return _parallel.load_parallel(self, ti, specs, options, state.lineage,
                                               self._ranges)
            return hook.transfer(
                self.sql,
                specs,
                options=options,
                ledger=ledger,
                # With a ledger table, the state store mirrors it (for the Airflow UI).
                on_commit=state.committed if ledger is not state else None,
                # A load waiting for a table this one holds names its DAG, task, run.
                application_name=load.application_name_for(
                    ti.dag_id, ti.task_id, ti.run_id,
                    ti.map_index if ti.map_index is not None else -1,
                ),
                raise_on_failure=False,
            )
        except CopyManConfigError as exc:
            raise CopyManPermanentFailure(str(exc)) from None
        finally:
            self._hook = None
            self._ranges = None

    def on_kill(self) -> None:
        """Cancel every COPY and statement in flight; nothing is committed after this.

        Called from the task's SIGTERM handler (the supervisor sends SIGKILL 5 s later),
        so it only cancels: ``execute`` then rolls everything back and fails.
        """
        self._killed = True
        hook, ranges = self._hook, self._ranges
        if hook is not None:
            hook.cancel()
        if ranges is not None:  # parallel > 1: every range's COPYs, on their servers
            ranges.cancel()

    def _destination_specs(self) -> list[Destination]:
        destinations = self.destinations
        if isinstance(destinations, Mapping):
            destinations = [destinations]
        if not isinstance(destinations, list | tuple):
            raise CopyManConfigError(
                f"destinations must be a list of mappings, got {type(destinations).__name__}"
            )
        if not destinations:
            raise CopyManConfigError("destinations is empty: give at least one")
        try:
            load.check_sql(self.sql)
        except load.ArgumentError as exc:
            raise CopyManConfigError(str(exc)) from None
        if copyman.is_copy_statement(self.sql):
            raise CopyManConfigError(
                "sql must be a query or a table name, not a COPY statement: the operator "
                "builds the COPY itself"
            )
        return destinations_from(destinations)

    def _check_counts(self, report: TransferReport) -> None:
        counts = {r.rows for r in report.destinations if r.status != "failed"}
        if len(counts) > 1:
            self.log.warning(
                "The destinations hold different row counts (%s): the source changed "
                "between the tries that loaded them",
                ", ".join(
                    f"{r.label}={r.rows}" for r in report.destinations if r.status != "failed"
                ),
            )



# The split load (operators/split.py builds on this module, so it comes last) is imported
# from here too: `from airflow_copyman.operators.copyman import CopyManSplitGroup`.
from airflow_copyman.operators.split import CopyManSplitGroup as CopyManSplitGroup  # noqa: E402
