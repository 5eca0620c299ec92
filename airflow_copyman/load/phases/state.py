"""The state of one load, shared by its phases: its destinations (:class:`Target`), and
the bookkeeping every phase does (a destination failed, loaded already, rolled back)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any

import psycopg

from airflow_copyman import copyman
from airflow_copyman.load.catalog import tables
from airflow_copyman.load.connection import bounded, classify
from airflow_copyman.load.connection.endpoint import Endpoint
from airflow_copyman.load.ledger.protocol import LoadLedger
from airflow_copyman.load.ledger.table import Entry
from airflow_copyman.load.modes.base import Mode
from airflow_copyman.load.spec import (
    ConfigError,
    Destination,
    DestinationResult,
    Progress,
    Verification,
)
from airflow_copyman.load.verify.checksum import Checksum, ChecksumMismatch, ColumnRendering


class Target:
    """One destination during a transfer."""

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
        self.conn: psycopg.Connection[Any] | None = None
        self.started = 0.0
        #: verify="checksum": how its columns are rendered, and what its scope held
        #: before the COPY (rows a preoperator wrote).
        self.renderings: list[ColumnRendering] | None = None
        self.baseline: Checksum | None = None
        #: The table as its server resolves it, the advisory key of its loads, and whether
        #: this load transaction holds that lock (:mod:`airflow_copyman.load.connection.locks`).
        self.lock_name: str | None = None
        self.lock_key: int | None = None
        self.locked = False

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


class State:
    """What every phase of a load reads and writes, and its bookkeeping."""

    # Set by Transfer.__init__ (see there); declared here for the phases.
    origin: Endpoint
    log: logging.Logger | logging.LoggerAdapter[Any]
    sql: str
    endpoint_of: Callable[[str], Endpoint]
    min_rows: int
    max_bytes_per_second: float | None
    verify: str
    requested_format: tables.Format | None
    specs: list[Destination]
    parameters: tables.Params | None
    bounds: bounded.Bounds
    #: Which destinations are loaded already, and the record of each load.
    ledger: LoadLedger | None
    on_commit: Callable[[DestinationResult], None] | None
    progress_interval: float
    #: Called with the load's progress (see :class:`~airflow_copyman.load.Progress`).
    on_progress: Callable[[Progress], None] | None
    #: When :meth:`Transfer.run` began (``time.monotonic()``).
    started: float
    receiver_timeout: float
    targets: list[Target]
    src: psycopg.Connection[Any] | None
    manager: copyman.CopyManager | None
    cancelled: bool
    interrupt: BaseException | None
    secrets: list[str]
    endpoints: dict[str, tuple[str, str]]
    source: tables.Source
    #: verify="checksum": the source session's settings a text read-back renders with.
    rendering: dict[str, str] | None

    def _tell_progress(self, progress: Progress) -> None:
        """Hand ``progress`` to ``on_progress``: a display that fails does not fail the load."""
        if self.on_progress is None:
            return
        try:
            self.on_progress(progress)
        except Exception as exc:
            self.log.warning("on_progress failed: %s", classify.describe(exc, self.secrets))

    def _go_on(self) -> bool:
        return not self.cancelled and any(t.pending for t in self.targets)

    def _bind(self, conn: psycopg.Connection[Any]) -> psycopg.Connection[Any]:
        """Put the connection's statements under this transfer's deadline and stop."""
        if isinstance(conn, bounded.BoundedConnection):
            conn.bounds = self.bounds
        return conn

    def _pending(self) -> list[Target]:
        return [t for t in self.targets if t.pending]

    def _connected(self) -> list[tuple[Target, psycopg.Connection[Any]]]:
        """The pending destinations with their connections (a destination that could not
        connect failed)."""
        return [(t, t.conn) for t in self.targets if t.pending and t.conn is not None]

    def _redact(self, text: str) -> str:
        return classify.redact(text, self.secrets)

    def _config_error(self, target: Target, exc: BaseException, doing: str) -> ConfigError:
        return ConfigError(
            self._redact(f"{target.label}: {doing}: {classify.describe(exc)}")
        )

    def _fail(self, target: Target, exc: BaseException, doing: str) -> None:
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

    def _source_failed(self, exc: BaseException, doing: str) -> None:
        for target in self._pending():
            self._fail(target, exc, f"source {self.origin.name}: {doing}")

    def _already_loaded(self, target: Target, entry: Entry) -> None:
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

    def _rollback(self, target: Target) -> None:
        conn = target.conn
        if conn is not None and not conn.closed:
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
