"""A daily warehouse load with CopyManOperator.

Every day, the day's orders stream from the OLTP database (``pg_src``) into two warehouses
in one pass over the source: ``pg_wh1`` keeps history (the day's rows are replaced, the
other days stay) and ``pg_wh2`` holds only the latest day. If one warehouse fails, the other
still commits, and the retry loads only the one that failed. A downstream task reads the
totals from XCom.

Each running load holds one connection to the source and one to each warehouse for its whole
run (dynamic task mapping multiplies that by the mapped tasks running at once), so the load
runs in the Airflow pool ``copyman_warehouse``: its slots cap the loads that run against the
warehouses at the same time. Create the pool before the DAG runs (a task in a pool that does
not exist is never scheduled)::

    airflow pools set copyman_warehouse 2 "CopyMan loads into the warehouses"

Run it end to end on throwaway PostgreSQL servers with ``make demo``
(``python -m airflow_copyman.demo``); the test suite runs this very file too.
"""

from __future__ import annotations

import datetime
from typing import Any

from airflow.sdk import DAG, get_current_context, task

from airflow_copyman.operators.copyman import CopyManOperator

#: The pool capping concurrent loads into the warehouses (2 slots: at most 2 loads, so
#: 2 source and 4 warehouse connections, at a time).
WAREHOUSE_POOL = "copyman_warehouse"

# [START copyman_warehouse_daily]
with DAG(
    dag_id="copyman_warehouse_daily",
    schedule="@daily",
    start_date=datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC),
    catchup=False,
    default_args={"retries": 3, "retry_delay": datetime.timedelta(minutes=1)},
    tags=["copyman", "example"],
) as dag:
    load_orders = CopyManOperator(
        task_id="load_orders",
        source_conn_id="pg_src",
        sql="SELECT * FROM orders WHERE day = '{{ ds }}'",
        # At most the pool's slots of these loads at once (see the module's docstring).
        pool=WAREHOUSE_POOL,
        destinations=[
            {
                "conn_id": "pg_wh1",
                "table": "public.orders",
                # Replace the day's rows, in the same transaction as the load.
                "preoperator": "DELETE FROM public.orders WHERE day = '{{ ds }}'",
            },
            {"conn_id": "pg_wh2", "table": "analytics.orders", "truncate": True},
        ],
    )

    @task
    def report_totals(rows: int, totals: dict[str, Any]) -> dict[str, Any]:
        """Read the load's totals from XCom: ``rows`` on its own key, and the whole report."""
        day = get_current_context()["ds"]
        for dest in totals["destinations"]:
            print(
                f"{day}: {dest['conn_id']} {dest['table']}: {dest['status']}, "
                f"{dest['rows']} rows, {dest['bytes']} bytes"
            )
        return {
            "day": day,
            "rows": rows,
            "bytes": totals["bytes"],
            "destinations": {d["conn_id"]: d["status"] for d in totals["destinations"]},
        }

    report_totals(load_orders.output["rows"], load_orders.output)
# [END copyman_warehouse_daily]


if __name__ == "__main__":
    dag.test()
