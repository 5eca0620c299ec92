"""The run of one load: it calls the phases in turn and hands each what the ones before
returned (connect, ledger, plan, begin, copy, commit, report).

It takes :class:`~airflow_copyman.load.connection.endpoint.Endpoint` objects (psycopg connections,
no Airflow): :meth:`airflow_copyman.hooks.copyman.CopyManHook.transfer` builds them from
Airflow connections, creates a :class:`Transfer` and runs it. Each phase is a module of
functions (:mod:`.phases.connect`, :mod:`.phases.ledger`, :mod:`.phases.plan`,
:mod:`.phases.begin`, :mod:`.phases.copy`, :mod:`.phases.commit`, :mod:`.phases.report`) that
take the load's :class:`~.phases.run.Run` and what they need, and return what they found;
each destination's :class:`~airflow_copyman.load.modes.base.Mode` says how its rows land.
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
from airflow_copyman.load.phases import begin, commit, connect, copy, plan, report
from airflow_copyman.load.phases import ledger as ledgering
from airflow_copyman.load.phases.connect import Connected
from airflow_copyman.load.phases.copy import NO_COPY, CopyOutcome
from airflow_copyman.load.phases.plan import Plan
from airflow_copyman.load.phases.run import Run, Target
from airflow_copyman.load.phases.verify import Rendering
from airflow_copyman.load.spec import (
    ConfigError,
    Destination,
    DestinationResult,
    Progress,
    TransferReport,
)

#: Where the load finds a destination's endpoint by its ``conn_id``.
Endpoints = Mapping[str, Endpoint] | Callable[[str], Endpoint]


class Transfer:
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
        self.requested_format = tables.normalize_format(options.format)
        self.specs = [Destination.from_value(d, i) for i, d in enumerate(destinations)]
        #: The deadline of every statement, and the flag that stops the transfer.
        self.bounds = bounded.Bounds(options.receiver_timeout)
        self.ledger = ledger
        self.on_commit = on_commit
        #: The copy's manager while it runs (for cancel()).
        self.manager: copyman.CopyManager | None = None
        try:
            self.source = tables.Source.parse(sql)
        except tables.PlanError as exc:
            raise ConfigError(f"source {source.name}: {exc}") from None

    # The phases.

    def run(self) -> TransferReport:
        started = time.monotonic()
        if not self.specs:
            raise ConfigError("no destinations: give at least one")
        resolved = connect.resolve(self.origin, self.specs, self.endpoint_of, self.log)
        run = Run(
            self.origin, self.source, self.log, self.options, self.requested_format,
            self.bounds, self.ledger, self.on_commit, resolved.targets, resolved.secrets,
            started,
        )
        planned: Plan | None = None
        outcome = NO_COPY
        connected = Connected(None, [])
        try:
            if self.ledger is not None:
                ledgering.check_recorded(run, self.ledger)
            if run.go_on():
                connected = connect.connect(run)
                connect.locate(run, connected.sessions)
            planned, outcome = self._load(run, connected)
        except copyman.Cancelled as exc:
            # A statement was cancelled because the transfer was asked to stop.
            run.stop_all(exc, "stopped")
        finally:
            connect.close(run, connected)
        if run.stopped:
            run.stop_all(copyman.Cancelled("the transfer was stopped"), "stopped")
        if outcome.interrupt is not None:
            raise outcome.interrupt
        fmt = planned.format if planned is not None else None
        done = report.report(run, time.monotonic() - started, fmt, outcome, resolved.locations)
        report.log_summary(run, done)
        estimate = planned.estimate if planned is not None else None
        run.tell_progress(Progress(
            done.rows, done.bytes, done.seconds, estimate.rows if estimate else None,
            None, tuple((r.label, r.status) for r in done.destinations),
        ))
        return done

    def _load(self, run: Run, connected: Connected) -> tuple[Plan | None, CopyOutcome]:
        """Once connected: the ledger, the plan, and the load (each step only while a
        destination is left to load)."""
        src = connected.src
        if src is None:  # the source could not connect: every destination failed
            return None, NO_COPY
        if self.ledger is not None and run.go_on():
            ledgering.check(run, self.ledger, connected.pending())
        planned = plan.plan(run, src, connected.sessions) if run.go_on() else None
        if planned is None:
            return None, NO_COPY
        if self.ledger is not None and run.go_on():
            ledgering.prepare(run, self.ledger, connected.pending())
        if not run.go_on():
            return planned, NO_COPY
        return planned, self._copy_and_commit(run, src, connected, planned)

    def _copy_and_commit(
        self, run: Run, src: psycopg.Connection[Any], connected: Connected, planned: Plan
    ) -> CopyOutcome:
        """Open each destination's transaction, run the copy, commit what completed."""
        rendering = Rendering(src, self.bounds)
        while True:
            loading = begin.open_all(run, planned, connected.pending(), rendering)
            if not loading or run.stopped:
                for one in loading:
                    run.fail(one.target, copyman.Cancelled("the task was killed"), "starting")
                return NO_COPY
            outcome = copy.copy(run, src, planned, loading, self._copying)
            if not outcome.restart:
                break
            # A destination's COPY could not start, so the engine aborted the others: their
            # transactions are void; load them again without the culprit.
        commit.commit(run, rendering, planned, [t for t in loading if t.target.pending], outcome)
        return outcome

    def _copying(self, manager: copyman.CopyManager | None) -> None:
        self.manager = manager

    # Stop (from on_kill: a signal handler). It only asks: the thread running the transfer
    # sends the servers' cancels itself (connection.bounded, the engine's loop), then reads each
    # statement's end, so a cancel can never hit a later statement.

    def cancel(self) -> None:
        self.bounds.stop.set()
        manager = self.manager
        if manager is not None:
            manager.cancel()


__all__ = ["Endpoints", "Target", "Transfer"]
