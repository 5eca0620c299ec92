"""The main job: run the example DAG end to end on throwaway PostgreSQL servers.

``python -m airflow_copyman.demo`` (``make demo``):

1. starts three throwaway PostgreSQL servers (source, warehouse 1, warehouse 2);
2. fills the source with orders (200,000 for the demo day, by default) and creates the
   warehouse tables, with stale rows the load must replace;
3. points Airflow at ``.demo/airflow`` in the repository (SQLite metadata database,
   ``example_dags/`` as DAGs folder) and at the servers (``AIRFLOW_CONN_PG_*``);
4. runs ``copyman_warehouse_daily`` for the demo day with ``dag.test()``;
5. prints the totals from XCom, checks every warehouse against the source, and exits
   non-zero if anything differs.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from airflow_copyman.testing.servers import (
    DATABASE,
    ContainerServer,
    LocalServer,
    ServerAddress,
    ServerPool,
    connect,
)

DEMO_DAY = datetime.date(2024, 6, 1)
DAG_FILE = "copyman_warehouse_daily.py"
DAG_ID = "copyman_warehouse_daily"
TASK_ID = "load_orders"
REPORT_TASK_ID = "report_totals"
#: The example DAG's pool (``WAREHOUSE_POOL`` there): ``airflow pools set`` creates it in a
#: real deployment; the demo and the tests create it with the Pool model.
POOL = "copyman_warehouse"
POOL_SLOTS = 2

ORDERS_DDL = """
CREATE TABLE {table} (
    id          bigint PRIMARY KEY,
    day         date NOT NULL,
    customer_id integer NOT NULL,
    status      text NOT NULL,
    amount      numeric(12, 2) NOT NULL,
    currency    char(3) NOT NULL,
    items       jsonb NOT NULL,
    created_at  timestamptz NOT NULL
)
"""

ORDERS_ROWS = """
INSERT INTO {table}
SELECT g,
       %(day)s::date,
       1 + g %% 5000,
       (ARRAY['new', 'paid', 'shipped', 'returned'])[1 + g %% 4],
       round((5 + (g * 7919) %% 50000 / 100.0)::numeric, 2),
       'EUR',
       jsonb_build_object('sku', 'SKU-' || g %% 977, 'qty', 1 + g %% 3, 'note', E'gift\\twrap'),
       %(day)s::timestamptz + (g %% 86400) * interval '1 second'
FROM generate_series(%(first)s::bigint, %(last)s::bigint) g
"""


@dataclass(frozen=True)
class Place:
    """A database on a server."""

    address: ServerAddress
    dbname: str = DATABASE

    def connect(self, **kwargs: Any) -> psycopg.Connection[Any]:
        return connect(self.address, self.dbname, **kwargs)

    def uri(self) -> str:
        return self.address.uri(self.dbname)


def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]


def start_servers(count: int) -> tuple[ServerPool, list[LocalServer | ContainerServer]]:
    pool = ServerPool()
    try:
        with ThreadPoolExecutor(count) as executor:
            servers = list(executor.map(lambda _: pool.new(), range(count)))
    except BaseException:
        pool.close()
        raise
    return pool, servers


def _fill(place: Place, table: str, day: datetime.date, first: int, last: int) -> None:
    with place.connect(autocommit=True) as conn:
        conn.execute(
            ORDERS_ROWS.format(table=table),  # type: ignore[arg-type]
            {"day": day, "first": first, "last": last},
        )


def prepare_databases(src: Place, wh1: Place, wh2: Place, rows: int, day: datetime.date) -> None:
    """The source's orders, and warehouse tables holding rows the load must replace."""
    previous = day - datetime.timedelta(days=1)
    with src.connect(autocommit=True) as conn:
        conn.execute(ORDERS_DDL.format(table="orders"))  # type: ignore[arg-type]
    _fill(src, "orders", day, 1, rows)
    _fill(src, "orders", previous, rows + 1, rows + rows // 10)
    with src.connect(autocommit=True) as conn:
        # As autovacuum would have by the time a real source is copied: the statistics give
        # the progress lines their estimate.
        conn.execute("ANALYZE orders")
    with wh1.connect(autocommit=True) as conn:
        conn.execute(ORDERS_DDL.format(table="public.orders"))  # type: ignore[arg-type]
    _fill(wh1, "public.orders", previous, 10_000_001, 10_000_500)  # history: kept
    _fill(wh1, "public.orders", day, 20_000_001, 20_000_100)  # stale: replaced
    with wh2.connect(autocommit=True) as conn:
        conn.execute("CREATE SCHEMA analytics")
        conn.execute(ORDERS_DDL.format(table="analytics.orders"))  # type: ignore[arg-type]
    _fill(wh2, "analytics.orders", previous, 30_000_001, 30_001_000)  # truncated


def connection_env(src: Place, wh1: Place, wh2: Place) -> dict[str, str]:
    return {
        "AIRFLOW_CONN_PG_SRC": src.uri(),
        "AIRFLOW_CONN_PG_WH1": wh1.uri(),
        "AIRFLOW_CONN_PG_WH2": wh2.uri(),
    }


def _digest(place: Place, table: str, where: str) -> tuple[int, str]:
    with place.connect() as conn:
        row = conn.execute(
            f"SELECT count(*), coalesce(md5(string_agg(o::text, '|' ORDER BY id)), '') "  # type: ignore[arg-type]
            f"FROM {table} o WHERE {where}"
        ).fetchone()
    assert row is not None
    return int(row[0]), str(row[1])


def verify(src: Place, wh1: Place, wh2: Place, day: datetime.date) -> list[str]:
    """What differs between the source and the warehouses (empty: all good)."""
    problems = []
    on_day = f"day = '{day.isoformat()}'"
    expected = _digest(src, "orders", on_day)
    for name, place, table in (
        ("pg_wh1", wh1, "public.orders"),
        ("pg_wh2", wh2, "analytics.orders"),
    ):
        got = _digest(place, table, on_day)
        if got != expected:
            problems.append(
                f"{name} {table}: {got[0]} rows for {day} (digest {got[1][:8]}), "
                f"the source has {expected[0]} (digest {expected[1][:8]})"
            )
    kept = _digest(wh1, "public.orders", f"day <> '{day.isoformat()}'")[0]
    if kept != 500:
        problems.append(f"pg_wh1 public.orders: {kept} rows of other days, expected 500 kept")
    others = _digest(wh2, "analytics.orders", f"day <> '{day.isoformat()}'")[0]
    if others != 0:
        problems.append(f"pg_wh2 analytics.orders: {others} rows of other days left")
    return problems


def configure_airflow(home: Path, dags_folder: Path) -> None:
    """Point Airflow at ``home``; must run before anything imports Airflow."""
    if "airflow" in sys.modules:
        raise RuntimeError("configure_airflow() must run before airflow is imported")
    home.mkdir(parents=True, exist_ok=True)
    os.environ["AIRFLOW_HOME"] = str(home)
    os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(dags_folder)
    os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"


def load_dag(dags_folder: Path) -> Any:
    import importlib.util

    path = dags_folder / DAG_FILE
    spec = importlib.util.spec_from_file_location("copyman_warehouse_daily", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.dag


def read_xcom(dag_id: str, run_id: str, task_id: str, key: str = "return_value") -> Any:
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        rows = session.scalars(
            XComModel.get_many(run_id=run_id, key=key, task_ids=task_id, dag_ids=dag_id)
        ).all()
        return XComModel.deserialize_value(rows[0]) if rows else None


def create_pool(name: str = POOL, slots: int = POOL_SLOTS) -> None:
    """The example DAG's pool, as ``airflow pools set NAME SLOTS DESCRIPTION`` creates it: a
    task in a pool that does not exist is never scheduled, not even by ``dag.test()``."""
    from airflow.models.pool import Pool

    Pool.create_or_update_pool(
        name, slots, "CopyMan loads into the warehouses", include_deferred=False
    )


def run_example(dags_folder: Path, day: datetime.date) -> tuple[str, Any, Any]:
    """Run the example DAG for ``day``; return (state, load totals, report)."""
    from airflow.utils import db

    db.initdb()
    create_pool()
    dag = load_dag(dags_folder)
    logical_date = datetime.datetime.combine(day, datetime.time(), tzinfo=datetime.UTC)
    dag_run = dag.test(logical_date=logical_date)
    totals = read_xcom(DAG_ID, dag_run.run_id, TASK_ID)
    report = read_xcom(DAG_ID, dag_run.run_id, REPORT_TASK_ID)
    return str(dag_run.state), totals, report


def _print_totals(totals: Any, report: Any, seconds: float) -> None:
    print()
    print("=" * 78)
    print(f"CopyMan demo: {DAG_ID}.{TASK_ID} for {DEMO_DAY} ({seconds:.1f} s)")
    if not isinstance(totals, dict):
        print("  no totals in XCom")
        return
    print(f"  source rows: {totals['rows']:,}  bytes: {totals['bytes']:,}  "
          f"format: {totals['format']}")
    for dest in totals["destinations"]:
        print(
            f"  {dest['conn_id']:<8} {dest['table']:<18} {dest['status']:<15} "
            f"rows: {dest['rows'] if dest['rows'] is None else format(dest['rows'], ',')}  "
            f"bytes: {dest['bytes'] if dest['bytes'] is None else format(dest['bytes'], ',')}"
            + (f"  error: {dest['error']}" if dest["error"] else "")
        )
    print(f"  downstream {REPORT_TASK_ID} read from XCom: {report}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000, help="orders on the demo day")
    parser.add_argument("--home", type=Path, default=repo_root() / ".demo" / "airflow")
    args = parser.parse_args(argv)

    dags_folder = repo_root() / "example_dags"
    if not (dags_folder / DAG_FILE).exists():
        print(f"cannot find {dags_folder / DAG_FILE}: run from a checkout", file=sys.stderr)
        return 2
    configure_airflow(args.home, dags_folder)

    print("Starting three throwaway PostgreSQL servers...", flush=True)
    pool, servers = start_servers(3)
    src, wh1, wh2 = (Place(s.address) for s in servers)
    try:
        print(f"Creating {args.rows:,} orders for {DEMO_DAY} in the source...", flush=True)
        prepare_databases(src, wh1, wh2, args.rows, DEMO_DAY)
        os.environ.update(connection_env(src, wh1, wh2))
        started = time.monotonic()
        state, totals, report = run_example(dags_folder, DEMO_DAY)
        seconds = time.monotonic() - started
        _print_totals(totals, report, seconds)
        problems = [] if state == "success" else [f"the DAG run ended {state}"]
        problems += verify(src, wh1, wh2, DEMO_DAY)
    finally:
        pool.close()
    if problems:
        print("FAILED:", *problems, sep="\n  ")
        return 1
    print("  verified: both warehouses hold exactly the source's rows for the day")
    print("=" * 78)
    return 0


if __name__ == "__main__":
    sys.exit(main())
