"""The run of one CopyMan transfer: connect, plan, per-destination transactions, ledger, progress.

:meth:`airflow_copyman.hooks.copyman.CopyManHook.transfer` creates a :class:`Transfer` and
runs it; :class:`Target` is one destination during that run.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import psycopg

from airflow_copyman import (
    _arguments,
    _bounded,
    _classify,
    _estimate,
    _identity,
    _names,
    _plan,
    _readonly,
    _relation,
    copyman,
)
from airflow_copyman._destinations import (
    CopyManConfigError,
    Destination,
    DestinationResult,
    TransferReport,
)
from airflow_copyman._ledger import Entry, Ledger
from airflow_copyman.hooks.copyman import CopyManHook


class Target:
    """One destination during a transfer."""

    def __init__(self, spec: Destination, hook: CopyManHook) -> None:
        self.spec = spec
        self.hook = hook
        self.result = DestinationResult(spec.conn_id, spec.table)
        self.table: _plan.TableName | None = None
        self.columns: list[str] | None = None
        self.conn: psycopg.Connection[Any] | None = None
        self.receiver: copyman.StatementReceiver | None = None
        self.started = 0.0
        #: The schema of its ledger table (once known).
        self.ledger_schema: str | None = None

    @property
    def pending(self) -> bool:
        return self.result.status == "pending"

    @property
    def label(self) -> str:
        return self.spec.label


class Transfer:
    """The state of one :meth:`CopyManHook.transfer` call."""

    def __init__(
        self,
        source: CopyManHook,
        sql: str,
        destinations: Sequence[Destination | Mapping[str, Any]],
        *,
        parameters: _plan.Params | None,
        format: str | None,
        ledger: Ledger | None,
        on_commit: Callable[[DestinationResult], None] | None,
        progress_interval: float,
        receiver_timeout: float,
        max_bytes_per_second: float | None = None,
    ) -> None:
        self.hook = source
        self.log = source.log
        self.sql = sql
        # Every argument is checked before any connection is used.
        try:
            _arguments.sql(sql)
            _arguments.parameters(parameters)
            _arguments.seconds("receiver_timeout", receiver_timeout, zero_ok=False)
            _arguments.seconds("progress_interval", progress_interval, zero_ok=True)
            self.max_bytes_per_second = _arguments.bytes_per_second(
                "max_bytes_per_second", max_bytes_per_second
            )
            if isinstance(destinations, str | bytes) or not isinstance(destinations, Sequence):
                raise _arguments.ArgumentError(
                    f"destinations must be a list, got {type(destinations).__name__}"
                )
            self.requested_format = _plan.normalize_format(format)
        except (_arguments.ArgumentError, _plan.PlanError) as exc:
            raise CopyManConfigError(f"{exc}") from None
        if ledger is not None:
            try:
                _arguments.ledger_schema(ledger.schema)
            except _arguments.ArgumentError as exc:
                raise CopyManConfigError(f"{exc}") from None
        self.specs = [Destination.from_value(d, i) for i, d in enumerate(destinations)]
        self.parameters = parameters or None
        #: The deadline of every statement, and the flag that stops the transfer.
        self.bounds = _bounded.Bounds(receiver_timeout)
        self.ledger = ledger
        self.on_commit = on_commit
        self.progress_interval = progress_interval
        self.receiver_timeout = receiver_timeout
        self.targets: list[Target] = []
        self.src: psycopg.Connection[Any] | None = None
        self.format: _plan.Format | None = None
        self.source_columns: list[_plan.Column] = []
        self.producer: copyman.StatementProducer | None = None
        self.manager: copyman.CopyManager | None = None
        self.cancelled = False
        self.interrupt: BaseException | None = None
        self.source_rows: int | None = None
        self.source_bytes = 0
        self.estimate: _estimate.SizeEstimate | None = None
        self.secrets: list[str] = []
        self.endpoints: dict[str, tuple[str, str]] = {}
        try:
            self.source = _plan.Source.parse(sql)
        except _plan.PlanError as exc:
            raise CopyManConfigError(f"source {source.conn_id}: {exc}") from None

    # The phases.

    def run(self) -> TransferReport:
        started = time.monotonic()
        if not self.specs:
            raise CopyManConfigError("no destinations: give at least one")
        self._resolve()
        try:
            self._connect()
            self._locate()
            if self.ledger is not None and self._go_on():
                self._check_ledger()
            if self._go_on():
                self._plan()
            if self.ledger is not None and self._go_on():
                self._prepare_ledger()
            if self._go_on():
                self._load()
        except copyman.Cancelled as exc:
            # A statement was cancelled because the transfer was asked to stop.
            for target in self._pending():
                self._fail(target, exc, "stopped")
        finally:
            self._close()
        if self.cancelled:
            for target in self._pending():
                self._fail(target, copyman.Cancelled("the transfer was stopped"), "stopped")
        if self.interrupt is not None:
            raise self.interrupt
        report = self._report(time.monotonic() - started)
        self._log_summary(report)
        return report

    def _resolve(self) -> None:
        """Look every connection up before connecting anywhere: bad input fails first."""
        seen: dict[tuple[str, str], int] = {}
        errors = []
        try:
            self.hook.check_connection()
        except CopyManConfigError as exc:
            errors.append(f"source: {exc}")
        self.secrets.extend(self.hook.secrets)
        self._endpoint(self.hook)
        for i, spec in enumerate(self.specs):
            where = f"destination #{i + 1} ({spec.conn_id}, table {spec.table})"
            target = Target(spec, CopyManHook(spec.conn_id))
            self.targets.append(target)
            try:
                target.table = _plan.parse_table(spec.table)
                target.columns = _plan.parse_columns(spec.columns, f"table {spec.table}")
                target.hook.check_connection()
            except (CopyManConfigError, _plan.PlanError) as exc:
                errors.append(f"{where}: {exc}")
                continue
            self.secrets.extend(target.hook.secrets)
            self._endpoint(target.hook)
            key = (spec.conn_id, str(target.table))
            if key in seen:
                errors.append(f"{where}: the same table is destination #{seen[key] + 1} too")
            seen.setdefault(key, i)
        if errors:
            raise CopyManConfigError(self._redact("; ".join(errors)))

    def _endpoint(self, hook: CopyManHook) -> None:
        """Keep where a connection points (for lineage: no second look-up later)."""
        try:
            conn = hook.connection
            self.endpoints[hook.conn_id] = (
                f"postgres://{conn.host}:{conn.port or 5432}",
                hook.database or conn.schema or "postgres",
            )
        except Exception:  # lineage is best effort
            pass

    def _connect(self) -> None:
        """Connect everywhere at once (each bounded by its connect_timeout); a connection
        refused for good (bad password, no such database, SSL refused, invalid option) is
        bad input, one that may come back fails its side."""
        errors = []
        source_error: BaseException | None = None
        hooks = [self.hook, *(t.hook for t in self.targets)]
        results = _bounded.connect_all([h.get_conn for h in hooks], self.bounds.stop)
        src_result, *target_results = results
        if not isinstance(src_result, BaseException):
            self.src = self._bind(src_result)
            _readonly.begin(self.src)
        for target, result in zip(self.targets, target_results, strict=True):
            if not isinstance(result, BaseException):
                target.conn = self._bind(result)
        for result in results:
            # Not a connection failure (an IAM token that cannot be had, say): raised as
            # is, after the connections made were kept for _close.
            if isinstance(result, BaseException) and not isinstance(
                result, psycopg.Error | copyman.Cancelled
            ):
                raise result
        if isinstance(src_result, BaseException):
            if _classify.is_permanent(src_result):
                errors.append(f"source {self.hook.describe()}: {_classify.describe(src_result)}")
            source_error = src_result
        for i, (target, result) in enumerate(zip(self.targets, target_results, strict=True)):
            if isinstance(result, BaseException):
                if _classify.is_permanent(result):
                    errors.append(
                        f"destination #{i + 1} ({target.hook.describe()}): "
                        f"{_classify.describe(result)}"
                    )
                else:
                    self._fail(target, result, "connecting")
        if errors:
            raise CopyManConfigError(self._redact("; ".join(errors)))
        self._log_connections()
        if source_error is not None:
            self._source_failed(source_error, "connecting")

    def _locate(self) -> None:
        """Name each destination's table as its server does (for the asset events): an
        unqualified name is resolved through the session's search_path, not guessed."""
        for target in self.targets:
            conn, table = target.conn, target.table
            if conn is None or conn.closed or table is None:
                continue
            try:
                target.result.relation = _relation.locate(conn, table)
            except psycopg.Error as exc:
                # Naming is not loading: what is wrong with the connection, the load says.
                self.log.debug(
                    "%s: could not name the table: %s",
                    target.label,
                    _classify.describe(exc, self.secrets),
                )
            self._rollback(target)

    def _log_connections(self) -> None:
        """How many sessions this task holds: a DBA sizing ``max_connections`` (or an
        Airflow pool) multiplies it by the tasks that may run at once."""
        held = [t.spec.conn_id for t in self.targets if t.conn is not None]
        self.log.info(
            "Holding %d PostgreSQL connection(s) until the transfer ends: %s to the source "
            "(%s), %d to destinations (%s)",
            len(held) + (self.src is not None),
            "1" if self.src is not None else "0",
            self.hook.conn_id,
            len(held),
            ", ".join(held) or "-",
        )

    def _bind(self, conn: psycopg.Connection[Any]) -> psycopg.Connection[Any]:
        """Put the connection's statements under this transfer's deadline and stop."""
        if isinstance(conn, _bounded.BoundedConnection):
            conn.bounds = self.bounds
        return conn

    def _go_on(self) -> bool:
        return not self.cancelled and any(t.pending for t in self.targets)

    def _check_ledger(self) -> None:
        assert self.ledger is not None
        skipped = 0
        for target in self._pending():
            assert target.conn is not None and target.table is not None
            try:
                schema = self.ledger.schema_for(target.conn, target.table)
                target.ledger_schema = schema
                entry = None
                if schema is not None:
                    entry = self.ledger.lookup(
                        target.conn, schema, target.spec.conn_id, str(target.table)
                    )
                else:
                    target.conn.rollback()
            except psycopg.Error as exc:
                if _classify.is_permanent(exc):
                    raise self._config_error(
                        target, exc, f"reading the ledger {self.ledger.name}"
                    ) from exc
                self._fail(target, exc, "reading the ledger")
                continue
            if entry is not None:
                self._already_loaded(target, entry)
                skipped += 1
        self.log.info(
            "Ledger %s: %d destination(s) already loaded (skipped), %d to load",
            self.ledger.name,
            skipped,
            len(self._pending()),
        )

    def _plan(self) -> None:
        assert self.src is not None
        src = self.src
        try:
            # Everything below runs in the source's one read-only transaction (its snapshot
            # is the copy's too): no rollback until the copy is over.
            source_columns = self.source.describe(src, self.parameters)
            select = self.source.select(source_columns)
            if self.parameters and self.source.query is not None:
                select = psycopg.sql.SQL(  # type: ignore[assignment]
                    psycopg.ClientCursor(src).mogrify(self.source.query, self.parameters)
                )
            _readonly.refuse_writes(src, select)
            source_tables = _identity.source(src, f"source {self.hook.conn_id}")
            self.estimate = _estimate.estimate_source(src, self.source, self.parameters, self.log)
        except _plan.PlanError as exc:
            raise CopyManConfigError(
                self._redact(f"source {self.hook.describe()}: {exc}")
            ) from None
        except psycopg.Error as exc:
            if _classify.is_permanent(exc):
                raise CopyManConfigError(
                    self._redact(f"source {self.hook.describe()}: {_classify.describe(exc)}")
                ) from exc
            self._source_failed(exc, "describing the source")
            return
        self.source_columns = source_columns
        errors = self._same_tables(source_tables)
        binary_ok = True
        difference = None
        binary_refusals = []
        for i, target in enumerate(self.targets):
            if not target.pending:
                continue
            assert target.conn is not None and target.table is not None
            where = f"destination #{i + 1} ({target.spec.conn_id}, table {target.spec.table})"
            try:
                columns = _plan.table_columns(target.conn, target.table, target.columns)
                if columns is None:
                    errors.append(f"{where}: {_names.missing_table(target.conn, target.table)}")
                    continue
                if target.columns is not None:  # the names as the table spells them
                    target.columns = [c.name for c in columns]
                mismatch = _plan.column_mismatch(source_columns, columns)
                if mismatch:
                    errors.append(f"{where}: column count mismatch: {mismatch}")
                    continue
                if target.spec.truncate and not _plan.has_table_privilege(
                    target.conn, target.table, "TRUNCATE"
                ):
                    errors.append(f"{where}: permission denied: no TRUNCATE privilege")
                    continue
                target.conn.rollback()
            except _plan.PlanError as exc:
                errors.append(f"{where}: {exc}")
                continue
            except psycopg.Error as exc:
                if _classify.is_permanent(exc):
                    errors.append(f"{where}: {_classify.describe(exc)}")
                else:
                    self._fail(target, exc, "checking the table")
                continue
            if not _plan.binary_safe(source_columns, columns):
                binary_ok = False
                here = _plan.first_type_difference(source_columns, columns)
                difference = difference or here
                binary_refusals.append(f"{where}: column {here}")
        if self.requested_format == "binary" and binary_refusals:
            # Binary COPY carries each type's own binary form: another type reads it as
            # something else (int8 1 as numeric 0.0) or not at all, and no server checks.
            errors.append(
                "format='binary' needs the same types on both sides: "
                + "; ".join(binary_refusals)
                + " (leave format unset to copy such columns in text)"
            )
        if errors:
            raise CopyManConfigError(self._redact("; ".join(errors)))
        if self.requested_format is not None:
            self.format = self.requested_format
        elif binary_ok:
            self.format = "binary"
        else:
            self.format = "text"
            self.log.info("Column types differ (%s): copying in text format", difference)

    def _same_tables(self, source_tables: _identity.Tables) -> list[str]:
        """Refuse destinations that are one table, or a table the source reads, whatever
        their spelling (identified by their servers, before anything is written)."""
        errors = []
        found = []
        for i, target in enumerate(self.targets):
            conn = target.conn
            if conn is None or conn.closed or target.table is None:
                continue
            label = f"destination #{i + 1} ({target.spec.conn_id}, table {target.spec.table})"
            try:
                # Left in the transaction planning goes on with (it rolls back after).
                tables = _identity.destination(conn, target.table.regclass_text, label)
            except psycopg.Error as exc:
                if _classify.is_permanent(exc):
                    errors.append(f"{label}: {_classify.describe(exc)}")
                else:
                    self._fail(target, exc, "identifying the table")
                continue
            if tables is not None:
                found.append(tables)
        return errors + _identity.conflicts(source_tables, found)

    def _prepare_ledger(self) -> None:
        assert self.ledger is not None
        errors = []
        for target in self._pending():
            assert target.conn is not None and target.table is not None
            schema = target.ledger_schema
            try:
                if schema is None:
                    schema = self.ledger.schema_for(target.conn, target.table)
                    target.ledger_schema = schema
                if schema is None:  # pragma: no cover - planning found the table
                    raise _plan.PlanError(f"table {target.table} does not exist")
                self.ledger.ensure_table(target.conn, schema)
            except _plan.PlanError as exc:
                errors.append(f"{target.label}: {exc}")
            except psycopg.Error as exc:
                if _classify.is_permanent(exc):
                    errors.append(
                        f"{target.spec.conn_id}: cannot create the ledger table "
                        f"{self.ledger.name_in(schema or '?')} ({_classify.describe(exc)}); "
                        "set ledger_schema to a schema the connection may write, or "
                        "ledger=False to keep no ledger"
                    )
                else:
                    self._fail(target, exc, "creating the ledger table")
        if errors:
            raise CopyManConfigError(self._redact("; ".join(errors)))

    def _load(self) -> None:
        """Open each destination's transaction, run the copy, commit what completed."""
        assert self.src is not None and self.format is not None
        while True:
            # Every claim first, then the TRUNCATEs: waiting for another try's claim must
            # not hold a TRUNCATE lock on a table taken before it.
            claimed = [t for t in self._pending() if self._claim(t)]
            loading = [t for t in claimed if self._begin(t)]
            if not loading or self.cancelled:
                for target in loading:
                    self._fail(target, copyman.Cancelled("the task was killed"), "starting")
                return
            outcome = self._copy(loading)
            if outcome == "restart":
                # A destination's COPY could not start, so the engine aborted the others:
                # their transactions are void; load them again without the culprit.
                continue
            break
        self._commit([t for t in loading if t.pending])

    def _claim(self, target: Target) -> bool:
        """Open the destination's load transaction, owning the load first: another try of
        this lineage loading it now (a zombie) holds the claim until its commit, and its
        ledger row shows then. False if the destination is loaded or failed."""
        conn = target.conn
        assert conn is not None and target.table is not None
        try:
            conn.rollback()
            if self.ledger is None or target.ledger_schema is None:
                return True
            self.ledger.claim(conn, target.spec.conn_id, str(target.table))
            entry = self.ledger.read(
                conn, target.ledger_schema, target.spec.conn_id, str(target.table)
            )
        except psycopg.Error as exc:
            doing = "claiming the load"
            if isinstance(exc, _bounded.StatementTimeout):
                doing += " (another try of this task is loading it)"
            self._fail(target, exc, doing)
            self._rollback(target)
            return False
        if entry is not None:
            self._rollback(target)
            self._already_loaded(target, entry)
            return False
        return True

    def _begin(self, target: Target) -> bool:
        """The load transaction, up to the COPY: TRUNCATE, preoperator."""
        conn = target.conn
        assert conn is not None and target.table is not None
        try:
            if target.spec.truncate:
                conn.execute(
                    psycopg.sql.SQL("TRUNCATE TABLE {}").format(target.table.identifier)
                )
            for statement in target.spec.statements:
                conn.execute(statement)  # type: ignore[call-overload]
        except psycopg.Error as exc:
            self._fail(target, exc, "running truncate/preoperator")
            self._rollback(target)
            return False
        target.started = time.monotonic()
        return True

    def _copy(self, loading: list[Target]) -> str:
        assert self.src is not None and self.format is not None
        try:
            producer = copyman.StatementProducer(
                self.src, self.source.copy_out(self.format, self.source_columns), self.parameters
            )
            receivers: dict[copyman.Receiver, Target] = {}
            for target in loading:
                assert target.conn is not None and target.table is not None
                receiver: copyman.StatementReceiver = copyman.StatementReceiver(
                    target.conn, _plan.copy_in(target.table, target.columns, self.format)
                )
                target.receiver = receiver
                receivers[receiver] = target
        except (copyman.CopyUsageError, psycopg.Error) as exc:
            for target in loading:
                self._fail(target, exc, "setting up the copy")
            return "done"
        self.producer = producer
        try:
            # The engine checks the sessions here (the pinned settings make them agree).
            manager = copyman.CopyManager(
                producer,
                *receivers,
                receiver_timeout=self.receiver_timeout,
                max_bytes_per_second=self.max_bytes_per_second,
            )
        except (copyman.CopyUsageError, psycopg.Error, TimeoutError) as exc:
            for target in loading:
                self._fail(target, exc, "setting up the copy")
            return "done"
        self.log.info(
            "Copying %s from %s into %d destination(s) in %s format: %s",
            self.source.table or "the query's rows",
            self.hook.describe(),
            len(loading),
            self.format,
            ", ".join(t.label for t in loading),
        )
        started = time.monotonic()
        # Known to cancel() before the COPYs start: a stop while one waits to start (for a
        # lock) is then seen by the engine's own loop, which cancels from this thread.
        self.manager = manager
        if self.cancelled:
            manager.cancel()
        try:
            with contextlib.ExitStack() as stack:
                try:
                    stack.enter_context(manager)
                except copyman.CopyFail as exc:
                    return self._start_failed(exc, receivers)
                self._pump(manager, receivers, started)
        except copyman.CopyFail as exc:
            self._copy_failed(exc, receivers)
        finally:
            self.manager = None
        self.source_rows = producer.server_rows if producer.done else None
        self.source_bytes = producer.bytes
        completed = manager.completed
        for fitting, target in receivers.items():
            if target.pending and fitting not in completed:
                self._fail(
                    target,
                    copyman.CopyFail(manager, "the copy did not complete"),
                    "copying",
                )
        self._log_progress(receivers, started, final=True)
        return "done"

    def _pump(
        self,
        manager: copyman.CopyManager,
        receivers: Mapping[copyman.Receiver, Target],
        started: float,
    ) -> None:
        next_log = started + self.progress_interval
        while True:
            try:
                for _ in manager:
                    now = time.monotonic()
                    if now >= next_log:
                        next_log = now + self.progress_interval
                        self._log_progress(receivers, started)
                return
            except copyman.ReceiverFault as fault:
                for receiver, exc in fault.faults.items():
                    target = receivers[receiver]
                    self._fail(target, exc, "copying")
                    self._rollback(target)
                if not manager.receivers:
                    return

    def _start_failed(
        self, exc: copyman.CopyFail, receivers: Mapping[copyman.Receiver, Target]
    ) -> str:
        if exc.producer_fault is not None:
            if _classify.is_permanent(exc.producer_fault):
                raise CopyManConfigError(
                    self._redact(
                        f"source {self.hook.describe()}: "
                        f"{_classify.describe(exc.producer_fault)}"
                    )
                ) from exc.producer_fault
            for target in receivers.values():
                self._fail(target, exc.producer_fault, "starting the source's COPY")
            return "done"
        culprits = [r for r in exc.receiver_faults if r in receivers]
        for receiver in culprits:
            self._fail(receivers[receiver], exc.receiver_faults[receiver], "starting the COPY")
        for target in receivers.values():
            if not culprits:
                self._fail(target, exc, "starting the copy")
            self._rollback(target)
        return "restart" if culprits else "done"

    def _copy_failed(
        self, exc: copyman.CopyFail, receivers: Mapping[copyman.Receiver, Target]
    ) -> None:
        cause = exc.__cause__
        if cause is not None and not isinstance(cause, Exception):
            # The copy was interrupted by something that is not a failure of the copy (the
            # task's execution_timeout, KeyboardInterrupt...): roll back, then re-raise it.
            self.interrupt = cause
        source_error: BaseException | None = exc.producer_fault
        if isinstance(cause, copyman.ProducerFault) and isinstance(cause.__cause__, Exception):
            # The server's own error (its SQLSTATE says whether a retry helps), not one the
            # engine met afterwards while aborting the source's COPY.
            source_error = cause.__cause__
        if source_error is not None and not self.cancelled:
            # The source failed: name it, with the server's own words; the destinations
            # only stopped because of it (what their aborts met says nothing more).
            for failed in receivers.values():
                if failed.pending:
                    self._fail(
                        failed, source_error, f"source {self.hook.describe()} failed while copying"
                    )
        for receiver, error in exc.receiver_faults.items():
            target = receivers.get(receiver)
            if target is not None and target.pending:
                self._fail(target, error, "copying")
        reason: BaseException = exc
        if self.cancelled or isinstance(cause, copyman.Cancelled):
            reason = copyman.Cancelled("the task was killed; the copy was cancelled")
        for target in receivers.values():
            if target.pending:
                self._fail(target, reason, "copying")
        for target in receivers.values():
            self._rollback(target)

    def _commit(self, loading: list[Target]) -> None:
        """Record each complete destination in its ledger, then COMMIT them all at once:
        the COMMITs go out together and their replies are waited for together, so one
        destination slow to answer never holds the others (nor their locks)."""
        producer = self.producer
        assert producer is not None
        ready: list[Target] = []
        for target in loading:
            conn, receiver = target.conn, target.receiver
            assert conn is not None and receiver is not None and target.table is not None
            if self.cancelled:
                self._fail(target, copyman.Cancelled("the task was killed"), "committing")
                self._rollback(target)
                continue
            rows, nbytes = receiver.server_rows, receiver.bytes
            if rows is None or rows != producer.server_rows:
                # The engine checked this already; checking again costs nothing, and a
                # destination is committed only on the servers' own word.
                self._fail(target, _count_error(target, rows, producer.server_rows), "checking")
                self._rollback(target)
                continue
            try:
                if self.ledger is not None and target.ledger_schema is not None:
                    schema, label = target.ledger_schema, str(target.table)
                    if not self.ledger.record(
                        conn, schema, target.spec.conn_id, label, rows, nbytes
                    ):
                        conn.rollback()
                        entry = self.ledger.lookup(conn, schema, target.spec.conn_id, label)
                        self.log.warning(
                            "%s: another try of this task loaded it meanwhile; rolled back "
                            "this copy",
                            target.label,
                        )
                        if entry is not None:
                            self._already_loaded(target, entry)
                            continue
                        raise psycopg.errors.SerializationFailure("the ledger changed meanwhile")
            except copyman.Cancelled as exc:
                self._fail(target, exc, "committing")
                self._rollback(target)
                continue
            except psycopg.Error as exc:
                self._fail(target, exc, "committing")
                self._rollback(target)
                continue
            ready.append(target)
        if self.cancelled:
            for target in ready:
                self._fail(target, copyman.Cancelled("the task was killed"), "committing")
                self._rollback(target)
            return
        conns = [t.conn for t in ready]
        outcomes = _bounded.commit_all(
            conns, self.receiver_timeout, self.bounds.stop  # type: ignore[arg-type]
        )
        for target, error in zip(ready, outcomes, strict=True):
            if error is not None:
                self._fail(target, error, "committing")
                if isinstance(error, psycopg.OperationalError):
                    target.result.error = (target.result.error or "") + (
                        " (the commit's outcome is unknown; the next try reads the ledger)"
                        if self.ledger is not None
                        else " (the commit's outcome is unknown)"
                    )
                self._rollback(target)
                continue
            self._committed(target)

    def _committed(self, target: Target) -> None:
        receiver = target.receiver
        assert receiver is not None and receiver.server_rows is not None
        result = target.result
        result.status = "loaded"
        result.rows, result.bytes = receiver.server_rows, receiver.bytes
        result.try_number = self.ledger.key.try_number if self.ledger else None
        result.seconds = time.monotonic() - target.started
        self.log.info("%s: committed %d rows", target.label, result.rows)
        if self.on_commit is not None:
            try:
                self.on_commit(result)
            except Exception as exc:
                # The ledger (if any) holds the truth; the callback only mirrors it.
                self.log.warning(
                    "%s: recording the load failed: %s",
                    target.label,
                    _classify.describe(exc, self.secrets),
                )

    def _close(self) -> None:
        for conn in [self.src, *(t.conn for t in self.targets)]:
            if conn is None or conn.closed:
                continue
            if isinstance(conn, _bounded.BoundedConnection):
                # Cleaning up must not wait long: a rollback is quick where the server is
                # there, and a connection that cannot roll back is closed anyway.
                conn.bounds = _bounded.Bounds(min(self.receiver_timeout, _bounded.CANCEL_WAIT))
            with contextlib.suppress(Exception):
                conn.rollback()
            with contextlib.suppress(Exception):
                conn.close()

    # Stop (from on_kill: a signal handler). It only asks: the thread running the transfer
    # sends the servers' cancels itself (_bounded, the engine's loop), then reads each
    # statement's end, so a cancel can never hit a later statement.

    def cancel(self) -> None:
        self.cancelled = True
        self.bounds.stop.set()
        manager = self.manager
        if manager is not None:
            manager.cancel()

    # Bookkeeping.

    def _pending(self) -> list[Target]:
        return [t for t in self.targets if t.pending]

    def _redact(self, text: str) -> str:
        return _classify.redact(text, self.secrets)

    def _config_error(self, target: Target, exc: BaseException, doing: str) -> CopyManConfigError:
        return CopyManConfigError(
            self._redact(f"{target.label}: {doing}: {_classify.describe(exc)}")
        )

    def _fail(self, target: Target, exc: BaseException, doing: str) -> None:
        result = target.result
        if result.status == "failed":
            return
        result.status = "failed"
        result.error = f"{doing}: {_classify.describe(exc, self.secrets)}"
        result.permanent = _classify.is_permanent(exc)
        result.rows = result.bytes = None
        self.log.warning(
            "%s failed (%s): %s",
            target.label,
            "permanent" if result.permanent else "transient, a retry may load it",
            result.error,
        )

    def _source_failed(self, exc: BaseException, doing: str) -> None:
        for target in self._pending():
            self._fail(target, exc, f"source {self.hook.conn_id}: {doing}")

    def _already_loaded(self, target: Target, entry: Entry) -> None:
        result = target.result
        result.status = "already_loaded"
        result.rows, result.bytes, result.try_number = entry.rows, entry.bytes, entry.try_number
        self.log.info(
            "%s: already loaded by try %d (%d rows): skipped",
            target.label,
            entry.try_number,
            entry.rows,
        )

    def _rollback(self, target: Target) -> None:
        conn = target.conn
        if conn is not None and not conn.closed:
            try:
                conn.rollback()
            except Exception:
                with contextlib.suppress(Exception):
                    conn.close()

    def _report(self, seconds: float) -> TransferReport:
        results = [t.result for t in self.targets]
        rows = self.source_rows
        nbytes = self.source_bytes
        if rows is None:
            done = [r for r in results if r.rows is not None]
            rows = max((r.rows or 0 for r in done), default=0)
            nbytes = max((r.bytes or 0 for r in done), default=0)
        return TransferReport(rows, nbytes, self.format, seconds, results, self.endpoints)

    def _log_progress(
        self,
        receivers: Mapping[copyman.Receiver, Target],
        started: float,
        *,
        final: bool = False,
    ) -> None:
        elapsed = max(time.monotonic() - started, 1e-6)
        producer = self.producer
        if producer is not None:
            self.log.info(
                "%s source %s: %d rows, %s, %s/s%s%s",
                "Done:" if final else "Progress:",
                self.hook.conn_id,
                producer.rows,
                _size(producer.bytes),
                _size(producer.bytes / elapsed),
                _cap_note(self.max_bytes_per_second),
                "" if final else _estimate.progress_note(self.estimate, producer.rows, elapsed),
            )
        for receiver, target in receivers.items():
            state = "copying"
            if final:
                state = "copied" if receiver.completed else target.result.status
            self.log.info(
                "  %s: %d rows, %s, %s/s (%s)",
                target.label,
                receiver.rows,
                _size(receiver.bytes),
                _size(receiver.bytes / elapsed),
                state,
            )

    def _log_summary(self, report: TransferReport) -> None:
        self.log.info(
            "CopyMan transfer finished in %.1f s: %d rows, %s from %s (%s format)",
            report.seconds,
            report.rows,
            _size(report.bytes),
            self.hook.conn_id,
            report.format or "n/a",
        )
        for result in report.destinations:
            rate = ""
            if result.seconds and result.bytes:
                rate = f", {_size(result.bytes / result.seconds)}/s"
            self.log.info(
                "  %s: %s, %s rows, %s%s%s",
                result.label,
                result.status,
                "-" if result.rows is None else result.rows,
                "-" if result.bytes is None else _size(result.bytes),
                rate,
                f" ({result.error})" if result.error else "",
            )


def _count_error(target: Target, rows: int | None, source_rows: int | None) -> BaseException:
    if rows is not None:
        return copyman.RowCountMismatch(
            f"{target.label}: the destination's COPY reports {rows} rows, the source's "
            f"{source_rows}"
        )
    # No COPY result at all: say what the server last said, if anything.
    conn = target.conn
    said = ""
    if conn is not None:
        with contextlib.suppress(Exception):
            said = conn.pgconn.error_message.decode(errors="replace").strip()
    text = f"{target.label}: the destination's COPY ended without a row count"
    if said:
        text += f"; the server said: {' '.join(said.split())}"
    if conn is None or conn.closed or conn.broken:
        return psycopg.OperationalError(text)
    return copyman.RowCountMismatch(text)


def _cap_note(cap: float | None) -> str:
    return "" if cap is None else f" (capped at {_size(cap)}/s)"


def _size(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.1f} TiB"  # pragma: no cover

