"""The DAG of the exact-data end-to-end test (issue 8): encodings and session settings that
would change values, a source query that writes, and one table given twice. Connections come
from ``AIRFLOW_CONN_*`` set by ``test_af_types_and_encodings_dag.py``."""

from __future__ import annotations

import datetime
import json
import os
from typing import Any

from airflow.sdk import DAG

from airflow_copyman.operators.copyman import CopyManOperator

START = datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)


def _record(event: str) -> Any:
    def callback(context: Any) -> None:
        path = os.environ.get("COPYMAN_TEST_EVENTS")
        if not path:
            return
        exc = context.get("exception")
        with open(path, "a") as f:
            record = {
                "event": event,
                "task_id": context["ti"].task_id,
                "try_number": context["ti"].try_number,
                "bases": [c.__name__ for c in type(exc).__mro__] if exc else [],
                "message": str(exc) if exc else None,
            }
            f.write(json.dumps(record) + "\n")

    return callback


with DAG(
    "copyman_test_exact",
    schedule=None,
    start_date=START,
    default_args={
        "retries": 2,
        "retry_delay": datetime.timedelta(seconds=1),
        "on_failure_callback": _record("failure"),
        "on_retry_callback": _record("retry"),
    },
) as exact_dag:
    # A LATIN1 source whose database renders dates, intervals and floats its own way.
    CopyManOperator(
        task_id="latin1_into_utf8",
        source_conn_id="pg_x_latin1",
        sql="words",
        destinations=[{"conn_id": "pg_x_utf8", "table": "words_from_latin1"}],
    )
    # Back into LATIN1: a character LATIN1 lacks fails that destination for good; the
    # UTF8 one commits.
    CopyManOperator(
        task_id="utf8_into_latin1",
        source_conn_id="pg_x_utf8",
        sql="SELECT * FROM words_utf8",
        format="text",
        destinations=[
            {"conn_id": "pg_x_latin1", "table": "words_back"},
            {"conn_id": "pg_x_utf8", "table": "words_copy"},
        ],
    )
    CopyManOperator(
        task_id="writing_query",
        source_conn_id="pg_x_utf8",
        sql="WITH d AS (DELETE FROM words_utf8 RETURNING *) SELECT * FROM d",
        destinations=[{"conn_id": "pg_x_latin1", "table": "words_never"}],
    )
    CopyManOperator(
        task_id="same_table_twice",
        source_conn_id="pg_x_latin1",
        sql="words",
        destinations=[
            {"conn_id": "pg_x_utf8", "table": "words_never"},
            {"conn_id": "pg_x_utf8_again", "table": "public.WORDS_NEVER"},
        ],
    )
