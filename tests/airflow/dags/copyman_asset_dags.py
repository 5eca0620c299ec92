"""The DAGs of the asset tests: a load whose destination tables are Airflow assets, and a DAG
scheduled on those assets that reads the loads' metrics from the asset events (no XCom).

The tables' URIs name each test's fresh databases, so the test sets them in
``COPYMAN_ASSET_URIS`` (space-separated) before ``dag.test()`` parses this folder."""

from __future__ import annotations

import datetime
import os
from typing import Any

from airflow.sdk import DAG, Asset, task

from airflow_copyman.operators.copyman import CopyManOperator

START = datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)
UNSET = "postgres://unset:5432/unset/public/orders"


def table_uris() -> list[str]:
    return os.environ.get("COPYMAN_ASSET_URIS", "").split() or [UNSET]


# Two destinations: one schema-qualified (spelled in capitals: folded, as the server does),
# one unqualified (resolved through the destination's search_path).
with DAG(
    "copyman_assets_load",
    schedule=None,
    start_date=START,
    default_args={"retries": 2, "retry_delay": datetime.timedelta(seconds=1)},
) as load_dag:
    CopyManOperator(
        task_id="load",
        source_conn_id="pg_src",
        sql="orders",
        destinations=[
            {"conn_id": "pg_d1", "table": "ARCHIVE.Orders"},
            {"conn_id": "pg_d2", "table": "orders"},
        ],
    )

# Scheduled on both tables; its task reads every event of each (inlet events).
with DAG(
    "copyman_assets_consumer",
    schedule=[Asset(uri) for uri in table_uris()],
    start_date=START,
    is_paused_upon_creation=False,
) as consumer_dag:

    @task(inlets=[Asset(uri) for uri in table_uris()])
    def read_metrics(*, inlet_events: Any = None) -> dict[str, list[Any]]:
        return {
            uri: [dict(event.extra) for event in inlet_events[Asset(uri)]]
            for uri in table_uris()
        }

    read_metrics()
