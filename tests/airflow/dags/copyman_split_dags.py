"""Split loads (issue 18): tests/airflow/test_af_split.py runs these DAGs with dag.test().

Connections: pg_ss (source), pg_sd1 and pg_sd2 (destinations), set by the tests."""

from __future__ import annotations

import datetime
import os

from airflow.sdk import DAG, task

from airflow_copyman.operators.copyman import CopyManSplitGroup

START = datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)

with DAG("copyman_split_modes", schedule=None, start_date=START) as modes:
    # A bigint key with gaps, negatives and NULLs; replace into one, append into another.
    CopyManSplitGroup(
        "events", source_conn_id="pg_ss", table="public.events", split_by="id", parts=4,
        destinations=[
            {"conn_id": "pg_sd1", "table": "public.events", "mode": "replace",
             "replace_with": "delete"},
            {"conn_id": "pg_sd2", "table": "events", "mode": "append"},
        ],
        max_active_parts=2, retries=0,
    )
    # Merge (keys not NULL: where), into a table with rows of its own.
    CopyManSplitGroup(
        "merged", source_conn_id="pg_ss", table="events", where="id IS NOT NULL AND id > -100",
        destinations=[{"conn_id": "pg_sd1", "table": "events_merged", "mode": "merge",
                       "key": ["id"]}],
        parts=3, retries=0,
    )
    # Append without staging: each range lands straight in the table.
    CopyManSplitGroup(
        "direct", source_conn_id="pg_ss", table="events", parts=2, stage=False,
        destinations=[{"conn_id": "pg_sd2", "table": "events_direct"}], retries=0,
    )
    # No key at all: ctid block ranges.
    CopyManSplitGroup(
        "logs", source_conn_id="pg_ss", table="logs", parts=3, verify="checksum",
        destinations=[{"conn_id": "pg_sd2", "table": "logs", "mode": "replace"}], retries=0,
    )
    # Tables that do not exist yet: staged with the source's types, created at publish.
    CopyManSplitGroup(
        "created", source_conn_id="pg_ss", table="events", split_by="id", parts=3,
        where="id IS NOT NULL",
        # Templated: Jinja renders it as text, taken as the number it was.
        max_bytes_per_second="{{ 10 * 1000 * 1000 }}",
        destinations=[
            {"conn_id": "pg_sd1", "table": "events_new", "mode": "replace",
             "create": "if_missing"},
            {"conn_id": "pg_sd2", "table": "events_keyed", "mode": "merge", "key": ["id"],
             "create": "if_missing"},
        ],
        retries=0,
    )


with DAG("copyman_split_grow", schedule=None, start_date=START) as grow:
    # Rows are inserted into the source while the ranges load (by a task running among
    # them): none may land twice.
    group = CopyManSplitGroup(
        "events", source_conn_id="pg_ss", table="events", split_by="id", parts=4,
        destinations=[{"conn_id": "pg_sd1", "table": "events", "mode": "append"}], retries=0,
    )

    @task
    def insert_more() -> None:
        import psycopg

        with psycopg.connect(os.environ["COPYMAN_SPLIT_SOURCE"], autocommit=True) as conn:
            conn.execute("INSERT INTO events SELECT g, 'late' FROM generate_series(10000001,"
                         " 10000100) g")

    group.plan >> insert_more() >> group.publish


with DAG("copyman_split_fail", schedule=None, start_date=START) as fail:
    # One range holds a value the destination's type refuses: no destination changes.
    CopyManSplitGroup(
        "events", source_conn_id="pg_ss", table="events", split_by="id", parts=4,
        destinations=[
            {"conn_id": "pg_sd1", "table": "narrow", "mode": "replace"},
            {"conn_id": "pg_sd2", "table": "events", "mode": "replace"},
        ],
        retries=0,
    )




with DAG("copyman_split_kill", schedule=None, start_date=START) as kill:
    # One range's destination backend dies in the middle of its COPY (the test arms a
    # trigger on the staging tables of pg_sd1): that range retries alone, and pg_sd2 does
    # not get it twice.
    CopyManSplitGroup(
        "events", source_conn_id="pg_ss", table="events", split_by="id", parts=3,
        destinations=[
            {"conn_id": "pg_sd1", "table": "events", "mode": "replace"},
            {"conn_id": "pg_sd2", "table": "events", "mode": "append"},
        ],
        retries=1, retry_delay=datetime.timedelta(seconds=1),
    )


with DAG("copyman_split_same", schedule=None, start_date=START) as same:
    # One table spelled two ways: each range would stage it twice, publish append it twice.
    CopyManSplitGroup(
        "events", source_conn_id="pg_ss", table="events", split_by="id", parts=2,
        destinations=[{"conn_id": "pg_sd1", "table": "events", "mode": "append"},
                      {"conn_id": "pg_sd1", "table": "Public.Events", "mode": "append"}],
        retries=2, retry_delay=datetime.timedelta(seconds=1),
    )
    # The same inside one task (parallel=N): refused before its ranges start.
    from airflow_copyman.operators.copyman import CopyManOperator

    CopyManOperator(
        task_id="same_parallel", source_conn_id="pg_ss", sql="events", parallel=2,
        destinations=[{"conn_id": "pg_sd1", "table": "events", "mode": "append"},
                      {"conn_id": "pg_sd1", "table": '"public"."events"', "mode": "append"}],
        retries=2, retry_delay=datetime.timedelta(seconds=1),
    )


with DAG("copyman_split_twice", schedule=None, start_date=START, max_active_runs=2) as twice:
    CopyManSplitGroup(
        "events", source_conn_id="pg_ss", table="events", split_by="id", parts=3,
        destinations=[{"conn_id": "pg_sd1", "table": "events", "mode": "replace"}], retries=0,
    )


with DAG("copyman_parallel", schedule=None, start_date=START) as parallel:
    # Two ranges inside one task, reading one exported snapshot, while the test updates the
    # source (each of its transactions moves 1 between two rows: a consistent read sums to 0).
    from airflow_copyman.operators.copyman import CopyManOperator

    CopyManOperator(
        task_id="copy", source_conn_id="pg_ss", sql="counters", parallel=2, verify="checksum",
        destinations=[{"conn_id": "pg_sd1", "table": "counters", "mode": "replace"},
                      {"conn_id": "pg_sd2", "table": "counters", "mode": "merge", "key": ["id"]}],
        retries=0,
    )


with DAG("copyman_parallel_kill", schedule=None, start_date=START) as parallel_kill:
    # Two ranges held back by max_bytes_per_second (per range): the test kills the task
    # while both COPY.
    from airflow_copyman.operators.copyman import CopyManOperator

    CopyManOperator(
        task_id="copy", source_conn_id="pg_ss", sql="counters", parallel=2,
        max_bytes_per_second=20000,
        destinations=[{"conn_id": "pg_sd1", "table": "counters", "mode": "replace"},
                      {"conn_id": "pg_sd2", "table": "counters", "mode": "append"}],
        retries=0,
    )
