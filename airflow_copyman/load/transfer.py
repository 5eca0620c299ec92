"""The run of one load: connect, plan, per-destination transactions, ledger, progress.

It takes :class:`~airflow_copyman.load.connection.endpoint.Endpoint` objects (psycopg connections,
no Airflow): :meth:`airflow_copyman.hooks.copyman.CopyManHook.transfer` builds them from
Airflow connections, creates a :class:`Transfer` and runs it. Each phase is a unit of its
own (:mod:`.phases.connect`, :mod:`.phases.ledger`, :mod:`.phases.plan`, :mod:`.phases.copy`,
:mod:`.phases.commit`, :mod:`.phases.report`) over the shared :class:`~.phases.state.State`; each
destination's :class:`~airflow_copyman.load.modes.base.Mode` says how its rows land.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import psycopg

from airflow_copyman import copyman
from airflow_copyman.load import options as checks
from airflow_copyman.load.catalog import tables
from airflow_copyman.load.connection import bounded
from airflow_copyman.load.connection.endpoint import Endpoint
from airflow_copyman.load.ledger.protocol import LoadLedger
from airflow_copyman.load.ledger.table import Ledger
from airflow_copyman.load.options import LOCK_TIMEOUT, PROGRESS_INTERVAL, LoadOptions
from airflow_copyman.load.phases.commit import Committing
from airflow_copyman.load.phases.connect import Connecting
from airflow_copyman.load.phases.copy import NO_COPY, Copying, CopyOutcome
from airflow_copyman.load.phases.ledger import LedgerSteps
from airflow_copyman.load.phases.plan import Plan, Planning
from airflow_copyman.load.phases.report import Reporting
from airflow_copyman.load.phases.state import Target
from airflow_copyman.load.spec import (
    ConfigError,
    Destination,
    DestinationResult,
    Progress,
    TransferReport,
)

#: Where the load finds a destination's endpoint by its ``conn_id``.
Endpoints = Mapping[str, Endpoint] | Callable[[str], Endpoint]


class Transfer(Connecting, LedgerSteps, Planning, Copying, Committing, Reporting):
    """One load: :meth:`run` it once; :meth:`cancel` stops it from another thread."""

    def __init__(
        self,
        source: Endpoint,
        sql: str,
        destinations: Sequence[Destination | Mapping[str, Any]],
        *,
        endpoints: Endpoints,
        parameters: tables.Params | None = None,
        format: str | None = None,
        ledger: LoadLedger | None = None,
        on_commit: Callable[[DestinationResult], None] | None = None,
        progress_interval: float = PROGRESS_INTERVAL,
        receiver_timeout: float = copyman.RECEIVER_TIMEOUT,
        lock_timeout: float = LOCK_TIMEOUT,
        min_rows: int = 0,
        max_bytes_per_second: float | None = None,
        verify: str = "count",
        log: logging.Logger | logging.LoggerAdapter[Any] | None = None,
        options: LoadOptions | None = None,
        on_progress: Callable[[Progress], None] | None = None,
    ) -> None:
        """The keyword options (``parameters`` to ``verify``, ``on_progress``) build a
        :class:`LoadOptions`; or give one as ``options`` (the keyword options are then not
        used)."""
        self.origin = source
        self.log = log or logging.getLogger("airflow_copyman.load")
        self.sql = sql
        self.endpoint_of = endpoints if callable(endpoints) else endpoints.__getitem__
        # Every argument is checked before any connection is used.
        try:
            checks.sql(sql)
            if options is None:
                options = LoadOptions(
                    format=format, parameters=parameters, verify=verify,
                    receiver_timeout=receiver_timeout, lock_timeout=lock_timeout,
                    progress_interval=progress_interval, min_rows=min_rows,
                    max_bytes_per_second=max_bytes_per_second, on_progress=on_progress,
                )
            if isinstance(destinations, str | bytes) or not isinstance(destinations, Sequence):
                raise checks.ArgumentError(
                    f"destinations must be a list, got {type(destinations).__name__}"
                )
            if isinstance(ledger, Ledger):
                checks.ledger_schema(ledger.schema)
        except checks.ArgumentError as exc:
            raise ConfigError(f"{exc}") from None
        self.options = options
        self.lock_timeout = options.lock_timeout
        self.min_rows = options.min_rows
        self.max_bytes_per_second = options.max_bytes_per_second
        self.verify = options.verify
        self.requested_format = tables.normalize_format(options.format)
        self.specs = [Destination.from_value(d, i) for i, d in enumerate(destinations)]
        self.parameters = options.parameters
        #: The deadline of every statement, and the flag that stops the transfer.
        self.bounds = bounded.Bounds(options.receiver_timeout)
        self.ledger = ledger
        self.on_commit = on_commit
        self.progress_interval = options.progress_interval
        self.on_progress = options.on_progress
        self.receiver_timeout = options.receiver_timeout
        self.targets: list[Target] = []
        self.src: psycopg.Connection[Any] | None = None
        self.rendering: dict[str, str] | None = None
        self.manager: copyman.CopyManager | None = None
        self.cancelled = False
        self.interrupt: BaseException | None = None
        self.secrets: list[str] = []
        self.endpoints: dict[str, tuple[str, str]] = {}
        try:
            self.source = tables.Source.parse(sql)
        except tables.PlanError as exc:
            raise ConfigError(f"source {source.name}: {exc}") from None

    # The phases.

    def run(self) -> TransferReport:
        started = self.started = time.monotonic()
        if not self.specs:
            raise ConfigError("no destinations: give at least one")
        self._resolve()
        plan: Plan | None = None
        outcome = NO_COPY
        try:
            if self.ledger is not None:
                self._check_recorded(self.ledger)
            if self._go_on():
                self._connect()
                self._locate()
            if self.ledger is not None and self._go_on():
                self._check_ledger(self.ledger)
            if self._go_on():
                plan = self._plan()
            if plan is not None and self.ledger is not None and self._go_on():
                self._prepare_ledger(self.ledger)
            if plan is not None and self._go_on():
                outcome = self._load(plan)
        except copyman.Cancelled as exc:
            # A statement was cancelled because the transfer was asked to stop.
            for target in self._pending():
                self._fail(target, exc, "stopped")
        finally:
            self._close()
        if self.cancelled:
            for target in self._pending():
                self._fail(target, copyman.Cancelled("the transfer was stopped"), "stopped")
        if self.interrupt is not None:
            raise self.interrupt
        report = self._report(
            time.monotonic() - started, plan.format if plan is not None else None, outcome
        )
        self._log_summary(report)
        self._tell_progress(Progress(
            report.rows, report.bytes, report.seconds,
            plan.estimate.rows if plan is not None and plan.estimate is not None else None,
            None, tuple((r.label, r.status) for r in report.destinations),
        ))
        return report

    def _load(self, plan: Plan) -> CopyOutcome:
        """Open each destination's transaction, run the copy, commit what completed."""
        while True:
            # Every claim first, then the TRUNCATEs: waiting for another try's claim must
            # not hold a TRUNCATE lock on a table taken before it.
            claimed = self._in_lock_order([t for t in self._pending() if self._claim(t)], plan)
            loading = [t for t in claimed if self._begin(t, plan)]
            if not loading or self.cancelled:
                for target in loading:
                    self._fail(target, copyman.Cancelled("the task was killed"), "starting")
                return NO_COPY
            outcome = self._copy(plan, loading)
            if not outcome.restart:
                break
            # A destination's COPY could not start, so the engine aborted the others: their
            # transactions are void; load them again without the culprit.
        self._commit([t for t in loading if t.pending], plan, outcome)
        return outcome

    # Stop (from on_kill: a signal handler). It only asks: the thread running the transfer
    # sends the servers' cancels itself (connection.bounded, the engine's loop), then reads each
    # statement's end, so a cancel can never hit a later statement.

    def cancel(self) -> None:
        self.cancelled = True
        self.bounds.stop.set()
        manager = self.manager
        if manager is not None:
            manager.cancel()


__all__ = ["Endpoints", "Target", "Transfer"]
