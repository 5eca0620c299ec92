"""Databases for the Dagster tests: a source of orders over three days, and two warehouses
(``wh1``: ``public.orders``, merged by id; ``wh2``: ``analytics.orders``, replaced), as the
example project (``example_dags/dagster_copyman.py``) loads them."""

from __future__ import annotations

import importlib.util
import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from af_support import Database  # on sys.path by tests/conftest.py

from airflow_copyman.testing.servers import ContainerServer, LocalServer, create_database

EXAMPLE = Path(__file__).resolve().parents[2] / "example_dags" / "dagster_copyman.py"
DAYS = ("2024-01-01", "2024-01-02", "2024-01-03")
#: Orders per day (ids day * 1000 + n).
PER_DAY = 50
TABLE = "(id int PRIMARY KEY, day date NOT NULL, amount int NOT NULL, note text)"
_names = itertools.count()


@dataclass
class Warehouse:
    src: Database
    wh1: Database
    wh2: Database

    def connections(self) -> dict[str, str]:
        return {"pg_src": self.src.uri(), "wh1": self.wh1.uri(), "wh2": self.wh2.uri()}

    def environment(self) -> dict[str, str]:
        """The example's ``dg.EnvVar`` names."""
        return {"SRC_DSN": self.src.uri(), "WH1_DSN": self.wh1.uri(), "WH2_DSN": self.wh2.uri()}

    @property
    def password(self) -> str:
        return self.src.address.password

    def day_rows(self, db: Database, table: str, day: str) -> list[tuple[Any, ...]]:
        return db.execute(f"SELECT id, day::text, amount, note FROM {table} WHERE day = %s "
                          "ORDER BY id", [day])

    def source_rows(self, day: str) -> list[tuple[Any, ...]]:
        return self.day_rows(self.src, "orders", day)


def new_database(server: LocalServer | ContainerServer, prefix: str) -> Database:
    name = f"dg_{prefix}_{next(_names)}"
    create_database(server.address, name)
    return Database(server, name)


@pytest.fixture
def warehouse(server: LocalServer | ContainerServer) -> Warehouse:
    src, wh1, wh2 = (new_database(server, p) for p in ("src", "wh1", "wh2"))
    src.execute(f"CREATE TABLE orders {TABLE}")
    src.execute(
        "INSERT INTO orders SELECT d * 1000 + n, date '2023-12-31' + d, n, 'order ' || n "
        "FROM generate_series(1, 3) d, generate_series(1, %s) n",
        [PER_DAY],
    )
    wh1.execute(f"CREATE TABLE public.orders {TABLE}")
    wh2.execute(f"CREATE SCHEMA analytics; CREATE TABLE analytics.orders {TABLE}")
    return Warehouse(src, wh1, wh2)


@pytest.fixture
def example(warehouse: Warehouse) -> Iterator[ModuleType]:
    """The example project, imported afresh, its ``dg.EnvVar`` connections set."""
    saved = {k: os.environ.get(k) for k in warehouse.environment()}
    os.environ.update(warehouse.environment())
    spec = importlib.util.spec_from_file_location(f"dagster_copyman_{next(_names)}", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
