"""The copy manager: one producer, many receivers, one thread, one wait loop.

Each cycle (``__next__``) first lets every receiver deliver what it can without blocking,
then reads one batch from the producer, queues it for every receiver and returns its
counts. The producer is read only while every receiver has room in its queue
(``queue_bytes``), so memory stays bounded and the copy runs at the pace of the slowest
receiver without any receiver waiting for the others between batches. Under a bandwidth
cap (``_pace``) it is also read only while the cap allows. When nothing can move, the
manager waits on all the sockets at once (and for the cap, with a deadline). Starting,
cancelling and ending COPYs are protocol steps too (``_steps``): the same loop runs them for
every connection at once.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Iterable
from types import TracebackType
from typing import Any

import psycopg
from psycopg.abc import Query

from ._errors import (
    Cancelled,
    CopyFail,
    CopyUsageError,
    ProducerFault,
    ProducerTimeout,
    ReceiverFault,
    ReceiverTimeout,
)
from ._fittings import Fitting, Producer, Receiver, Wait
from ._limits import ABORT_TIMEOUT, MAX_WAIT
from ._pace import Pace
from ._session import check_sessions
from ._statement import StatementProducer, StatementReceiver
from ._steps import Driver, Step, select_fds

#: Target size of one cycle's batch read from the producer.
BATCH_BYTES = 256 * 1024
#: Most data queued for one receiver before the producer waits for it to drain.
QUEUE_BYTES = 1024 * 1024
#: A receiver that makes no progress for this long faults.
RECEIVER_TIMEOUT = 300.0


class CopyManager:
    """Moves COPY data from one producer to many receivers.

    A context manager (``__enter__`` starts every COPY, ``__exit__`` finishes or aborts
    them) and an iterator yielding ``(num_messages, num_bytes)`` per cycle: the records and
    payload bytes read from the producer and queued for every receiver in that cycle.

    :param producer: where the records come from.
    :param receivers: where they go; each one at most once.
    :param receiver_timeout: seconds a receiver may make no progress (or its COPY take to
        start) before it faults.
    :param producer_timeout: seconds the producer may move nothing while the copy waits for
        it (or its COPY take to start) before it faults; ``receiver_timeout`` by default.
    :param batch_bytes: size of the batch read from the producer in one cycle.
    :param queue_bytes: most data queued for a receiver before the producer waits.
    :param max_bytes_per_second: the cap: at most this many bytes read from the producer
        in any one-second window and on average since the start (``_pace``); None (the
        default): no cap. The time the cap makes the copy wait is nobody's stall: it counts
        towards no time-out.

    Before anything runs, the fittings' database sessions are checked (``_session``): a
    session that would change the data in flight is refused with ``CopyUsageError``.
    """

    def __init__(
        self,
        producer: Producer,
        *receivers: Receiver,
        receiver_timeout: float = RECEIVER_TIMEOUT,
        producer_timeout: float | None = None,
        batch_bytes: int = BATCH_BYTES,
        queue_bytes: int = QUEUE_BYTES,
        max_bytes_per_second: float | None = None,
    ) -> None:
        _check_fittings(producer, receivers)
        if producer_timeout is None:
            producer_timeout = receiver_timeout
        for name, value in (
            ("receiver_timeout", receiver_timeout),
            ("producer_timeout", producer_timeout),
            ("batch_bytes", batch_bytes),
            ("queue_bytes", queue_bytes),
        ):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise CopyUsageError(f"{name} must be a positive number, got {value!r}")
        cap = max_bytes_per_second
        if cap is not None and (
            isinstance(cap, bool) or not isinstance(cap, (int, float)) or not math.isfinite(cap)
            or cap <= 0
        ):
            raise CopyUsageError(
                f"max_bytes_per_second must be a positive number or None, got {cap!r}"
            )
        check_sessions(producer, receivers, timeout=min(receiver_timeout, producer_timeout))
        self.producer = producer
        producer.keep_records = any(r.needs_records for r in receivers)
        self.receivers: set[Receiver] = set(receivers)
        self.receiver_timeout = receiver_timeout
        self.producer_timeout = producer_timeout
        self.batch_bytes = batch_bytes
        self.queue_bytes = queue_bytes
        self.max_bytes_per_second = cap
        self._pace = Pace(cap, batch_bytes) if cap is not None else None
        #: Receivers dropped by a fault and not reconciled, with what failed them.
        self.faults: dict[Receiver, BaseException] = {}
        self._all = list(receivers)  # in the caller's order, for stable reporting
        self._state = "new"  # new -> running -> complete | exited
        self._cycles_since_fault: dict[Receiver, int] = {}
        self._cycle = 0
        self._cancel = threading.Event()
        self._waits: dict[Receiver, Wait] = {}
        self._producer_progress_at = time.monotonic()
        # COPYs being ended (faulted receivers during the copy, everything at its end),
        # and what went wrong doing it.
        self._aborts: Driver[Fitting] = Driver({})
        self._abort_errors: dict[Fitting, BaseException] = {}

    # Introspection.

    @property
    def completed(self) -> set[Receiver]:
        """Receivers whose copy completed and was verified."""
        return {r for r in self._all if r.completed}

    def __repr__(self) -> str:
        count = len(self.receivers)
        return f"<CopyManager {self.producer!r} -> {count} receiver(s), {self._state}>"

    # Context manager.

    def __enter__(self) -> CopyManager:
        if self._state != "new":
            raise CopyUsageError("a CopyManager runs one copy; make a new one")
        self._state = "running"
        started: list[Fitting] = []
        # Receivers first (all at once): a source COPY started before a receiver fails
        # would have to be cancelled again.
        failure: tuple[Fitting | None, BaseException] | None
        try:
            failure = self._start(self._all, self.receiver_timeout, ReceiverTimeout, started)
            if failure is None:
                failure = self._start(
                    [self.producer], self.producer_timeout, ProducerTimeout, started
                )
        except BaseException as interrupt:  # KeyboardInterrupt while starting
            failure = None, interrupt
        if failure is not None:
            culprit, exc = failure
            self._state = "exited"
            self._finish_aborts(started, exc)
            self._close_all()
            if isinstance(exc, Cancelled):
                reason = "the copy was cancelled while its COPYs started"
            elif culprit is None:
                reason = f"the copy was interrupted while its COPYs started: {exc!r}"
            else:
                reason = f"could not start the copy at {culprit!r}: {type(exc).__name__}: {exc}"
            raise CopyFail(
                self,
                reason,
                receiver_faults={culprit: exc} if isinstance(culprit, Receiver) else None,
                producer_fault=exc if culprit is self.producer else None,
            ) from exc
        self._producer_progress_at = time.monotonic()
        return self

    def _start(
        self,
        fittings: list[Producer] | list[Receiver],
        timeout: float,
        timeout_error: type[TimeoutError],
        started: list[Fitting],
    ) -> tuple[Fitting | None, BaseException] | None:
        """Start the fittings' COPYs together; the first failure, if any (None: cancelled)."""
        deadline = time.monotonic() + timeout
        driver: Driver[Fitting] = Driver({f: Step(f.starting(), deadline) for f in fittings})
        started.extend(fittings)  # a start under way must be aborted too
        driver.run(self._cancel.is_set, stop_on_error=True)
        for fitting, step in driver.finished.items():
            if step.error is not None:
                return fitting, step.error
        for fitting in driver.expired:
            return fitting, timeout_error(f"{fitting!r}: its COPY did not start in {timeout:g} s")
        if self._cancel.is_set():
            return None, Cancelled("the copy was cancelled")
        return None

    def __exit__(
        self,
        typ: type[BaseException] | None,
        val: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._state == "complete" and typ is None:
            self._state = "exited"
            self._finish_aborts([], None)
            self._close_all()
            return
        if self._state == "exited":
            return
        self._state = "exited"
        if typ is not None:
            reason = f"the copy was interrupted by {typ.__name__}: {val}"
        elif not self.receivers:
            reason = "no receivers left: every receiver faulted"
        else:
            reason = "the copy was abandoned before the producer's end"
        unfinished = [r for r in self._all if not r.completed]
        self._finish_aborts([self.producer, *unfinished], val)
        self._close_all()
        producer_fault = self._abort_errors.get(self.producer)
        receiver_faults = dict(self.faults)
        for receiver in unfinished:
            if receiver in self._abort_errors:
                receiver_faults.setdefault(receiver, self._abort_errors[receiver])
        if isinstance(val, ProducerFault) and producer_fault is None:
            producer_fault = val.__cause__ or val.__context__
        raise CopyFail(
            self, reason, receiver_faults=receiver_faults, producer_fault=producer_fault
        ) from val

    def _close_all(self) -> None:
        _quietly(self.producer.close)
        for receiver in self._all:
            _quietly(receiver.close)

    # Ending COPYs early: protocol steps like the others, all in the one wait loop.

    def _begin_abort(self, fitting: Fitting, reason: BaseException | None) -> None:
        aborts = self._aborts
        if fitting in aborts.pending or fitting in aborts.finished or fitting in aborts.expired:
            return
        aborts.pending[fitting] = Step(
            fitting.aborting(reason), time.monotonic() + ABORT_TIMEOUT
        )

    def _finish_aborts(self, fittings: list[Fitting], reason: BaseException | None) -> None:
        """Abort the fittings (and finish aborts under way) together, with one deadline."""
        for fitting in fittings:
            self._begin_abort(fitting, reason)
        self._aborts.run()
        self._record_aborts()

    def _record_aborts(self) -> None:
        aborts = self._aborts
        for fitting in aborts.expired:
            if fitting not in self._abort_errors:
                _quietly(fitting.abandon)
                self._abort_errors[fitting] = TimeoutError(
                    f"{fitting!r}: its server did not answer the abort in "
                    f"{ABORT_TIMEOUT:g} s; the connection was closed"
                )
                self._note_abort(fitting)
        for fitting, step in aborts.finished.items():
            if step.error is not None and fitting not in self._abort_errors:
                self._abort_errors[fitting] = step.error
                self._note_abort(fitting)

    def _note_abort(self, fitting: Fitting) -> None:
        fault = self.faults.get(fitting) if isinstance(fitting, Receiver) else None
        if fault is not None:
            fault.add_note(f"aborting its COPY failed too: {self._abort_errors[fitting]!r}")

    # Iteration.

    def __iter__(self) -> CopyManager:
        return self

    def __next__(self) -> tuple[int, int]:
        if self._state == "complete":
            raise StopIteration
        if self._state != "running":
            raise CopyUsageError("iterate a CopyManager inside its with-block")
        producer = self.producer
        while True:
            if self._cancel.is_set():
                raise Cancelled("the copy was cancelled")
            self._service_receivers()
            if not self.receivers:
                raise StopIteration
            if producer.done:
                if all(r.completed for r in self.receivers):
                    self._state = "complete"
                    raise StopIteration
                self._wait(want_producer=False)
                continue
            if any(r.queued_bytes >= self.queue_bytes for r in self.receivers):
                # Waiting for receivers is not the producer's stall.
                self._producer_progress_at = time.monotonic()
                self._wait(want_producer=False)
                continue
            max_bytes = self.batch_bytes
            pace = self._pace
            if pace is not None:
                now = time.monotonic()
                if (delay := pace.delay(now)) > 0:
                    self._wait(want_producer=False, until=now + delay)
                    # Waiting for the cap is not the producer's stall: its clock starts now.
                    self._producer_progress_at = time.monotonic()
                    continue
                max_bytes = pace.step
            try:
                batch = producer.read(max_bytes)
            except Exception as exc:
                raise ProducerFault(self) from exc
            if pace is not None and batch is not None:
                pace.spent(now, batch.nbytes)
            if producer.done:
                for receiver in self.receivers:
                    receiver.end(producer.rows)
            if batch is not None:
                self._producer_progress_at = time.monotonic()
                self._cycle += 1
                for receiver in self.receivers:
                    receiver.accept(batch)
                # Faults surface at the start of a cycle, before its read, so no cycle's
                # counts are ever lost to one (a defect of the original engine).
                return batch.rows, batch.nbytes
            if not producer.done:
                if time.monotonic() - self._producer_progress_at > self.producer_timeout:
                    self._producer_progress_at = time.monotonic()  # a new term if iterated on
                    raise ProducerFault(self) from ProducerTimeout(
                        f"{producer!r} moved nothing for {self.producer_timeout:g} s"
                    )
                self._wait(want_producer=True)

    def _service_receivers(self) -> None:
        """Let each receiver move what it can; drop and report those that fail."""
        faults: dict[Receiver, BaseException] = {}
        now = time.monotonic()
        for receiver in list(self.receivers):
            try:
                wait = receiver.transmit()
            except Exception as exc:
                faults[receiver] = exc
                continue
            self._waits[receiver] = wait
            if wait is Wait.READY:
                # Nothing to send is not a stall: its clock starts when it has data again
                # (after a wait for the producer or the cap, however long).
                receiver.progress_at = max(receiver.progress_at, now)
            elif now - receiver.progress_at > self.receiver_timeout:
                faults[receiver] = ReceiverTimeout(
                    f"{receiver!r} made no progress for {self.receiver_timeout:g} s"
                )
        if faults:
            self._drop(faults)
            raise ReceiverFault(self, faults)

    def _drop(self, faults: dict[Receiver, BaseException]) -> None:
        for receiver, exc in faults.items():
            self.receivers.discard(receiver)
            self._waits.pop(receiver, None)
            self.faults[receiver] = exc
            self._cycles_since_fault[receiver] = self._cycle
            if not receiver.reconcilable:
                self._begin_abort(receiver, exc)
            _note_kept(receiver, exc)
        if not self._aborts.pending:
            return
        # Their COPYs cannot be resumed: end them now (cancel, then read each one's end, all
        # at once with one deadline) and release their connections, so that the caller can
        # roll each back as soon as it sees the fault and the server keeps nothing. The
        # others' clocks stop meanwhile: that pause is not theirs.
        paused = time.monotonic()
        self._aborts.run()
        self._record_aborts()
        for receiver in faults:
            if not receiver.reconcilable:
                _quietly(receiver.close)
        pause = time.monotonic() - paused
        for receiver in self.receivers:
            receiver.progress_at += pause
        self._producer_progress_at += pause

    def _wait(self, *, want_producer: bool, until: float | None = None) -> None:
        """Block until a socket can move data, a time-out comes, ``until`` (the cap
        allows a read) or MAX_WAIT passes."""
        wants: list[tuple[int, Wait]] = []
        now = time.monotonic()
        deadline = now + MAX_WAIT
        if until is not None:
            deadline = min(deadline, until)
        if want_producer and (fd := self.producer.fileno()) is not None:
            wants.append((fd, Wait.READ))
            deadline = min(deadline, self._producer_progress_at + self.producer_timeout)
        for receiver in self.receivers:
            wait = self._waits.get(receiver, Wait.READY)
            if wait is Wait.READY or (fd := receiver.fileno()) is None:
                continue
            wants.append((fd, wait))
            deadline = min(deadline, receiver.progress_at + self.receiver_timeout)
        if wants:
            select_fds(wants, deadline - time.monotonic())
        elif until is not None:
            time.sleep(max(0.0, deadline - time.monotonic()))

    # Control.

    def reconcile(self, receiver: Receiver) -> None:
        """Put a faulted receiver back, first re-sending the records it had not taken.

        Must come before the next cycle (the records of later cycles were not kept for it).
        """
        if receiver not in self._all:
            raise CopyUsageError(f"{receiver!r} is not a receiver of this copy")
        if receiver not in self.faults:
            raise CopyUsageError(f"{receiver!r} has not faulted; nothing to reconcile")
        if not receiver.reconcilable:
            raise CopyUsageError(
                f"{receiver!r} cannot be reconciled: its COPY was aborted when it faulted"
            )
        if self._cycles_since_fault[receiver] != self._cycle:
            raise CopyUsageError(
                f"{receiver!r} cannot be reconciled: the copy moved on since it faulted, and "
                "the records of those cycles were not kept for it"
            )
        try:
            receiver.transmit()
        except Exception as exc:
            self.faults[receiver] = exc
            raise ReceiverFault(self, {receiver: exc}) from exc
        receiver.progress_at = time.monotonic()
        del self.faults[receiver]
        self.receivers.add(receiver)
        if self.producer.done:
            receiver.end(self.producer.rows)

    def cancel(self) -> None:
        """Stop the copy; safe from another thread or a signal handler (Airflow's ``on_kill``).

        It only asks: the thread running the copy notices within ``MAX_WAIT`` seconds
        (``__next__`` raises ``Cancelled``; a start under way stops and ``__enter__``
        raises ``CopyFail``), and ``__exit__`` then ends every COPY on every server: a
        cancel request from that thread for each unfinished one (so that a busy server
        stops too), waited for, then the COPY's end read. A request sent that way can
        never cancel whatever the caller runs next on the connection.
        """
        self._cancel.set()

    def run(self) -> None:
        """Perform the whole copy; raises only ``CopyFail``."""
        with self:
            for _ in self:
                pass


def transfer(
    producer: Producer | tuple[psycopg.Connection[Any], Query],
    *receivers: Receiver | tuple[psycopg.Connection[Any], Query],
    **options: Any,
) -> tuple[int, int]:
    """Run a whole copy; return ``(total_rows, total_bytes)`` moved.

    A ``(connection, sql)`` pair stands for a ``StatementProducer`` or ``StatementReceiver``.
    The callers own the transactions: commit the receivers' connections afterwards (or use
    autocommit connections, where each COPY commits when it completes).
    """
    if isinstance(producer, tuple):
        producer = StatementProducer(*producer)
    fittings = [StatementReceiver(*r) if isinstance(r, tuple) else r for r in receivers]
    CopyManager(producer, *fittings, **options).run()
    return producer.rows, producer.bytes


def _check_fittings(producer: Producer, receivers: Iterable[Receiver]) -> None:
    if not isinstance(producer, Producer):
        raise CopyUsageError(f"the producer must be a Producer, got {producer!r}")
    seen: set[int] = set()
    connections: dict[int, Producer | Receiver] = {}
    key = producer.connection_key()
    if key is not None:
        connections[id(key)] = producer
    for receiver in receivers:
        if not isinstance(receiver, Receiver):
            raise CopyUsageError(f"a receiver must be a Receiver, got {receiver!r}")
        if id(receiver) in seen:
            raise CopyUsageError(f"{receiver!r} is given twice")
        seen.add(id(receiver))
        key = receiver.connection_key()
        if key is not None:
            other = connections.setdefault(id(key), receiver)
            if other is not receiver:
                raise CopyUsageError(
                    f"{receiver!r} and {other!r} share a connection; each needs its own"
                )


def _note_kept(receiver: Receiver, exc: BaseException) -> None:
    """Say what the failed receiver had been given, for the user who reads the fault."""
    if receiver.reconcilable:
        exc.add_note(f"{receiver!r} took {receiver.rows} rows; the rest is kept for reconcile()")
    else:
        exc.add_note(
            f"{receiver!r} had been sent {receiver.rows} rows; its COPY is aborted, "
            "so its transaction keeps none of them"
        )


def _quietly(func: Any, *args: Any, **kwargs: Any) -> None:
    with contextlib.suppress(Exception):
        func(*args, **kwargs)
