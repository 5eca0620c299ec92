"""``CopyManResource``: the connections, and the run of a load inside a Dagster step.

The step maps onto the load layer's ledger (``airflow_copyman.load.Ledger``), whose row in each
destination database commits with the data:

* ``dag_id`` = ``dagster:<job name>``, ``task_id`` = the step key, ``map_index`` = -1;
* ``run_id`` = the run's *root* run id, then ``:<partition key>`` (or ``:<first>...<last>``
  for a partition range): one key per run of a partition, shared by its re-executions;
* ``lineage`` = the run id: the tries a ``RetryPolicy`` makes inside one run share it, so a
  retry skips the destinations an earlier try loaded; a re-execution is a new run id, a new
  lineage, and loads again (as a cleared Airflow task does), unless ``resume_on_reexecution``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import dagster as dg
import psycopg
from pydantic import Field

from airflow_copyman import load
from airflow_copyman.dagster._assets import CHECK_NAME, Binding, current_binding

#: How long a stopped step waits for its transfer to roll back and close (the cancels reach
#: the servers at once; this only bounds a server that does not answer).
STOP_WAIT = 10.0

Event = dg.MaterializeResult[Any] | dg.AssetCheckResult

class CopyManDestinationsFailed(Exception):
    """Destinations failed in a way a retry may fix: a ``RetryPolicy`` retries the step,
    and the retry loads only the destinations not loaded yet."""


class CopyManResource(dg.ConfigurableResource):  # type: ignore[type-arg]
    """The connections loads use, by name: libpq connection strings or URIs, from
    ``dg.EnvVar`` or run config (never in code: they hold passwords, which never reach
    metadata, logs or events)."""

    connections: dict[str, str] = Field(
        description="connection name -> libpq connection string or URI (use dg.EnvVar)"
    )
    ledger: bool = Field(
        default=True,
        description="record each destination's load in copyman_ledger in its database, "
        "so a retry loads only what is not loaded",
    )
    ledger_schema: str | None = Field(
        default=None, description="schema of copyman_ledger (default: each table's own)"
    )
    resume_on_reexecution: bool = Field(
        default=False,
        description="a re-execution of a run skips destinations the run loaded before",
    )
    receiver_timeout: float | None = Field(
        default=None, description="seconds a server may stay silent (default: the load's)"
    )
    lock_timeout: float = load.LOCK_TIMEOUT
    max_bytes_per_second: float | None = None
    progress_interval: float = 5.0

    def run(
        self,
        context: dg.AssetExecutionContext,
        *,
        parameters: Mapping[str, Any] | Sequence[Any] | None = None,
    ) -> Iterator[Event]:
        """Load the selected destinations; yield a ``MaterializeResult`` and the check
        result for each one loaded, then raise if any failed (see the module's doc)."""
        binding = current_binding()
        chosen = [(d, k) for d, k in binding.keys if k in context.selected_asset_keys]
        if not chosen:
            raise dg.Failure(
                description="no destination's asset is selected: the checks of a CopyMan load "
                "come from loading, select their assets too",
                allow_retries=False,
            )
        try:
            transfer = self._transfer(context, binding, [d for d, _ in chosen], parameters)
            report = run_stoppable(transfer)
        except load.ConfigError as exc:
            raise dg.Failure(
                description=f"bad input, nothing was loaded: {exc}", allow_retries=False
            ) from None
        keys = {d.label: k for d, k in chosen}
        columns = self._column_schemas(report)
        checks = context.selected_asset_check_keys
        for result in report.destinations:
            key = keys[result.label]
            check = dg.AssetCheckKey(key, CHECK_NAME)
            if result.status in ("loaded", "already_loaded"):
                yield dg.MaterializeResult(
                    asset_key=key, metadata=materialization_metadata(report, result, columns)
                )
                if check in checks:
                    yield passed_check(binding, report, result, key)
            elif check in checks and (found := failed_check(binding, result, key)) is not None:
                yield found
        _raise_for(report)

    # The parts.

    def _transfer(
        self, context: dg.AssetExecutionContext, binding: Binding,
        destinations: list[load.Destination], parameters: Any,
    ) -> load.Transfer:
        spec = binding.load
        names = [spec.source, *(d.conn_id for d in destinations)]
        endpoints = {name: self._endpoint(name) for name in dict.fromkeys(names)}
        # Unset: the load layer's own default.
        optional: dict[str, Any] = {"receiver_timeout": self.receiver_timeout}
        return load.Transfer(
            endpoints[spec.source], spec.sql, destinations, endpoints=endpoints,
            parameters=parameters, format=spec.format, ledger=self._ledger(context),
            progress_interval=self.progress_interval, lock_timeout=self.lock_timeout,
            min_rows=spec.min_rows, max_bytes_per_second=self.max_bytes_per_second,
            verify=spec.verify, log=context.log,
            **{k: v for k, v in optional.items() if v is not None},
        )

    def _endpoint(self, name: str) -> load.Endpoint:
        conninfo = self.connections.get(name)
        if conninfo is None:
            known = ", ".join(sorted(self.connections)) or "none"
            raise load.ConfigError(f"no connection named {name!r} (the resource has: {known})")
        try:
            return load.postgres(name, conninfo)
        except psycopg.Error:
            # psycopg quotes the string it could not parse: never show it (a password).
            raise load.ConfigError(
                f"connection {name!r}: not a libpq connection string or URI"
            ) from None

    def _ledger(self, context: dg.AssetExecutionContext) -> load.Ledger | None:
        if not self.ledger:
            return None
        return load.Ledger(
            self.ledger_schema, task_key(context), resume_on_clear=self.resume_on_reexecution
        )

    def _column_schemas(self, report: load.TransferReport) -> dict[str, dg.TableSchema]:
        """Each loaded table's columns, read after the load (one connection per database);
        a table that cannot be read gets none (the load is done: this must not fail it)."""
        schemas: dict[str, dg.TableSchema] = {}
        by_conn: dict[str, list[load.DestinationResult]] = {}
        for result in report.destinations:
            if result.status != "failed" and result.relation is not None:
                by_conn.setdefault(result.conn_id, []).append(result)
        for conn_id, results in by_conn.items():
            try:
                with self._endpoint(conn_id).connect() as conn:
                    for result in results:
                        assert result.relation is not None
                        schemas[result.label] = table_schema(
                            conn, result.relation.schema, result.relation.name
                        )
                    conn.rollback()
            except (psycopg.Error, load.ConfigError, OSError):
                continue
        return schemas


def task_key(context: dg.AssetExecutionContext) -> load.TaskKey:
    """The ledger's key of this step (see the module's doc)."""
    run = context.run
    run_key = run.root_run_id or run.run_id
    if context.has_partition_key_range and not context.has_partition_key:
        keys = context.partition_key_range
        run_key = f"{run_key}:{keys.start}...{keys.end}"
    elif context.has_partition_key:
        run_key = f"{run_key}:{context.partition_key}"
    step = context.get_step_execution_context().step.key
    return load.TaskKey(
        dag_id=f"dagster:{context.job_name}", task_id=step, run_id=run_key, map_index=-1,
        lineage=run.run_id, try_number=context.retry_number + 1,
    )


def run_stoppable(transfer: load.Transfer) -> load.TransferReport:
    """Run ``transfer`` in a thread of its own, so that the step's thread stays free for
    Dagster's stop: terminating a run raises ``DagsterExecutionInterruptedError`` (or
    ``KeyboardInterrupt``) in the step's thread, which then cancels every COPY."""
    outcome: list[load.TransferReport | BaseException] = []
    # An Event, not Thread.join: a join interrupted by an exception from a signal handler
    # marks the thread stopped while it still runs (CPython 3.11's _wait_for_tstate_lock).
    done = threading.Event()

    def work() -> None:
        try:
            outcome.append(transfer.run())
        except BaseException as exc:
            outcome.append(exc)
        finally:
            done.set()

    threading.Thread(target=work, name="copyman-transfer", daemon=True).start()
    try:
        done.wait()
    except BaseException:
        transfer.cancel()
        wait_for_stop(done)
        raise
    (got,) = outcome
    if isinstance(got, BaseException):
        raise got
    return got


def wait_for_stop(done: threading.Event) -> None:
    """Wait (at most :data:`STOP_WAIT`) for a cancelled transfer to send its cancels, roll
    back and close. A second interrupt (the run worker's parent exiting sends SIGTERM, which
    Dagster raises as another interrupt) must not end the wait: the process would exit with
    the transfer's thread, and its COPYs would run on until each server noticed."""
    deadline = time.monotonic() + STOP_WAIT
    while not done.is_set() and time.monotonic() < deadline:
        try:
            done.wait(max(0.0, deadline - time.monotonic()))
        except BaseException:  # another interrupt: the stop is under way
            continue


def materialization_metadata(
    report: load.TransferReport, result: load.DestinationResult,
    columns: Mapping[str, dg.TableSchema],
) -> dict[str, Any]:
    metadata: dict[str, Any] = {
        "dagster/row_count": dg.MetadataValue.int(result.rows or 0),
        "copyman/bytes": dg.MetadataValue.int(result.bytes or 0),
        "copyman/mode": result.mode,
        "copyman/format": report.format or "n/a",
        "copyman/status": result.status,
    }
    if result.mode == "merge":
        metadata["copyman/inserted"] = dg.MetadataValue.int(result.inserted or 0)
        metadata["copyman/updated"] = dg.MetadataValue.int(result.updated or 0)
    if result.checksum is not None:
        metadata["copyman/checksum"] = result.checksum
    if result.seconds is not None:
        metadata["copyman/duration_seconds"] = dg.MetadataValue.float(round(result.seconds, 3))
    if result.try_number is not None:
        metadata["copyman/loaded_by_try"] = dg.MetadataValue.int(result.try_number)
    if result.relation is not None:
        metadata["dagster/table_name"] = str(result.relation)
    if result.label in columns:
        metadata["dagster/column_schema"] = columns[result.label]
    return metadata


def passed_check(
    binding: Binding, report: load.TransferReport, result: load.DestinationResult,
    key: dg.AssetKey,
) -> dg.AssetCheckResult:
    """A destination that committed passed the load's verification (it rolls back
    otherwise): the source's count or checksum equals the destination's."""
    verification = result.verification
    rows = result.rows or 0
    source_rows = rows
    if verification is not None and verification.source_rows is not None:
        source_rows = verification.source_rows
    metadata: dict[str, Any] = {
        "destination_rows": dg.MetadataValue.int(rows),
        "source_rows": dg.MetadataValue.int(source_rows),
    }
    if binding.load.verify == "checksum":
        metadata["source_checksum"] = metadata["destination_checksum"] = result.checksum or ""
    return dg.AssetCheckResult(
        asset_key=key, check_name=CHECK_NAME, passed=True, metadata=metadata
    )


def failed_check(
    binding: Binding, result: load.DestinationResult, key: dg.AssetKey
) -> dg.AssetCheckResult | None:
    """The check of a destination that failed its verification (None: it failed otherwise,
    so nothing was verified)."""
    verification = result.verification
    if verification is None or verification.passed:
        return None
    metadata: dict[str, Any]
    if verification.source_checksum is not None:
        metadata = {
            "source_checksum": verification.source_checksum,
            "destination_checksum": verification.checksum or "",
        }
    else:
        metadata = {
            "source_rows": _count(verification.source_rows),
            "destination_rows": _count(verification.rows),
        }
    metadata["error"] = result.error or ""
    return dg.AssetCheckResult(
        asset_key=key, check_name=CHECK_NAME, passed=False, metadata=metadata,
        severity=dg.AssetCheckSeverity.ERROR,
    )


def _count(rows: int | None) -> int | str:
    return "unknown" if rows is None else rows


def _raise_for(report: load.TransferReport) -> None:
    failed = report.failed
    if not failed:
        return
    text = "; ".join(f"{r.label}: {r.error}" for r in failed)
    loaded = [r.label for r in report.destinations if r.status != "failed"]
    kept = f" (loaded: {', '.join(loaded)})" if loaded else ""
    if all(r.permanent for r in failed):
        raise dg.Failure(
            description=f"{len(failed)} destination(s) failed, no retry can fix it: {text}{kept}",
            allow_retries=False,
        )
    raise CopyManDestinationsFailed(
        f"{len(failed)} destination(s) failed, a retry loads them: {text}{kept}"
    )


def table_schema(conn: psycopg.Connection[Any], schema: str, name: str) -> dg.TableSchema:
    rows = conn.execute(
        "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), a.attnotnull"
        " FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid"
        " JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = %s AND c.relname = %s AND a.attnum > 0 AND NOT a.attisdropped"
        " ORDER BY a.attnum",
        [schema, name],
    ).fetchall()
    return dg.TableSchema(
        columns=[
            dg.TableColumn(
                column, type_name, constraints=dg.TableColumnConstraints(nullable=not notnull)
            )
            for column, type_name, notnull in rows
        ]
    )
