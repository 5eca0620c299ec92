"""CopyManHook: PostgreSQL connections from Airflow, and one-source, many-destination COPY.

Connections are ordinary ``postgres`` connections (``AIRFLOW_CONN_*``, secrets backends,
the metadata database); the hook subclasses ``PostgresHook`` so that every option it
honours (connection extras as libpq keywords, ``sslmode``, ``options``, IAM tokens...)
works the same here. On top of it, :meth:`CopyManHook.transfer` streams the source's COPY
into every destination with the copy engine (:mod:`airflow_copyman.copyman`), each
destination in its own transaction, committed only once it received every row.

The values it takes and returns (:class:`Destination`, :class:`TransferReport`...) and the
run of one transfer live in :mod:`airflow_copyman.load`, which knows nothing of Airflow:
the hook turns Airflow connections into its endpoints (:meth:`CopyManHook.endpoint`) and
its errors into this provider's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import psycopg
from airflow.providers.postgres.hooks.postgres import PostgresHook
from airflow.sdk.exceptions import AirflowNotFoundException
from psycopg.types.json import register_default_adapters

from airflow_copyman import copyman, load
from airflow_copyman._destinations import (
    DESTINATION_KEYS,
    CopyManConfigError,
    CopyManError,
    Destination,
    DestinationResult,
    Status,
    TransferReport,
    config_error,
    destinations_from,
)
from airflow_copyman.load import APPLICATION_NAME, CONNECT_TIMEOUT, PROGRESS_INTERVAL

if TYPE_CHECKING:
    from airflow_copyman.load import Transfer

__all__ = [
    "APPLICATION_NAME",
    "CONNECT_TIMEOUT",
    "DESTINATION_KEYS",
    "POSTGRES_CONN_TYPES",
    "PROGRESS_INTERVAL",
    "CopyManConfigError",
    "CopyManError",
    "CopyManHook",
    "Destination",
    "DestinationResult",
    "Status",
    "TransferReport",
    "destinations_from",
]

#: Connection types the hook accepts (``postgresql://`` URIs normalise to ``postgres``).
POSTGRES_CONN_TYPES = frozenset({"postgres", "postgresql"})


class CopyManHook(PostgresHook):
    """A PostgreSQL connection for CopyMan, and the fan-out transfer from it.

    Builds psycopg 3 connections exactly like ``PostgresHook`` (whose options all apply),
    after checking that the connection exists and is a PostgreSQL one. The connection
    the hook is made for is the source of :meth:`transfer`.

    :param postgres_conn_id: the ``postgres`` connection id.
    :param application_name: ``application_name`` for its sessions unless the connection's
        extra sets one.
    """

    conn_name_attr = "postgres_conn_id"
    default_conn_name = "postgres_default"
    conn_type = "postgres"
    hook_name = "CopyMan (PostgreSQL COPY fan-out)"

    def __init__(
        self,
        *args: Any,
        application_name: str | None = APPLICATION_NAME,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.application_name = application_name
        self._transfer: Transfer | None = None

    # Connections.

    @property
    def conn_id(self) -> str:
        return str(getattr(self, self.conn_name_attr))

    def check_connection(self) -> Any:
        """The Airflow connection, after checking that it exists and is PostgreSQL."""
        conn_id = self.conn_id
        try:
            conn = self.connection
        except AirflowNotFoundException:
            raise CopyManConfigError(
                f"connection {conn_id!r} is not defined (no AIRFLOW_CONN_{conn_id.upper()}, "
                "secrets backend entry or metadata database connection has that id)"
            ) from None
        if conn.conn_type not in POSTGRES_CONN_TYPES:
            raise CopyManConfigError(
                f"connection {conn_id!r} is of type {conn.conn_type!r}; CopyMan needs a "
                "PostgreSQL connection (type 'postgres')"
            )
        return conn

    @property
    def secrets(self) -> list[str]:
        """What must never appear in a log line, an XCom or an error message."""
        try:
            password = self.connection.password
        except Exception:
            return []
        return [password] if password else []

    def describe(self) -> str:
        """``conn_id (host:port/database)``: never the login or password."""
        try:
            conn = self.connection
            database = self.database or conn.schema or ""
            return f"{self.conn_id} ({conn.host}:{conn.port or 5432}/{database})"
        except Exception:
            return self.conn_id

    def get_conn(self) -> psycopg.Connection[Any]:
        """A new psycopg 3 connection, outside autocommit, with plain tuple rows, in UTF8
        and with the load layer's pinned session settings in force."""
        self.check_connection()
        conn = super().get_conn()
        if not isinstance(conn, psycopg.Connection):
            raise CopyManConfigError(
                "CopyMan needs psycopg 3 (PostgresHook chose psycopg2: install psycopg>=3.2 "
                "and SQLAlchemy>=2)"
            )
        try:
            # Tuple rows (the "cursor" extra may ask for dicts), the session checked.
            load.prepare_connection(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def endpoint(self) -> load.Endpoint:
        """This connection as the load layer's endpoint (what is wrong with it, if
        anything, in its ``problem``)."""
        try:
            self.check_connection()
        except CopyManConfigError as exc:
            return load.Endpoint(self.conn_id, self.get_conn, problem=str(exc))
        location = None
        try:
            conn = self.connection
            location = (
                f"postgres://{conn.host}:{conn.port or 5432}",
                self.database or conn.schema or "postgres",
            )
            description = f"{conn.host}:{conn.port or 5432}/{self.database or conn.schema or ''}"
        except Exception:  # lineage and descriptions are best effort
            description = ""
        return load.Endpoint(
            self.conn_id,
            self.get_conn,
            description=description,
            secrets=tuple(self.secrets),
            location=location,
        )

    def _create_connection(self, conn_args: dict[str, Any]) -> Any:
        if self.application_name and "application_name" not in conn_args:
            conn_args = {**conn_args, "application_name": self.application_name}
        # Bounded waits (the load layer's): a default connect_timeout, and a
        # connection class whose statements a transfer can bound and stop.
        conn = load.BoundedConnection.connect(**load.connection_args(conn_args))
        register_default_adapters(conn)
        if self.enable_log_db_messages:
            conn.add_notice_handler(self._notice_handler)
        return conn

    # The transfer.

    def transfer(
        self,
        sql: str,
        destinations: Sequence[Destination | Mapping[str, Any]],
        *,
        parameters: load.Params | None = None,
        format: str | None = None,
        ledger: load.LoadLedger | None = None,
        on_commit: Callable[[DestinationResult], None] | None = None,
        progress_interval: float = PROGRESS_INTERVAL,
        receiver_timeout: float = copyman.RECEIVER_TIMEOUT,
        lock_timeout: float = load.LOCK_TIMEOUT,
        application_name: str | None = None,
        raise_on_failure: bool = True,
        min_rows: int = 0,
        max_bytes_per_second: float | None = None,
        verify: str = "count",
        options: load.LoadOptions | None = None,
    ) -> TransferReport:
        """Copy the rows of ``sql`` (a query or a table name) from this hook's connection
        into every destination, in one pass over the source.

        Every destination loads in its own transaction and commits only if it received
        every row (the servers' COPY counts agree). A destination that fails is rolled
        back and reported; the others go on and commit. With a ``ledger``
        (:class:`~airflow_copyman.load.LoadLedger`: the ledger table,
        :class:`~airflow_copyman.load.Ledger`, records each commit atomically with its
        data), destinations it records as loaded (for this lineage) are skipped.

        Every wait is bounded: connecting by the connection's ``connect_timeout`` (default
        :data:`CONNECT_TIMEOUT`), every statement and the copy by ``receiver_timeout``.
        ``lock_timeout`` bounds every lock wait in a destination (the table's load lock:
        one load at a time per table; TRUNCATE, DELETE, CREATE, the merge's statements): a
        wait that times out fails that destination transient, naming the table, the lock
        and the sessions in the way. ``application_name``: the destinations' sessions'
        (unless their connection sets one), so that a load waiting for the table names
        this one (the operator passes ``copyman <dag_id>.<task_id> <run_id>``).
        ``verify="checksum"`` compares a checksum of the rows the source sent with one of
        the rows each destination wrote before it commits (default ``"count"``: the COPYs'
        row counts). ``max_bytes_per_second`` caps the copy: at most that many bytes read from the
        source in any second (None: no cap); its waits count towards no time-out.
        ``options``: the load's options as one :class:`~airflow_copyman.load.LoadOptions`
        (``parameters`` to ``verify`` are then not used).

        :raises CopyManConfigError: bad input, found before any destination was written.
        :raises CopyManDestinationsFailed: a destination failed (``CopyManPermanentFailure``,
            an ``AirflowFailException``, when no retry can fix any failure); the report is
            its ``report``. With ``raise_on_failure=False`` the report is returned instead.
        :returns: the report.
        """
        try:
            run = load.Transfer(
                self.endpoint(), sql, destinations,
                endpoints=lambda conn_id: CopyManHook(
                    conn_id, application_name=application_name or self.application_name
                ).endpoint(),
                parameters=parameters, format=format, ledger=ledger, on_commit=on_commit,
                progress_interval=progress_interval, receiver_timeout=receiver_timeout,
                lock_timeout=lock_timeout,
                min_rows=min_rows, max_bytes_per_second=max_bytes_per_second,
                verify=verify, log=self.log, options=options,
            )
            self._transfer = run
            report = run.run()
        except load.ConfigError as exc:
            raise config_error(exc) from None
        finally:
            self._transfer = None
        if raise_on_failure and report.failed:
            from airflow_copyman._outcome import failure_of

            raise failure_of(report)
        return report

    def cancel(self) -> None:
        """Stop the running transfer (safe from a signal handler): it only asks; the
        transfer's own loop cancels every COPY and statement in flight on the servers and
        commits nothing more."""
        run = self._transfer
        if run is not None:
            run.cancel()

