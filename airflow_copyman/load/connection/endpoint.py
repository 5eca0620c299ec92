"""Endpoints: a PostgreSQL database a load reads from or writes to, without Airflow.

An :class:`Endpoint` is a name, a description safe to log, a function that opens a psycopg
connection with the pinned session settings (:mod:`.settings`), and the secrets to keep out
of every message. The Airflow hook builds them from its connections; a command line or
another orchestrator builds them with :func:`postgres`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import tuple_row
from psycopg.types.json import register_default_adapters

from airflow_copyman.load.connection import bounded, settings

#: ``application_name`` of the sessions :func:`postgres` opens, unless given.
#: ``application_name`` given to CopyMan's connections unless the connection sets one, so
#: that a DBA can tell CopyMan's sessions in ``pg_stat_activity``.
APPLICATION_NAME = "airflow-copyman"


@dataclass(frozen=True)
class Endpoint:
    """A database a load uses.

    :param name: how the load names it (a destination's ``conn_id`` refers to it).
    :param connect: opens a new connection (see :func:`open_connection`).
    :param description: where it points, for messages (``host:port/database``); never a
        password.
    :param secrets: strings that must never reach a log line or a message (passwords).
    :param location: ``(postgres://host:port, database)`` for lineage, where known.
    :param problem: why it cannot be used (an unknown connection, say): the load reports
        it with the other bad input before connecting anywhere.
    """

    name: str
    connect: Callable[[], psycopg.Connection[Any]] = field(repr=False)
    description: str = ""
    secrets: tuple[str, ...] = field(default=(), repr=False)
    location: tuple[str, str] | None = None
    problem: str | None = None

    @property
    def conn_id(self) -> str:
        return self.name

    def describe(self) -> str:
        """``name (host:port/database)``, or the name alone."""
        return f"{self.name} ({self.description})" if self.description else self.name


def connection_args(conn_args: Mapping[str, Any]) -> dict[str, Any]:
    """``conn_args`` with the pinned session settings and a default ``connect_timeout``."""
    return bounded.connect_args(settings.connect_args(conn_args))


def open_connection(conn_args: Mapping[str, Any]) -> psycopg.Connection[Any]:
    """A new connection from libpq keywords, ready for a load: the pinned session
    settings (checked), a default ``connect_timeout``, statements a load can bound and
    stop, plain tuple rows, outside autocommit."""
    args = connection_args(conn_args)
    conn = bounded.BoundedConnection.connect(**args)
    register_default_adapters(conn)
    try:
        prepare(conn)
    except BaseException:
        conn.close()
        raise
    return conn


def prepare(conn: psycopg.Connection[Any]) -> None:
    """Tuple rows, the session settings checked, left outside autocommit."""
    conn.row_factory = tuple_row  # type: ignore[assignment]
    # The check runs before a load gives the connection its bounds: bound it on its own,
    # or a server that answered the handshake and then fell silent would hold it forever.
    own = conn if isinstance(conn, bounded.BoundedConnection) else None
    unbounded = own is not None and own.bounds is None
    if own is not None and unbounded:
        own.bounds = bounded.Bounds(timeout=float(bounded.CONNECT_TIMEOUT))
    try:
        conn.autocommit = True  # the check is one query, without BEGIN and ROLLBACK
        settings.check(conn)
        conn.autocommit = False
    finally:
        if own is not None and unbounded:
            # A connection the hook hands out for other work keeps psycopg's own waits.
            own.bounds = None


def postgres(name: str, conninfo: str = "", **kwargs: Any) -> Endpoint:
    """An endpoint from a libpq connection string or URI and/or keywords."""
    args: dict[str, Any] = {**conninfo_to_dict(conninfo), **kwargs}
    args.setdefault("application_name", APPLICATION_NAME)
    password = args.get("password")
    host, port = args.get("host") or "localhost", args.get("port") or 5432
    database = args.get("dbname") or args.get("user") or ""
    return Endpoint(
        name=name,
        connect=lambda: open_connection(args),
        description=f"{host}:{port}/{database}",
        secrets=(str(password),) if password else (),
        location=(f"postgres://{host}:{port}", str(database or "postgres")),
    )
