"""The DAGs of the Airflow end-to-end tests (one file: dag.test() parses the whole folder on
every run, so fewer files run faster). Connections come from ``AIRFLOW_CONN_*`` that each
test points at fresh databases; callbacks record failures and retries for the tests."""

from __future__ import annotations

import datetime
import json
import os
from typing import Any

from airflow.sdk import DAG, task

from airflow_copyman.hooks.copyman import Destination
from airflow_copyman.operators.copyman import CopyManOperator

START = datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)


def _record(event: str) -> Any:
    def callback(context: Any) -> None:
        path = os.environ.get("COPYMAN_TEST_EVENTS")
        if not path:
            return
        exc = context.get("exception")
        with open(path, "a") as f:
            f.write(
                json.dumps(
                    {
                        "event": event,
                        "task_id": context["ti"].task_id,
                        "try_number": context["ti"].try_number,
                        "exception": type(exc).__name__ if exc else None,
                        "bases": [c.__name__ for c in type(exc).__mro__] if exc else [],
                        "message": str(exc) if exc else None,
                    }
                )
                + "\n"
            )

    return callback


DEFAULTS = {
    "retries": 3,
    "retry_delay": datetime.timedelta(seconds=1),
    "on_failure_callback": _record("failure"),
    "on_retry_callback": _record("retry"),
}

# A clean fan-out, templating, truncate/preoperator, csv with columns, and a downstream
# task reading the totals from XCom.
with DAG(
    "copyman_test_fanout",
    schedule=None,
    start_date=START,
    default_args=DEFAULTS,
    params={"modulo": 2, "target": "public.orders_day"},
) as fanout_dag:
    fanout3 = CopyManOperator(
        task_id="fanout3",
        source_conn_id="pg_src",
        sql="orders",
        destinations=[
            {"conn_id": "pg_d1", "table": "orders"},
            {"conn_id": "pg_d2", "table": "public.orders"},
            {"conn_id": "pg_d3", "table": "archive.orders"},
        ],
        progress_interval=0.0,
    )
    templated = CopyManOperator(
        task_id="templated",
        source_conn_id="pg_src",
        sql="templated_orders.sql",
        destinations=[{"conn_id": "pg_d1", "table": "{{ params.target }}"}],
    )
    truncate_preop = CopyManOperator(
        task_id="truncate_preop",
        source_conn_id="pg_src",
        sql="SELECT * FROM orders WHERE day = '{{ ds }}';",
        destinations=[
            {"conn_id": "pg_d2", "table": "orders_trunc", "truncate": True},
            {
                "conn_id": "pg_d3",
                "table": "orders_preop",
                "preoperator": [
                    "DELETE FROM orders_preop WHERE day = '{{ ds }}'",
                    "INSERT INTO load_audit VALUES ('{{ ds }}', '{{ ti.task_id }}')",
                ],
            },
        ],
    )
    csv_columns = CopyManOperator(
        task_id="csv_columns",
        source_conn_id="pg_src",
        sql="SELECT id, customer FROM orders WHERE id <= %(last)s",
        parameters={"last": 100},
        format="csv",
        destinations=[{"conn_id": "pg_d1", "table": "people", "columns": ["id", "customer"]}],
    )

    @task
    def report(rows: int, totals: dict[str, Any]) -> dict[str, Any]:
        return {
            "rows": rows,
            "statuses": [d["status"] for d in totals["destinations"]],
            "tables": [d["table"] for d in totals["destinations"]],
        }

    report(fanout3.output["rows"], fanout3.output)


# A destination whose backend dies mid-copy on the first try only.
with DAG("copyman_test_retry", schedule=None, start_date=START, default_args=DEFAULTS) as retry_dag:
    CopyManOperator(
        task_id="retry_once",
        source_conn_id="pg_src",
        sql="SELECT * FROM orders",
        destinations=[
            {"conn_id": "pg_d1", "table": "orders"},
            {"conn_id": "pg_d2", "table": "orders"},
            {"conn_id": "pg_d3", "table": "orders"},
        ],
        retries=2,
    )


# Failures that no retry can fix, and bad input: each task must fail on its first try.
with DAG(
    "copyman_test_failures", schedule=None, start_date=START, default_args=DEFAULTS
) as failures_dag:
    good = {"conn_id": "pg_d1", "table": "orders_untouched"}
    CopyManOperator(
        task_id="permanent_mid_copy",
        source_conn_id="pg_src",
        sql="orders",
        destinations=[
            {"conn_id": "pg_d1", "table": "orders"},
            {"conn_id": "pg_d2", "table": "orders_checked"},
        ],
    )
    CopyManOperator(
        task_id="unknown_conn",
        source_conn_id="pg_src",
        sql="orders",
        destinations=[good, {"conn_id": "pg_missing", "table": "orders"}],
    )
    CopyManOperator(
        task_id="not_postgres",
        source_conn_id="pg_src",
        sql="orders",
        destinations=[good, {"conn_id": "not_pg", "table": "orders"}],
    )
    CopyManOperator(
        task_id="missing_table",
        source_conn_id="pg_src",
        sql="orders",
        destinations=[good, {"conn_id": "pg_d2", "table": "public.no_such_table"}],
    )
    CopyManOperator(
        task_id="column_mismatch",
        source_conn_id="pg_src",
        sql="orders",
        destinations=[good, {"conn_id": "pg_d2", "table": "orders_narrow"}],
    )
    CopyManOperator(
        task_id="bad_sql",
        source_conn_id="pg_src",
        sql="SELEC * FROM orders",
        destinations=[good],
    )
    CopyManOperator(
        task_id="leaky_preoperator",
        source_conn_id="pg_src",
        sql="orders",
        destinations=[
            {"conn_id": "pg_d1", "table": "orders_leak"},
            {
                "conn_id": "pg_d2",
                "table": "orders",
                "preoperator": "DO $$ BEGIN RAISE EXCEPTION 'leak %', "
                "'{{ conn.pg_d2.password }}'; END $$",
            },
        ],
    )


    # Checked after rendering, before any connection is used: a permanent failure.
    CopyManOperator(
        task_id="templated_bad_parameters",
        source_conn_id="pg_src",
        sql="SELECT * FROM orders WHERE id < %s",
        parameters="{{ params.limit }}",  # renders as the text "5", not a list
        destinations=[good],
        params={"limit": 5},
    )
    CopyManOperator(
        task_id="ssl_refused",
        source_conn_id="pg_src",
        sql="orders",
        destinations=[good, {"conn_id": "pg_ssl", "table": "orders"}],
    )


# Templated Destination objects and a templated boolean.
with DAG(
    "copyman_test_templating",
    schedule=None,
    start_date=START,
    default_args=DEFAULTS,
    params={"full_refresh": True, "target": "orders_obj", "keep_from": 3},
) as templating_dag:
    CopyManOperator(
        task_id="templated_objects",
        source_conn_id="pg_src",
        sql="SELECT * FROM orders WHERE id <= 10",
        destinations=[
            Destination(
                "pg_d1",
                "{{ params.target }}",
                preoperator="DELETE FROM {{ params.target }} WHERE id >= {{ params.keep_from }}",
            ),
            {"conn_id": "pg_d2", "table": "orders", "truncate": "{{ params.full_refresh }}"},
        ],
    )


# A long, slow transfer for on_kill (run in a subprocess that receives SIGTERM).
with DAG("copyman_test_kill", schedule=None, start_date=START) as kill_dag:
    CopyManOperator(
        task_id="slow_copy",
        source_conn_id="pg_src",
        sql="SELECT g AS id, md5(g::text) AS note FROM generate_series(1, 5000000) g "
        "WHERE g % 500 <> 0 OR pg_sleep(0.01) IS NOT NULL",
        destinations=[
            {"conn_id": "pg_d1", "table": "kill_target"},
            {"conn_id": "pg_d2", "table": "kill_target"},
        ],
        retries=0,
    )


# on_kill against a busy destination: every row costs its server 10 ms in a trigger.
with DAG("copyman_test_kill_busy", schedule=None, start_date=START) as kill_busy_dag:
    CopyManOperator(
        task_id="busy_copy",
        source_conn_id="pg_src",
        sql="SELECT g AS id, md5(g::text) AS note FROM generate_series(1, 200000) g",
        destinations=[
            {"conn_id": "pg_d1", "table": "kill_target"},
            {"conn_id": "pg_d2", "table": "kill_target"},
        ],
        retries=0,
    )


# Lineage with connections kept in the metadata database (OpenLineage console transport).
with DAG("copyman_test_lineage", schedule=None, start_date=START) as lineage_dag:
    CopyManOperator(
        task_id="with_lineage",
        source_conn_id="ol_meta_src",
        sql="orders",
        destinations=[{"conn_id": "ol_meta_dst", "table": "orders"}],
        retries=0,
    )


# A merge destination whose backend dies while the merge applies, on the first try only.
with DAG(
    "copyman_test_merge_retry", schedule=None, start_date=START, default_args=DEFAULTS
) as merge_retry_dag:
    CopyManOperator(
        task_id="merge_retry",
        source_conn_id="pg_src",
        sql="items",
        destinations=[{"conn_id": "pg_d1", "table": "items", "mode": "merge", "key": ["id"]}],
        retries=2,
    )


# The bandwidth cap (issue 10): a templated cap, under a receiver_timeout shorter than the
# copy, and a templated cap that renders to a bad value (a permanent failure).
with DAG(
    "copyman_test_cap",
    schedule=None,
    start_date=START,
    default_args=DEFAULTS,
    params={"cap": 512 * 1024, "bad_cap": -5},
) as cap_dag:
    CopyManOperator(
        task_id="capped",
        source_conn_id="pg_src",
        sql="orders",
        destinations=[{"conn_id": "pg_d1", "table": "orders"}],
        max_bytes_per_second="{{ params.cap }}",
        receiver_timeout=1.0,
        progress_interval=0.5,
    )
    CopyManOperator(
        task_id="capped_bad",
        source_conn_id="pg_src",
        sql="orders",
        destinations=[{"conn_id": "pg_d1", "table": "orders_untouched"}],
        max_bytes_per_second="{{ params.bad_cap }}",
    )


# verify="checksum" (issue 10): one destination per mode (the append one with a preoperator
# that writes a row of its own), and a destination whose trigger alters one value (it fails
# for good, rolled back; the other destination of that task commits).
with DAG(
    "copyman_test_verify", schedule=None, start_date=START, default_args=DEFAULTS
) as verify_dag:
    CopyManOperator(
        task_id="verified",
        source_conn_id="pg_src",
        sql="orders",
        destinations=[
            {
                "conn_id": "pg_d1",
                "table": "orders",
                "preoperator": "INSERT INTO orders (id, day) VALUES (-1, '2024-01-01')",
            },
            {"conn_id": "pg_d1", "table": "orders_replaced", "mode": "replace"},
            {"conn_id": "pg_d2", "table": "orders", "mode": "merge", "key": ["id"]},
        ],
        verify="checksum",
    )
    CopyManOperator(
        task_id="altered",
        source_conn_id="pg_src",
        sql="orders",
        destinations=[
            {"conn_id": "pg_d1", "table": "orders_altered"},
            {"conn_id": "pg_d2", "table": "orders_plain"},
        ],
        verify="checksum",
    )


# What a try measured, reported by the retry that skips what it loaded: a merge verified by
# checksum commits on try 1 while the other destination's backend dies (first try only);
# with the ledger, with a ledger table of an earlier version (no such columns), without one.
def _extras_dag(name: str, **options: Any) -> DAG:
    with DAG(
        f"copyman_test_extras_{name}", schedule=None, start_date=START, default_args=DEFAULTS
    ) as dag:
        CopyManOperator(
            task_id="extras",
            source_conn_id="pg_src",
            sql="orders",
            destinations=[
                {"conn_id": "pg_d1", "table": "orders", "mode": "merge", "key": ["id"]},
                {"conn_id": "pg_d2", "table": "orders"},
            ],
            verify="checksum",
            retries=2,
            **options,
        )
    return dag


extras_ledger_dag = _extras_dag("ledger")
extras_old_ledger_dag = _extras_dag("old_ledger", ledger_schema="old")
extras_store_dag = _extras_dag("store", ledger=False)


# Merge keys with NULLs (issue 15): refused by default (the task fails on its first try,
# the other destination commits); matched as equal with a templated key_nulls="match".
with DAG(
    "copyman_test_key_nulls",
    schedule=None,
    start_date=START,
    default_args=DEFAULTS,
    params={"nulls": "match"},
) as key_nulls_dag:
    CopyManOperator(
        task_id="nulls_matched",
        source_conn_id="pg_src",
        sql="items",
        destinations=[
            {"conn_id": "pg_d1", "table": "items", "mode": "merge", "key": ["id"],
             "key_nulls": "{{ params.nulls }}"},
        ],
        verify="checksum",
    )
    CopyManOperator(
        task_id="nulls_refused",
        source_conn_id="pg_src",
        sql="items",
        destinations=[
            {"conn_id": "pg_d1", "table": "refused", "mode": "merge", "key": ["id"]},
            {"conn_id": "pg_d2", "table": "items"},
        ],
    )
# A retry that spells the destination table otherwise (issue 15): try 1 names it
# `public.orders` and commits it while the other destination's backend dies; try 2 names it
# `orders` (resolved through the search_path)
# and must find it loaded, with the ledger and without one (task_state_store).
def _respelled_dag(name: str, **options: Any) -> DAG:
    with DAG(
        f"copyman_test_respelled_{name}", schedule=None, start_date=START, default_args=DEFAULTS
    ) as dag:
        CopyManOperator(
            task_id="respelled",
            source_conn_id="pg_src",
            sql="orders",
            destinations=[
                {"conn_id": "pg_d1",
                 "table": "{{ 'public.orders' if ti.try_number == 1 else 'orders' }}"},
                {"conn_id": "pg_d2", "table": "orders"},
            ],
            retries=2,
            **options,
        )
    return dag


respelled_ledger_dag = _respelled_dag("ledger")
respelled_store_dag = _respelled_dag("store", ledger=False)
