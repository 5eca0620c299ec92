"""What a load asks of a ledger: the one place that decides whether a destination is
loaded already, and that records each load (:class:`LoadLedger`).

Two implement it: the ledger table in each destination database
(:class:`airflow_copyman.load.ledger.table.Ledger`, recorded in the load's own transaction),
and the Airflow task's ``task_state_store`` record (``airflow_copyman._task_state``, written
after each commit). The load calls them in this order: :meth:`~LoadLedger.recorded` before
connecting, :meth:`~LoadLedger.loaded_already` once the table is resolved,
:meth:`~LoadLedger.prepare` before the load transactions, then in each load transaction
:meth:`~LoadLedger.claim_load` first and :meth:`~LoadLedger.record_load` before its COMMIT,
and :meth:`~LoadLedger.committed` after it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import psycopg

from airflow_copyman.load.catalog.tables import TableName

if TYPE_CHECKING:
    from airflow_copyman.load.ledger.table import Entry, Extras
    from airflow_copyman.load.spec import Destination, DestinationResult


@dataclass(frozen=True)
class Slot:
    """One destination as a ledger knows it."""

    conn_id: str
    #: The table as the destination names it, parsed.
    table: TableName
    #: The table as its server resolved it (``public.orders``), else as spelled: the key.
    key: str
    #: Whether the load may create the table (``create="if_missing"``).
    create: bool

    @property
    def spelling(self) -> str:
        return str(self.table)


class LoadLedger(Protocol):
    """Which destinations an earlier try of the task loaded, and this try's records."""

    @property
    def name(self) -> str:
        """For the log: where the records are kept."""
        ...

    @property
    def try_number(self) -> int | None:
        """The try a result records as the loading one (None: not counted)."""
        ...

    @property
    def atomic(self) -> bool:
        """Whether a load's record commits with its rows (a commit whose outcome is
        unknown is then settled by the next try, which reads the record)."""
        ...

    def recorded(self, spec: Destination) -> Entry | None:
        """Before connecting: an earlier try's record of ``spec`` as spelled, if any."""
        ...

    def loaded_already(self, conn: psycopg.Connection[Any], slot: Slot) -> Entry | None:
        """Connected, the table resolved: an earlier try's record, if any. Leaves no
        transaction open."""
        ...

    def prepare(self, conn: psycopg.Connection[Any], slot: Slot) -> None:
        """Before the load transactions: what recording needs (in a transaction of its
        own). :raises PlanError: a permanent problem, worded for the user."""
        ...

    def claim_load(self, conn: psycopg.Connection[Any], slot: Slot) -> Entry | None:
        """First in the load transaction: own the load until the transaction ends (another
        try loading it now is waited for); its record, if that try loaded it."""
        ...

    def record_load(
        self, conn: psycopg.Connection[Any], slot: Slot, rows: int, nbytes: int,
        extras: Extras,
    ) -> Entry | None:
        """In the load transaction, before its COMMIT: record it. Another try's record
        where that try recorded it first (the caller rolls back: loaded already)."""
        ...

    def committed(self, result: DestinationResult) -> None:
        """After the COMMIT of ``result``."""
        ...
