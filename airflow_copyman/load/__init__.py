"""What a load is, without Airflow: endpoints, destinations, the run of a load, its report.

Everything here takes psycopg connections (through :class:`Endpoint`) and imports nothing
from Airflow, so that the Airflow provider (:mod:`airflow_copyman.hooks`,
:mod:`airflow_copyman.operators`), a command line or another orchestrator run exactly the
same loads::

    from airflow_copyman import load

    src = load.postgres("src", "postgresql://reader@db1/sales")
    wh = load.postgres("wh", "postgresql://loader@db2/warehouse")
    report = load.run(
        src, "SELECT * FROM orders WHERE day = current_date",
        [load.Destination("wh", "public.orders", mode="merge", key=("id",))],
        endpoints={"wh": wh},
    )
    report.failed      # [] or the DestinationResults that failed (rolled back)

Errors: :class:`ConfigError` (bad input, found before anything was written) is raised;
a destination that fails is rolled back and reported (``status="failed"``, ``permanent``
says whether a retry could help); the others commit.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from airflow_copyman.copyman import RECEIVER_TIMEOUT
from airflow_copyman.load.catalog.identity import Tables as TableIdentity
from airflow_copyman.load.catalog.identity import conflicts as identity_conflicts
from airflow_copyman.load.catalog.identity import destination as table_identity
from airflow_copyman.load.catalog.relation import Relation
from airflow_copyman.load.catalog.tables import Column, Params, PlanError, Source, TableName
from airflow_copyman.load.connection.bounded import CONNECT_TIMEOUT, BoundedConnection
from airflow_copyman.load.connection.classify import CREATED_CONCURRENTLY, is_permanent
from airflow_copyman.load.connection.classify import describe as describe_error
from airflow_copyman.load.connection.endpoint import (
    APPLICATION_NAME,
    Endpoint,
    connection_args,
    open_connection,
    postgres,
)
from airflow_copyman.load.connection.endpoint import prepare as prepare_connection
from airflow_copyman.load.connection.load_lock import take_load_lock
from airflow_copyman.load.connection.locks import LockWaitTimeout, application_name_for
from airflow_copyman.load.ledger.protocol import LoadLedger, Slot
from airflow_copyman.load.ledger.table import (
    Entry,
    Extras,
    Ledger,
    TaskKey,
    ledger_checksums,
    ledger_rows,
)
from airflow_copyman.load.modes import statements as mode_sql
from airflow_copyman.load.modes.base import Mode
from airflow_copyman.load.modes.create import key_constraint as create_key_constraint
from airflow_copyman.load.modes.create import refusal as create_refusal
from airflow_copyman.load.modes.create import schema_for as create_schema_for
from airflow_copyman.load.modes.create import statement as create_statement
from airflow_copyman.load.modes.merge import MergeConflictError, NullKeyError
from airflow_copyman.load.modes.merge import key_indexes as merge_key_indexes
from airflow_copyman.load.modes.merge import send_functions as merge_send_functions
from airflow_copyman.load.options import (
    LOCK_TIMEOUT,
    PROGRESS_INTERVAL,
    ArgumentError,
    LoadOptions,
    is_deferred,
)
from airflow_copyman.load.options import ledger_schema as check_ledger_schema
from airflow_copyman.load.options import sql as check_sql
from airflow_copyman.load.spec import (
    DESTINATION_KEYS,
    Append,
    ConfigError,
    Destination,
    DestinationResult,
    DuplicateKeyError,
    LoadError,
    LoadMode,
    Merge,
    Progress,
    Replace,
    Status,
    TooFewRowsError,
    TransferReport,
    Verification,
    destinations_from,
)
from airflow_copyman.load.transfer import Endpoints, Transfer
from airflow_copyman.load.verify.checksum import Checksum, ChecksumMismatch
from airflow_copyman.load.verify.readback import render_settings
from airflow_copyman.load.verify.staged import parse_checksum, relation_checksum, sum_checksums

__all__ = [
    "APPLICATION_NAME",
    "CONNECT_TIMEOUT",
    "CREATED_CONCURRENTLY",
    "DESTINATION_KEYS",
    "LOCK_TIMEOUT",
    "PROGRESS_INTERVAL",
    "Append",
    "ArgumentError",
    "BoundedConnection",
    "Checksum",
    "ChecksumMismatch",
    "Column",
    "ConfigError",
    "Destination",
    "DestinationResult",
    "DuplicateKeyError",
    "Endpoint",
    "Endpoints",
    "Entry",
    "Extras",
    "Ledger",
    "LoadError",
    "LoadLedger",
    "LoadMode",
    "LoadOptions",
    "LockWaitTimeout",
    "Merge",
    "MergeConflictError",
    "Mode",
    "NullKeyError",
    "Params",
    "PlanError",
    "Progress",
    "Relation",
    "Replace",
    "Slot",
    "Source",
    "Status",
    "TableIdentity",
    "TableName",
    "TaskKey",
    "TooFewRowsError",
    "Transfer",
    "TransferReport",
    "Verification",
    "application_name_for",
    "check_ledger_schema",
    "check_sql",
    "connection_args",
    "create_key_constraint",
    "create_refusal",
    "create_schema_for",
    "create_statement",
    "describe_error",
    "destinations_from",
    "identity_conflicts",
    "is_deferred",
    "is_permanent",
    "ledger_checksums",
    "ledger_rows",
    "merge_key_indexes",
    "merge_send_functions",
    "mode_sql",
    "open_connection",
    "parse_checksum",
    "postgres",
    "prepare_connection",
    "relation_checksum",
    "render_settings",
    "run",
    "sum_checksums",
    "table_identity",
    "take_load_lock",
]


def run(
    source: Endpoint,
    sql: str,
    destinations: Sequence[Destination | Mapping[str, Any]],
    *,
    endpoints: Endpoints,
    parameters: Params | None = None,
    format: str | None = None,
    ledger: LoadLedger | None = None,
    on_commit: Callable[[DestinationResult], None] | None = None,
    progress_interval: float = 5.0,
    receiver_timeout: float = RECEIVER_TIMEOUT,
    lock_timeout: float = LOCK_TIMEOUT,
    min_rows: int = 0,
    max_bytes_per_second: float | None = None,
    verify: str = "count",
    log: logging.Logger | logging.LoggerAdapter[Any] | None = None,
    options: LoadOptions | None = None,
    on_progress: Callable[[Progress], None] | None = None,
) -> TransferReport:
    """Copy the rows of ``sql`` (a query or a table name) from ``source`` into every
    destination (each finds its endpoint in ``endpoints`` by its ``conn_id``), in one pass.

    ``max_bytes_per_second`` caps the copy: at most that many bytes read from the source
    in any second (None: no cap). ``verify="checksum"`` also compares a checksum of the
    rows the source sent with one of the rows each destination wrote, before it commits
    (``"count"``, the default: the COPYs' row counts only). ``lock_timeout`` bounds every
    lock wait in a destination (the table's load lock, TRUNCATE, DELETE, CREATE, the
    merge's statements; at most ``receiver_timeout``): a wait that times out fails that
    destination transient, naming the table, the lock and the sessions in the way.
    ``on_progress`` is called with a :class:`Progress` from the loading thread, at most
    every ``progress_interval`` seconds while the copy runs, and once at the end.
    ``options``: all of these at once, as one :class:`LoadOptions` (the keyword options
    are then not used).

    :raises ConfigError: bad input, found before any destination was written.
    :returns: the report (failed destinations are in it, rolled back).
    """
    return Transfer(
        source, sql, destinations, endpoints=endpoints, parameters=parameters, format=format,
        ledger=ledger, on_commit=on_commit, progress_interval=progress_interval,
        receiver_timeout=receiver_timeout, lock_timeout=lock_timeout, min_rows=min_rows,
        max_bytes_per_second=max_bytes_per_second, verify=verify, log=log, options=options,
        on_progress=on_progress,
    ).run()
