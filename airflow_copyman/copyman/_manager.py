"""The copy manager: one producer, many receivers, one thread, one wait loop.

Each cycle (``__next__``) first lets every receiver deliver what it can without blocking,
then reads one batch from the producer, queues it for every receiver and returns its
counts. The producer is read only while every receiver has room in its queue
(``queue_bytes``), so memory stays bounded and the copy runs at the pace of the slowest
receiver without any receiver waiting for the others between batches. When nothing can
move, the manager waits on all the sockets at once.
"""

from __future__ import annotations

import contextlib
import select
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
    ReceiverFault,
    ReceiverTimeout,
)
from ._fittings import Producer, Receiver, Wait
from ._statement import StatementProducer, StatementReceiver

#: Target size of one cycle's batch read from the producer.
BATCH_BYTES = 256 * 1024
#: Most data queued for one receiver before the producer waits for it to drain.
QUEUE_BYTES = 1024 * 1024
#: A receiver that makes no progress for this long faults.
RECEIVER_TIMEOUT = 300.0
#: Longest single wait, so that ``cancel()`` and time-outs are noticed promptly.
MAX_WAIT = 0.5


class CopyManager:
    """Moves COPY data from one producer to many receivers.

    A context manager (``__enter__`` starts every COPY, ``__exit__`` finishes or aborts
    them) and an iterator yielding ``(num_messages, num_bytes)`` per cycle: the records and
    payload bytes read from the producer and queued for every receiver in that cycle.

    :param producer: where the records come from.
    :param receivers: where they go; each one at most once.
    :param receiver_timeout: seconds a receiver may make no progress before it faults.
    :param batch_bytes: size of the batch read from the producer in one cycle.
    :param queue_bytes: most data queued for a receiver before the producer waits.
    """

    def __init__(
        self,
        producer: Producer,
        *receivers: Receiver,
        receiver_timeout: float = RECEIVER_TIMEOUT,
        batch_bytes: int = BATCH_BYTES,
        queue_bytes: int = QUEUE_BYTES,
    ) -> None:
        _check_fittings(producer, receivers)
        if receiver_timeout <= 0 or batch_bytes <= 0 or queue_bytes <= 0:
            raise CopyUsageError("receiver_timeout, batch_bytes and queue_bytes must be positive")
        self.producer = producer
        producer.keep_records = any(r.needs_records for r in receivers)
        self.receivers: set[Receiver] = set(receivers)
        self.receiver_timeout = receiver_timeout
        self.batch_bytes = batch_bytes
        self.queue_bytes = queue_bytes
        #: Receivers dropped by a fault and not reconciled, with what failed them.
        self.faults: dict[Receiver, BaseException] = {}
        self._all = list(receivers)  # in the caller's order, for stable reporting
        self._state = "new"  # new -> running -> complete | exited
        self._cycles_since_fault: dict[Receiver, int] = {}
        self._cycle = 0
        self._cancel = threading.Event()
        self._entering = False  # inside __enter__, where COPYs start (and may block)
        self._waits: dict[Receiver, Wait] = {}

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
        started: list[Producer | Receiver] = []
        self._entering = True
        try:
            # Receivers first: a source COPY started before a receiver fails would have to
            # be cancelled again.
            for receiver in self._all:
                receiver.start()
                started.append(receiver)
            self.producer.start()
            started.append(self.producer)
        except BaseException as exc:
            self._state = "exited"
            for fitting in started:
                _quietly(fitting.abort, exc)
                _quietly(fitting.close)
            culprit = next((f for f in [*self._all, self.producer] if f not in started), None)
            raise CopyFail(
                self,
                f"could not start the copy at {culprit!r}: {type(exc).__name__}: {exc}",
                receiver_faults={culprit: exc} if isinstance(culprit, Receiver) else None,
                producer_fault=exc if culprit is self.producer else None,
            ) from exc
        finally:
            self._entering = False
        return self

    def __exit__(
        self,
        typ: type[BaseException] | None,
        val: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._state == "complete" and typ is None:
            self._state = "exited"
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
        producer_fault: BaseException | None = None
        try:
            self.producer.abort(val)
        except Exception as exc:
            producer_fault = exc
        receiver_faults = dict(self.faults)
        for receiver in self._all:
            if receiver.completed:
                continue
            try:
                receiver.abort(val)
            except Exception as exc:
                receiver_faults.setdefault(receiver, exc)
        self._close_all()
        if isinstance(val, ProducerFault) and producer_fault is None:
            producer_fault = val.__cause__ or val.__context__
        raise CopyFail(
            self, reason, receiver_faults=receiver_faults, producer_fault=producer_fault
        ) from val

    def _close_all(self) -> None:
        _quietly(self.producer.close)
        for receiver in self._all:
            _quietly(receiver.close)

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
                self._wait(want_producer=False)
                continue
            try:
                batch = producer.read(self.batch_bytes)
            except Exception as exc:
                raise ProducerFault(self) from exc
            if producer.done:
                for receiver in self.receivers:
                    receiver.end(producer.rows)
            if batch is not None:
                self._cycle += 1
                for receiver in self.receivers:
                    receiver.accept(batch)
                # Faults surface at the start of a cycle, before its read, so no cycle's
                # counts are ever lost to one (a defect of the original engine).
                return batch.rows, batch.nbytes
            if not producer.done:
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
            if wait is not Wait.READY and now - receiver.progress_at > self.receiver_timeout:
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
                # Its COPY cannot be resumed: end it now, so its connection is usable at
                # once (after a rollback) and the server keeps nothing of it.
                try:
                    receiver.abort(exc)
                except Exception as abort_exc:
                    exc.add_note(f"aborting its COPY failed too: {abort_exc!r}")
                _quietly(receiver.close)
            _note_kept(receiver, exc)

    def _wait(self, *, want_producer: bool) -> None:
        """Block until a socket can move data, a receiver times out, or MAX_WAIT passes."""
        rlist: list[int] = []
        wlist: list[int] = []
        if want_producer and (fd := self.producer.fileno()) is not None:
            rlist.append(fd)
        deadline = time.monotonic() + MAX_WAIT
        for receiver in self.receivers:
            wait = self._waits.get(receiver, Wait.READY)
            if wait is Wait.READY or (fd := receiver.fileno()) is None:
                continue
            (rlist if wait is Wait.READ else wlist).append(fd)
            deadline = min(deadline, receiver.progress_at + self.receiver_timeout)
        if not rlist and not wlist:
            return
        timeout = max(0.0, deadline - time.monotonic())
        select.select(rlist, wlist, [], timeout)

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
        """Stop the copy from another thread or a signal handler (Airflow's ``on_kill``).

        The running ``__next__`` raises ``Cancelled`` within ``MAX_WAIT`` seconds and
        ``__exit__`` aborts every COPY. Servers are sent cancel requests only while the
        copy is starting (a COPY may wait there for a lock): once the loop runs it never
        blocks, and a cancel request that arrived after the abort would cancel whatever
        the connection runs next (the caller's rollback or its next query).
        """
        self._cancel.set()
        if not self._entering:
            return
        for fitting in [self.producer, *self._all]:
            conn = getattr(fitting, "connection", None)
            if (
                isinstance(conn, psycopg.Connection)
                and not conn.closed
                and conn.pgconn.transaction_status == psycopg.pq.TransactionStatus.ACTIVE
            ):
                _quietly(conn.cancel_safe, timeout=2.0)

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
            f"{receiver!r} had been sent {receiver.rows} rows; its COPY was aborted, "
            "so its transaction keeps none of them"
        )


def _quietly(func: Any, *args: Any, **kwargs: Any) -> None:
    with contextlib.suppress(Exception):
        func(*args, **kwargs)
