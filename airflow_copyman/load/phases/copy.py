"""Phase 3 of a load: open each destination's load transaction, run the one copy, and
handle what fails while it runs."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping

import psycopg

from airflow_copyman import copyman
from airflow_copyman.load.catalog import estimates
from airflow_copyman.load.connection import classify, locks
from airflow_copyman.load.modes import create
from airflow_copyman.load.phases import verify
from airflow_copyman.load.phases.locks import TableLocking
from airflow_copyman.load.phases.state import Target, size
from airflow_copyman.load.spec import ConfigError


class Copying(TableLocking):
    """The load transactions up to the end of the COPY."""

    def _begin(self, target: Target) -> bool:
        """The load transaction, up to the COPY: create the table, the mode's start
        (TRUNCATE, DELETE, the merge's staging table), the preoperator."""
        conn = target.conn
        assert conn is not None and target.table is not None
        mode = target.mode
        assert mode is not None
        doing = "taking the table's load lock"
        try:
            # Before anything is written (a merge: before its apply, in _finish; one that
            # creates its table: now, before the CREATE).
            if not mode.lock_before_finish or target.create:
                self._lock_table(target)
            doing = "creating the table"
            if target.create:
                conn.execute(create.statement(
                    target.table, target.planned, mode.key or None,
                    nulls_match=target.spec.key_nulls == "match",
                ))
            if self.verify == "checksum" and not verify.streams(self, target):
                doing = "describing the columns for the checksum"
                verify.take_renderings(target)
            doing = f"starting mode={mode.name!r}"
            if mode.lock_mode == "ACCESS EXCLUSIVE" and not mode.created:
                doing = "locking the table for TRUNCATE"
                self._lock_exclusively(target)
                doing = f"starting mode={mode.name!r}"
            mode.begin(conn)
            doing = "running the preoperator"
            for statement in target.spec.statements:
                conn.execute(statement)  # type: ignore[call-overload]
            if self.verify == "checksum" and target.spec.statements:
                doing = "taking the checksum of the rows before the COPY"
                verify.take_baseline(self, target)
        except (locks.LockWaitTimeout, locks.CreatedMeanwhile) as exc:
            self._fail(target, exc, doing)
            self._rollback(target)
            return False
        except psycopg.Error as exc:
            self._fail(target, self._begin_error(target, exc, doing), doing)
            self._rollback(target)
            return False
        target.started = time.monotonic()
        return True

    def _begin_error(self, target: Target, exc: psycopg.Error, doing: str) -> BaseException:
        """A lock that timed out, named; a CREATE TABLE that lost a race on the catalog
        (another session created a table or type of that name meanwhile): transient."""
        catalog = (exc.diag.constraint_name or "").startswith(("pg_type_", "pg_class_"))
        if doing == "creating the table" and catalog:
            return locks.CreatedMeanwhile(
                f"table {target.lock_name or target.table} (or a type of its name) was "
                f"created by another session meanwhile ({classify.describe(exc)}); "
                "a retry loads into it"
            )
        return self._lock_failed(target, exc)

    def _copy(self, loading: list[Target]) -> str:
        assert self.src is not None and self.format is not None
        try:
            producer = copyman.StatementProducer(
                self.src,
                self.source.copy_out(self.format, self.source_columns),
                self.parameters,
                # verify="checksum": the rows are digested as they pass (phases.verify).
                digest=self.verify == "checksum",
            )
            receivers: dict[copyman.Receiver, Target] = {}
            for target in loading:
                assert target.conn is not None and target.table is not None
                assert target.mode is not None
                receiver: copyman.StatementReceiver = copyman.StatementReceiver(
                    target.conn, target.mode.copy_in(self.format)
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
            self.origin.describe(),
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
            if classify.is_permanent(exc.producer_fault):
                raise ConfigError(
                    self._redact(
                        f"source {self.origin.describe()}: "
                        f"{classify.describe(exc.producer_fault)}"
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
                        failed,
                        source_error,
                        f"source {self.origin.describe()} failed while copying",
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
                self.origin.name,
                producer.rows,
                size(producer.bytes),
                size(producer.bytes / elapsed),
                _cap_note(self.max_bytes_per_second),
                "" if final else estimates.progress_note(self.estimate, producer.rows, elapsed),
            )
        for receiver, target in receivers.items():
            state = "copying"
            if final:
                state = "copied" if receiver.completed else target.result.status
            self.log.info(
                "  %s: %d rows, %s, %s/s (%s)",
                target.label,
                receiver.rows,
                size(receiver.bytes),
                size(receiver.bytes / elapsed),
                state,
            )


def _cap_note(cap: float | None) -> str:
    return "" if cap is None else f" (capped at {size(cap)}/s)"
