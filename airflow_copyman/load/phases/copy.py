"""Phase 3 of a load: open each destination's load transaction, run the one copy, and
handle what fails while it runs."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import psycopg

from airflow_copyman import copyman
from airflow_copyman.copyman import Digest
from airflow_copyman.load.catalog import estimates
from airflow_copyman.load.connection import classify, locks
from airflow_copyman.load.modes import create
from airflow_copyman.load.phases import verify
from airflow_copyman.load.phases.locks import TableLocking
from airflow_copyman.load.phases.plan import Plan
from airflow_copyman.load.phases.state import Target, size
from airflow_copyman.load.spec import ConfigError, Progress


@dataclass(frozen=True)
class CopyOutcome:
    """What the one copy did: ``restart`` where a destination's COPY could not start (the
    engine aborted the others: their transactions are void, load them again without it);
    else the source's COPY count (None: no copy ran), whether its COPY completed, the bytes
    it sent, and (``verify="checksum"``) the digest of the rows it sent."""

    restart: bool = False
    server_rows: int | None = None
    completed: bool = False
    bytes: int = 0
    digest: Digest | None = None
    #: Each destination's COPY, by label: the row count its server reported (None: its
    #: COPY did not end) and the bytes it was sent.
    received: Mapping[str, tuple[int | None, int]] = field(default_factory=dict)

    @property
    def source_rows(self) -> int | None:
        """The source's row count, where its COPY completed."""
        return self.server_rows if self.completed else None

    @classmethod
    def of(
        cls,
        producer: copyman.StatementProducer,
        receivers: Mapping[copyman.Receiver, Target],
    ) -> CopyOutcome:
        received = {
            target.label: (
                receiver.server_rows
                if isinstance(receiver, copyman.StatementReceiver) else None,
                receiver.bytes,
            )
            for receiver, target in receivers.items()
        }
        return cls(
            False, producer.server_rows, producer.done, producer.bytes, producer.digest(),
            received,
        )

    def rows_of(self, target: Target) -> int:
        """The rows ``target``'s COPY wrote (of a destination whose COPY completed)."""
        rows = self.received[target.label][0]
        assert rows is not None, "only complete COPYs are committed"
        return rows


#: A copy that did not run (set up failed, or stopped first).
NO_COPY = CopyOutcome()
#: A copy to run again without the destinations whose COPY could not start.
RESTART = CopyOutcome(restart=True)


class Copying(TableLocking):
    """The load transactions up to the end of the COPY."""

    def _begin(self, target: Target, plan: Plan) -> bool:
        """The load transaction, up to the COPY: create the table, the mode's start
        (TRUNCATE, DELETE, the merge's staging table), the preoperator."""
        conn = target.conn
        assert conn is not None
        mode = target.mode
        planned = plan.of(target)
        doing = "taking the table's load lock"
        try:
            # Before anything is written (a merge: before its apply, in _finish; one that
            # creates its table: now, before the CREATE).
            if not mode.lock_before_finish or planned.create:
                self._lock_table(target, planned.create)
            doing = "creating the table"
            if planned.create:
                conn.execute(create.statement(
                    target.table, planned.columns, mode.key or None,
                    nulls_match=target.spec.key_nulls == "match",
                ))
            if self.verify == "checksum" and not verify.streams(self, target, plan):
                doing = "describing the columns for the checksum"
                verify.take_renderings(target, planned)
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
                verify.take_baseline(self, target, plan)
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

    def _copy(self, plan: Plan, loading: list[Target]) -> CopyOutcome:
        """The one copy, from the source into every destination of ``loading``."""
        set_up = self._set_up(plan, loading)
        if set_up is None:
            return NO_COPY
        manager, producer, receivers = set_up
        self.log.info(
            "Copying %s from %s into %d destination(s) in %s format: %s",
            self.source.table or "the query's rows",
            self.origin.describe(),
            len(loading),
            plan.format,
            ", ".join(t.label for t in loading),
        )
        if not self._run_copy(manager, producer, receivers, plan):
            return RESTART
        completed = manager.completed
        for fitting, target in receivers.items():
            if target.pending and fitting not in completed:
                self._fail(
                    target,
                    copyman.CopyFail(manager, "the copy did not complete"),
                    "copying",
                )
        return CopyOutcome.of(producer, receivers)

    def _set_up(
        self, plan: Plan, loading: list[Target]
    ) -> (
        tuple[copyman.CopyManager, copyman.StatementProducer, dict[copyman.Receiver, Target]]
        | None
    ):
        """The copy's producer, receivers and manager; None if it cannot be set up (every
        destination of ``loading`` failed)."""
        assert self.src is not None
        try:
            producer = copyman.StatementProducer(
                self.src,
                self.source.copy_out(plan.format, list(plan.source_columns)),
                self.parameters,
                # verify="checksum": the rows are digested as they pass (phases.verify).
                digest=self.verify == "checksum",
            )
            receivers: dict[copyman.Receiver, Target] = {}
            for target in loading:
                assert target.conn is not None
                receiver = copyman.StatementReceiver(
                    target.conn, target.mode.copy_in(plan.format)
                )
                receivers[receiver] = target
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
            return None
        return manager, producer, receivers

    def _run_copy(
        self,
        manager: copyman.CopyManager,
        producer: copyman.StatementProducer,
        receivers: dict[copyman.Receiver, Target],
        plan: Plan,
    ) -> bool:
        """Run the copy to its end, failing what fails; False where a destination's COPY
        could not start (the copy is to run again without it)."""
        started = time.monotonic()
        # Known to cancel() before the COPYs start: a stop while one waits to start (for a
        # lock) is then seen by the engine's own loop, which cancels from this thread.
        self.manager = manager
        if self.cancelled:
            manager.cancel()
        progress = _Progress(producer, receivers, started, plan.estimate)
        try:
            with contextlib.ExitStack() as stack:
                try:
                    stack.enter_context(manager)
                except copyman.CopyFail as exc:
                    return not self._start_failed(exc, receivers)
                self._pump(manager, receivers, progress)
        except copyman.CopyFail as exc:
            self._copy_failed(exc, receivers)
        finally:
            self.manager = None
        self._log_progress(progress, final=True)
        return True

    def _pump(
        self,
        manager: copyman.CopyManager,
        receivers: Mapping[copyman.Receiver, Target],
        progress: _Progress,
    ) -> None:
        next_log = progress.started + self.progress_interval
        while True:
            try:
                for _ in manager:
                    now = time.monotonic()
                    if now >= next_log:
                        next_log = now + self.progress_interval
                        self._log_progress(progress)
                        self._tell_progress(self._progress_now(progress, now))
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
    ) -> bool:
        """A COPY could not start: fail who caused it; True if the copy is to run again
        without the destinations whose COPY could not start."""
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
            return False
        culprits = [r for r in exc.receiver_faults if r in receivers]
        for receiver in culprits:
            self._fail(receivers[receiver], exc.receiver_faults[receiver], "starting the COPY")
        for target in receivers.values():
            if not culprits:
                self._fail(target, exc, "starting the copy")
            self._rollback(target)
        return bool(culprits)

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

    def _progress_now(self, progress: _Progress, now: float) -> Progress:
        copying = {id(t) for t in progress.receivers.values()}
        estimate = progress.estimate
        return Progress(
            progress.producer.rows,
            progress.producer.bytes,
            now - self.started,
            estimate.rows if estimate is not None else None,
            None,
            tuple(
                (t.label, "copying" if t.pending and id(t) in copying else t.result.status)
                for t in self.targets
            ),
        )

    def _log_progress(self, progress: _Progress, *, final: bool = False) -> None:
        elapsed = max(time.monotonic() - progress.started, 1e-6)
        producer = progress.producer
        self.log.info(
            "%s source %s: %d rows, %s, %s/s%s%s",
            "Done:" if final else "Progress:",
            self.origin.name,
            producer.rows,
            size(producer.bytes),
            size(producer.bytes / elapsed),
            _cap_note(self.max_bytes_per_second),
            "" if final else estimates.progress_note(progress.estimate, producer.rows, elapsed),
        )
        for receiver, target in progress.receivers.items():
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


@dataclass(frozen=True)
class _Progress:
    """What the progress lines of one copy read."""

    producer: copyman.StatementProducer
    receivers: Mapping[copyman.Receiver, Target]
    started: float
    estimate: estimates.SizeEstimate | None


def _cap_note(cap: float | None) -> str:
    return "" if cap is None else f" (capped at {size(cap)}/s)"
