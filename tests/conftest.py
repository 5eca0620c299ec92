"""Real PostgreSQL servers for the tests (testcontainers or local binaries; never mocks)."""

from __future__ import annotations

import itertools
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from airflow_copyman.load.connection import settings
from airflow_copyman.testing.servers import (
    ContainerServer,
    LocalServer,
    ServerPool,
    connect,
    create_database,
    default_version,
    versions,
)

# The Airflow tests' database helper (it imports nothing of Airflow) serves these too.
sys.path.insert(0, str(Path(__file__).resolve().parent / "airflow"))
from af_support import Database

_names = itertools.count()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--pg-version", type=int, default=None,
        help="PostgreSQL major version of the servers the tests start (default: "
        "$COPYMAN_PG_VERSION, else 15); tests/test_cross_version.py starts 15 and 18 itself",
    )


def pytest_configure(config: pytest.Config) -> None:
    version = config.getoption("--pg-version")
    if version is not None:
        # Read by every server the tests start (testing/servers.py's default_version()).
        os.environ["COPYMAN_PG_VERSION"] = str(version)


def pytest_report_header(config: pytest.Config) -> str:
    return f"PostgreSQL servers: {default_version()} (this machine can start {versions()})"


@pytest.fixture(scope="session")
def server_pool() -> Iterator[ServerPool]:
    pool = ServerPool()
    yield pool
    pool.close()


@pytest.fixture(scope="session")
def server(server_pool: ServerPool) -> LocalServer | ContainerServer:
    """One server shared by the session; tests get databases of their own on it."""
    return server_pool.new()


@pytest.fixture
def spare_server(server_pool: ServerPool) -> LocalServer | ContainerServer:
    """A server of the test's own, for tests that stop or kill it."""
    return server_pool.new()


class Databases:
    """Fresh databases on a server, and connections to them closed at the end."""

    def __init__(self, server: LocalServer | ContainerServer) -> None:
        self.server = server
        self.connections: list[psycopg.Connection] = []

    def new(self, prefix: str = "db", server: LocalServer | ContainerServer | None = None,
            **kwargs: object) -> psycopg.Connection:
        target = server or self.server
        name = f"{prefix}_{next(_names)}"
        create_database(target.address, name)
        conn = connect(target.address, name, **kwargs)
        self.connections.append(conn)
        return conn

    def close(self) -> None:
        for conn in self.connections:
            conn.close()


@pytest.fixture
def dbs(server: LocalServer | ContainerServer) -> Iterator[Databases]:
    databases = Databases(server)
    yield databases
    databases.close()


@pytest.fixture
def pair(server: LocalServer | ContainerServer) -> Iterator[tuple[Database, Database]]:
    """A source and a destination database on the shared server (a checksum does not care
    whether they share one)."""
    made = []
    for prefix in ("src", "dst"):
        name = f"{prefix}_{next(_names)}"
        create_database(server.address, name)
        made.append(Database(server, name))
    yield made[0], made[1]


def pinned(db: Database, **kwargs: Any) -> psycopg.Connection[Any]:
    """A connection with the settings a load pins on every connection."""
    conn: psycopg.Connection[Any] = db.connect(**settings.connect_args(kwargs))
    return conn
