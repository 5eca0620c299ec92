"""N ranges of one table inside one process (``CopyManOperator(..., parallel=N)``), all
reading one exported snapshot, through the split load's staging and publish.

The source connection that exported the snapshot (``pg_export_snapshot()``) keeps its
transaction open until every range has read: a snapshot can be imported only while its
exporting transaction lives. Each range's source transaction begins with ``SET TRANSACTION
SNAPSHOT`` (:class:`load.LoadOptions` ``snapshot``), so together the ranges read exactly
the table as it was at the export, however it changes meanwhile.

A try's ranges have a lineage of their own (the task's lineage and the try): a retry
exports a new snapshot, so it loads every range again into a new staging table rather than
mixing ranges of two snapshots; the publish is keyed by the task's lineage, so a retry
after a publish that committed changes nothing. Imports no Airflow module.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import psycopg

from airflow_copyman import load
from airflow_copyman.split import _adapters
from airflow_copyman.split._catalog import SourceTable, column_names, describe_columns, plan
from airflow_copyman.split._identity import conflicts as table_conflicts
from airflow_copyman.split._publish import Published, RangeLedger, publish, staged_rows
from airflow_copyman.split._ranges import Range
from airflow_copyman.split._staging import Identity, Target, drop_leftovers, prepare

#: The suffix of the task id the ranges' ledger rows are keyed by.
RANGE_TASK_SUFFIX = ".range"


class RangeTransfers:
    """The transfers of the ranges running now, so that another thread (the operator's
    ``on_kill``, a signal handler) can stop them all: :meth:`cancel` only asks, each range's
    thread sends its servers' cancels (:meth:`load.Transfer.cancel`). Once cancelled, no
    range starts and nothing is published."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: set[load.Transfer] = set()
        self.cancelled = False

    def start(self, transfer: load.Transfer) -> bool:
        """Register ``transfer``; False (not registered) once cancelled: do not run it."""
        with self._lock:
            if self.cancelled:
                return False
            self._running.add(transfer)
            return True

    def finish(self, transfer: load.Transfer) -> None:
        with self._lock:
            self._running.discard(transfer)

    def cancel(self) -> None:
        self.cancelled = True  # first: a range registering after this sees it
        # The range threads hold the lock only to add or remove one item: no deadlock
        # for a signal handler on the main thread, which never holds it.
        with self._lock:
            running = list(self._running)
        for transfer in running:
            transfer.cancel()


@dataclass(frozen=True)
class TaskRun:
    """The task and try running the ranges (the ledger's keys)."""

    dag_id: str
    task_id: str
    run_id: str
    map_index: int
    #: The task's lineage (kept across its tries): the publish's ledger key.
    lineage: str
    try_number: int

    @property
    def range_lineage(self) -> str:
        return f"{self.lineage}.try{self.try_number}"


def run_parallel(
    source: load.Endpoint, table: str, destinations: Sequence[load.Destination], *,
    endpoints: Mapping[str, load.Endpoint], parallel: int, task: TaskRun,
    ledger_schema: str | None, options: load.LoadOptions, log: logging.Logger,
    transfers: RangeTransfers | None = None,
) -> load.TransferReport:
    """Load ``table`` from ``source`` in ``parallel`` ranges at once, all in one exported
    snapshot, staged per destination, then publish each destination in one transaction.
    Destinations whose ranges or publish failed are in the report as failed (unchanged).
    ``transfers``: where the running ranges are kept for :meth:`RangeTransfers.cancel`
    (after which nothing more is published)."""
    transfers = transfers or RangeTransfers()
    with source.connect() as conn:
        source_table, ranges = plan(conn, table, None, parallel)
        columns = column_names(conn, source_table)
        _check_tables(conn, source_table, destinations, endpoints)
    log.info("%s splits into %d range(s) in one snapshot: %s", source_table, len(ranges),
             "; ".join(r.describe() for r in ranges))
    targets, results = _prepare_all(source, table, destinations, endpoints, task,
                                    options.lock_timeout)
    staged = [s for s in destinations if s.label in targets]
    settings: dict[str, str] | None = None
    if staged:
        with source.connect() as holder:
            snapshot = _export_snapshot(holder)
            log.info("Snapshot %s exported; %d range(s) read in it", snapshot, len(ranges))
            if options.verify == "checksum":
                settings = load.render_settings(holder)
            reports = _load_ranges(
                source, source_table.schema, source_table.name, ranges, staged, targets,
                endpoints=endpoints, task=task, ledger_schema=ledger_schema,
                options=replace(options, snapshot=snapshot, min_rows=0), transfers=transfers,
            )
            holder.rollback()  # the ranges have read: the snapshot may go
        for spec in staged:
            unpublished = _unpublished(spec, targets[spec.label], reports, transfers, source,
                                       endpoints)
            results[spec.label] = unpublished or _publish_one(
                spec, targets[spec.label], endpoints, task, ledger_schema, len(ranges),
                columns, options, settings, source, log,
            )
    ordered = [results[s.label] for s in destinations]
    done = [r for r in ordered if r.status != "failed"]
    return load.TransferReport(
        max((r.rows or 0 for r in done), default=0), max((r.bytes or 0 for r in done), default=0),
        options.format, 0.0, ordered,
    )


def _prepare_all(
    source: load.Endpoint, table: str, destinations: Sequence[load.Destination],
    endpoints: Mapping[str, load.Endpoint], task: TaskRun, lock_timeout: float,
) -> tuple[dict[str, Target], dict[str, load.DestinationResult]]:
    """Each destination's target and staging table, by label; those that failed, by label."""
    targets: dict[str, Target] = {}
    failed: dict[str, load.DestinationResult] = {}
    for spec in destinations:
        try:
            with endpoints[spec.conn_id].connect() as conn:
                targets[spec.label] = prepare(
                    conn, spec, _identity(task, spec), lock_timeout,
                    lambda: _describe(source, table),
                )
        except Exception as exc:
            failed[spec.label] = _failed(spec, exc, source, endpoints)
    return targets, failed


def _unpublished(
    spec: load.Destination, found: Target, reports: list[load.TransferReport],
    transfers: RangeTransfers, source: load.Endpoint, endpoints: Mapping[str, load.Endpoint],
) -> load.DestinationResult | None:
    """Why ``spec`` is not to be published (the task was cancelled, or ranges failed into
    its staging table), as its failed result; None: publish it."""
    if transfers.cancelled:
        return _failed(spec, load.LoadError(f"{spec.label}: stopped (cancelled): nothing "
                                            "published"), source, endpoints)
    errors = [r for report in reports for r in report.failed
              if r.conn_id == spec.conn_id and r.table == found.staging_text]
    if not errors:
        return None
    return load.DestinationResult(
        spec.conn_id, spec.table, status="failed", mode=spec.mode,
        error=f"{len(errors)} range(s) failed; the first: {errors[0].error}",
        permanent=all(e.permanent for e in errors),
    )


def _check_tables(
    conn: psycopg.Connection[Any], source_table: SourceTable,
    destinations: Sequence[load.Destination], endpoints: Mapping[str, load.Endpoint],
) -> None:
    """Every table written once (:func:`.table_conflicts`), else :class:`load.ConfigError`
    before any range loads."""
    with contextlib.ExitStack() as stack:
        opened = [(spec, stack.enter_context(endpoints[spec.conn_id].connect()))
                  for spec in destinations]
        problems = table_conflicts(conn, source_table, opened)
    if problems:
        raise load.ConfigError("; ".join(problems) + ": nothing was loaded")


def _describe(source: load.Endpoint, table: str) -> list[load.Column]:
    """The source table's columns with their exact types (staging for a table that
    ``create="if_missing"`` makes at publish)."""
    with source.connect() as conn:
        return describe_columns(conn, table)


def _identity(task: TaskRun, spec: load.Destination) -> Identity:
    return Identity(task.dag_id, task.task_id, task.run_id, task.range_lineage, spec.conn_id,
                    spec.table)


def _export_snapshot(conn: psycopg.Connection[Any]) -> str:
    """Open a read-only REPEATABLE READ transaction that stays open (no idle timeout ends
    it while the ranges read) and export its snapshot."""
    conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
    conn.read_only = True
    conn.execute("SET LOCAL idle_in_transaction_session_timeout = 0")
    row = conn.execute("SELECT pg_export_snapshot()").fetchone()
    assert row is not None
    return str(row[0])


def _load_ranges(
    source: load.Endpoint, schema: str, name: str, ranges: list[Range],
    specs: list[load.Destination], targets: Mapping[str, Target], *,
    endpoints: Mapping[str, load.Endpoint], task: TaskRun, ledger_schema: str | None,
    options: load.LoadOptions, transfers: RangeTransfers,
) -> list[load.TransferReport]:
    """Every range at once (one thread each: they wait on their servers, not on Python),
    each kept in ``transfers`` while it runs."""
    from airflow_copyman.split import range_query  # the package's, defined after this module

    def one(rng: Range) -> load.TransferReport:
        key = load.TaskKey(task.dag_id, task.task_id + RANGE_TASK_SUFFIX, task.run_id,
                           rng.index, task.range_lineage, task.try_number)
        transfer = load.Transfer(
            source, range_query(schema, name, rng, None),
            [load.Destination(s.conn_id, targets[s.label].staging_text, columns=s.columns,
                              load_lock=False)
             for s in specs],
            endpoints=endpoints, ledger=load.Ledger(ledger_schema, key), options=options,
        )
        if not transfers.start(transfer):
            transfer.cancel()  # stopped before it began: it fails every destination at once
        try:
            return transfer.run()
        finally:
            transfers.finish(transfer)

    with ThreadPoolExecutor(max_workers=len(ranges), thread_name_prefix="copyman-range") as pool:
        return list(pool.map(one, ranges))


def _publish_one(
    spec: load.Destination, found: Target, endpoints: Mapping[str, load.Endpoint],
    task: TaskRun, ledger_schema: str | None, parts: int, columns: list[str],
    options: load.LoadOptions, settings: dict[str, str] | None, source: load.Endpoint,
    log: logging.Logger,
) -> load.DestinationResult:
    ranges = RangeLedger(task.dag_id, task.task_id + RANGE_TASK_SUFFIX, task.run_id,
                         task.range_lineage, parts, ledger_schema)
    key = load.TaskKey(task.dag_id, task.task_id, task.run_id, task.map_index, task.lineage,
                       task.try_number)
    try:
        with endpoints[spec.conn_id].connect() as conn:
            if options.min_rows:
                rows = staged_rows(conn, found, ranges, spec.conn_id)
                if rows < options.min_rows:
                    raise load.TooFewRowsError(
                        f"{spec.label}: the ranges staged {rows} rows, fewer than min_rows="
                        f"{options.min_rows}: nothing published"
                    )
            done: Published = publish(
                conn, spec, found, load.Ledger(ledger_schema, key), ranges,
                source_columns=columns, lock_timeout=options.lock_timeout,
                verify=options.verify, render_settings=settings,
                timeout=options.receiver_timeout,
            )
            # This task's staging tables of earlier tries (another run's are its own).
            drop_leftovers(conn, found.schema, _identity(task, spec),
                           lambda run_id: run_id != task.run_id, options.lock_timeout)
    except Exception as exc:
        failed = _failed(spec, exc, source, endpoints)
        log.error("%s: not published (unchanged): %s", spec.label, failed.error)
        return failed
    log.info("%s: %s %d rows", spec.label,
             "already published" if done.already else "published", done.rows)
    return load.DestinationResult(
        spec.conn_id, spec.table, status="already_loaded" if done.already else "loaded",
        rows=done.rows, bytes=done.bytes, mode=spec.mode, inserted=done.inserted,
        updated=done.updated, try_number=done.try_number or task.try_number,
        relation=_adapters.relation(found.database, found.schema, found.name, found.key,
                                    done.oid or found.oid),
    )


def _failed(
    spec: load.Destination, exc: Exception, source: load.Endpoint,
    endpoints: Mapping[str, load.Endpoint],
) -> load.DestinationResult:
    secrets = tuple(source.secrets) + tuple(
        s for e in endpoints.values() for s in e.secrets
    )
    return load.DestinationResult(
        spec.conn_id, spec.table, status="failed", mode=spec.mode,
        error=_adapters.describe_error(exc, secrets), permanent=_adapters.is_permanent(exc),
    )
