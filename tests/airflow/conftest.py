"""End-to-end tests of the Airflow provider: real task runs (``dag.test()``) against real
PostgreSQL servers.

Airflow reads its configuration when it is first imported, so this file points it at a
throwaway home (SQLite metadata database, a DAGs folder holding the test DAGs and the
example DAGs, no example DAGs of Airflow's own) before anything imports it. The servers are
started once per session; every test gets fresh databases and its own ``AIRFLOW_CONN_*``.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]

if "airflow" in sys.modules:  # pragma: no cover - a guard for whoever reorders conftests
    raise RuntimeError(
        "airflow was imported before tests/airflow/conftest.py could configure it: "
        "do not import airflow (or airflow_copyman.hooks/operators) from a root conftest"
    )

AIRFLOW_HOME = Path(tempfile.mkdtemp(prefix="copyman-airflow-home-"))
DAGS_FOLDER = AIRFLOW_HOME / "dags"
DAGS_FOLDER.mkdir()
for _source in [*(HERE / "dags").iterdir(), *(REPO / "example_dags").iterdir()]:
    if _source.suffix in (".py", ".sql"):
        shutil.copy(_source, DAGS_FOLDER / _source.name)
atexit.register(shutil.rmtree, AIRFLOW_HOME, True)

os.environ.update(
    {
        "AIRFLOW_HOME": str(AIRFLOW_HOME),
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS_FOLDER),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__ALLOWED_DESERIALIZATION_CLASSES_REGEXP": ".*",
        "COPYMAN_TEST_EVENTS": str(AIRFLOW_HOME / "events.jsonl"),
    }
)

import pytest  # noqa: E402
from af_support import Events, PgServers, start_servers  # noqa: E402


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.airflow)


@pytest.fixture(scope="session")
def airflow_db() -> None:
    """A migrated metadata database (SQLite, in the throwaway home), once per session."""
    from airflow.utils import db

    db.initdb()


@pytest.fixture(scope="session")
def pg() -> Iterator[PgServers]:
    """Three throwaway PostgreSQL servers (a source and two destination servers)."""
    servers = start_servers(3)
    try:
        yield servers
    finally:
        servers.close()


@pytest.fixture
def events() -> Events:
    """The task callbacks' records (see the test DAGs), emptied for each test."""
    path = Path(os.environ["COPYMAN_TEST_EVENTS"])
    path.unlink(missing_ok=True)
    return Events(path)


