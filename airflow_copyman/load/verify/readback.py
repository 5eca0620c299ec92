"""Read back what destinations wrote, as the COPY stream the source sent, and digest it.

``verify="checksum"`` compares the digest of the rows the source sent (taken by the engine
as it forwarded them: :class:`copyman.StreamDigest`) with the digest of the same ``COPY``
of the rows each destination's load wrote, run in its load transaction (the only place
those rows are visible). Where every column has the same type on both sides, the two
streams are the same bytes row for row, whatever order the rows are in:

* binary: each type's send function gives the same bytes for the same value (a changed
  ``numeric`` scale, ``-0``, a JSON number's spelling all show);
* text and CSV: each type's output function, with the source session's rendering
  settings set for the read (``TimeZone``, ``DateStyle``...: :func:`render_settings`),
  in a savepoint rolled back after it, so the load transaction keeps its own.

The read-back's ``SELECT`` renders each column by its type's send or output function, so
that parallel workers can share the rendering (:func:`query`): the bytes are the same.

Every destination's read runs at once in one wait loop, each hashed as it arrives, so
one slow server holds up nobody and no data is kept. A read with no data for the load's
timeout, or a stop, is cancelled on its server (then its connection is closed if it does
not end within :data:`bounded.CANCEL_WAIT`).

This module imports no Airflow module.
"""

from __future__ import annotations

import contextlib
import select
import time
from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg import errors as e
from psycopg import pq, sql

from airflow_copyman import copyman
from airflow_copyman.copyman import Digest, StreamDigest
from airflow_copyman.copyman._digest import row_hash
from airflow_copyman.load.connection import bounded
from airflow_copyman.load.connection.bounded import Bounds
from airflow_copyman.load.verify import checksum

#: The settings a type's text output depends on (all but TimeZone pinned by the load's
#: session, read from the source all the same: a connection may have changed them).
RENDERING = ("TimeZone", "DateStyle", "IntervalStyle", "extra_float_digits",
             "lc_monetary", "bytea_output")

_SAVEPOINT = sql.Identifier("copyman_readback")
_COPY_OUT = pq.ExecStatus.COPY_OUT
_POLL = copyman.POLL


def render_settings(source: psycopg.Connection[Any]) -> dict[str, str]:
    """The source session's values of :data:`RENDERING`: a text read-back renders with them."""
    row = source.execute(
        sql.SQL("SELECT {}").format(
            sql.SQL(", ").join(
                sql.SQL("current_setting({})").format(sql.Literal(name)) for name in RENDERING
            )
        )
    ).fetchone()
    assert row is not None
    return dict(zip(RENDERING, row, strict=True))


#: For the read-back only: parallel workers may render the rows (the planner's defaults
#: count the send and output functions as nearly free, so it would not use them). Tables
#: under ``min_parallel_table_scan_size`` are still read by one process; a merge's staging
#: table is temporary, which workers cannot read.
PARALLEL = {"parallel_setup_cost": "0", "parallel_tuple_cost": "0"}

_FUNCTIONS = """
SELECT a.attname::text,
       CASE WHEN t.typsend = 0 THEN NULL
            ELSE format('%%I.%%I', sn.nspname, s.proname) END,
       format('%%I.%%I', n.nspname, o.proname)
FROM pg_attribute a
JOIN pg_type t ON t.oid = a.atttypid
LEFT JOIN pg_proc s ON s.oid = t.typsend
LEFT JOIN pg_namespace sn ON sn.oid = s.pronamespace
JOIN pg_proc o ON o.oid = t.typoutput
JOIN pg_namespace n ON n.oid = o.pronamespace
WHERE a.attrelid = %(relation)s::regclass AND a.attnum > 0 AND NOT a.attisdropped
"""


def query(
    conn: psycopg.Connection[Any],
    relation: sql.Composable,
    columns: Sequence[str],
    where: sql.Composable | None,
    fmt: str,
) -> sql.Composed:
    """The ``COPY`` of ``columns`` (in the load's order) of ``relation``'s rows that
    ``where`` selects, in ``fmt``. Each column is rendered in the ``SELECT`` by its type's
    own send function (binary) or output function (text, CSV): a ``bytea`` or ``cstring``
    that COPY then writes as it is, so the stream is byte for byte the COPY of the columns
    themselves (``numeric_send(n)``'s bytes are the field ``n``'s), and parallel workers
    can do the rendering instead of the one process that writes the COPY. A domain's
    functions are its base type's."""
    table = checksum.table_of(relation).as_string(conn)
    rows = conn.execute(
        _FUNCTIONS,  # type: ignore[arg-type]
        {"relation": table},
    ).fetchall()
    functions = {name: send if fmt == "binary" else output for name, send, output in rows}
    missing = [c for c in columns if c not in functions]
    if missing:
        raise psycopg.errors.UndefinedColumn(
            f"{table} has no column {missing[0]!r}"
        )
    rendered = []
    for name in columns:
        column = sql.SQL("r.{}").format(sql.Identifier(name))
        function = functions[name]
        # A type without a send function never travels in binary: no such column here.
        rendered.append(column if function is None else sql.SQL(f"{function}({{}})").format(column))
    select_ = sql.SQL("SELECT {} FROM {} AS r").format(sql.SQL(", ").join(rendered), relation)
    if where is not None:
        select_ = sql.SQL("{} WHERE {}").format(select_, where)
    return sql.SQL("COPY ({}) TO STDOUT (FORMAT {})").format(select_, sql.SQL(fmt))


class _Read:
    """One destination's read-back in progress."""

    def __init__(self, conn: psycopg.Connection[Any], settings: dict[str, str] | None) -> None:
        self.conn = conn
        self.pg = conn.pgconn
        self.settings = settings
        self.digest = StreamDigest()
        self.copying = False  # the COPY_OUT result came: rows follow
        self.copied = False
        self.socket = -1
        self.results: list[pq.abc.PGresult] = []
        self.outcome: Digest | BaseException | None = None
        self.cancelled: str | None = None  # why a cancel was sent
        self.deadline = 0.0

    def start(self, statement: bytes, timeout: float) -> None:
        checksum.with_settings(self.conn, {**PARALLEL, **(self.settings or {})}, _SAVEPOINT)
        self.pg.send_query(statement)
        self.socket = self.pg.socket
        self.deadline = time.monotonic() + timeout

    def advance(self, timeout: float) -> bool:
        """Read what has arrived; True once the read-back has ended."""
        pg = self.pg
        pg.consume_input()
        if not self.copying:
            if pg.is_busy():
                return False
            result = pg.get_result()
            if result is None or result.status != _COPY_OUT:
                if result is not None:
                    self.results.append(result)
                return self._ending()
            self.copying = self.copied = True
        get = pg.get_copy_data
        digest = self.digest
        hashed = 0
        messages = 0
        first: Any = None
        refilled = False  # libpq's buffer was just refilled from the socket
        try:
            while True:
                nbytes, data = get(1)
                if nbytes > 0:
                    hashed += row_hash(data)
                    if not messages:
                        first = data
                    messages += 1
                    refilled = False
                elif nbytes == 0:
                    if refilled:
                        break  # nothing in the socket either: wait for it
                    pg.consume_input()
                    refilled = True
                else:
                    self.copying = False  # -1: the rows ended
                    break
        finally:
            if messages:
                digest.started(first)
                digest.total += hashed
                digest.messages += messages
                self.deadline = time.monotonic() + timeout  # data came: not stalled
        if self.copying:
            return False
        return self._ending()

    def _ending(self) -> bool:
        pg = self.pg
        while not pg.is_busy():
            result = pg.get_result()
            if result is None:
                self.outcome = self._outcome()
                return True
            self.results.append(result)
        return False

    def _outcome(self) -> Digest | BaseException:
        encoding = self.conn.info.encoding
        for result in self.results:
            if result.status == pq.ExecStatus.FATAL_ERROR:
                error = e.error_from_result(result, encoding=encoding)
                if self.cancelled is not None and isinstance(error, e.QueryCanceled):
                    return _ended(self.cancelled)
                return error
        if not self.copied:  # pragma: no cover - a COPY gives COPY_OUT or an error
            return psycopg.OperationalError("the checksum read gave no COPY")
        return self.digest.digest()

    def cancel(self, why: str) -> None:
        self.cancelled = why
        if why == "stopped" and isinstance(self.conn, bounded.BoundedConnection):
            self.conn.stop_handled = True  # the rollback after it must run, not be cancelled
        bounded.send_cancel(self.conn)
        self.deadline = time.monotonic() + bounded.CANCEL_WAIT

    def finish(self) -> None:
        """After the read: undo the settings (the savepoint), if the connection is usable."""
        if self.conn.closed:
            return
        if isinstance(self.outcome, BaseException):
            return  # the transaction failed: the load rolls it back
        checksum.undo_settings(self.conn, _SAVEPOINT)


def _ended(why: str) -> BaseException:
    if why == "stopped":
        return copyman.Cancelled("the transfer was stopped; the checksum read was cancelled")
    return bounded.StatementTimeout(why)


def digests(
    reads: Sequence[tuple[psycopg.Connection[Any], sql.Composable]],
    settings: dict[str, str] | None,
    bounds: Bounds,
) -> list[Digest | BaseException]:
    """Run every ``(connection, COPY query)`` read-back at once (``settings``: the text
    rendering settings, None for binary) and digest each; per read, its digest or what
    failed (a server error, :class:`bounded.StatementTimeout` after ``bounds.timeout``
    seconds without data, :class:`copyman.Cancelled` on a stop)."""
    running: list[_Read] = []
    out: list[Digest | BaseException | None] = [None] * len(reads)
    index: dict[int, int] = {}
    for i, (conn, statement) in enumerate(reads):
        read = _Read(conn, settings)
        try:
            read.start(statement.as_bytes(conn), bounds.timeout)
        except Exception as exc:  # a server error, a stop or a time-out of its bounds
            out[i] = exc
            continue
        index[id(read)] = i
        running.append(read)
    pending = list(running)
    stopped = False
    while pending:
        for read in list(pending):
            if read.conn.closed:  # a cancel that could not be sent closed it
                read.outcome = _ended(read.cancelled or "stopped")
                pending.remove(read)
                continue
            try:
                ended = read.advance(bounds.timeout)
            except Exception as exc:  # the connection broke
                read.outcome = exc if isinstance(exc, psycopg.Error) else (
                    psycopg.OperationalError(str(exc))
                )
                ended = True
            if ended:
                pending.remove(read)
        now = time.monotonic()
        if pending and bounds.stop.is_set() and not stopped:
            stopped = True
            for read in pending:
                read.cancel("stopped")
        for read in list(pending):
            if now >= read.deadline and not read.conn.closed:
                if read.cancelled is None:
                    read.cancel(f"no data from the server within {bounds.timeout:g} s")
                else:  # the cancelled read did not end either: its state is unknown
                    read.conn.close()
                    read.outcome = _ended(read.cancelled)
                    pending.remove(read)
        if pending:
            wait = min(_POLL, max(0.0, min(r.deadline for r in pending) - now))
            with contextlib.suppress(OSError, ValueError):  # each read looks for itself
                select.select([r.socket for r in pending], [], [], wait)
    for read in running:
        try:
            read.finish()
        except Exception as exc:
            read.outcome = exc
        out[index[id(read)]] = read.outcome
    return [o if o is not None else RuntimeError("no read-back outcome") for o in out]
