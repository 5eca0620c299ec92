"""The daily orders load of ``copyman_warehouse_daily.py``, in Dagster.

One pass over the source's orders of a day feeds two warehouses: ``wh1`` keeps history (the
day's rows merged by ``id``), ``wh2`` holds the latest day (replaced). Each destination table
is an asset (``wh1/public/orders``, ``wh2/analytics/orders``) with the check
``copyman_verify`` (the checksum of the rows each one wrote equals the source's). A
warehouse that fails is not materialized while the other is; the ``RetryPolicy`` retries the
step, and the retry loads only the warehouse not loaded yet.

Connection strings come from the environment (``SRC_DSN``, ``WH1_DSN``, ``WH2_DSN``)::

    dagster asset materialize -f example_dags/dagster_copyman.py --select '*' \
        --partition 2024-01-02 \
        --config-json '{"ops": {"orders_assets": {"config": {"min_amount": 10}}}}'
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import dagster as dg

from airflow_copyman.dagster import CopyManLoad, CopyManResource, copyman_assets


class OrdersConfig(dg.Config):
    """Run config: it reaches the query's parameters."""

    min_amount: int = 0


# [START dagster_copyman]
orders = CopyManLoad(
    source="pg_src",  # a name in the resource's connections
    sql="SELECT * FROM orders WHERE day = %(day)s AND amount >= %(min_amount)s",
    destinations=[
        {"conn": "wh1", "table": "public.orders", "mode": "merge", "key": ["id"]},
        {"conn": "wh2", "table": "analytics.orders", "mode": "replace"},
    ],
    verify="checksum",
)


@copyman_assets(
    load=orders,
    partitions_def=dg.DailyPartitionsDefinition("2024-01-01"),
    retry_policy=dg.RetryPolicy(max_retries=2, delay=1),
)
def orders_assets(
    context: dg.AssetExecutionContext, copyman: CopyManResource, config: OrdersConfig
) -> Iterator[Any]:
    yield from copyman.run(
        context, parameters={"day": context.partition_key, "min_amount": config.min_amount}
    )


defs = dg.Definitions(
    assets=[orders_assets],
    resources={
        "copyman": CopyManResource(
            connections={
                "pg_src": dg.EnvVar("SRC_DSN"),
                "wh1": dg.EnvVar("WH1_DSN"),
                "wh2": dg.EnvVar("WH2_DSN"),
            }
        )
    },
)
# [END dagster_copyman]
