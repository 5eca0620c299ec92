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

Each read is the engine's own COPY reader (:class:`copyman.StatementProducer` with
``digest=True``: the one loop that digests rows, the copy's and the read-backs'), run as
steps by the engine's one driver, all at once, each hashed as it arrives, so one slow
server holds up nobody and no data is kept. A read with no data for the load's timeout,
or a stop, is aborted as the engine aborts a COPY: cancelled on its server from this
thread, its end read (then its connection is closed if it does not end within
:data:`bounded.CANCEL_WAIT`).

This module imports no Airflow module.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg import sql

from airflow_copyman import copyman
from airflow_copyman.copyman import Digest
from airflow_copyman.load.connection import bounded
from airflow_copyman.load.connection.bounded import Bounds
from airflow_copyman.load.verify import checksum

#: The settings a type's text output depends on (all but TimeZone pinned by the load's
#: session, read from the source all the same: a connection may have changed them).
RENDERING = ("TimeZone", "DateStyle", "IntervalStyle", "extra_float_digits",
             "lc_monetary", "bytea_output")

_SAVEPOINT = sql.Identifier("copyman_readback")


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


def _read_step(producer: copyman.StatementProducer) -> copyman.Steps:
    """One read-back as the engine's steps: the source's own COPY reader (the producer),
    digesting each row as it arrives; returns the digest."""
    yield from producer.starting()
    while True:
        producer.read(copyman.BATCH_BYTES)
        if producer.done:
            digest = producer.digest()
            if digest is None:  # pragma: no cover - made with digest=True
                raise psycopg.OperationalError("the read-back kept no digest")
            return digest
        yield producer.fileno(), copyman.Wait.READ


class _Read:
    """One destination's read-back: its COPY reader and why it was cancelled, if it was."""

    def __init__(self, conn: psycopg.Connection[Any], statement: sql.Composed) -> None:
        self.conn = conn
        self.producer = copyman.StatementProducer(conn, statement, digest=True)
        # Its batches are only digested: no list of records is kept.
        self.producer.keep_records = False
        self.why: str | None = None

    def cancel(self, why: str) -> copyman.Step:
        """The abort (a cancel sent from this thread, then the COPY's end read) as a step
        bounded by CANCEL_WAIT."""
        self.why = why
        if why == "stopped" and isinstance(self.conn, bounded.BoundedConnection):
            self.conn.stop_handled = True  # the rollback after it must run, not be cancelled
        reason = copyman.Cancelled(why)
        return copyman.Step(
            self.producer.aborting(reason), time.monotonic() + bounded.CANCEL_WAIT
        )

    def outcome(self, step: copyman.Step | None) -> Digest | BaseException:
        """What the read gave: ``step`` ended (None: it never ended, even cancelled)."""
        if step is None:
            self.producer.abandon()  # closes the connection: its state is unknown
            return _ended(self.why or "stopped")
        if self.why is not None:
            return _ended(self.why)
        if step.error is not None:
            error = step.error
            return error if isinstance(error, psycopg.Error | copyman.RowCountMismatch) else (
                psycopg.OperationalError(str(error))
            )
        digest: Digest = step.value
        return digest

    def finish(self, outcome: Digest | BaseException) -> Digest | BaseException:
        """After the read: release the connection, and undo the settings (the savepoint)
        where the connection is usable and the read succeeded."""
        self.producer.close()
        if self.conn.closed or isinstance(outcome, BaseException):
            return outcome  # the transaction failed: the load rolls it back
        try:
            checksum.undo_settings(self.conn, _SAVEPOINT)
        except Exception as exc:
            return exc
        return outcome


def _ended(why: str) -> BaseException:
    if why == "stopped":
        return copyman.Cancelled("the transfer was stopped; the checksum read was cancelled")
    return bounded.StatementTimeout(why)


def digests(
    reads: Sequence[tuple[psycopg.Connection[Any], sql.Composed]],
    settings: dict[str, str] | None,
    bounds: Bounds,
) -> list[Digest | BaseException]:
    """Run every ``(connection, COPY query)`` read-back at once (``settings``: the text
    rendering settings, None for binary) and digest each; per read, its digest or what
    failed (a server error, :class:`bounded.StatementTimeout` after ``bounds.timeout``
    seconds without data, :class:`copyman.Cancelled` on a stop).

    The reads are the engine's steps, run by its one :class:`~airflow_copyman.copyman.Driver`:
    a read that gets no data for ``bounds.timeout`` seconds, or every read on a stop, is
    aborted as the engine aborts a COPY (the cancel sent from this thread, then the COPY's
    end read, within CANCEL_WAIT; else its connection is closed)."""
    out: list[Digest | BaseException | None] = [None] * len(reads)
    started: dict[int, _Read] = {}
    steps: dict[int, copyman.Step] = {}
    for i, (conn, statement) in enumerate(reads):
        try:
            checksum.with_settings(conn, {**PARALLEL, **(settings or {})}, _SAVEPOINT)
            read = _Read(conn, statement)
        except Exception as exc:  # a server error, a stop or a time-out of its bounds
            out[i] = exc
            continue
        started[i] = read
        # Data that comes moves its deadline: only a read with none for the timeout stalls.
        steps[i] = copyman.Step(_read_step(read.producer), idle=bounds.timeout)
    ended = _drive(started, steps, bounds)
    for i, read in started.items():
        out[i] = read.finish(read.outcome(ended.get(i)))
    return [o if o is not None else RuntimeError("no read-back outcome") for o in out]


def _drive(
    reads: dict[int, _Read], steps: dict[int, copyman.Step], bounds: Bounds
) -> dict[int, copyman.Step]:
    """Run the reads until each ends; the steps that ended, by read (a read whose abort
    did not end within CANCEL_WAIT has none)."""
    driver = copyman.Driver(steps)

    def running() -> list[int]:
        return [i for i in driver.pending if reads[i].why is None]

    while True:
        driver.run(lambda: bounds.stop.is_set() and bool(running()))
        if bounds.stop.is_set():  # abort every read still running
            for i in running():
                driver.pending.pop(i).stop()
                driver.pending[i] = reads[i].cancel("stopped")
        for i in [i for i in driver.expired if reads[i].why is None]:
            # No data for the timeout: abort it (a read whose abort expired too stays).
            driver.expired.pop(i)
            driver.pending[i] = reads[i].cancel(
                f"no data from the server within {bounds.timeout:g} s"
            )
        if not driver.pending:
            return driver.finished
