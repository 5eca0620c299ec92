"""The ledger's steps in a load: which destinations are loaded already, the ledger table,
and each load's claim (:mod:`airflow_copyman.load.ledger.table` is the table itself)."""

from __future__ import annotations

import psycopg

from airflow_copyman.load.catalog import tables
from airflow_copyman.load.connection import bounded, classify
from airflow_copyman.load.ledger.protocol import LoadLedger, Slot
from airflow_copyman.load.phases.state import State, Target
from airflow_copyman.load.spec import ConfigError


class LedgerSteps(State):
    """Asking the ledger which destinations are loaded, preparing it, claiming each load."""

    def _check_recorded(self, ledger: LoadLedger) -> None:
        """Before connecting: what an earlier try recorded by the destination as spelled
        (the task_state_store record; the table ledger knows nothing yet)."""
        for target in self._pending():
            entry = ledger.recorded(target.spec)
            if entry is not None:
                self._already_loaded(target, entry)

    def _check_ledger(self, ledger: LoadLedger) -> None:
        """Connected: skip what an earlier try loaded, asked by the table as its server
        resolved it (a try that spelled it otherwise loaded it)."""
        skipped = 0
        for target, conn in self._connected():
            try:
                entry = ledger.loaded_already(conn, slot(target))
            except psycopg.Error as exc:
                if classify.is_permanent(exc):
                    raise self._config_error(
                        target, exc, f"reading the ledger {ledger.name}"
                    ) from exc
                self._fail(target, exc, "reading the ledger")
                continue
            if entry is not None:
                self._already_loaded(target, entry)
                skipped += 1
        self.log.info(
            "Ledger %s: %d destination(s) already loaded (skipped), %d to load",
            ledger.name,
            skipped,
            len(self._pending()),
        )

    def _prepare_ledger(self, ledger: LoadLedger) -> None:
        errors = []
        for target, conn in self._connected():
            try:
                ledger.prepare(conn, slot(target))
            except tables.PlanError as exc:
                errors.append(f"{target.label}: {exc}")
            except psycopg.Error as exc:
                self._fail(target, exc, "creating the ledger table")
        if errors:
            raise ConfigError(self._redact("; ".join(errors)))

    def _claim(self, target: Target) -> bool:
        """Open the destination's load transaction, owning the load first: another try of
        this lineage loading it now (a zombie) holds the claim until its commit, and its
        ledger row shows then. False if the destination is loaded or failed."""
        conn = target.conn
        if conn is None:
            return False
        try:
            conn.rollback()
            entry = None
            if self.ledger is not None:
                entry = self.ledger.claim_load(conn, slot(target))
        except psycopg.Error as exc:
            doing = "claiming the load"
            if isinstance(exc, bounded.StatementTimeout):
                doing += " (another try of this task is loading it)"
            self._fail(target, exc, doing)
            self._rollback(target)
            return False
        if entry is not None:
            self._rollback(target)
            self._already_loaded(target, entry)
            return False
        return True


def slot(target: Target) -> Slot:
    """``target`` as the ledger knows it."""
    return Slot(
        target.spec.conn_id, target.table, target.table_key, target.spec.create == "if_missing"
    )
