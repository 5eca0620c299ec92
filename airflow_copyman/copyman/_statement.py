"""Producer and receiver for COPY statements on psycopg 3 connections.

psycopg starts the COPY (``cursor.copy()``: it opens the transaction the connection's
settings ask for, binds the parameters, checks the result and holds the connection's lock
for the duration); the data then moves through the connection's non-blocking libpq
handle (``connection.pgconn``) without psycopg's per-row generator machinery, which is what
lets the copy run at the speed of a ``psql | psql`` pipe (see ``bench/``).
"""

from __future__ import annotations

import contextlib
import select
import time
from contextlib import AbstractContextManager
from typing import Any

import psycopg
from psycopg import errors as e
from psycopg import pq, sql
from psycopg.abc import Buffer, Params, Query
from psycopg.copy import Copy, Writer

from ._errors import CopyUsageError, ReceiverTimeout, RowCountMismatch
from ._fittings import Producer, Receiver, Wait
from ._records import Batch
from ._sql import check_copy_statement

# How much one put_copy_data hands to libpq: libpq copies it into its output buffer, so
# this bounds the unsent data a receiver holds in libpq (psycopg uses the same order of
# magnitude, MAX_BUFFER_SIZE, to avoid libpq's huge-buffer pathologies, psycopg#255).
PIECE_SIZE = 128 * 1024
# How long aborting one side may wait on a server before giving up and closing the
# connection (the server then rolls the transaction back itself).
ABORT_TIMEOUT = 5.0
# Once the source said it is done, its final result is already on the wire.
END_TIMEOUT = 60.0

_ACTIVE = pq.TransactionStatus.ACTIVE
_INERROR = pq.TransactionStatus.INERROR
_COPY_IN = pq.ExecStatus.COPY_IN
_COPY_OUT = pq.ExecStatus.COPY_OUT
_COMMAND_OK = pq.ExecStatus.COMMAND_OK


class _DetachedWriter(Writer):
    """Lets psycopg open a COPY FROM STDIN while the engine itself sends the data."""

    def write(self, data: Buffer) -> None:  # pragma: no cover - never called
        raise RuntimeError("the copy manager writes COPY data itself")

    def finish(self, exc: BaseException | None = None) -> None:
        """The engine ended the COPY already (completed or aborted)."""


class _StatementFitting:
    """What statement producers and receivers share: the connection and its COPY."""

    _direction: str  # "out" (TO STDOUT) or "in" (FROM STDIN)

    def __init__(
        self, connection: psycopg.Connection[Any], statement: Query, params: Params | None
    ) -> None:
        if not isinstance(connection, psycopg.Connection):
            raise CopyUsageError(
                f"{type(self).__name__} needs a psycopg.Connection, "
                f"got {type(connection).__name__}"
            )
        self.connection = connection
        self.statement = statement
        self.params = params
        self.server_rows: int | None = None  # the server's own COPY row count, at the end
        self._text = _statement_text(connection, statement)
        check_copy_statement(self._text, self._direction, type(self).__name__)
        self._check_connection()
        self._copy_cm: AbstractContextManager[Copy] | None = None
        self._pgconn = connection.pgconn

    def connection_key(self) -> object:
        return self.connection

    def fileno(self) -> int:
        return self._pgconn.socket

    def _check_connection(self) -> None:
        conn = self.connection
        where = self._where()
        if conn.closed:
            raise CopyUsageError(f"{type(self).__name__} on {where}: the connection is closed")
        status = conn.info.transaction_status
        if status == _ACTIVE:
            raise CopyUsageError(
                f"{type(self).__name__} on {where}: the connection is busy "
                "(inside another COPY or query)"
            )
        if status == _INERROR:
            raise CopyUsageError(
                f"{type(self).__name__} on {where}: the connection is in a failed "
                "transaction; roll it back first"
            )

    def _open_copy(self, expected: pq.ExecStatus) -> None:
        self._check_connection()
        writer = _DetachedWriter() if expected == _COPY_IN else None
        cursor = self.connection.cursor()
        cm = cursor.copy(self.statement, self.params, writer=writer)
        cm.__enter__()
        self._copy_cm = cm
        result = cursor.pgresult
        if result is not None and result.status != expected:
            # psycopg accepts either direction; the text check catches nearly every mix-up,
            # this one catches the rest, and ends the wrong COPY before saying so.
            error = CopyUsageError(f"{self!r}: the statement runs a COPY in the wrong direction")
            if result.status == _COPY_IN:
                self._pgconn.put_copy_end(b"copyman: wrong COPY direction")
                self._pgconn.flush()
                self._fetch_results(time.monotonic() + ABORT_TIMEOUT)
                self._close_copy()
            else:
                self._copy_cm = None
                cm.__exit__(type(error), error, None)
            raise error

    def _close_copy(self) -> None:
        cm, self._copy_cm = self._copy_cm, None
        if cm is not None:
            # The engine ended the COPY on the wire already: this only releases psycopg's
            # lock and cursor (its finish() has nothing left to do).
            try:
                cm.__exit__(None, None, None)
            except Exception:
                if not self.connection.closed:
                    raise

    def _where(self) -> str:
        """host:port/dbname, never the password."""
        try:
            info = self.connection.info
            return f"{info.host}:{info.port}/{info.dbname}"
        except Exception:
            return "a closed connection"

    def __repr__(self) -> str:
        text = " ".join(self._text.split())
        if len(text) > 80:
            text = text[:77] + "..."
        return f"{type(self).__name__}({self._where()}: {text!r})"

    # Blocking helpers with deadlines, for the ends of a copy (the data phase never blocks).

    def _wait(self, wait: Wait, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"{self!r}: the server did not answer in time")
        fd = self._pgconn.socket
        rlist, wlist = ([fd], []) if wait is Wait.READ else ([], [fd])
        select.select(rlist, wlist, [], remaining)

    def _fetch_results(self, deadline: float) -> list[pq.abc.PGresult]:
        pg = self._pgconn
        results: list[pq.abc.PGresult] = []
        while True:
            pg.consume_input()
            while not pg.is_busy():
                res = pg.get_result()
                if res is None:
                    return results
                results.append(res)
            self._wait(Wait.READ, deadline)

    def _connection_lost(self) -> bool:
        return self.connection.closed or self._pgconn.status != pq.ConnStatus.OK

    def _close_connection(self) -> None:
        # Closing is the only clean end left when the server does not answer: the server
        # rolls back the transaction, so nothing partial is ever committed.
        with contextlib.suppress(Exception):
            self.connection.close()


def _statement_text(connection: psycopg.Connection[Any], statement: Query) -> str:
    if isinstance(statement, str):
        return statement
    if isinstance(statement, bytes):
        return statement.decode("utf-8", "replace")
    if isinstance(statement, sql.Composable):
        return statement.as_string(connection)
    raise CopyUsageError(f"a COPY statement must be str, bytes or psycopg.sql, got {statement!r}")


def _raise_for(result: pq.abc.PGresult, pgconn: pq.abc.PGconn) -> None:
    if result.status != _COMMAND_OK:
        raise e.error_from_result(result, encoding=pgconn._encoding)


class StatementProducer(_StatementFitting, Producer):
    """Produces the records of a ``COPY ... TO STDOUT`` statement run on ``connection``."""

    _direction = "out"

    def __init__(
        self, connection: psycopg.Connection[Any], sql: Query, params: Params | None = None
    ) -> None:
        Producer.__init__(self)
        _StatementFitting.__init__(self, connection, sql, params)
        self._pending_error: BaseException | None = None

    def start(self) -> None:
        Producer.start(self)
        self._open_copy(_COPY_OUT)

    def _read_batch(self, max_bytes: int) -> Batch | None:
        if self._pending_error is not None:
            error, self._pending_error = self._pending_error, None
            raise error
        if self.done:
            return None
        pg = self._pgconn
        get = pg.get_copy_data
        # One growing buffer, not a list of records: libpq's records arrive as memoryviews,
        # which the garbage collector tracks; kept in a list until the batch is joined they
        # made its collections a quarter of the client's CPU (bench/README.md). Appended and
        # dropped at once, they never pile up. The list is kept only if a receiver wants it.
        buffer = bytearray()
        records: list[Buffer] | None = [] if self.keep_records else None
        count = 0
        first: Buffer = b""
        last: Buffer = b""
        try:
            while len(buffer) < max_bytes:
                nbytes, data = get(1)
                if nbytes == 0:
                    # Nothing complete in libpq's buffer: read what the socket has, and only
                    # if that is nothing too does the manager wait (select) on this socket.
                    pg.consume_input()
                    nbytes, data = get(1)
                    if nbytes == 0:
                        break
                if nbytes > 0:
                    buffer += data
                    if not count:
                        first = data
                    last = data
                    count += 1
                    if records is not None:
                        records.append(data)
                else:
                    self._end_of_copy()
                    break
        except Exception as exc:
            if not count:
                raise
            # Hand over what arrived before the failure; fail on the next read, so that
            # no record that reached us is lost.
            self._pending_error = exc
        if not count:
            return None
        return Batch(buffer, self._counter.count_parts(count, first, last), records)

    def _end_of_copy(self) -> None:
        results = self._fetch_results(time.monotonic() + END_TIMEOUT)
        if not results:  # pragma: no cover - libpq always gives a final result
            raise e.OperationalError(f"{self!r}: the COPY ended without a result")
        for res in results:
            _raise_for(res, self._pgconn)
        self.server_rows = results[-1].command_tuples
        self.done = True

    def read(self, max_bytes: int) -> Batch | None:
        batch = super().read(max_bytes)
        if self.done and self.server_rows is not None and self.server_rows != self.rows:
            raise RowCountMismatch(
                f"{self!r}: the server reports {self.server_rows} rows, "
                f"{self.rows} were received"
            )
        return batch

    def abort(self, reason: BaseException | None) -> None:
        """Cancel the source's COPY and discard what is still in flight (never buffering it)."""
        if self.done or self._copy_cm is None or self._connection_lost():
            return
        pg = self._pgconn
        deadline = time.monotonic() + ABORT_TIMEOUT
        try:
            self.connection.cancel_safe(timeout=ABORT_TIMEOUT)
            while True:
                nbytes, _ = pg.get_copy_data(1)
                if nbytes > 0:
                    continue
                if nbytes == 0:
                    self._wait(Wait.READ, deadline)
                    pg.consume_input()
                    continue
                break
            self._fetch_results(deadline)  # QueryCanceled, expected and discarded
        except Exception:
            self._close_connection()
            raise

    def close(self) -> None:
        self._close_copy()


class StatementReceiver(_StatementFitting, Receiver):
    """Sends the records into a ``COPY ... FROM STDIN`` statement run on ``connection``.

    When it faults, its COPY is aborted at once (the server discards what it received and
    the connection is left in a failed transaction, to be rolled back): it can therefore
    not be reconciled; load it again in a new copy.
    """

    _direction = "in"
    reconcilable = False
    needs_records = False  # it sends the joined stream

    # States of the end of the copy.
    _DATA, _ENDING, _RESULT, _DONE = range(4)

    def __init__(
        self, connection: psycopg.Connection[Any], sql: Query, params: Params | None = None
    ) -> None:
        Receiver.__init__(self)
        _StatementFitting.__init__(self, connection, sql, params)
        self._state = self._DATA
        self._unflushed = False
        self._offset = 0  # how much of the head batch was already given to libpq
        self._results: list[pq.abc.PGresult] = []  # the COPY's final results, as they come

    def start(self) -> None:
        Receiver.start(self)
        self._open_copy(_COPY_IN)

    def transmit(self) -> Wait:
        pg = self._pgconn
        if self._unflushed:
            if pg.flush():
                return Wait.WRITE
            self._unflushed = False
            self.progress_at = time.monotonic()
        queue = self._queue
        while queue:
            batch = queue[0]
            data = batch.data
            piece = data[self._offset : self._offset + PIECE_SIZE]
            if not pg.put_copy_data(piece):
                return Wait.WRITE
            self._offset += len(piece)
            if self._offset >= len(data):
                self._offset = 0
                self._delivered(batch)
            # Wait for libpq to hand each piece to the socket before giving it more: this
            # is what keeps memory bounded when a destination is slower than the source
            # (put_copy_data alone would queue the whole stream in libpq, psycopg#1047).
            if pg.flush():
                self._unflushed = True
                return Wait.WRITE
            self.progress_at = time.monotonic()
        if self._expected_rows is None:
            return Wait.READY
        return self._transmit_end()

    def _transmit_end(self) -> Wait:
        pg = self._pgconn
        if self._state == self._DATA:
            if not pg.put_copy_end(None):
                return Wait.WRITE
            self._state = self._ENDING
        if self._state == self._ENDING:
            if pg.flush():
                return Wait.WRITE
            self._state = self._RESULT
            self.progress_at = time.monotonic()
        if self._state == self._RESULT:
            pg.consume_input()
            # Results may arrive over several steps (an error result, then the end): keep
            # them across steps, or a failed COPY could look like one without a result.
            results = self._results
            while not pg.is_busy():
                res = pg.get_result()
                if res is None:
                    break
                results.append(res)
            else:
                return Wait.READ
            self._state = self._DONE
            for res in results:
                _raise_for(res, pg)
            if not results:  # pragma: no cover - libpq always gives a final result
                # A COPY is complete only with the server's COMMAND_OK, never by default.
                raise e.OperationalError(
                    f"{self!r}: the COPY ended without the server's result: "
                    f"{pg.get_error_message() or 'no message'}"
                )
            self.server_rows = results[-1].command_tuples
            if self.server_rows is None:
                raise RowCountMismatch(f"{self!r}: the server reported no COPY row count")
            self._check_rows(self.server_rows)
            self.completed = True
        return Wait.READY

    def abort(self, reason: BaseException | None) -> None:
        """End the COPY with an error, so the server keeps nothing of it."""
        if self._state == self._DONE or self._copy_cm is None:
            return
        self._state = self._DONE
        if self._connection_lost() or isinstance(reason, ReceiverTimeout):
            # A server that stopped answering would only make us wait again: closing the
            # connection is the clean end (the server rolls back when it notices).
            self._close_connection()
            return
        pg = self._pgconn
        message = f"copyman: copy aborted ({type(reason).__name__ if reason else 'cancelled'})"
        deadline = time.monotonic() + ABORT_TIMEOUT
        try:
            while not pg.put_copy_end(message.encode()):
                self._wait(Wait.WRITE, deadline)
            while pg.flush():
                self._wait(Wait.WRITE, deadline)
            self._fetch_results(deadline)  # the server's "COPY from stdin failed", expected
        except Exception:
            self._close_connection()
            raise

    def close(self) -> None:
        self._close_copy()
