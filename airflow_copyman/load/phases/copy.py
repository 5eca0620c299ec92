"""Phase 3 of a load: the one copy, from the source into every open load transaction
(:mod:`.begin` opened them), and what fails while it runs."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import psycopg

from airflow_copyman import copyman
from airflow_copyman.copyman import Digest
from airflow_copyman.load.catalog import estimates
from airflow_copyman.load.connection import classify
from airflow_copyman.load.phases.begin import Loading
from airflow_copyman.load.phases.plan import Plan
from airflow_copyman.load.phases.run import Run, Target, rollback, size
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
    #: What interrupted the copy that is not a failure of it (the task's
    #: execution_timeout, KeyboardInterrupt...): raised once everything is rolled back.
    interrupt: BaseException | None = None

    @property
    def source_rows(self) -> int | None:
        """The source's row count, where its COPY completed."""
        return self.server_rows if self.completed else None

    @classmethod
    def of(
        cls,
        producer: copyman.StatementProducer,
        receivers: Mapping[copyman.Receiver, Loading],
        interrupt: BaseException | None,
    ) -> CopyOutcome:
        received = {
            loading.label: (
                receiver.server_rows
                if isinstance(receiver, copyman.StatementReceiver) else None,
                receiver.bytes,
            )
            for receiver, loading in receivers.items()
        }
        return cls(
            False, producer.server_rows, producer.done, producer.bytes, producer.digest(),
            received, interrupt,
        )

    def rows_of(self, target: Target) -> int:
        """The rows ``target``'s COPY wrote (0 where its COPY did not end: only complete
        COPYs are committed, checked before)."""
        return self.received[target.label][0] or 0


#: A copy that did not run (set up failed, or stopped first).
NO_COPY = CopyOutcome()
#: A copy to run again without the destinations whose COPY could not start.
RESTART = CopyOutcome(restart=True)


#: Told the copy's manager while it runs (None after), so that a stop can reach it.
OnManager = Callable[[copyman.CopyManager | None], None]
Receivers = dict[copyman.Receiver, Loading]


def copy(
    run: Run,
    src: psycopg.Connection[Any],
    plan: Plan,
    loading: list[Loading],
    on_manager: OnManager,
) -> CopyOutcome:
    """The one copy, from the source into every destination of ``loading``."""
    set_up = _set_up(run, src, plan, loading)
    if set_up is None:
        return NO_COPY
    manager, producer, receivers = set_up
    run.log.info(
        "Copying %s from %s into %d destination(s) in %s format: %s",
        run.source.table or "the query's rows",
        run.origin.describe(),
        len(loading),
        plan.format,
        ", ".join(t.label for t in loading),
    )
    restart, interrupt = _run_copy(run, manager, producer, receivers, plan, on_manager)
    if restart:
        return RESTART
    completed = manager.completed
    for fitting, one in receivers.items():
        if one.target.pending and fitting not in completed:
            run.fail(
                one.target, copyman.CopyFail(manager, "the copy did not complete"), "copying"
            )
    return CopyOutcome.of(producer, receivers, interrupt)


def _set_up(
    run: Run, src: psycopg.Connection[Any], plan: Plan, loading: list[Loading]
) -> tuple[copyman.CopyManager, copyman.StatementProducer, Receivers] | None:
    """The copy's producer, receivers and manager; None if it cannot be set up (every
    destination of ``loading`` failed)."""
    try:
        producer = copyman.StatementProducer(
            src,
            run.source.copy_out(plan.format, list(plan.source_columns)),
            run.options.parameters,
            # verify="checksum": the rows are digested as they pass (phases.verify).
            digest=run.verify == "checksum",
        )
        receivers: Receivers = {}
        for one in loading:
            planned = plan.of(one.target)
            statement = one.target.mode.copy_in(
                plan.format, planned.names, created=planned.create
            )
            receiver = copyman.StatementReceiver(one.conn, statement)
            receivers[receiver] = one
        # The engine checks the sessions here (the pinned settings make them agree).
        manager = copyman.CopyManager(
            producer,
            *receivers,
            receiver_timeout=run.options.receiver_timeout,
            max_bytes_per_second=run.options.max_bytes_per_second,
        )
    except (copyman.CopyUsageError, psycopg.Error, TimeoutError) as exc:
        for one in loading:
            run.fail(one.target, exc, "setting up the copy")
        return None
    return manager, producer, receivers


def _run_copy(
    run: Run,
    manager: copyman.CopyManager,
    producer: copyman.StatementProducer,
    receivers: Receivers,
    plan: Plan,
    on_manager: OnManager,
) -> tuple[bool, BaseException | None]:
    """Run the copy to its end, failing what fails. Returns whether a destination's COPY
    could not start (the copy is to run again without it), and what interrupted the copy
    (see :attr:`CopyOutcome.interrupt`)."""
    started = time.monotonic()
    # Known to cancel() before the COPYs start: a stop while one waits to start (for a
    # lock) is then seen by the engine's own loop, which cancels from this thread.
    on_manager(manager)
    if run.stopped:
        manager.cancel()
    progress = _Progress(producer, receivers, started, plan.estimate)
    interrupt = None
    try:
        with contextlib.ExitStack() as stack:
            try:
                stack.enter_context(manager)
            except copyman.CopyFail as exc:
                return _start_failed(run, exc, receivers), None
            _pump(run, manager, receivers, progress)
    except copyman.CopyFail as exc:
        interrupt = _copy_failed(run, exc, receivers)
    finally:
        on_manager(None)
    _log_progress(run, progress, final=True)
    return False, interrupt


def _pump(
    run: Run, manager: copyman.CopyManager, receivers: Receivers, progress: _Progress
) -> None:
    interval = run.options.progress_interval
    next_log = progress.started + interval
    while True:
        try:
            for _ in manager:
                now = time.monotonic()
                if now >= next_log:
                    next_log = now + interval
                    _log_progress(run, progress)
                    run.tell_progress(_progress_now(run, progress, now))
            return
        except copyman.ReceiverFault as fault:
            for receiver, exc in fault.faults.items():
                run.drop(receivers[receiver].session, exc, "copying")
            if not manager.receivers:
                return


def _start_failed(run: Run, exc: copyman.CopyFail, receivers: Receivers) -> bool:
    """A COPY could not start: fail who caused it; True if the copy is to run again
    without the destinations whose COPY could not start."""
    if exc.producer_fault is not None:
        if classify.is_permanent(exc.producer_fault):
            raise ConfigError(
                run.redact(
                    f"source {run.origin.describe()}: {classify.describe(exc.producer_fault)}"
                )
            ) from exc.producer_fault
        for one in receivers.values():
            run.fail(one.target, exc.producer_fault, "starting the source's COPY")
        return False
    culprits = [r for r in exc.receiver_faults if r in receivers]
    for receiver in culprits:
        run.fail(receivers[receiver].target, exc.receiver_faults[receiver], "starting the COPY")
    for one in receivers.values():
        if not culprits:
            run.fail(one.target, exc, "starting the copy")
        rollback(one.conn)
    return bool(culprits)


def _copy_failed(
    run: Run, exc: copyman.CopyFail, receivers: Receivers
) -> BaseException | None:
    """Fail every destination the copy did not finish, with the cause that says most;
    returns what interrupted the copy, if it is not a failure of the copy."""
    cause = exc.__cause__
    interrupt = None
    if cause is not None and not isinstance(cause, Exception):
        # The copy was interrupted by something that is not a failure of the copy (the
        # task's execution_timeout, KeyboardInterrupt...): roll back, then re-raise it.
        interrupt = cause
    source_error: BaseException | None = exc.producer_fault
    if isinstance(cause, copyman.ProducerFault) and isinstance(cause.__cause__, Exception):
        # The server's own error (its SQLSTATE says whether a retry helps), not one the
        # engine met afterwards while aborting the source's COPY.
        source_error = cause.__cause__
    if source_error is not None and not run.stopped:
        # The source failed: name it, with the server's own words; the destinations
        # only stopped because of it (what their aborts met says nothing more).
        doing = f"source {run.origin.describe()} failed while copying"
        for one in receivers.values():
            if one.target.pending:
                run.fail(one.target, source_error, doing)
    for receiver, error in exc.receiver_faults.items():
        if receiver in receivers and receivers[receiver].target.pending:
            run.fail(receivers[receiver].target, error, "copying")
    reason: BaseException = exc
    if run.stopped or isinstance(cause, copyman.Cancelled):
        reason = copyman.Cancelled("the task was killed; the copy was cancelled")
    for one in receivers.values():
        if one.target.pending:
            run.fail(one.target, reason, "copying")
    for one in receivers.values():
        rollback(one.conn)
    return interrupt


def _progress_now(run: Run, progress: _Progress, now: float) -> Progress:
    copying = {id(one.target) for one in progress.receivers.values()}
    estimate = progress.estimate
    return Progress(
        progress.producer.rows,
        progress.producer.bytes,
        now - run.started,
        estimate.rows if estimate is not None else None,
        None,
        tuple(
            (t.label, "copying" if t.pending and id(t) in copying else t.result.status)
            for t in run.targets
        ),
    )


def _log_progress(run: Run, progress: _Progress, *, final: bool = False) -> None:
    elapsed = max(time.monotonic() - progress.started, 1e-6)
    producer = progress.producer
    run.log.info(
        "%s source %s: %d rows, %s, %s/s%s%s",
        "Done:" if final else "Progress:",
        run.origin.name,
        producer.rows,
        size(producer.bytes),
        size(producer.bytes / elapsed),
        _cap_note(run.options.max_bytes_per_second),
        "" if final else estimates.progress_note(progress.estimate, producer.rows, elapsed),
    )
    for receiver, one in progress.receivers.items():
        state = "copying"
        if final:
            state = "copied" if receiver.completed else one.target.result.status
        run.log.info(
            "  %s: %d rows, %s, %s/s (%s)",
            one.label,
            receiver.rows,
            size(receiver.bytes),
            size(receiver.bytes / elapsed),
            state,
        )
@dataclass(frozen=True)
class _Progress:
    """What the progress lines of one copy read."""

    producer: copyman.StatementProducer
    receivers: Mapping[copyman.Receiver, Loading]
    started: float
    estimate: estimates.SizeEstimate | None


def _cap_note(cap: float | None) -> str:
    return "" if cap is None else f" (capped at {size(cap)}/s)"
