"""The ledger's steps in a load: which destinations are loaded already, the ledger table,
and each load's claim (:mod:`airflow_copyman.load.ledger.table` is the table itself)."""

from __future__ import annotations

import psycopg

from airflow_copyman.load.catalog import tables
from airflow_copyman.load.connection import bounded, classify
from airflow_copyman.load.modes import create
from airflow_copyman.load.phases.plan import Plan
from airflow_copyman.load.phases.state import State, Target
from airflow_copyman.load.spec import ConfigError


class LedgerSteps(State):
    """Reading the ledger, creating its table, claiming each load."""

    def _check_ledger(self) -> None:
        assert self.ledger is not None
        skipped = 0
        for target in self._pending():
            assert target.conn is not None
            try:
                schema = self.ledger.schema_for(target.conn, target.table)
                if schema is None and target.spec.create == "if_missing":
                    schema = create.schema_for(target.conn, target.table)
                target.ledger_schema = schema
                entry = None
                if schema is not None:
                    entry = self.ledger.lookup(
                        target.conn, schema, target.spec.conn_id, target.table_key,
                        str(target.table),
                    )
                else:
                    target.conn.rollback()
            except psycopg.Error as exc:
                if classify.is_permanent(exc):
                    raise self._config_error(
                        target, exc, f"reading the ledger {self.ledger.name}"
                    ) from exc
                self._fail(target, exc, "reading the ledger")
                continue
            if entry is not None:
                self._already_loaded(target, entry)
                skipped += 1
        self.log.info(
            "Ledger %s: %d destination(s) already loaded (skipped), %d to load",
            self.ledger.name,
            skipped,
            len(self._pending()),
        )

    def _check_loaded_before(self) -> None:
        """Without a ledger: skip what an earlier try recorded elsewhere, asked by the table
        as its server resolved it (a try that spelled it otherwise loaded it)."""
        assert self.loaded_before is not None
        for target in self._pending():
            entry = self.loaded_before(target.result)
            if entry is not None:
                self._already_loaded(target, entry)

    def _prepare_ledger(self, plan: Plan) -> None:
        assert self.ledger is not None
        errors = []
        for target in self._pending():
            assert target.conn is not None
            schema = target.ledger_schema
            try:
                if schema is None:
                    schema = self.ledger.schema_for(target.conn, target.table)
                    if schema is None and plan.of(target).create:
                        schema = create.schema_for(target.conn, target.table)
                    target.ledger_schema = schema
                if schema is None:  # pragma: no cover - planning found the table
                    raise tables.PlanError(f"table {target.table} does not exist")
                target.ledger_extras = self.ledger.ensure_table(target.conn, schema)
            except tables.PlanError as exc:
                errors.append(f"{target.label}: {exc}")
            except psycopg.Error as exc:
                if classify.is_permanent(exc):
                    errors.append(
                        f"{target.spec.conn_id}: cannot create the ledger table "
                        f"{self.ledger.name_in(schema or '?')} ({classify.describe(exc)}); "
                        "set ledger_schema to a schema the connection may write, or "
                        "ledger=False to keep no ledger"
                    )
                else:
                    self._fail(target, exc, "creating the ledger table")
        if errors:
            raise ConfigError(self._redact("; ".join(errors)))

    def _claim(self, target: Target) -> bool:
        """Open the destination's load transaction, owning the load first: another try of
        this lineage loading it now (a zombie) holds the claim until its commit, and its
        ledger row shows then. False if the destination is loaded or failed."""
        conn = target.conn
        assert conn is not None
        try:
            conn.rollback()
            if self.ledger is None or target.ledger_schema is None:
                return True
            # Keyed by the table the server resolved: a try spelling it otherwise is
            # waited for and found all the same.
            self.ledger.claim(conn, target.spec.conn_id, target.table_key)
            entry = self.ledger.read(
                conn, target.ledger_schema, target.spec.conn_id, target.table_key,
                str(target.table),
            )
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
