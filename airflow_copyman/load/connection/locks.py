"""One load at a time into one table, and lock waits that end with a name.

Every load of a destination table takes a transaction-scoped advisory lock on the table's
identity on its server before it writes to it: the key hashes the schema and name the
server resolves (``pg_class``/``pg_namespace``; for a table ``create="if_missing"`` will
create, the schema it will be created in), so every spelling, connection id, DAG and run
of one table maps to one key (advisory locks are per database already). A crashed load
never keeps it: COMMIT or ROLLBACK releases it.

Every lock wait of a load transaction is bounded by ``lock_timeout`` (``SET LOCAL``); a
wait that times out (55P03) fails the destination transient, naming the table, the lock
mode and the sessions in the way (their ``application_name``: a CopyMan load run by the
operator names its DAG, task and run there).

The SQL is built by pure functions here; :mod:`airflow_copyman.load.phases.locks` runs it in a load.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from psycopg import sql

from airflow_copyman.load.spec import LoadError

#: A statement and its parameters.
Query = tuple[sql.SQL, list[Any]]

#: Longest single try for TRUNCATE's ACCESS EXCLUSIVE lock: readers that arrive meanwhile
#: queue behind the waiting TRUNCATE at most this long.
ATTEMPT = 0.5
#: Pause between two tries (plus up to as much again, at random, so two loads that
#: collide do not retry in step).
PAUSE = 0.1

#: Hashed with the table's quoted, qualified name: the advisory key of its loads.
KEY_PREFIX = "copyman table "

#: The modes of ``pg_locks`` each table lock mode waits for (PostgreSQL's conflict table).
CONFLICTS: dict[str, tuple[str, ...]] = {
    "ROW EXCLUSIVE": (
        "ShareLock", "ShareRowExclusiveLock", "ExclusiveLock", "AccessExclusiveLock",
    ),
    "ACCESS EXCLUSIVE": (
        "AccessShareLock", "RowShareLock", "RowExclusiveLock", "ShareUpdateExclusiveLock",
        "ShareLock", "ShareRowExclusiveLock", "ExclusiveLock", "AccessExclusiveLock",
    ),
}


class LockWaitTimeout(LoadError):
    """A lock the load needed was not granted within ``lock_timeout`` (a retry may get it)."""

    permanent = False


class CreatedMeanwhile(LoadError):
    """The table ``create="if_missing"`` was to create exists now: another load created it
    while this one waited (a retry loads into it)."""

    permanent = False


@dataclass(frozen=True)
class Session:
    """A session in the way of a lock, as ``pg_locks`` and ``pg_stat_activity`` show it."""

    pid: int
    application_name: str | None
    state: str | None
    #: Seconds its transaction has run (None: not shown to this role).
    xact_seconds: float | None
    granted: bool
    mode: str

    def describe(self) -> str:
        name = repr(self.application_name) if self.application_name else "no application_name"
        state = self.state or "state not shown to this role"
        running = (
            f"its transaction has run {self.xact_seconds:.1f} s"
            if self.xact_seconds is not None
            else "its transaction's start not shown to this role"
        )
        holds = "holds" if self.granted else "waits for"
        return f"pid {self.pid} {name} ({state}, {running}, {holds} {self.mode})"


def timeout_setting(seconds: float) -> str:
    """``lock_timeout``'s value for ``seconds`` (at least 1 ms: 0 would mean no limit)."""
    return f"{max(1, round(seconds * 1000))}ms"


def set_lock_timeout(seconds: float) -> Query:
    """Bound every lock wait of the current transaction (undone at its end)."""
    return sql.SQL("SELECT set_config('lock_timeout', %s, true)"), [timeout_setting(seconds)]


def identity_of_existing(regclass_text: str) -> Query:
    """The table's qualified name as its server resolves it, and its advisory key (no row:
    the table does not exist)."""
    return sql.SQL(
        "SELECT q, hashtextextended(%s || q, 0) FROM ("
        "SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname) AS q "
        "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE c.oid = to_regclass(%s)) AS r"
    ), [KEY_PREFIX, regclass_text]


def identity_of_new(schema: str, name: str) -> Query:
    """The qualified name and advisory key of a table to be created as ``schema.name``:
    the same as :func:`identity_of_existing` gives once it exists."""
    return sql.SQL(
        "SELECT q, hashtextextended(%s || q, 0) FROM ("
        "SELECT quote_ident(%s) || '.' || quote_ident(%s) AS q) AS r"
    ), [KEY_PREFIX, schema, name]


def lock(key: int) -> Query:
    """Wait (within ``lock_timeout``) for the table's load lock, held until the commit."""
    return sql.SQL("SELECT pg_advisory_xact_lock(%s)"), [key]


def exists(schema: str, name: str) -> Query:
    """Whether ``schema.name`` exists now. Read from ``pg_class`` itself: a name lookup
    (``to_regclass``) may answer from the session's catalog cache, which an advisory lock
    does not refresh, and miss a table another transaction just committed."""
    return sql.SQL(
        "SELECT EXISTS (SELECT FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = %s AND c.relname = %s)"
    ), [schema, name]


def lock_table(identifier: sql.Composable, mode: str) -> sql.Composed:
    """``LOCK TABLE ONLY``: the lock the statement to come takes on the table itself."""
    if mode not in CONFLICTS:
        raise ValueError(f"unknown lock mode {mode!r}")
    return sql.SQL("LOCK TABLE ONLY {} IN {} MODE").format(identifier, sql.SQL(mode))


_SESSIONS = (
    "SELECT l.pid, a.application_name, a.state, "
    "extract(epoch FROM clock_timestamp() - a.xact_start)::float8, l.granted, l.mode "
    "FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid "
    "WHERE l.pid <> pg_backend_pid() AND l.database = "
    "(SELECT oid FROM pg_database WHERE datname = current_database()) AND "
)


def advisory_holders(key: int) -> Query:
    """The sessions holding (or queued for) the advisory key: a bigint key shows in
    ``pg_locks`` as its high and low 32 bits (``classid``, ``objid``) with ``objsubid`` 1."""
    unsigned = key & 0xFFFF_FFFF_FFFF_FFFF
    return sql.SQL(
        _SESSIONS + "l.locktype = 'advisory' AND l.classid::int8 = %s AND l.objid::int8 = %s "
        "AND l.objsubid = 1 ORDER BY l.granted DESC, a.xact_start"
    ), [unsigned >> 32, unsigned & 0xFFFF_FFFF]


def relation_holders(regclass_text: str, mode: str) -> Query:
    """The sessions holding (or queued for) a lock on the table that conflicts with
    ``mode``."""
    return sql.SQL(
        _SESSIONS + "l.locktype = 'relation' AND l.relation = to_regclass(%s) "
        "AND l.mode = ANY(%s) ORDER BY l.granted DESC, a.xact_start"
    ), [regclass_text, list(CONFLICTS[mode])]


def sessions(rows: Sequence[tuple[Any, ...]]) -> list[Session]:
    return [Session(*row) for row in rows]


def blockers_text(found: Sequence[Session]) -> str:
    if not found:
        return "no session holds it now (the holder ended meanwhile)"
    return "; ".join(s.describe() for s in found)


def application_name_for(dag_id: str, task_id: str, run_id: str, map_index: int = -1) -> str:
    """``copyman <dag_id>.<task_id>[<map_index>] <run_id>``, as ``application_name`` takes
    it: printable ASCII (the server would alter anything else), at most 63 bytes."""
    index = f"[{map_index}]" if map_index >= 0 else ""
    text = f"copyman {dag_id}.{task_id}{index} {run_id}"
    ascii_only = "".join(c if " " <= c <= "~" else "?" for c in text)
    return ascii_only[:63]
