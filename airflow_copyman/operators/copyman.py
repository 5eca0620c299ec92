"""CopyManOperator: one pass over a PostgreSQL source, loaded into many destinations.

Retries load only what failed. Each destination loads in its own transaction, and a small
ledger table in the destination database (:mod:`airflow_copyman.load._ledger`) records the load
in that same transaction: the data and the record of having loaded it commit together.
The next try of the task skips every destination the ledger lists for this lineage of
tries, so no destination is ever loaded twice by retries, not even when a try dies right
after a commit. Airflow 3.3's ``task_state_store`` holds the lineage (which tries belong
together) and mirrors the ledger, for the Airflow UI and REST API.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, ClassVar

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowException

from airflow_copyman import _assets, load
from airflow_copyman._destinations import (
    CopyManConfigError,
    Destination,
    DestinationResult,
    TransferReport,
    destinations_from,
)
from airflow_copyman._outcome import (
    CopyManDestinationsFailed,
    CopyManPermanentFailure,
    failure_of,
)
from airflow_copyman.hooks.copyman import PROGRESS_INTERVAL, CopyManHook
from airflow_copyman.load import _arguments, _plan
from airflow_copyman.load._ledger import Entry, Ledger, TaskKey
from airflow_copyman.load._relation import Relation

if TYPE_CHECKING:
    from airflow.sdk import Context

__all__ = [
    "LEDGER_SCHEMA",
    "STATE_KEY",
    "CopyManDestinationsFailed",
    "CopyManOperator",
    "CopyManPermanentFailure",
]

#: The ``task_state_store`` key holding the lineage and the destinations it loaded.
STATE_KEY = "copyman"
#: Default schema of the ledger table: None, the destination table's own schema (a role
#: that may create tables only there, as PostgreSQL 15+ gives no CREATE on ``public``).
LEDGER_SCHEMA = None


class CopyManOperator(BaseOperator):
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
        self._hook: CopyManHook | None = None
        self._killed = False
        self._report: TransferReport | None = None
        # Check what can be checked before templates are rendered: a DAG with bad
        # arguments fails when it is parsed, not when it runs. Templated values are
        # checked after rendering, before any connection is used.
        try:
            _plan.normalize_format(format)
            if not _arguments.is_deferred(sql):
                _arguments.sql(sql)
            _arguments.seconds("receiver_timeout", receiver_timeout, zero_ok=False)
            _arguments.seconds("lock_timeout", lock_timeout, zero_ok=False)
            _arguments.seconds("progress_interval", progress_interval, zero_ok=True)
            if not _arguments.is_deferred(max_bytes_per_second):
                _arguments.bytes_per_second("max_bytes_per_second", max_bytes_per_second)
            if not _arguments.is_deferred(parameters):
                _arguments.parameters(parameters)
            _arguments.ledger_schema(ledger_schema)
            if not _arguments.is_deferred(min_rows):
                _arguments.count("min_rows", min_rows)
            _arguments.verify(verify)
            if not isinstance(ledger, bool):
                raise _arguments.ArgumentError(
                    f"ledger must be true or false, got {type(ledger).__name__}"
                )
        except (_plan.PlanError, _arguments.ArgumentError) as exc:
            raise ValueError(f"{self.task_id}: {exc}") from None
        if isinstance(sql, str) and _plan.is_copy_statement(sql):
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
        try:
            specs = self._destination_specs()
            _arguments.parameters(self.parameters)  # rendered now
            cap = _arguments.bytes_per_second(
                "max_bytes_per_second", self.max_bytes_per_second, rendered=True
            )
            min_rows = _arguments.count("min_rows", self.min_rows)  # rendered now
        except _arguments.ArgumentError as exc:
            raise CopyManPermanentFailure(f"{self.task_id}: {exc}") from None
        except CopyManConfigError as exc:
            raise CopyManPermanentFailure(str(exc)) from None
        store = context.get("task_state_store")
        state = _StateMirror(store, ti.max_tries, resume_on_clear=self.resume_on_clear)
        map_index = ti.map_index if ti.map_index is not None else -1
        key = TaskKey(ti.dag_id, ti.task_id, ti.run_id, map_index, state.lineage, ti.try_number)
        ledger = None
        if self.ledger:
            ledger = Ledger(self.ledger_schema, key, resume_on_clear=self.resume_on_clear)
        # Without a ledger, the state store is the record of what was loaded.
        skipped: dict[str, DestinationResult] = {}
        if ledger is None:
            for spec in specs:
                if (entry := state.loaded(spec)) is not None:
                    skipped[spec.label] = entry
                    self.log.info(
                        "%s: already loaded by try %s (task_state_store): skipped",
                        spec.label,
                        entry.try_number,
                    )
        pending = [s for s in specs if s.label not in skipped]
        if ledger is None:
            self.log.info(
                "Try %d, lineage %s: %d destination(s) to load, %d already loaded "
                "(no ledger: task_state_store only)",
                ti.try_number, state.lineage, len(pending), len(skipped),
            )
        else:
            # The ledger is read once connected: the transfer logs what it skips.
            self.log.info(
                "Try %d, lineage %s: %d destination(s); the ledger %s says which are loaded",
                ti.try_number, state.lineage, len(pending), ledger.name,
            )
        hook = CopyManHook(self.source_conn_id)
        self._hook = hook
        report: TransferReport
        try:
            if self._killed:
                raise AirflowException("the task was killed before the copy started")
            if pending:
                report = hook.transfer(
                    self.sql,
                    pending,
                    parameters=self.parameters,
                    format=self.format,
                    ledger=ledger,
                    on_commit=lambda result: state.record(result, ti.try_number),
                    # Without a ledger: the record by the table the server resolved.
                    loaded_before=state.loaded_as if ledger is None else None,
                    progress_interval=self.progress_interval,
                    receiver_timeout=self.receiver_timeout,
                    lock_timeout=self.lock_timeout,
                    # A load waiting for a table this one holds names its DAG, task, run.
                    application_name=load.application_name_for(
                        ti.dag_id, ti.task_id, ti.run_id, map_index
                    ),
                    min_rows=min_rows,
                    max_bytes_per_second=cap,
                    verify=self.verify,
                    raise_on_failure=False,
                )
            else:
                report = TransferReport(0, 0, None, 0.0, [])
        except CopyManConfigError as exc:
            raise CopyManPermanentFailure(str(exc)) from None
        finally:
            self._hook = None
        # In the order the destinations were given, skipped ones included.
        by_label = {r.label: r for r in report.destinations}
        report.destinations = [by_label.get(s.label) or skipped[s.label] for s in specs]
        if not pending:
            report.rows = max((r.rows or 0 for r in report.destinations), default=0)
            report.bytes = max((r.bytes or 0 for r in report.destinations), default=0)
        self._report = report
        state.sync(report, ti.try_number)
        self._check_counts(report)
        if self._killed:
            raise AirflowException("the task was killed: nothing was committed after the kill")
        failed = report.failed
        if failed:
            raise failure_of(report)
        result = report.as_dict()
        ti.xcom_push(key="rows", value=report.rows)
        ti.xcom_push(key="bytes", value=report.bytes)
        _assets.emit(context, self, specs, report, ti.try_number)
        return result

    def on_kill(self) -> None:
        """Cancel every COPY and statement in flight; nothing is committed after this.

        Called from the task's SIGTERM handler (the supervisor sends SIGKILL 5 s later),
        so it only cancels: ``execute`` then rolls everything back and fails.
        """
        self._killed = True
        hook = self._hook
        if hook is not None:
            hook.cancel()

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
            _arguments.sql(self.sql)
        except _arguments.ArgumentError as exc:
            raise CopyManConfigError(str(exc)) from None
        if _plan.is_copy_statement(self.sql):
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

    # OpenLineage (used only where apache-airflow-providers-openlineage is installed).

    def get_openlineage_facets_on_start(self) -> Any:
        return self._lineage(None)

    def get_openlineage_facets_on_complete(self, task_instance: Any) -> Any:
        return self._lineage(self._report)

    def get_openlineage_facets_on_failure(self, task_instance: Any) -> Any:
        return self._lineage(self._report)

    def _lineage(self, report: TransferReport | None) -> Any:
        try:
            from airflow_copyman._lineage import operator_lineage
        except ImportError:  # pragma: no cover - the module imports lazily itself
            return None
        return operator_lineage(self, report)


class _StateMirror:
    """The task's ``task_state_store`` record: the lineage, and what it loaded.

    Retries of a task instance share one store record (Airflow keys it by DAG run, task
    and map index); a manual clear keeps it, but raises ``max_tries`` (to ``try_number +
    retries``), and a re-created DAG run starts with an empty store. So the lineage is a
    random id kept in the store together with ``max_tries``: same ``max_tries``, same
    lineage; otherwise a new one. Without a store (Airflow < 3.3, or ``execute`` called
    outside a task run), the lineage is derived from ``max_tries`` alone.
    """

    def __init__(self, store: Any, max_tries: int, *, resume_on_clear: bool) -> None:
        self.store = store
        self.record_: dict[str, Any] = {}
        previous = store.get(STATE_KEY) if store is not None else None
        if (
            isinstance(previous, dict)
            and previous.get("max_tries") == max_tries
            and isinstance(previous.get("lineage"), str)
        ):
            self.record_ = previous
            self.lineage: str = previous["lineage"]
            return
        if store is None:
            self.lineage = f"max_tries-{max_tries}"
        else:
            self.lineage = uuid.uuid4().hex
        carried = {}
        if resume_on_clear and isinstance(previous, dict):
            carried = dict(previous.get("destinations") or {})
        self.record_ = {"lineage": self.lineage, "max_tries": max_tries, "destinations": carried}
        self._write()

    def loaded(self, spec: Destination) -> DestinationResult | None:
        """Before connecting: the record of ``spec`` as spelled (records of earlier
        versions, and of a try that spelled it alike)."""
        entry = (self.record_.get("destinations") or {}).get(spec.label)
        if not isinstance(entry, dict):
            return None
        return DestinationResult(
            spec.conn_id,
            spec.table,
            status="already_loaded",
            mode=spec.mode,
            rows=entry.get("rows"),
            bytes=entry.get("bytes"),
            try_number=entry.get("try_number"),
            relation=Relation(*entry["relation"]) if entry.get("relation") else None,
            # What the loading try measured (absent from records of earlier versions).
            inserted=entry.get("inserted"),
            updated=entry.get("updated"),
            checksum=entry.get("checksum"),
        )

    def loaded_as(self, result: DestinationResult) -> Entry | None:
        """Once connected: the record of the table as its server resolved it, however an
        earlier try spelled it."""
        entry = (self.record_.get("destinations") or {}).get(_key_of(result))
        if not isinstance(entry, dict):
            return None
        return Entry(
            self.lineage, entry.get("try_number") or 0, entry.get("rows") or 0,
            entry.get("bytes") or 0, entry.get("inserted"), entry.get("updated"),
            entry.get("checksum"),
        )

    def record(self, result: DestinationResult, try_number: int) -> None:
        self.record_.setdefault("destinations", {})[_key_of(result)] = {
            "rows": result.rows,
            "bytes": result.bytes,
            "try_number": result.try_number or try_number,
            "loaded_at": datetime.now(UTC).isoformat(),
            "relation": list(result.relation.parts) if result.relation else None,
            **_measured(result),
        }
        self._write()

    def sync(self, report: TransferReport, try_number: int) -> None:
        """Bring the mirror in line with the ledger after a try (a load the ledger shows
        but the store missed: a try died between a commit and its bookkeeping)."""
        destinations = self.record_.setdefault("destinations", {})
        for result in report.destinations:
            key = _key_of(result)
            if result.status in ("loaded", "already_loaded") and not (
                key in destinations or result.label in destinations
            ):
                destinations[key] = {
                    "rows": result.rows,
                    "bytes": result.bytes,
                    "try_number": result.try_number or try_number,
                    **_measured(result),
                }
        self.record_["last_try"] = try_number
        self.record_["failed"] = [r.label for r in report.failed]
        try:
            self._write()
        except Exception as exc:  # the ledger is the record; this is a mirror
            import logging

            logging.getLogger(__name__).warning("Could not update task_state_store: %s", exc)

    def _write(self) -> None:
        if self.store is not None:
            self.store.set(STATE_KEY, self.record_)


def _key_of(result: DestinationResult) -> str:
    """A destination's key in the record: its connection and its table as the server
    resolved it (``pg_wh:public.orders``), else as spelled (records of earlier versions)."""
    relation = result.relation
    if relation is not None and relation.key is not None:
        return f"{result.conn_id}:{relation.key}"
    return result.label


def _measured(result: DestinationResult) -> dict[str, Any]:
    """What a load measured beyond rows and bytes (a merge's counts, the checksum)."""
    return {"inserted": result.inserted, "updated": result.updated, "checksum": result.checksum}



# Issue 18: the split load is imported from here too.
from airflow_copyman.operators.split import CopyManSplitGroup as CopyManSplitGroup  # noqa: E402
