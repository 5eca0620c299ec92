"""The example DAG, run as the docs show it (``example_dags/`` is copied into the DAGs
folder), on the demo's data: the example never rots."""

from __future__ import annotations

import datetime

import pytest
from af_support import PgServers, Run, run_dag

from airflow_copyman import demo

pytestmark = pytest.mark.usefixtures("airflow_db")


def test_example_dag_loads_both_warehouses_and_reports(
    pg: PgServers, monkeypatch: pytest.MonkeyPatch
) -> None:
    src, wh1, wh2 = (
        demo.Place(server.address, pg.database(server, prefix).name)
        for server, prefix in ((pg.src, "exsrc"), (pg.dst1, "exwh1"), (pg.dst2, "exwh2"))
    )
    demo.prepare_databases(src, wh1, wh2, rows=5000, day=demo.DEMO_DAY)
    for key, value in demo.connection_env(src, wh1, wh2).items():
        monkeypatch.setenv(key, value)
    logical_date = datetime.datetime.combine(demo.DEMO_DAY, datetime.time(), tzinfo=datetime.UTC)
    # As `make demo` does. dag.test() runs a task whatever its pool, but a scheduler never
    # schedules a task whose pool does not exist: the check below is that the pool the load
    # ran in is one the demo created, with the slots the docs give.
    demo.create_pool()

    run = run_dag(demo.DAG_FILE, demo.DAG_ID, logical_date=logical_date)

    assert run.state == "success", run.tis
    assert _pool_of(run, demo.TASK_ID) == (demo.POOL, 1, demo.POOL_SLOTS)
    totals = run.xcom(demo.TASK_ID)
    assert totals["rows"] == 5000
    assert [(d["conn_id"], d["status"], d["rows"]) for d in totals["destinations"]] == [
        ("pg_wh1", "loaded", 5000),
        ("pg_wh2", "loaded", 5000),
    ]
    assert run.xcom(demo.REPORT_TASK_ID) == {
        "day": "2024-06-01",
        "rows": 5000,
        "bytes": totals["bytes"],
        "destinations": {"pg_wh1": "loaded", "pg_wh2": "loaded"},
    }
    assert demo.verify(src, wh1, wh2, demo.DEMO_DAY) == []

    # A deliberate re-run (a new DAG run for the same day) loads again, and the example's
    # preoperator/truncate make that idempotent.
    again = run_dag(demo.DAG_FILE, demo.DAG_ID, logical_date=logical_date)
    assert again.state == "success"
    assert [d["status"] for d in again.xcom(demo.TASK_ID)["destinations"]] == ["loaded"] * 2
    assert demo.verify(src, wh1, wh2, demo.DEMO_DAY) == []


def _pool_of(run: Run, task_id: str) -> tuple[str, int, int | None]:
    """The pool and slots the task ran with, and the pool's size (None: no such pool)."""
    from airflow.models.pool import Pool
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        pool, slots = session.execute(
            select(TaskInstance.pool, TaskInstance.pool_slots).where(
                TaskInstance.dag_id == run.dag_id,
                TaskInstance.run_id == run.run_id,
                TaskInstance.task_id == task_id,
            )
        ).one()
        size = session.scalar(select(Pool.slots).where(Pool.pool == pool))
    return str(pool), int(slots), size
