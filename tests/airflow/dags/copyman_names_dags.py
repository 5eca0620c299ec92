"""The DAG of the templated-names test (issue 15): a merge ``key`` and ``min_rows`` given as
templates, rendered as text (no native rendering), and ones that render to bad values. Its
own file, so that it does not touch the other test DAGs; callbacks record failures."""

from __future__ import annotations

import datetime
import json
import os
from typing import Any

from airflow.sdk import DAG

from airflow_copyman.operators.copyman import CopyManOperator

START = datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)
SOURCE = (
    "SELECT g AS id, date '2024-01-01' + g AS day, 'v' || g AS v "
    "FROM generate_series(1, 5) g"
)


def _failed(context: Any) -> None:
    path = os.environ.get("COPYMAN_TEST_EVENTS")
    if path:
        exc = context.get("exception")
        with open(path, "a") as f:
            f.write(json.dumps({
                "event": "failure",
                "task_id": context["ti"].task_id,
                "try_number": context["ti"].try_number,
                "exception": type(exc).__name__ if exc else None,
                "bases": [c.__name__ for c in type(exc).__mro__] if exc else [],
                "message": str(exc) if exc else None,
            }) + "\n")


with DAG(
    "copyman_test_names",
    schedule=None,
    start_date=START,
    default_args={"retries": 0, "on_failure_callback": _failed},
    params={"key_columns": ["id", "day"], "min_rows": 3, "bad_min": "lots", "bad_keys": [1, 2]},
) as names_dag:
    CopyManOperator(
        task_id="templated_key",
        source_conn_id="pg_nsrc",
        sql=SOURCE,
        destinations=[
            {"conn_id": "pg_ndst", "table": "items", "mode": "merge",
             "key": "{{ params.key_columns }}"}
        ],
        min_rows="{{ params.min_rows }}",
    )
    CopyManOperator(
        task_id="too_few_rows",
        source_conn_id="pg_nsrc",
        sql=SOURCE,
        destinations=[{"conn_id": "pg_ndst", "table": "untouched"}],
        min_rows="{{ params.min_rows * 2 }}",
    )
    CopyManOperator(
        task_id="bad_min_rows",
        source_conn_id="pg_nsrc",
        sql=SOURCE,
        destinations=[{"conn_id": "pg_ndst", "table": "untouched"}],
        min_rows="{{ params.bad_min }}",
    )
    CopyManOperator(
        task_id="bad_key",
        source_conn_id="pg_nsrc",
        sql=SOURCE,
        destinations=[
            {"conn_id": "pg_ndst", "table": "untouched", "mode": "merge",
             "key": "{{ params.bad_keys }}"}
        ],
    )
