"""Helpers of the Airflow end-to-end tests: servers, databases, DAG runs and their results.

Imported by ``conftest.py`` after it configured Airflow (nothing here imports Airflow at
module level).
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import os
import sys
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from airflow_copyman.testing.servers import (
    ContainerServer,
    LocalServer,
    ServerAddress,
    ServerPool,
    connect,
    create_database,
)

UTC = datetime.UTC
LOGICAL_DATE = datetime.datetime(2024, 1, 2, tzinfo=UTC)


@dataclass
class Database:
    """A database on a throwaway server."""

    server: LocalServer | ContainerServer
    name: str

    @property
    def address(self) -> ServerAddress:
        return self.server.address

    def uri(self) -> str:
        return self.address.uri(self.name)

    def connect(self, **kwargs: Any) -> psycopg.Connection[Any]:
        return connect(self.address, self.name, **kwargs)

    def execute(self, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
        with self.connect(autocommit=True) as conn:
            cur = conn.execute(sql, params)  # type: ignore[arg-type]
            return cur.fetchall() if cur.description else []

    def scalar(self, sql: str, params: Any = None) -> Any:
        return self.execute(sql, params)[0][0]

    def connection_json(self, **extra: Any) -> str:
        a = self.address
        return json.dumps(
            {
                "conn_type": "postgres",
                "host": a.host,
                "port": a.port,
                "login": a.user,
                "password": a.password,
                "schema": self.name,
                "extra": extra,
            }
        )


@dataclass
class PgServers:
    pool: ServerPool
    servers: list[LocalServer | ContainerServer] = field(default_factory=list)

    @property
    def src(self) -> LocalServer | ContainerServer:
        return self.servers[0]

    @property
    def dst1(self) -> LocalServer | ContainerServer:
        return self.servers[1]

    @property
    def dst2(self) -> LocalServer | ContainerServer:
        return self.servers[2]

    def database(self, server: LocalServer | ContainerServer, prefix: str) -> Database:
        name = f"{prefix}_{uuid.uuid4().hex[:8]}"
        create_database(server.address, name)
        return Database(server, name)

    @property
    def passwords(self) -> list[str]:
        return [s.address.password for s in self.servers]

    def close(self) -> None:
        self.pool.close()


def start_servers(count: int) -> PgServers:
    """Start ``count`` servers at once (each start takes seconds)."""
    pool = ServerPool()
    with ThreadPoolExecutor(count) as executor:
        servers = list(executor.map(lambda _: pool.new(), range(count)))
    return PgServers(pool, servers)


# The source data every test loads: many types, NULLs, text that needs escaping.
ORDERS_DDL = """
CREATE TABLE {name} (
    id         bigint PRIMARY KEY,
    day        date NOT NULL,
    customer   text,
    amount     numeric(12, 2),
    tags       text[],
    payload    jsonb,
    created_at timestamptz,
    flag       boolean,
    raw        bytea
)
"""

ORDERS_FILL = r"""
INSERT INTO orders
SELECT g,
       date '2024-01-01' + (g %% 3),
       CASE WHEN g %% 17 = 0 THEN NULL
            ELSE E'cust ' || (g %% 100) || E'\t\\ "q" ;\n' || chr(233) END,
       CASE WHEN g %% 13 = 0 THEN NULL ELSE (g * 1.25)::numeric(12, 2) END,
       ARRAY['a', g::text, NULL],
       jsonb_build_object('g', g, 's', 'x"y'),
       timestamptz '2024-01-01 00:00:00+00' + g * interval '1 second',
       g %% 2 = 0,
       decode(md5(g::text), 'hex')
FROM generate_series(1, %s) g
"""


def create_orders(db: Database, rows: int) -> None:
    db.execute(ORDERS_DDL.format(name="orders"))
    db.execute(ORDERS_FILL, [rows])


def create_orders_table(db: Database, name: str = "orders") -> None:
    if "." in name:
        db.execute(f"CREATE SCHEMA IF NOT EXISTS {name.split('.')[0]}")
    db.execute(ORDERS_DDL.format(name=name))


def rows_of(db: Database, table: str, order_by: str = "id", where: str = "") -> list[Any]:
    return db.execute(f"SELECT * FROM {table} {where} ORDER BY {order_by}")


# The ledger table as the versions before these columns created it.
OLD_LEDGER = """
CREATE SCHEMA IF NOT EXISTS old;
CREATE TABLE old.copyman_ledger (
    dag_id      text        NOT NULL,
    task_id     text        NOT NULL,
    run_id      text        NOT NULL,
    map_index   integer     NOT NULL,
    conn_id     text        NOT NULL,
    destination text        NOT NULL,
    lineage     text        NOT NULL,
    try_number  integer     NOT NULL,
    rows        bigint      NOT NULL,
    bytes       bigint      NOT NULL,
    loaded_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (dag_id, task_id, run_id, map_index, conn_id, destination)
)
"""
OLD_LEDGER_COLUMNS = [
    "dag_id", "task_id", "run_id", "map_index", "conn_id", "destination", "lineage",
    "try_number", "rows", "bytes", "loaded_at",
]


# DAG runs.

_modules: dict[Path, Any] = {}


def dags_folder() -> Path:
    return Path(os.environ["AIRFLOW__CORE__DAGS_FOLDER"])


def load_dag(filename: str, dag_id: str) -> Any:
    """The DAG object ``dag_id`` of a file in the DAGs folder (imported once)."""
    path = dags_folder() / filename
    module = _modules.get(path)
    if module is None:
        name = f"copyman_dagfile_{path.stem}"
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        _modules[path] = module
    from airflow.sdk import DAG

    for value in vars(module).values():
        if isinstance(value, DAG) and value.dag_id == dag_id:
            return value
    raise LookupError(f"no DAG {dag_id} in {path}")


@dataclass
class Run:
    """A finished DAG run, as the metadata database records it."""

    dag_id: str
    run_id: str
    state: str
    tis: dict[str, tuple[str, int]]  # task_id -> (state, try_number)

    def state_of(self, task_id: str) -> str:
        return self.tis[task_id][0]

    def tries_of(self, task_id: str) -> int:
        return self.tis[task_id][1]

    def xcom(self, task_id: str, key: str = "return_value") -> Any:
        from airflow.models.xcom import XComModel
        from airflow.utils.session import create_session

        with create_session() as session:
            rows = session.scalars(
                XComModel.get_many(
                    run_id=self.run_id, key=key, task_ids=task_id, dag_ids=self.dag_id
                )
            ).all()
            return XComModel.deserialize_value(rows[0]) if rows else None

    def task_state(self, task_id: str, key: str) -> Any:
        """A value of the task's ``task_state_store``."""
        from airflow.models.dagrun import DagRun
        from airflow.models.task_state_store import TaskStateStoreModel
        from airflow.utils.session import create_session
        from sqlalchemy import select

        with create_session() as session:
            dag_run_id = session.scalar(
                select(DagRun.id).where(DagRun.dag_id == self.dag_id, DagRun.run_id == self.run_id)
            )
            value = session.scalar(
                select(TaskStateStoreModel.value).where(
                    TaskStateStoreModel.dag_run_id == dag_run_id,
                    TaskStateStoreModel.task_id == task_id,
                    TaskStateStoreModel.key == key,
                )
            )
        return json.loads(value) if value is not None else None


def run_dag(filename: str, dag_id: str, logical_date: datetime.datetime = LOGICAL_DATE) -> Run:
    dag = load_dag(filename, dag_id)
    dr = dag.test(logical_date=logical_date)
    from airflow.utils.session import create_session

    with create_session() as session:
        from airflow.models.dagrun import DagRun

        fresh = session.get(DagRun, dr.id) if getattr(dr, "id", None) else dr
        tis = {
            ti.task_id: (str(ti.state), ti.try_number)
            for ti in fresh.get_task_instances(session=session)
        }
        return Run(dag_id, dr.run_id, str(dr.state), tis)


class Events:
    """What the test DAGs' callbacks recorded (failures, retries), one JSON object a line."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def all(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line]

    def of(self, task_id: str) -> list[dict[str, Any]]:
        return [e for e in self.all() if e["task_id"] == task_id]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.all())
