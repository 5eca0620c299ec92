"""Between the plan and the copy: open each destination's load transaction (claim the
load, take the table's load lock in one order, create the table, the mode's start, the
preoperator). Returns the open transactions (:class:`Loading`), which the copy and the
commit take."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import psycopg

from airflow_copyman.load.connection import classify, locks
from airflow_copyman.load.modes import create
from airflow_copyman.load.phases import ledger, verify
from airflow_copyman.load.phases.locks import (
    TableLock,
    identify,
    lock_exclusively,
    lock_failed,
    lock_table,
)
from airflow_copyman.load.phases.plan import Plan
from airflow_copyman.load.phases.run import Run, Session, Target
from airflow_copyman.load.verify.checksum import Checksum, ColumnRendering


@dataclass(frozen=True)
class Loading:
    """A destination whose load transaction is open, up to its COPY: its table's load
    lock (and whether it is held yet: a merge takes it before its apply), and for
    ``verify="checksum"`` how its columns are rendered and what its scope held before the
    COPY (rows a preoperator wrote)."""

    session: Session
    lock: TableLock
    locked: bool
    started: float
    renderings: list[ColumnRendering] | None = None
    baseline: Checksum | None = None

    @property
    def target(self) -> Target:
        return self.session.target

    @property
    def conn(self) -> psycopg.Connection[Any]:
        return self.session.conn

    @property
    def label(self) -> str:
        return self.session.label


def open_all(
    run: Run, plan: Plan, sessions: list[Session], rendering: verify.Rendering
) -> list[Loading]:
    """Every claim first, then the TRUNCATEs: waiting for another try's claim must not
    hold a TRUNCATE lock on a table taken before it."""
    claimed = [s for s in sessions if ledger.claim(run, s)]
    opened = []
    for session, lock in _in_lock_order(run, plan, claimed):
        loading = _begin(run, plan, session, lock, rendering)
        if loading is not None:
            opened.append(loading)
    return opened


def _in_lock_order(
    run: Run, plan: Plan, claimed: list[Session]
) -> list[tuple[Session, TableLock]]:
    """Bound the lock waits of each load transaction and find its table's load lock;
    the destinations in the order of their keys, so that two loads of the same tables
    take their locks in one order (no cycle of waits between their sessions)."""
    found = []
    for session in claimed:
        try:
            session.conn.execute(*locks.set_lock_timeout(run.lock_wait))
            found.append((session, identify(session, plan.of(session.target).create)))
        except psycopg.Error as exc:
            run.drop(session, exc, "identifying the table for its load lock")
    return sorted(found, key=lambda found: found[1].key)


def _begin(
    run: Run, plan: Plan, session: Session, lock: TableLock, rendering: verify.Rendering
) -> Loading | None:
    """The load transaction, up to the COPY: create the table, the mode's start
    (TRUNCATE, DELETE, the merge's staging table), the preoperator. None (rolled back)
    where it fails."""
    conn, target = session.conn, session.target
    mode, planned = target.mode, plan.of(target)
    by_text = run.verify == "checksum" and not planned.by_stream
    renderings = baseline = None
    locked = False
    doing = "taking the table's load lock"
    try:
        # Before anything is written (a merge: before its apply, in commit; one that
        # creates its table: now, before the CREATE).
        if target.spec.load_lock and (not mode.lock_before_finish or planned.create):
            lock_table(run, session, lock, planned.create)
            locked = True
        doing = "creating the table"
        if planned.create:
            conn.execute(create.statement(
                target.table, planned.columns, mode.key or None,
                nulls_match=target.spec.key_nulls == "match",
            ))
        if by_text:
            doing = "describing the columns for the checksum"
            renderings = verify.take_renderings(session, planned)
        doing = f"starting mode={mode.name!r}"
        if mode.lock_mode == "ACCESS EXCLUSIVE" and not planned.create:
            doing = "locking the table for TRUNCATE"
            lock_exclusively(run, session, lock)
            doing = f"starting mode={mode.name!r}"
        mode.begin(conn, planned.names, created=planned.create)
        doing = "running the preoperator"
        for statement in target.spec.statements:
            conn.execute(statement)  # type: ignore[call-overload]
        if run.verify == "checksum" and target.spec.statements:
            doing = "taking the checksum of the rows before the COPY"
            baseline = verify.take_baseline(rendering, session, plan)
    except (locks.LockWaitTimeout, locks.CreatedMeanwhile) as exc:
        run.drop(session, exc, doing)
        return None
    except psycopg.Error as exc:
        run.drop(session, _begin_error(run, session, lock, exc, doing), doing)
        return None
    return Loading(session, lock, locked, time.monotonic(), renderings, baseline)


def _begin_error(
    run: Run, session: Session, lock: TableLock, exc: psycopg.Error, doing: str
) -> BaseException:
    """A lock that timed out, named; a CREATE TABLE that lost a race on the catalog
    (another session created a table or type of that name meanwhile): transient."""
    catalog = (exc.diag.constraint_name or "").startswith(("pg_type_", "pg_class_"))
    if doing == "creating the table" and catalog:
        return locks.CreatedMeanwhile(
            f"table {lock.name} (or a type of its name) was created by another session "
            f"meanwhile ({classify.describe(exc)}); a retry loads into it"
        )
    return lock_failed(run, session, lock, exc)
