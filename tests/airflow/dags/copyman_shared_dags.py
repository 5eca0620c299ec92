"""Two runs of one DAG loading the same tables at once (issue 15, "One load at a time into
one table"): tests/airflow/test_af_shared_tables.py runs it twice, in two processes.

Before each load, both runs meet at a barrier (files in ``COPYMAN_SHARED_BARRIER``), so that
their loads of each table start together whatever each process's start-up took."""

from __future__ import annotations

import datetime
import os
import time
from pathlib import Path
from typing import Any

from airflow.sdk import DAG, task

from airflow_copyman.operators.copyman import CopyManOperator

START = datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)
#: 1,000 rows tagged with the run's date, after a pause: the two runs' loads overlap.
SOURCE = (
    "WITH pause AS MATERIALIZED (SELECT pg_sleep(0.5)) "
    "SELECT g AS id, '{{ ds_nodash }}:' || g AS v FROM generate_series(1, 1000) AS g, pause"
)
#: Each load stays open a while after its writes (before its commit).
HOLD = "SELECT pg_sleep(0.5)"

MODES: dict[str, dict[str, Any]] = {
    "append": {"mode": "append"},
    "truncate": {"mode": "replace"},
    "delete": {"mode": "replace", "replace_with": "delete"},
    "merge": {"mode": "merge", "key": ["id"]},
    "merge_unique": {"mode": "merge", "key": ["id"]},
}


@task
def meet(point: str, **context: Any) -> None:
    """Wait (at most 60 s) until both runs reached ``point``."""
    folder = os.environ.get("COPYMAN_SHARED_BARRIER")
    if not folder:
        return
    here = Path(folder) / f"{point}.{context['run_id']}"
    here.touch()
    deadline = time.monotonic() + 60
    while len(list(Path(folder).glob(f"{point}.*"))) < 2:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the other run never reached {point}")
        time.sleep(0.05)


with DAG("copyman_test_shared", schedule=None, start_date=START, max_active_runs=2) as dag:
    previous: Any = None
    for name, options in MODES.items():
        barrier = meet.override(task_id=f"meet_{name}")(name)
        load = CopyManOperator(
            task_id=name,
            source_conn_id="pg_src",
            sql=SOURCE,
            destinations=[{"conn_id": "pg_d1", "table": f"shared_{name}", **options,
                           "postoperator": HOLD}],
            retries=0,
        )
        if previous is not None:
            previous >> barrier
        barrier >> load
        previous = load
    # One run holds the table longer than the other may wait: the other fails (transient),
    # naming the holder's DAG, task and run.
    barrier = meet.override(task_id="meet_held")("held")
    held = CopyManOperator(
        task_id="held",
        source_conn_id="pg_src",
        sql=SOURCE,
        destinations=[{"conn_id": "pg_d1", "table": "shared_held",
                       "postoperator": "SELECT pg_sleep(4)"}],
        lock_timeout=1,
        retries=0,
    )
    previous >> barrier >> held
