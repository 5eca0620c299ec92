"""Producer and receiver for COPY statements on psycopg 3 connections.

Everything a statement fitting does on the wire is a non-blocking step on the connection's
libpq handle (``connection.pgconn``): starting the COPY (with the ``BEGIN`` psycopg would
send first), moving the data, cancelling, ending or aborting it. The manager waits for all
of them in one loop (``_steps``), so no server is ever waited for in turn, ``cancel()``
is noticed while a COPY start waits for a lock, and the data moves without psycopg's
per-row generator machinery, at the speed of a ``psql | psql`` pipe (see ``bench/``).

psycopg's own ``cursor.copy()`` is not used: it waits for the COPY to start in a blocking
call that only a cancel from another thread could interrupt, and such a cancel can arrive
after the COPY ended and hit the caller's next statement. The fitting holds the
connection's lock, as ``cursor.copy()`` does, while its COPY runs.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import psycopg
from psycopg import errors as e
from psycopg import pq, sql
from psycopg.abc import Buffer, Params, Query

from ._digest import Digest, StreamDigest, row_hash
from ._errors import CopyUsageError, RowCountMismatch
from ._fittings import Producer, Receiver, Wait
from ._limits import ABORT_TIMEOUT
from ._records import Batch
from ._sql import check_copy_statement, copy_format
from ._steps import Driver, Step, Steps

# How much one put_copy_data hands to libpq: libpq copies it into its output buffer, so
# this bounds the unsent data a receiver holds in libpq (psycopg uses the same order of
# magnitude, MAX_BUFFER_SIZE, to avoid libpq's huge-buffer pathologies, psycopg#255).
PIECE_SIZE = 128 * 1024

_IDLE = pq.TransactionStatus.IDLE
_ACTIVE = pq.TransactionStatus.ACTIVE
_INERROR = pq.TransactionStatus.INERROR
_COPY_IN = pq.ExecStatus.COPY_IN
_COPY_OUT = pq.ExecStatus.COPY_OUT
_COMMAND_OK = pq.ExecStatus.COMMAND_OK
_TUPLES_OK = pq.ExecStatus.TUPLES_OK
_POLL_OK = pq.PollingStatus.OK
_POLL_READING = pq.PollingStatus.READING
_POLL_WRITING = pq.PollingStatus.WRITING


class _StatementFitting:
    """What statement producers and receivers share: the connection and its COPY."""

    _direction: str  # "out" (TO STDOUT) or "in" (FROM STDIN)
    _expected: pq.ExecStatus  # the COPY result its statement must give
    _started: bool

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
        self._pgconn = connection.pgconn
        self._busy = False  # a command was sent and not all of its results were read
        self._in_copy: pq.ExecStatus | None = None  # libpq is in this COPY state
        self._end_sent = False  # CopyDone or CopyFail was handed to libpq
        self._locked = False  # holds the connection's lock (released by close())

    @property
    def copy_format(self) -> str:
        """``text``, ``csv`` or ``binary``, as the statement's options say."""
        return copy_format(self._text, self._direction)

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

    # Steps on the wire. Each yields (socket, what it waits for) when it cannot go on.

    def _opening(self) -> Steps:
        """Start the COPY: psycopg's BEGIN where it would send one, then the statement."""
        self._check_connection()
        conn, pg = self.connection, self._pgconn
        if not conn.lock.acquire(blocking=False):
            raise CopyUsageError(f"{self!r}: another thread is using the connection")
        self._locked = True
        if not conn.autocommit and pg.transaction_status == _IDLE:
            yield from self._command(_begin_command(conn))
        # The extended protocol takes exactly one statement: nothing can ride along.
        pg.send_query_params(self._query_bytes(), None)
        self._busy = True
        yield from self._flushing()
        result = yield from self._next_result()
        if result.status in (_COPY_IN, _COPY_OUT):
            self._in_copy = result.status
            if result.status != self._expected:
                # The text check catches nearly every mix-up; this catches the rest. The
                # manager's abort ends the wrong COPY.
                raise CopyUsageError(f"{self!r}: the statement runs a COPY in the wrong direction")
            return
        yield from self._rest_of_results()
        _raise_for(result, self.connection)
        raise CopyUsageError(f"{self!r}: the statement did not start a COPY")

    def _query_bytes(self) -> bytes:
        conn = self.connection
        if isinstance(self.statement, bytes) and self.params is None:
            return self.statement  # already in the connection's encoding
        text = self._text
        if self.params is not None:
            # Parameters are merged client-side, as psycopg does for COPY.
            with psycopg.ClientCursor(conn) as cursor:
                text = cursor.mogrify(self.statement, self.params)
        return text.encode(conn.info.encoding)

    def _command(self, query: bytes) -> Steps:
        """Run a short command and read it to the end; raise the server's error."""
        self._pgconn.send_query_params(query, None)
        self._busy = True
        yield from self._flushing()
        results = []
        while self._busy:
            results.append((yield from self._next_result()))
            yield from self._rest_of_results()
        for result in results:
            _raise_for(result, self.connection)
        return results[-1]

    def _flushing(self) -> Steps:
        while self._pgconn.flush():
            yield self._pgconn.socket, Wait.WRITE

    def _next_result(self) -> Steps:
        pg = self._pgconn
        while True:
            pg.consume_input()
            if not pg.is_busy():
                break
            yield pg.socket, Wait.READ
        result = pg.get_result()
        if result is None:
            self._busy = False
            raise e.OperationalError(
                f"{self!r}: the server sent no result: {pg.get_error_message() or 'no message'}"
            )
        return result

    def _rest_of_results(self) -> Steps:
        """Read what is left of the command's results (there should be nothing)."""
        pg = self._pgconn
        while True:
            pg.consume_input()
            if pg.is_busy():
                yield pg.socket, Wait.READ
                continue
            result = pg.get_result()
            if result is None:
                self._busy = False
                return
            _raise_for(result, self.connection)

    def _cancelling(self) -> Steps:
        """Ask the server to cancel what the connection runs, and wait until it has.

        Sent by the thread that drives the connection, and followed by reading the COPY's
        end: libpq's cancel returns once the server has passed the request on, and a
        backend that waits for a command discards a cancel, so the request can only ever
        hit this COPY, never a statement the caller sends later.
        """
        pg = self._pgconn
        if not psycopg.capabilities.has_cancel_safe():  # pragma: no cover - libpq < 17
            pg.get_cancel().cancel()
            return
        cancel = pg.cancel_conn()
        try:
            cancel.start()
            while (status := cancel.poll()) != _POLL_OK:
                if status == _POLL_READING:
                    yield cancel.socket, Wait.READ
                elif status == _POLL_WRITING:
                    yield cancel.socket, Wait.WRITE
                else:
                    raise e.OperationalError(
                        f"{self!r}: the cancel request failed: {cancel.get_error_message()}"
                    )
        finally:
            cancel.finish()

    def _settling(self, message: bytes) -> Steps:
        """Read the running command to its end: fail a COPY IN (unless its end was sent),
        discard a COPY OUT's data, read every result. The errors it meets were expected."""
        pg = self._pgconn
        while self._busy:
            if self._in_copy == _COPY_IN:
                if not self._end_sent:
                    while not pg.put_copy_end(message):
                        pg.flush()  # make room in libpq's buffer
                        yield pg.socket, Wait.WRITE
                    self._end_sent = True
                self._in_copy = None
            yield from self._flushing()
            if self._in_copy == _COPY_OUT:
                nbytes, _ = pg.get_copy_data(1)
                if nbytes == 0:
                    pg.consume_input()
                    nbytes, _ = pg.get_copy_data(1)
                    if nbytes == 0:
                        yield pg.socket, Wait.READ
                if nbytes < 0:
                    self._in_copy = None
                continue
            pg.consume_input()
            if pg.is_busy():
                yield pg.socket, Wait.READ
                continue
            result = pg.get_result()
            if result is None:
                self._busy = False
            elif result.status == _COPY_IN:  # the COPY started while we cancelled
                self._in_copy, self._end_sent = _COPY_IN, False
            elif result.status == _COPY_OUT:
                self._in_copy = _COPY_OUT

    def aborting(self, reason: BaseException | None) -> Steps:
        """Cancel whatever the connection runs for this copy, then read its end, so that
        the server keeps nothing and the connection is usable after a rollback."""
        if not self._busy:
            return
        if self._connection_lost():
            self._busy = False
            self._close_connection()
            return
        name = type(reason).__name__ if reason is not None else "cancelled"
        try:
            with contextlib.suppress(e.OperationalError):
                # A failed cancel request leaves the CopyFail below to end a COPY IN; a
                # server that answers neither is closed at the deadline.
                yield from self._cancelling()
            yield from self._settling(f"copyman: copy aborted ({name})".encode())
        except Exception:
            self._close_connection()
            raise

    def abort(self, reason: BaseException | None) -> None:
        """``aborting`` in one blocking call (the manager runs it for all at once)."""
        step = Step(self.aborting(reason), time.monotonic() + ABORT_TIMEOUT)
        driver = Driver({self: step})
        driver.run()
        if driver.expired:
            self.abandon()
            raise TimeoutError(f"{self!r}: the server did not answer the abort in time")
        if step.error is not None:
            raise step.error

    def abandon(self) -> None:
        self._busy = False
        self._close_connection()

    def close(self) -> None:
        if self._locked:
            self._locked = False
            self.connection.lock.release()

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


def _begin_command(conn: psycopg.Connection[Any]) -> bytes:
    """The BEGIN psycopg sends before a statement outside a transaction."""
    parts = ["BEGIN"]
    if conn.isolation_level is not None:
        parts.append("ISOLATION LEVEL " + conn.isolation_level.name.replace("_", " "))
    if conn.read_only is not None:
        parts.append("READ ONLY" if conn.read_only else "READ WRITE")
    if conn.deferrable is not None:
        parts.append("DEFERRABLE" if conn.deferrable else "NOT DEFERRABLE")
    return " ".join(parts).encode()


def _raise_for(result: pq.abc.PGresult, connection: psycopg.Connection[Any]) -> None:
    """Raise the server's error as psycopg's exception for its SQLSTATE (``.diag`` kept)."""
    if result.status not in (_COMMAND_OK, _TUPLES_OK):
        raise e.error_from_result(result, encoding=connection.info.encoding)


class StatementProducer(_StatementFitting, Producer):
    """Produces the records of a ``COPY ... TO STDOUT`` statement run on ``connection``."""

    _direction = "out"
    _expected = _COPY_OUT

    def __init__(
        self,
        connection: psycopg.Connection[Any],
        sql: Query,
        params: Params | None = None,
        *,
        digest: bool = False,
    ) -> None:
        """``digest``: hash every row as it is read (:meth:`digest`), so that what the
        source sent can be compared with what a destination holds without reading the
        source again."""
        Producer.__init__(self)
        _StatementFitting.__init__(self, connection, sql, params)
        self._digest = StreamDigest() if digest else None
        self._pending_error: BaseException | None = None
        self._results: list[pq.abc.PGresult] = []
        #: The record that would have taken the last batch over its size: the next one's first.
        self._carry: Buffer | None = None

    def digest(self) -> Digest | None:
        """The digest of the rows read so far (all of them once :attr:`done`), or None
        when the producer was made without ``digest=True``."""
        return None if self._digest is None else self._digest.digest()

    def start(self) -> None:
        _run(self.starting())

    def starting(self) -> Steps:
        Producer.start(self)
        yield from self._opening()

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
        digest = self._digest
        hashing = digest is not None
        hashed = 0  # the sum of this call's row hashes (verify="checksum")
        if (carry := self._carry) is not None:
            self._carry = None
            buffer += carry
            first = last = carry
            count = 1
            if records is not None:
                records.append(carry)
        try:
            if self._in_copy is None:  # the data ended: waiting for the final result
                self._read_end()
                return None
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
                    if hashing:
                        hashed += row_hash(data)
                    if not count:
                        first = data
                    last = data
                    count += 1
                    if records is not None:
                        records.append(data)
                else:
                    self._in_copy = None
                    self._read_end()
                    break
        except Exception as exc:
            error = self._server_error(exc)
            if not count:
                if error is exc:
                    raise
                raise error from exc  # the server's own words, libpq's behind them
            # Hand over what arrived before the failure; fail on the next read, so that
            # no record that reached us is lost.
            self._pending_error = error
        if digest is not None:
            read = count - (carry is not None)
            if read:
                # With no row read before, there is no carry: ``first`` is the stream's first.
                digest.started(first)
                digest.total += hashed
                digest.messages += read
        if not count:
            return None
        if len(buffer) > max_bytes and count > 1 and self._pending_error is None:
            # A batch is never larger than asked for (the bandwidth cap counts on it),
            # unless its first record alone is: the last record waits for the next batch.
            # The record before it is a row (binary COPY's trailer comes last), hence b"".
            self._carry = last
            del buffer[len(buffer) - len(memoryview(last)) :]
            count -= 1
            last = b""
            if records is not None:
                records.pop()
        return Batch(buffer, self._counter.count_parts(count, first, last), records)

    def _read_end(self) -> None:
        """Collect the COPY's final results as they come (never waiting for them)."""
        pg = self._pgconn
        pg.consume_input()
        while not pg.is_busy():
            result = pg.get_result()
            if result is None:
                self._busy = False
                break
            self._results.append(result)
        else:
            return  # the manager waits for the socket
        for result in self._results:
            _raise_for(result, self.connection)
        if not self._results:  # pragma: no cover - libpq always gives a final result
            raise e.OperationalError(f"{self!r}: the COPY ended without a result")
        self.server_rows = self._results[-1].command_tuples
        self.done = True

    def _server_error(self, exc: BaseException) -> BaseException:
        """The server's own error behind a broken COPY (a terminated backend says why
        before it closes the connection), else ``exc``."""
        if isinstance(exc, e.Error) and exc.sqlstate:
            return exc  # the server's error already
        pg = self._pgconn
        encoding = self.connection.info.encoding
        for kept in self._results:
            if kept.status not in (_COMMAND_OK, _TUPLES_OK):
                return e.error_from_result(kept, encoding=encoding)
        with contextlib.suppress(Exception):
            if self._in_copy == _COPY_OUT:
                # The error message follows the data libpq still holds; the copy fails
                # anyway, so that data is skipped.
                while (nbytes := pg.get_copy_data(1)[0]) > 0:
                    pass
                if nbytes == 0:
                    return exc  # the connection broke before the server said why
            while True:
                result = pg.get_result()
                if result is None or result.status in (_COPY_OUT, _COPY_IN):
                    break
                if result.status not in (_COMMAND_OK, _TUPLES_OK):
                    self._in_copy = None
                    return e.error_from_result(result, encoding=encoding)
        return exc

    def read(self, max_bytes: int) -> Batch | None:
        batch = super().read(max_bytes)
        if self.done and self.server_rows is not None and self.server_rows != self.rows:
            raise RowCountMismatch(
                f"{self!r}: the server reports {self.server_rows} rows, "
                f"{self.rows} were received"
            )
        return batch


class StatementReceiver(_StatementFitting, Receiver):
    """Sends the records into a ``COPY ... FROM STDIN`` statement run on ``connection``.

    When it faults, its COPY is aborted at once (the server discards what it received and
    the connection is left in a failed transaction, to be rolled back): it can therefore
    not be reconciled; load it again in a new copy.
    """

    _direction = "in"
    _expected = _COPY_IN
    reconcilable = False
    needs_records = False  # it sends the joined stream

    def __init__(
        self, connection: psycopg.Connection[Any], sql: Query, params: Params | None = None
    ) -> None:
        Receiver.__init__(self)
        _StatementFitting.__init__(self, connection, sql, params)
        self._unflushed = False
        self._offset = 0  # how much of the head batch was already given to libpq
        self._results: list[pq.abc.PGresult] = []  # the COPY's final results, as they come

    def start(self) -> None:
        _run(self.starting())

    def starting(self) -> Steps:
        Receiver.start(self)
        yield from self._opening()
        self.progress_at = time.monotonic()

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
        if self._expected_rows is None or self.completed:
            return Wait.READY
        return self._transmit_end()

    def _transmit_end(self) -> Wait:
        pg = self._pgconn
        if not self._end_sent:
            if not pg.put_copy_end(None):
                return Wait.WRITE
            self._end_sent = True
            self._in_copy = None
            self._unflushed = True
        if self._unflushed:
            if pg.flush():
                return Wait.WRITE
            self._unflushed = False
            self.progress_at = time.monotonic()
        pg.consume_input()
        # Results may arrive over several steps (an error result, then the end): keep
        # them across steps, or a failed COPY could look like one without a result.
        results = self._results
        while not pg.is_busy():
            result = pg.get_result()
            if result is None:
                break
            results.append(result)
        else:
            return Wait.READ
        self._busy = False
        for result in results:
            _raise_for(result, self.connection)
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


def _run(steps: Steps) -> None:
    """Drive steps to their end in a blocking call (``start()`` outside a manager)."""
    step = Step(steps)
    Driver({0: step}).run()
    if step.error is not None:
        raise step.error
