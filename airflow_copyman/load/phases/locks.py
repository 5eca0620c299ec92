"""The locks of a load transaction: the table's load lock, TRUNCATE's lock taken in short
tries, and a lock wait that times out turned into an error naming who is in the way
(:mod:`airflow_copyman.load.connection.locks` holds the SQL)."""

from __future__ import annotations

import random
import time
from collections.abc import Sequence

import psycopg
from psycopg import sql

from airflow_copyman import copyman
from airflow_copyman.load.connection import bounded, classify, locks
from airflow_copyman.load.modes import create
from airflow_copyman.load.phases.plan import Plan
from airflow_copyman.load.phases.state import State, Target

#: The savepoint each try for TRUNCATE's lock rolls back to.
_SAVEPOINT = sql.SQL("SAVEPOINT copyman_table_lock")
_BACK = sql.SQL("ROLLBACK TO SAVEPOINT copyman_table_lock")
_RELEASE = sql.SQL("RELEASE SAVEPOINT copyman_table_lock")


class TableLocking(State):
    """One load at a time per table, and lock waits bounded by ``lock_timeout``."""

    #: Seconds any one lock wait of a load transaction may last (set by Transfer).
    lock_timeout: float

    @property
    def _lock_wait(self) -> float:
        # Never longer than a statement may wait at all: the server's lock_timeout then
        # ends the wait first, and says it was a lock.
        return min(self.lock_timeout, self.receiver_timeout)

    def _in_lock_order(self, claimed: Sequence[Target], plan: Plan) -> list[Target]:
        """Bound the lock waits of each load transaction and find its table's load lock;
        the destinations in the order of their keys, so that two loads of the same tables
        take their locks in one order (no cycle of waits between their sessions)."""
        found = []
        for target in claimed:
            conn = target.conn
            assert conn is not None
            try:
                conn.execute(*locks.set_lock_timeout(self._lock_wait))
                self._identify(target, plan.of(target).create)
            except psycopg.Error as exc:
                self._fail(target, exc, "identifying the table for its load lock")
                self._rollback(target)
                continue
            found.append(target)
        return sorted(found, key=lambda t: t.lock_key or 0)

    def _identify(self, target: Target, new_table: bool) -> None:
        """The table's qualified name as its server resolves it, and its lock key: for a
        table to be created, the schema it will be created in."""
        conn, table = target.conn, target.table
        assert conn is not None
        target.locked = False
        if new_table:
            schema = create.schema_for(conn, table) or ""
            query = locks.identity_of_new(schema, table.name)
        else:
            query = locks.identity_of_existing(table.regclass_text)
        row = conn.execute(*query).fetchone()
        if row is None:
            raise psycopg.errors.UndefinedTable(f"table {table} does not exist any more")
        target.lock_name, target.lock_key = str(row[0]), int(row[1])

    def _lock_table(self, target: Target, new_table: bool) -> None:
        """Wait (within ``lock_timeout``) until no other load of the table is running;
        held until this transaction ends. A table to be created that exists by then was
        created by another load meanwhile: transient, a retry loads into it."""
        conn, table = target.conn, target.table
        assert conn is not None and target.lock_key is not None
        try:
            conn.execute(*locks.lock(target.lock_key))
        except (psycopg.errors.LockNotAvailable, bounded.StatementTimeout):
            self._rollback(target)
            raise self._timed_out(
                target,
                "its load lock (an EXCLUSIVE advisory lock on the table's identity, which "
                "a CopyMan load of the table holds until its commit)",
                locks.advisory_holders(target.lock_key),
            ) from None
        target.locked = True
        if new_table:
            schema = create.schema_for(conn, table) or ""
            row = conn.execute(*locks.exists(schema, table.name)).fetchone()
            if row and row[0]:
                raise locks.CreatedMeanwhile(
                    f"table {target.lock_name} was created by another load meanwhile; "
                    "a retry loads into it"
                )

    def _lock_exclusively(self, target: Target) -> None:
        """TRUNCATE's ACCESS EXCLUSIVE lock, in tries of at most ``ATTEMPT`` seconds until
        ``lock_timeout`` is spent: a TRUNCATE queued behind a long reader would block every
        new reader of the table while it waits; between tries they go on."""
        conn, table = target.conn, target.table
        assert conn is not None
        budget = self._lock_wait
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
                    raise self._timed_out(
                        target,
                        "an ACCESS EXCLUSIVE lock (to TRUNCATE it)",
                        locks.relation_holders(table.regclass_text, "ACCESS EXCLUSIVE"),
                    ) from None
                pause = locks.PAUSE + random.uniform(0, locks.PAUSE)
                if self.bounds.stop.wait(pause):
                    raise copyman.Cancelled("the transfer was stopped") from None
                continue
            conn.execute(_RELEASE)
            # The try's own setting outlives its savepoint: the load's bound again.
            conn.execute(*locks.set_lock_timeout(budget))
            return

    def _lock_failed(self, target: Target, exc: psycopg.Error) -> BaseException:
        """A statement of the load transaction timed out on a lock (55P03): the error
        naming the table, the lock its mode takes and the sessions in the way; anything
        else as it was."""
        if not isinstance(exc, psycopg.errors.LockNotAvailable):
            return exc
        mode = target.mode.lock_mode
        self._rollback(target)
        return self._timed_out(
            target,
            f"a lock its statement needed (mode={target.spec.mode!r} takes {mode} on the "
            f"table; {classify.describe(exc)})",
            locks.relation_holders(target.table.regclass_text, mode),
        )

    def _timed_out(
        self, target: Target, what: str, holders: locks.Query
    ) -> locks.LockWaitTimeout:
        conn = target.conn
        names = "(not known: the connection is closed)"
        if conn is not None and not conn.closed:
            try:
                found = locks.sessions(conn.execute(*holders).fetchall())
                names = locks.blockers_text(found)
            except psycopg.Error as exc:
                names = f"(could not be read: {classify.describe(exc)})"
        return locks.LockWaitTimeout(
            f"table {target.lock_name or target.table}: {what} was not granted within "
            f"{self._lock_wait:g} s (lock_timeout); in the way: {names}; nothing was written"
        )
