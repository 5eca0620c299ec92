"""What every phase of a load is handed: the load's settings and bookkeeping (:class:`Run`),
its destinations (:class:`Target`, each with the result the phases fill in), and a
destination once connected (:class:`Session`).

The phases are functions: each takes what it needs and returns what it found. A
:class:`Run` is made once, after the destinations are resolved, and no phase sets a field
of it; what a phase finds (the connections, the plan, the open load transactions, the
copy's outcome) is its return value, handed to the next one by
:class:`~airflow_copyman.load.transfer.Transfer`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg

from airflow_copyman import copyman
from airflow_copyman.load.catalog import tables
from airflow_copyman.load.connection import bounded, classify
from airflow_copyman.load.connection.endpoint import Endpoint
from airflow_copyman.load.ledger.protocol import LoadLedger
from airflow_copyman.load.ledger.table import Entry
from airflow_copyman.load.modes.base import Mode
from airflow_copyman.load.options import LoadOptions
from airflow_copyman.load.spec import (
    ConfigError,
    Destination,
    DestinationResult,
    Progress,
    Verification,
)
from airflow_copyman.load.verify.checksum import ChecksumMismatch


class Target:
    """One destination during a load: what it names, and its result as the phases fill it."""

    def __init__(
        self,
        spec: Destination,
        endpoint: Endpoint,
        table: tables.TableName,
        mode: Mode,
        columns: list[str] | None,
    ) -> None:
        self.spec = spec
        self.endpoint = endpoint
        self.result = DestinationResult(spec.conn_id, spec.table, mode=spec.mode)
        #: The table as parsed from the destination's name, and how its rows land.
        self.table = table
        self.mode = mode
        #: The columns the destination names (None: the source's, paired by name).
        self.columns = columns

    @property
    def pending(self) -> bool:
        return self.result.status == "pending"

    @property
    def label(self) -> str:
        return self.spec.label

    @property
    def table_key(self) -> str:
        """The table as the ledger knows it: as its server resolved it once connected
        (``public.orders``, however the destination spells it), else as spelled."""
        relation = self.result.relation
        if relation is not None and relation.key is not None:
            return relation.key
        return str(self.table)


@dataclass(frozen=True)
class Session:
    """A destination connected: its target and its connection."""

    target: Target
    conn: psycopg.Connection[Any]

    @property
    def label(self) -> str:
        return self.target.label


@dataclass(frozen=True)
class Run:
    """One load's settings, and the bookkeeping every phase does (a destination failed,
    loaded already, rolled back)."""

    origin: Endpoint
    source: tables.Source
    log: logging.Logger | logging.LoggerAdapter[Any]
    options: LoadOptions
    requested_format: tables.Format | None
    #: The deadline of every statement, and the flag that stops the load.
    bounds: bounded.Bounds
    #: Which destinations are loaded already, and the record of each load.
    ledger: LoadLedger | None
    on_commit: Callable[[DestinationResult], None] | None
    targets: list[Target]
    #: Every endpoint's secrets, kept out of errors and logs.
    secrets: list[str]
    #: When the load began (``time.monotonic()``).
    started: float

    @property
    def stopped(self) -> bool:
        """Whether the load was asked to stop (:meth:`Transfer.cancel`)."""
        return self.bounds.stop.is_set()

    @property
    def verify(self) -> str:
        return self.options.verify

    @property
    def lock_wait(self) -> float:
        """Seconds any one lock wait of a load transaction may last: never longer than a
        statement may wait at all (the server's lock_timeout then ends the wait first, and
        says it was a lock)."""
        return min(self.options.lock_timeout, self.options.receiver_timeout)

    def pending(self) -> list[Target]:
        return [t for t in self.targets if t.pending]

    def go_on(self) -> bool:
        return not self.stopped and any(t.pending for t in self.targets)

    def bind(self, conn: psycopg.Connection[Any]) -> psycopg.Connection[Any]:
        """Put the connection's statements under this load's deadline and stop."""
        if isinstance(conn, bounded.BoundedConnection):
            conn.bounds = self.bounds
        return conn

    def redact(self, text: str) -> str:
        return classify.redact(text, self.secrets)

    def config_error(self, target: Target, exc: BaseException, doing: str) -> ConfigError:
        return ConfigError(self.redact(f"{target.label}: {doing}: {classify.describe(exc)}"))

    def tell_progress(self, progress: Progress) -> None:
        """Hand ``progress`` to ``on_progress``: a display that fails does not fail the load."""
        on_progress = self.options.on_progress
        if on_progress is None:
            return
        try:
            on_progress(progress)
        except Exception as exc:
            self.log.warning("on_progress failed: %s", classify.describe(exc, self.secrets))

    def fail(self, target: Target, exc: BaseException, doing: str) -> None:
        result = target.result
        if result.status == "failed":
            return
        result.status = "failed"
        result.error = f"{doing}: {classify.describe(exc, self.secrets)}"
        result.permanent = classify.is_permanent(exc)
        result.rows = result.bytes = None
        result.verification = failed_verification(exc)
        self.log.warning(
            "%s failed (%s): %s",
            target.label,
            "permanent" if result.permanent else "transient, a retry may load it",
            result.error,
        )

    def source_failed(self, exc: BaseException, doing: str) -> None:
        for target in self.pending():
            self.fail(target, exc, f"source {self.origin.name}: {doing}")

    def stop_all(self, exc: BaseException, doing: str) -> None:
        """Fail every destination still pending with ``exc``."""
        for target in self.pending():
            self.fail(target, exc, doing)

    def already_loaded(self, target: Target, entry: Entry) -> None:
        result = target.result
        result.status = "already_loaded"
        result.rows, result.bytes, result.try_number = entry.rows, entry.bytes, entry.try_number
        # What the loading try measured (None where its ledger table has no such columns);
        # replaces whatever this try measured before it found the row.
        result.inserted, result.updated = entry.inserted, entry.updated
        result.checksum = entry.checksum
        if entry.relation is not None and result.relation is None:
            result.relation = entry.relation
        # Verified by the try that loaded it, against the rows that try read.
        result.verification = Verification(
            True, entry.rows, entry.rows, entry.checksum, entry.checksum
        )
        self.log.info(
            "%s: already loaded by try %d (%d rows): skipped",
            target.label,
            entry.try_number,
            entry.rows,
        )

    def drop(self, session: Session, exc: BaseException, doing: str) -> None:
        """Fail ``session``'s destination and roll its transaction back."""
        self.fail(session.target, exc, doing)
        rollback(session.conn)


def rollback(conn: psycopg.Connection[Any]) -> None:
    """Roll back (a connection that cannot is closed)."""
    if conn.closed:
        return
    try:
        conn.rollback()
    except Exception:
        with contextlib.suppress(Exception):
            conn.close()


def failed_verification(exc: BaseException) -> Verification | None:
    """The comparison that failed a destination, if its failure is one (else None: the
    rows were not compared)."""
    if isinstance(exc, ChecksumMismatch):
        return Verification(
            False, exc.source.rows, exc.destination.rows, exc.source.text, exc.destination.text
        )
    if isinstance(exc, copyman.RowCountMismatch) and exc.rows is not None:
        return Verification(False, exc.source_rows, exc.rows)
    return None


def size(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.1f} TiB"  # pragma: no cover
