"""The locks of a load transaction: the table's load lock, TRUNCATE's lock taken in short
tries, and a lock wait that times out turned into an error naming who is in the way
(:mod:`airflow_copyman.load.connection.locks` holds the SQL)."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import psycopg
from psycopg import sql

from airflow_copyman import copyman
from airflow_copyman.load.connection import bounded, classify, locks
from airflow_copyman.load.modes import create
from airflow_copyman.load.phases.run import Run, Session, rollback

#: The savepoint each try for TRUNCATE's lock rolls back to.
_SAVEPOINT = sql.SQL("SAVEPOINT copyman_table_lock")
_BACK = sql.SQL("ROLLBACK TO SAVEPOINT copyman_table_lock")
_RELEASE = sql.SQL("RELEASE SAVEPOINT copyman_table_lock")


@dataclass(frozen=True)
class TableLock:
    """A destination table's load lock: the table as its server resolves it, and the
    advisory key every CopyMan load of that table takes (one load at a time per table)."""

    name: str
    key: int


def identify(session: Session, new_table: bool) -> TableLock:
    """Bound the session's lock waits, and find its table's load lock: for a table to be
    created, by the schema it will be created in."""
    conn, table = session.conn, session.target.table
    if new_table:
        schema = create.schema_for(conn, table) or ""
        query = locks.identity_of_new(schema, table.name)
    else:
        query = locks.identity_of_existing(table.regclass_text)
    row = conn.execute(*query).fetchone()
    if row is None:
        raise psycopg.errors.UndefinedTable(f"table {table} does not exist any more")
    return TableLock(str(row[0]), int(row[1]))


def lock_table(run: Run, session: Session, lock: TableLock, new_table: bool) -> None:
    """Wait (within ``lock_timeout``) until no other load of the table is running;
    held until this transaction ends. A table to be created that exists by then was
    created by another load meanwhile: transient, a retry loads into it."""
    conn, table = session.conn, session.target.table
    try:
        conn.execute(*locks.lock(lock.key))
    except (psycopg.errors.LockNotAvailable, bounded.StatementTimeout):
        rollback(conn)
        raise timed_out(
            run, session, lock.name,
            "its load lock (an EXCLUSIVE advisory lock on the table's identity, which "
            "a CopyMan load of the table holds until its commit)",
            locks.advisory_holders(lock.key),
        ) from None
    if new_table:
        schema = create.schema_for(conn, table) or ""
        row = conn.execute(*locks.exists(schema, table.name)).fetchone()
        if row and row[0]:
            raise locks.CreatedMeanwhile(
                f"table {lock.name} was created by another load meanwhile; "
                "a retry loads into it"
            )


def lock_exclusively(run: Run, session: Session, lock: TableLock) -> None:
    """TRUNCATE's ACCESS EXCLUSIVE lock, in tries of at most ``ATTEMPT`` seconds until
    ``lock_timeout`` is spent: a TRUNCATE queued behind a long reader would block every
    new reader of the table while it waits; between tries they go on."""
    conn, table = session.conn, session.target.table
    budget = run.lock_wait
    deadline = time.monotonic() + budget
    statement = locks.lock_table(table.identifier, "ACCESS EXCLUSIVE")
    # One savepoint: a try that times out rolls back to it (the load's own locks stay).
    conn.execute(_SAVEPOINT)
    while True:
        left = deadline - time.monotonic()
        conn.execute(*locks.set_lock_timeout(min(locks.ATTEMPT, max(left, 0.0))))
        try:
            conn.execute(statement)
        except psycopg.errors.LockNotAvailable:
            conn.execute(_BACK)
            if time.monotonic() + locks.PAUSE >= deadline:
                raise timed_out(
                    run, session, lock.name,
                    "an ACCESS EXCLUSIVE lock (to TRUNCATE it)",
                    locks.relation_holders(table.regclass_text, "ACCESS EXCLUSIVE"),
                ) from None
            pause = locks.PAUSE + random.uniform(0, locks.PAUSE)
            if run.bounds.stop.wait(pause):
                raise copyman.Cancelled("the transfer was stopped") from None
            continue
        conn.execute(_RELEASE)
        # The try's own setting outlives its savepoint: the load's bound again.
        conn.execute(*locks.set_lock_timeout(budget))
        return


def lock_failed(
    run: Run, session: Session, lock: TableLock, exc: psycopg.Error
) -> BaseException:
    """A statement of the load transaction timed out on a lock (55P03): the error
    naming the table, the lock its mode takes and the sessions in the way; anything
    else as it was."""
    if not isinstance(exc, psycopg.errors.LockNotAvailable):
        return exc
    target = session.target
    mode = target.mode.lock_mode
    rollback(session.conn)
    return timed_out(
        run, session, lock.name,
        f"a lock its statement needed (mode={target.spec.mode!r} takes {mode} on the "
        f"table; {classify.describe(exc)})",
        locks.relation_holders(target.table.regclass_text, mode),
    )


def timed_out(
    run: Run, session: Session, name: str, what: str, holders: locks.Query
) -> locks.LockWaitTimeout:
    conn = session.conn
    names = "(not known: the connection is closed)"
    if not conn.closed:
        try:
            found = locks.sessions(conn.execute(*holders).fetchall())
            names = locks.blockers_text(found)
        except psycopg.Error as exc:
            names = f"(could not be read: {classify.describe(exc)})"
    return locks.LockWaitTimeout(
        f"table {name}: {what} was not granted within "
        f"{run.lock_wait:g} s (lock_timeout); in the way: {names}; nothing was written"
    )
