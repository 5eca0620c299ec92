"""The exceptions of a copy: faults from ``__next__``, ``CopyFail`` from ``__exit__``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._fittings import Receiver
    from ._manager import CopyManager


class CopyUsageError(ValueError):
    """The copy was set up wrongly (bad statement, unusable connection, duplicate fitting).

    Raised before any data moves; nothing needs cleaning up.
    """

    __module__ = "airflow_copyman.copyman"


class Fault(Exception):
    """A producer or a receiver failed during the copy (raised only by ``__next__``)."""

    __module__ = "airflow_copyman.copyman"

    def __init__(self, manager: CopyManager) -> None:
        super().__init__(manager)
        self.manager = manager


class ProducerFault(Fault):
    """The producer raised; the original exception is ``__context__`` (and ``__cause__``).

    The manager changed no state: iteration may go on where that is safe.
    """

    __module__ = "airflow_copyman.copyman"

    def __str__(self) -> str:
        cause = self.__cause__ or self.__context__
        return f"producer {self.manager.producer!r} failed: {_describe(cause)}"


class ReceiverFault(Fault):
    """Receivers failed in this cycle; they have left ``manager.receivers``.

    ``faults`` maps each failed receiver to its exception. The other receivers go on.
    """

    __module__ = "airflow_copyman.copyman"

    def __init__(self, manager: CopyManager, faults: Mapping[Receiver, BaseException]) -> None:
        super().__init__(manager)
        self.faults: dict[Receiver, BaseException] = dict(faults)

    def __str__(self) -> str:
        parts = "; ".join(f"{r!r}: {_describe(exc)}" for r, exc in self.faults.items())
        return f"{len(self.faults)} receiver(s) faulted: {parts}"


class Cancelled(Exception):
    """``CopyManager.cancel()`` was called (for example by Airflow's ``on_kill``)."""

    __module__ = "airflow_copyman.copyman"


class ReceiverTimeout(TimeoutError):
    """A receiver made no progress for ``receiver_timeout`` seconds."""

    __module__ = "airflow_copyman.copyman"


class ProducerTimeout(TimeoutError):
    """The producer moved nothing for ``producer_timeout`` seconds (a stalled source)."""

    __module__ = "airflow_copyman.copyman"


class RowCountMismatch(Exception):
    """A server's COPY row count differs from the number of rows the copy moved.

    ``rows`` and ``source_rows``: the two counts compared, where a receiver's count was
    checked against the source's (None otherwise)."""

    __module__ = "airflow_copyman.copyman"

    def __init__(
        self, message: str, *, rows: int | None = None, source_rows: int | None = None
    ) -> None:
        super().__init__(message)
        self.rows, self.source_rows = rows, source_rows


class CopyFail(Exception):
    """The copy did not run to the producer's end; every unfinished COPY was aborted.

    ``receiver_faults`` maps receivers to what failed them (faults that dropped them and
    errors met while aborting them); ``producer_fault`` is the producer's failure, if any.
    """

    __module__ = "airflow_copyman.copyman"

    def __init__(
        self,
        manager: CopyManager,
        reason: str,
        *,
        receiver_faults: Mapping[Receiver, BaseException] | None = None,
        producer_fault: BaseException | None = None,
    ) -> None:
        super().__init__(reason)
        self.manager = manager
        self.reason = reason
        self.receiver_faults: dict[Receiver, BaseException] = dict(receiver_faults or {})
        self.producer_fault = producer_fault

    def __str__(self) -> str:
        text = self.reason
        if self.producer_fault is not None:
            text += f"; producer: {_describe(self.producer_fault)}"
        for r, exc in self.receiver_faults.items():
            text += f"; {r!r}: {_describe(exc)}"
        return text


def _describe(exc: BaseException | None) -> str:
    if exc is None:
        return "unknown error"
    message = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {message[0] if message else ''}".rstrip(": ")
