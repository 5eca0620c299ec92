"""The ledger's steps in a load: which destinations are loaded already, preparing the
ledger, and each load's claim. The ledger itself is a
:class:`~airflow_copyman.load.ledger.protocol.LoadLedger` (the table in each destination
database, or the Airflow task's ``task_state_store`` record): the one place that decides."""

from __future__ import annotations

import psycopg

from airflow_copyman.load.catalog import tables
from airflow_copyman.load.connection import bounded, classify
from airflow_copyman.load.ledger.protocol import LoadLedger, Slot
from airflow_copyman.load.phases.run import Run, Session, Target, rollback
from airflow_copyman.load.spec import ConfigError


def slot(target: Target) -> Slot:
    """``target`` as the ledger knows it."""
    return Slot(
        target.spec.conn_id, target.table, target.table_key, target.spec.create == "if_missing"
    )


def check_recorded(run: Run, ledger: LoadLedger) -> None:
    """Before connecting: skip what an earlier try recorded by the destination as spelled
    (the task_state_store record; the table ledger knows nothing yet)."""
    for target in run.pending():
        entry = ledger.recorded(target.spec)
        if entry is not None:
            run.already_loaded(target, entry)


def check(run: Run, ledger: LoadLedger, sessions: list[Session]) -> None:
    """Connected: skip what an earlier try loaded, asked by the table as its server
    resolved it (a try that spelled it otherwise loaded it).

    :raises ConfigError: the ledger cannot be read, for good."""
    skipped = 0
    for session in sessions:
        target = session.target
        try:
            entry = ledger.loaded_already(session.conn, slot(target))
        except psycopg.Error as exc:
            if classify.is_permanent(exc):
                raise run.config_error(target, exc, f"reading the ledger {ledger.name}") from exc
            run.fail(target, exc, "reading the ledger")
            continue
        if entry is not None:
            run.already_loaded(target, entry)
            skipped += 1
    run.log.info(
        "Ledger %s: %d destination(s) already loaded (skipped), %d to load",
        ledger.name,
        skipped,
        len(run.pending()),
    )


def prepare(run: Run, ledger: LoadLedger, sessions: list[Session]) -> None:
    """What recording needs, before the load transactions (the ledger table).

    :raises ConfigError: it cannot be had, for good."""
    errors = []
    for session in sessions:
        try:
            ledger.prepare(session.conn, slot(session.target))
        except tables.PlanError as exc:
            errors.append(f"{session.label}: {exc}")
        except psycopg.Error as exc:
            run.fail(session.target, exc, "creating the ledger table")
    if errors:
        raise ConfigError(run.redact("; ".join(errors)))


def claim(run: Run, session: Session) -> bool:
    """Open the destination's load transaction, owning the load first: another try of
    this lineage loading it now (a zombie) holds the claim until its commit, and its
    ledger row shows then. False if the destination is loaded or failed."""
    conn, target = session.conn, session.target
    try:
        conn.rollback()
        entry = None if run.ledger is None else run.ledger.claim_load(conn, slot(target))
    except psycopg.Error as exc:
        doing = "claiming the load"
        if isinstance(exc, bounded.StatementTimeout):
            doing += " (another try of this task is loading it)"
        run.drop(session, exc, doing)
        return False
    if entry is not None:
        rollback(conn)
        run.already_loaded(target, entry)
        return False
    return True
