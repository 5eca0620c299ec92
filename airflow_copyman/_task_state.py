"""The task's ``task_state_store`` record: the lineage of its tries, and which destinations
they loaded (the operator's record where it keeps no ledger table, and a mirror of the ledger
for the Airflow UI where it does)."""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime
from typing import Any

import psycopg

from airflow_copyman._destinations import Destination, DestinationResult, TransferReport
from airflow_copyman.load import Entry, Extras, Relation, Slot

__all__ = ["STATE_KEY", "TaskStateLedger"]

#: The ``task_state_store`` key holding the lineage and the destinations it loaded.
STATE_KEY = "copyman"


class TaskStateLedger:
    """The task's ``task_state_store`` record: the lineage, and what it loaded; without the
    table ledger (``ledger=False``), the load's ledger
    (:class:`~airflow_copyman.load.LoadLedger`: :meth:`recorded` before connecting,
    :meth:`loaded_already` once the table is resolved, :meth:`committed` after each
    commit); with it, a mirror of it for the Airflow UI.

    Retries of a task instance share one store record (Airflow keys it by DAG run, task
    and map index); a manual clear keeps it, but raises ``max_tries`` (to ``try_number +
    retries``), and a re-created DAG run starts with an empty store. So the lineage is a
    random id kept in the store together with ``max_tries``: same ``max_tries``, same
    lineage; otherwise a new one. Without a store (Airflow < 3.3, or ``execute`` called
    outside a task run), the lineage is derived from ``max_tries`` alone.
    """

    def __init__(
        self, store: Any, max_tries: int, *, resume_on_clear: bool, try_number: int = 0
    ) -> None:
        self.store = store
        #: The try recording (:meth:`committed`).
        self.try_number = try_number
        self.record_: dict[str, Any] = {}
        previous = store.get(STATE_KEY) if store is not None else None
        if (
            isinstance(previous, dict)
            and previous.get("max_tries") == max_tries
            and isinstance(previous.get("lineage"), str)
        ):
            self.record_ = previous
            self.lineage: str = previous["lineage"]
            return
        if store is None:
            self.lineage = f"max_tries-{max_tries}"
        else:
            self.lineage = uuid.uuid4().hex
        carried = {}
        if resume_on_clear and isinstance(previous, dict):
            carried = dict(previous.get("destinations") or {})
        self.record_ = {"lineage": self.lineage, "max_tries": max_tries, "destinations": carried}
        self._write()

    def loaded(self, spec: Destination) -> DestinationResult | None:
        """Before connecting: the record of ``spec`` as spelled (records of earlier
        versions, and of a try that spelled it alike)."""
        entry = (self.record_.get("destinations") or {}).get(spec.label)
        if not isinstance(entry, dict):
            return None
        return DestinationResult(
            spec.conn_id,
            spec.table,
            status="already_loaded",
            mode=spec.mode,
            rows=entry.get("rows"),
            bytes=entry.get("bytes"),
            try_number=entry.get("try_number"),
            relation=Relation(*entry["relation"]) if entry.get("relation") else None,
            # What the loading try measured (absent from records of earlier versions).
            inserted=entry.get("inserted"),
            updated=entry.get("updated"),
            checksum=entry.get("checksum"),
        )

    # The load's ledger (airflow_copyman.load.LoadLedger) where there is no ledger table.

    name = "task_state_store"
    #: Written after the commit: a commit whose outcome is unknown stays unknown.
    atomic = False

    def recorded(self, spec: Destination) -> Entry | None:
        """Before connecting: the record of ``spec`` as spelled."""
        loaded = self.loaded(spec)
        if loaded is None:
            return None
        return Entry(
            self.lineage, loaded.try_number or 0, loaded.rows or 0, loaded.bytes or 0,
            loaded.inserted, loaded.updated, loaded.checksum, loaded.relation,
        )

    def loaded_already(self, conn: psycopg.Connection[Any], slot: Slot) -> Entry | None:
        """Once connected: the record of the table as its server resolved it, however an
        earlier try spelled it."""
        entry = (self.record_.get("destinations") or {}).get(f"{slot.conn_id}:{slot.key}")
        if not isinstance(entry, dict):
            return None
        return Entry(
            self.lineage, entry.get("try_number") or 0, entry.get("rows") or 0,
            entry.get("bytes") or 0, entry.get("inserted"), entry.get("updated"),
            entry.get("checksum"),
        )

    def prepare(self, conn: psycopg.Connection[Any], slot: Slot) -> None:
        """Nothing to prepare: the record is written after the commit."""

    def claim_load(self, conn: psycopg.Connection[Any], slot: Slot) -> Entry | None:
        """No claim: nothing in the destination shows another try loading it."""
        return None

    def record_load(
        self, conn: psycopg.Connection[Any], slot: Slot, rows: int, nbytes: int,
        extras: Extras,
    ) -> Entry | None:
        """Nothing in the load transaction: :meth:`committed` records after the commit."""
        return None

    def committed(self, result: DestinationResult) -> None:
        """After a commit of this try: record it."""
        self.record(result, self.try_number)

    def record(self, result: DestinationResult, try_number: int) -> None:
        self.record_.setdefault("destinations", {})[_key_of(result)] = {
            "rows": result.rows,
            "bytes": result.bytes,
            "try_number": result.try_number or try_number,
            "loaded_at": datetime.now(UTC).isoformat(),
            "relation": list(result.relation.parts) if result.relation else None,
            **_measured(result),
        }
        self._write()

    def sync(self, report: TransferReport, try_number: int) -> None:
        """Bring the mirror in line with the ledger after a try (a load the ledger shows
        but the store missed: a try died between a commit and its bookkeeping)."""
        destinations = self.record_.setdefault("destinations", {})
        for result in report.destinations:
            key = _key_of(result)
            if result.status in ("loaded", "already_loaded") and not (
                key in destinations or result.label in destinations
            ):
                destinations[key] = {
                    "rows": result.rows,
                    "bytes": result.bytes,
                    "try_number": result.try_number or try_number,
                    **_measured(result),
                }
        self.record_["last_try"] = try_number
        self.record_["failed"] = [r.label for r in report.failed]
        try:
            self._write()
        except Exception as exc:  # the ledger is the record; this is a mirror
            logging.getLogger(__name__).warning("Could not update task_state_store: %s", exc)

    def _write(self) -> None:
        if self.store is not None:
            self.store.set(STATE_KEY, self.record_)


def _key_of(result: DestinationResult) -> str:
    """A destination's key in the record: its connection and its table as the server
    resolved it (``pg_wh:public.orders``), else as spelled (records of earlier versions)."""
    relation = result.relation
    if relation is not None and relation.key is not None:
        return f"{result.conn_id}:{relation.key}"
    return result.label


def _measured(result: DestinationResult) -> dict[str, Any]:
    """What a load measured beyond rows and bytes (a merge's counts, the checksum)."""
    return {"inserted": result.inserted, "updated": result.updated, "checksum": result.checksum}
