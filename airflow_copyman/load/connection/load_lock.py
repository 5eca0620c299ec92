"""The table's load lock for a transaction outside a load: a split load's publish takes the
same advisory lock as every CopyMan load of the table (one at a time), with its waits
bounded by ``lock_timeout`` (:mod:`.locks` holds the SQL)."""

from __future__ import annotations

from typing import Any

import psycopg

from airflow_copyman.load.connection import classify, locks


def take_load_lock(
    conn: psycopg.Connection[Any], regclass_text: str, lock_timeout: float,
    *, new_table: tuple[str, str] | None = None,
) -> str:
    """In ``conn``'s open transaction: bound every lock wait by ``lock_timeout`` (until the
    transaction ends), then wait for the table's load lock, held until the commit. Returns
    the table's qualified name. ``new_table``: (schema, name) of a table that may not exist
    yet, whose load lock is the one it will have once created. :class:`locks.LockWaitTimeout`
    (transient) names the sessions in the way; the transaction is then unusable (the caller
    rolls back)."""
    conn.execute(*locks.set_lock_timeout(lock_timeout))
    identity = (
        locks.identity_of_new(*new_table) if new_table is not None
        else locks.identity_of_existing(regclass_text)
    )
    row = conn.execute(*identity).fetchone()
    if row is None:
        raise psycopg.errors.UndefinedTable(f"table {regclass_text} does not exist")
    name, key = str(row[0]), int(row[1])
    conn.execute("SAVEPOINT copyman_load_lock")
    try:
        conn.execute(*locks.lock(key))
    except psycopg.errors.LockNotAvailable as exc:
        conn.execute("ROLLBACK TO SAVEPOINT copyman_load_lock")
        try:
            holders = locks.blockers_text(
                locks.sessions(conn.execute(*locks.advisory_holders(key)).fetchall())
            )
        except psycopg.Error as read:
            holders = f"(could not be read: {classify.describe(read)})"
        raise locks.LockWaitTimeout(
            f"table {name}: its load lock (the advisory lock a CopyMan load of the table holds "
            f"until its commit) was not granted within {lock_timeout:g} s (lock_timeout); in "
            f"the way: {holders}; nothing was written"
        ) from exc
    conn.execute("RELEASE SAVEPOINT copyman_load_lock")
    return name
