"""Waits that end: deadline-bounded statements, commits waited for together, and a stop
that cancels on the servers from the thread that owns the connections.

A transfer's connections are :class:`BoundedConnection` objects. Once the transfer gives
one its :class:`Bounds`, every statement psycopg runs on it (``execute``, ``commit``,
``rollback``, a COPY's start) waits in :func:`_wait`: psycopg's generator runs as a step of
the engine's one driver (:class:`airflow_copyman.copyman.Driver`, with its limits), whose
deadline does not abandon the statement but cancels it and goes on reading its end. It ends:

* when the server answers (as psycopg's own wait does);
* when the transfer is asked to stop (``on_kill``): the waiting thread, which owns the
  connection, sends the server a cancel, waits for libpq to have passed it on, then reads
  the statement's end. The cancel reached the server before anything new was sent, so it
  can never hit a later statement (PostgreSQL drops a cancel that arrives while the backend
  waits for a new command), and the connection stays usable after a rollback;
* when the server gave no answer for ``Bounds.timeout`` seconds (a stalled link, a
  server that accepts TCP and never answers, a lock wait): the same cancel, then
  :class:`StatementTimeout` (transient). A connection whose statement does not end even
  then is closed: its state is unknown.

Connecting is bounded by the connection's ``connect_timeout`` (default
:data:`CONNECT_TIMEOUT`); :func:`connect_all` connects everywhere at once and stops
waiting when asked to. :func:`commit_all` runs every COMMIT as a step of the engine's
one driver (:class:`airflow_copyman.copyman.Driver`): all are sent at once and their replies
waited for together, so one destination slow to answer never holds the others.

This module imports no Airflow module.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Generator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from typing import Any, TypeVar

import psycopg
from psycopg import errors as e
from psycopg import pq
from psycopg.waiting import Ready
from psycopg.waiting import Wait as WaitFor

from airflow_copyman import copyman

#: Seconds to wait for a connection when the connection sets no ``connect_timeout``
#: (psycopg's own default is 130 s: two addresses, a 65 s SYN timeout each).
CONNECT_TIMEOUT = 30
#: The waits' limits, named once for the engine and the load layer.
POLL = copyman.POLL
CANCEL_WAIT = copyman.CANCEL_WAIT

RV = TypeVar("RV")
T = TypeVar("T")


class StatementTimeout(psycopg.OperationalError):
    """The server gave no answer within the deadline (transient: a retry may succeed)."""


@dataclass
class Bounds:
    """How long a transfer's statements may wait, and the flag that stops them."""

    timeout: float
    stop: threading.Event = field(default_factory=threading.Event)


class BoundedConnection(psycopg.Connection[Any]):
    """A psycopg connection whose statements wait within :class:`Bounds` (once given)."""

    bounds: Bounds | None = None
    #: Whether a stop already sent this connection's cancel (a stop cancels once: the
    #: rollback after it must run, not be cancelled in turn).
    stop_handled: bool = False

    def wait(
        self, gen: Generator[Any, Any, RV], interval: float = POLL, timeout: float | None = None
    ) -> RV:
        if self.bounds is None or timeout is not None:
            return super().wait(gen, interval, timeout)
        return _wait(self, gen, self.bounds)


def connect_args(conn_args: dict[str, Any]) -> dict[str, Any]:
    """``conn_args`` with the default connect timeout where none is set."""
    if conn_args.get("connect_timeout") in (None, "") and "PGCONNECT_TIMEOUT" not in os.environ:
        return {**conn_args, "connect_timeout": CONNECT_TIMEOUT}
    return conn_args


def _wait(conn: BoundedConnection, gen: Generator[Any, Any, RV], bounds: Bounds) -> RV:
    """Run psycopg's generator ``gen`` as a step of the engine's one driver
    (:class:`airflow_copyman.copyman.Driver`): its deadline and a stop cancel the statement
    (:class:`_Statement`), which then goes on as a step that reads its end."""
    statement = _Statement(conn, bounds)
    step = copyman.Step(
        _as_step(gen, conn.pgconn.socket),
        time.monotonic() + bounds.timeout,
        on_expire=statement.on_deadline,
    )
    driver = copyman.Driver({0: step})
    driver.run(statement.stop_asked)
    if driver.pending:
        # Stopped: a stop cancels once (the rollback after it must run, not be cancelled).
        conn.stop_handled = True
        follow = statement.cancel(driver.pending[0], "stopped")
        if follow is None:
            raise _ended("stopped", bounds)
        driver.pending[0] = follow
        driver.run()
    if driver.expired:
        # The statement did not end even after the cancel: nothing more can be known of
        # this connection's state.
        conn.close()
        raise _ended(statement.why or statement.no_answer(), bounds)
    ended = driver.finished[0]
    if ended.error is None:
        # Also when a cancel went out meanwhile: the statement ended on its own first (the
        # server dropped the cancel), and its result stands.
        rv: RV = ended.value
        return rv
    if isinstance(ended.error, e.QueryCanceled) and statement.why is not None:
        raise _ended(statement.why, bounds) from ended.error
    # Also someone else's cancel (a DBA's pg_cancel_backend): the server's error.
    raise ended.error


class _Statement:
    """What a bounded statement's deadline and a stop do: send the server a cancel from
    this (the owning) thread, then let the step read the statement's end within
    :data:`CANCEL_WAIT`."""

    def __init__(self, conn: BoundedConnection, bounds: Bounds) -> None:
        self.conn = conn
        self.bounds = bounds
        #: Why the statement was cancelled, once it was (one cancel per statement).
        self.why: str | None = None

    def stop_asked(self) -> bool:
        return self.why is None and self.bounds.stop.is_set() and not self.conn.stop_handled

    def on_deadline(self, step: copyman.Step) -> copyman.Step | None:
        if self.stop_asked():
            self.conn.stop_handled = True
            return self.cancel(step, "stopped")
        return self.cancel(step, self.no_answer())

    def no_answer(self) -> str:
        return f"no answer from the server within {self.bounds.timeout:g} s"

    def cancel(self, step: copyman.Step, why: str) -> copyman.Step | None:
        """Cancel the statement; the step that reads its end, or None if the connection
        was closed (the server could not be reached)."""
        self.why = why
        send_cancel(self.conn)
        if self.conn.closed:
            return None
        return step.follow(time.monotonic() + CANCEL_WAIT)


#: psycopg's waits as the engine's, and the readiness each one asks for.
_WAITS = {
    WaitFor.R: copyman.Wait.READ,
    WaitFor.W: copyman.Wait.WRITE,
    WaitFor.RW: copyman.Wait.READ_WRITE,
}
_READY = {WaitFor.R: Ready.R, WaitFor.W: Ready.W, WaitFor.RW: Ready.RW}


def _as_step(gen: Generator[Any, Any, RV], fileno: int) -> copyman.Steps:
    """psycopg's generator as a step: its waits yielded as ``(fd, Wait)``; once advanced,
    it is told that what it waited for came. (For a wait on either, both are said: its
    libpq calls do not block, so a side that was not ready costs one more look.)"""
    try:
        wait = next(gen)
        while True:
            yield fileno, _WAITS[wait]
            wait = gen.send(_READY[wait])
    except StopIteration as end:
        rv: RV = end.value
        return rv


def send_cancel(conn: psycopg.Connection[Any]) -> None:
    """Ask the server to cancel what ``conn`` runs; returns once libpq passed it on."""
    if conn.pgconn.transaction_status != pq.TransactionStatus.ACTIVE:
        return
    try:
        conn.cancel_safe(timeout=CANCEL_WAIT)
    except Exception:
        conn.close()  # the server cannot be reached: the statement's end never comes


def _ended(why: str, bounds: Bounds) -> BaseException:
    if why == "stopped":
        return copyman.Cancelled("the transfer was stopped; the statement was cancelled")
    return StatementTimeout(why)


# Connecting.


def connect_all(
    openers: Sequence[Callable[[], T]], stop: threading.Event
) -> list[T | BaseException]:
    """Run every opener (a connect, bounded by its own ``connect_timeout``) at once; each
    result is the connection or what it raised. A stop ends the wait: the openers still
    running give :class:`copyman.Cancelled`, and their connections are closed when they
    arrive.

    Connecting stays on threads, not on the driver: an opener is any callable (the load's
    endpoints connect through ``psycopg.Connection.connect``, which resolves host names,
    tries each address in turn and applies ``connect_timeout`` per attempt inside psycopg),
    and driving psycopg's connect generator ourselves would mean redoing that logic, and
    the connection class and session setup each opener chooses. Each thread owns its
    connection until it is handed back; a stop only stops waiting for it."""
    if not openers:
        return []
    pool = ThreadPoolExecutor(max_workers=min(len(openers), 16), thread_name_prefix="copyman")
    futures = [pool.submit(opener) for opener in openers]
    try:
        pending: set[Future[T]] = set(futures)
        while pending and not stop.is_set():
            _, pending = wait_futures(pending, timeout=POLL)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    results: list[T | BaseException] = []
    for future in futures:
        if future.done() and not future.cancelled():
            error = future.exception()
            results.append(error if error is not None else future.result())
        else:
            future.add_done_callback(_close_late)
            results.append(copyman.Cancelled("the transfer was stopped while connecting"))
    return results


def _close_late(future: Future[Any]) -> None:
    if not future.cancelled() and future.exception() is None:
        conn = future.result()
        close = getattr(conn, "close", None)
        if close is not None:
            close()


# Committing.


def _commit_step(conn: psycopg.Connection[Any]) -> copyman.Steps:
    """COMMIT ``conn``'s transaction without blocking: send it, then read its results as
    they come; returns None (committed) or what failed."""
    pg = conn.pgconn
    pg.send_query(b"COMMIT")
    results: list[pq.abc.PGresult] = []
    while True:
        if pg.flush():
            yield pg.socket, copyman.Wait.WRITE
            continue
        pg.consume_input()
        while not pg.is_busy():
            result = pg.get_result()
            if result is None:
                return _commit_outcome(conn, results)
            results.append(result)
        yield pg.socket, copyman.Wait.READ


def commit_all(
    conns: Sequence[psycopg.Connection[Any]], timeout: float, stop: threading.Event
) -> list[BaseException | None]:
    """COMMIT every connection's transaction: the COMMITs are steps
    (:func:`_commit_step`) run together by the engine's one
    :class:`~airflow_copyman.copyman.Driver`, with one deadline. Each result is None
    (committed) or what failed; a COMMIT without a reply within ``timeout`` gives
    :class:`StatementTimeout` (its outcome is unknown) and its connection is closed. A
    stop shortens the wait to :data:`CANCEL_WAIT`: a COMMIT cannot be cancelled, only
    waited for."""
    deadline = time.monotonic() + timeout
    driver = copyman.Driver(
        {i: copyman.Step(_commit_step(conn), deadline) for i, conn in enumerate(conns)}
    )
    driver.run(stop.is_set)
    stopped = bool(driver.pending)
    if stopped:
        cut = min(deadline, time.monotonic() + CANCEL_WAIT)
        for step in driver.pending.values():
            step.deadline = cut
        driver.run()
    outcome: list[BaseException | None] = [None] * len(conns)
    for i, step in driver.finished.items():
        outcome[i] = _as_error(step.error) if step.error is not None else step.value
    for i in driver.expired:
        outcome[i] = StatementTimeout(
            "the task was stopped before the server answered COMMIT"
            if stopped
            else f"no answer to COMMIT within {timeout:g} s"
        )
        conns[i].close()
    return outcome


def _as_error(exc: BaseException) -> BaseException:
    # pq raises its own errors for a closed connection: a connection error all the same.
    return exc if isinstance(exc, psycopg.Error) else psycopg.OperationalError(str(exc))


def _commit_outcome(
    conn: psycopg.Connection[Any], results: list[pq.abc.PGresult]
) -> BaseException | None:
    for result in results:
        if result.status == pq.ExecStatus.FATAL_ERROR:
            return e.error_from_result(result, encoding=conn.info.encoding)
    last = results[-1] if results else None
    if last is None or last.command_status != b"COMMIT":
        # The server rolled the transaction back instead (it had failed).
        status = last.command_status.decode() if last and last.command_status else "nothing"
        return psycopg.errors.InFailedSqlTransaction(
            f"COMMIT answered {status}: the transaction was rolled back"
        )
    return None


__all__ = [
    "CANCEL_WAIT",
    "CONNECT_TIMEOUT",
    "BoundedConnection",
    "Bounds",
    "StatementTimeout",
    "commit_all",
    "connect_all",
    "connect_args",
    "send_cancel",
]
