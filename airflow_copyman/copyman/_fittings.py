"""Producers and receivers: the two ends of a copy, and the ones that need no database.

A fitting does its I/O in small non-blocking steps and says what it waits for
(:class:`Wait`); the manager owns the waiting, as psycopg separates its protocol
generators from its wait functions. That is what lets one thread feed many receivers
concurrently without one slow receiver stalling the others.
"""

from __future__ import annotations

import enum
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator
from typing import Any

from psycopg.abc import Buffer

from ._errors import CopyUsageError, RowCountMismatch
from ._records import Batch, RowCounter


class Wait(enum.Enum):
    """What a fitting needs before its next step can make progress."""

    READY = 0  # nothing pending: no need to wait for this fitting
    READ = 1  # its socket must become readable
    WRITE = 2  # its socket must become writable
    READ_WRITE = 3  # either (a statement flushing its query also reads what comes meanwhile)


class Fitting:
    """What producers and receivers share. A fitting takes part in one copy only."""

    _started = False

    def _mark_started(self) -> None:
        if self._started:
            raise CopyUsageError(f"{self!r} was already used in a copy; make a new one")
        self._started = True

    def fileno(self) -> int | None:
        """The socket to wait on when the fitting cannot move on; None if it never blocks."""
        return None

    def connection_key(self) -> object | None:
        """The connection this fitting drives, so that two fittings never share one."""
        return None

    def abort(self, reason: BaseException | None) -> None:
        """Stop early so that nothing of the copy is kept. May block briefly."""

    # The manager drives starting and aborting as steps (generators yielding the socket
    # and what they wait for), so that it can run them for every fitting at once. A
    # fitting that only implements the blocking ``start``/``abort`` needs nothing more.

    def starting(self) -> Generator[tuple[int, Wait], None, None]:
        """``start`` as steps; by default, ``start`` itself."""
        self.start()
        yield from ()

    def aborting(self, reason: BaseException | None) -> Generator[tuple[int, Wait], None, None]:
        """``abort`` as steps; by default, ``abort`` itself."""
        self.abort(reason)
        yield from ()

    def abandon(self) -> None:
        """Its abort did not finish in time: give up on it (a statement closes its connection)."""

    def start(self) -> None:
        """Begin (for a statement: start its COPY). May block."""
        self._mark_started()

    def close(self) -> None:
        """Release what ``start`` took (after completion or abort)."""


class Producer(Fitting, ABC):
    """The source of COPY records."""

    def __init__(self) -> None:
        self.rows = 0  # rows produced so far (binary header and trailer excluded)
        self.bytes = 0  # record payload bytes produced so far
        self.done = False  # the producer reached its real end (and verified it)
        #: Whether batches must keep their list of records (set when a receiver needs them).
        self.keep_records = True
        self._counter = RowCounter()

    def start(self) -> None:
        """Begin producing (for a statement: start its COPY). May block."""
        self._mark_started()

    def read(self, max_bytes: int) -> Batch | None:
        """The next batch of about ``max_bytes``, or None if none is ready yet or at the end
        (then ``done`` is set). Must not block. A batch larger than ``max_bytes`` is paid in
        full under a bandwidth cap (``StatementProducer`` returns one only when its first
        record alone is larger)."""
        batch = self._read_batch(max_bytes)
        if batch is not None:
            self.rows += batch.rows
            self.bytes += batch.nbytes
        return batch

    def _read_batch(self, max_bytes: int) -> Batch | None:
        records = self._read_records(max_bytes)
        if not records:
            return None
        return Batch.of_records(records, self._counter.count(records))

    def _read_records(self, max_bytes: int) -> list[Buffer]:
        """The next records (empty at the end); override this or ``_read_batch``."""
        raise NotImplementedError


class Receiver(Fitting, ABC):
    """A consumer of COPY records: keeps a bounded queue and delivers it step by step."""

    #: Whether a receiver dropped by a fault may rejoin the copy through ``reconcile``.
    reconcilable = True
    #: Whether it needs each batch's list of records (or only the joined stream).
    needs_records = True

    def __init__(self) -> None:
        self.rows = 0  # rows delivered
        self.bytes = 0  # record payload bytes delivered
        self.completed = False  # delivered everything and verified the end of its copy
        self.progress_at = time.monotonic()
        self._queue: deque[Batch] = deque()
        self._queued_bytes = 0
        self._expected_rows: int | None = None  # set when the producer reached its end

    def start(self) -> None:
        """Begin receiving (for a statement: start its COPY). May block."""
        self._mark_started()
        self.progress_at = time.monotonic()

    def accept(self, batch: Batch) -> None:
        """Queue a batch for delivery. Never does I/O."""
        self._queue.append(batch)
        self._queued_bytes += batch.nbytes

    @property
    def queued_bytes(self) -> int:
        return self._queued_bytes

    def end(self, expected_rows: int) -> None:
        """The producer finished: once the queue is delivered, complete the copy."""
        self._expected_rows = expected_rows

    def _delivered(self, batch: Batch) -> None:
        """Bookkeeping once a batch left the queue for good."""
        self._queue.popleft()
        self._queued_bytes -= batch.nbytes
        self.rows += batch.rows
        self.bytes += batch.nbytes
        self.progress_at = time.monotonic()

    @abstractmethod
    def transmit(self) -> Wait:
        """Make what progress is possible without blocking; raise on failure."""

    def _check_rows(self, server_rows: int | None = None) -> None:
        expected = self._expected_rows
        got = self.rows if server_rows is None else server_rows
        if expected is not None and got != expected:
            raise RowCountMismatch(
                f"{self!r} received {got} rows, but the source produced {expected}",
                rows=got, source_rows=expected,
            )


class IteratorProducer(Producer):
    """Produces from an iterable of chunks; a chunk is a list of COPY records (bytes)."""

    def __init__(self, iterable: Iterable[Iterable[Buffer]]) -> None:
        super().__init__()
        self._iterable = iterable
        self._iterator: Iterator[Iterable[Buffer]] | None = None

    def start(self) -> None:
        super().start()
        self._iterator = iter(self._iterable)

    def _read_records(self, max_bytes: int) -> list[Buffer]:
        assert self._iterator is not None, "start() first"
        # One chunk a cycle, as given: the chunking is the caller's choice. Empty chunks
        # are skipped so that a cycle always moves something.
        for chunk in self._iterator:
            records = list(chunk)
            if records:
                return records
        self.done = True
        return []

    def __repr__(self) -> str:
        return f"IteratorProducer({self._iterable!r})"


class NullProducer(Producer):
    """Produces nothing: the copy ends at once."""

    def _read_records(self, max_bytes: int) -> list[Buffer]:
        self.done = True
        return []

    def __repr__(self) -> str:
        return "NullProducer()"


class CallReceiver(Receiver):
    """Calls ``callable(records)`` with the list of records (bytes) of each cycle."""

    def __init__(self, callable: Callable[[list[bytes]], Any]) -> None:
        super().__init__()
        self.callable = callable

    def transmit(self) -> Wait:
        # A batch leaves the queue only once the call returned: after a failure the same
        # records are given again on reconcile, so nothing is lost.
        while self._queue:
            batch = self._queue[0]
            self.callable(batch.record_list())
            self._delivered(batch)
        if self._expected_rows is not None and not self.completed:
            self._check_rows()
            self.completed = True
        return Wait.READY

    def __repr__(self) -> str:
        name = getattr(self.callable, "__qualname__", None) or repr(self.callable)
        return f"CallReceiver({name})"


class NullReceiver(CallReceiver):
    """Discards everything (and still counts it)."""

    def __init__(self) -> None:
        super().__init__(_discard)

    def __repr__(self) -> str:
        return "NullReceiver()"


def _discard(records: list[bytes]) -> None:
    del records
