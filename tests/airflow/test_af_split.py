"""Split loads (issue 18) end to end: CopyManSplitGroup in dag.test() runs on real servers."""

from __future__ import annotations

import datetime
import random
import threading
from typing import Any

import pytest
from af_support import Database, PgServers, Run, load_dag, run_dag

pytestmark = pytest.mark.usefixtures("airflow_db")

FILE = "copyman_split_dags.py"
#: A second logical date (run_dag's default is 2024-01-02).
LATER = datetime.datetime(2024, 1, 3, tzinfo=datetime.UTC)
EVENTS = (
    "CREATE TABLE events (id bigint, v text);"
    " INSERT INTO events SELECT g * 7 - 3000, 'v' || g FROM generate_series(1, 1500) g;"
    " INSERT INTO events SELECT g * 100000, 'gap' FROM generate_series(1, 20) g;"
    " INSERT INTO events SELECT NULL, 'null' FROM generate_series(1, 5) g"
)


@pytest.fixture
def dbs(pg: PgServers, monkeypatch: pytest.MonkeyPatch) -> tuple[Database, Database, Database]:
    src = pg.database(pg.src, "ssrc")
    d1, d2 = pg.database(pg.dst1, "sd1"), pg.database(pg.dst2, "sd2")
    for conn_id, db in (("pg_ss", src), ("pg_sd1", d1), ("pg_sd2", d2)):
        monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", db.uri())
    monkeypatch.setenv("COPYMAN_SPLIT_SOURCE", src.uri())
    return src, d1, d2


def asset_events(uri: str) -> list[dict[str, Any]]:
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        rows = session.execute(
            select(AssetEvent.extra, AssetEvent.source_task_id)
            .join(AssetModel, AssetModel.id == AssetEvent.asset_id)
            .where(AssetModel.uri == uri)
        ).all()
    return [{"extra": e, "task_id": t} for e, t in rows]


def rendered_map_indexes(run: Run, task_id: str) -> dict[int, str]:
    """The names the UI shows for the mapped instances (map_index_template)."""
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        rows = session.execute(
            select(TaskInstance.map_index, TaskInstance.rendered_map_index).where(
                TaskInstance.dag_id == run.dag_id, TaskInstance.run_id == run.run_id,
                TaskInstance.task_id == task_id,
            )
        ).all()
    return {m: r for m, r in rows}


def sorted_rows(db: Database, table: str, where: str = "") -> list[Any]:
    return db.execute(f"SELECT * FROM {table} {where} ORDER BY 1 NULLS LAST, 2")


def staging_tables(db: Database) -> list[str]:
    return [r[0] for r in db.execute(
        "SELECT relname FROM pg_class WHERE relname LIKE 'copyman\\_stage\\_%'")]


def test_every_row_once_in_each_mode_and_no_staging_left(
    dbs: tuple[Database, Database, Database],
) -> None:
    src, d1, d2 = dbs
    src.execute(EVENTS + "; ANALYZE events; CREATE TABLE logs (line text, n int);"
                " INSERT INTO logs SELECT repeat('l', 100), g FROM generate_series(1, 3000) g;"
                " DELETE FROM logs WHERE n % 5 = 0")  # dead tuples
    d1.execute("CREATE TABLE events (id bigint, v text); INSERT INTO events VALUES (1, 'old');"
               " CREATE TABLE events_merged (id bigint PRIMARY KEY, v text, note text"
               " DEFAULT 'd'); INSERT INTO events_merged VALUES (-200, 'keep', 'k'),"
               " (10, 'old', 'k')")
    d2.execute("CREATE TABLE events (id bigint, v text); INSERT INTO events VALUES (1, 'old');"
               " CREATE TABLE logs (line text, n int); CREATE TABLE events_direct (id bigint,"
               " v text)")
    run = run_dag(FILE, "copyman_split_modes")
    assert run.state == "success", run.tis
    source = sorted_rows(src, "events")
    assert sorted_rows(d1, "events") == source  # replace
    assert sorted_rows(d2, "events") == sorted([(1, "old"), *source],
                                               key=lambda r: (r[0] is None, r[0] or 0, r[1]))
    merged = d1.execute("SELECT id, v, note FROM events_merged ORDER BY id")
    expected = [(-200, "keep", "k")] + [
        (i, v, "k" if i == 10 else "d") for i, v in sorted_rows(src, "events", "WHERE id > -100")
    ]
    assert merged == expected
    assert sorted_rows(d2, "logs") == sorted_rows(src, "logs")
    # create="if_missing": each table made at publish, from the source's types (and the
    # merge key as its primary key).
    keyed = sorted_rows(src, "events", "WHERE id IS NOT NULL")
    assert sorted_rows(d1, "events_new") == keyed
    assert sorted_rows(d2, "events_keyed") == keyed
    types = ("SELECT attname::text, format_type(atttypid, atttypmod) FROM pg_attribute"
             " WHERE attrelid = %s::regclass AND attnum > 0 ORDER BY attnum")
    assert d1.execute(types, ["events_new"]) == src.execute(types, ["events"])
    assert d2.execute("SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid ="
                      " 'events_keyed'::regclass AND contype <> 'n'") == [("PRIMARY KEY (id)",)]
    assert sorted_rows(d2, "events_direct") == source  # stage=False
    direct = run.xcom("direct.publish")
    assert (direct["rows"], direct["destinations"][0]["status"]) == (len(source), "loaded")
    xcom = run.xcom("events.publish")
    assert xcom["rows"] == len(source)
    assert [(d["conn_id"], d["table"], d["status"], d["rows"]) for d in xcom["destinations"]] == [
        ("pg_sd1", "public.events", "loaded", len(source)),
        ("pg_sd2", "events", "loaded", len(source)),
    ]
    merged_result = run.xcom("merged.publish")["destinations"][0]
    assert (merged_result["inserted"], merged_result["updated"]) == (len(expected) - 2, 1)
    assert staging_tables(d1) == [] and staging_tables(d2) == []
    plan = run.xcom("events.plan")
    assert len(plan) == 5 and plan[-1]["kind"] == "nulls"  # 4 key ranges and the NULLs
    labels = rendered_map_indexes(run, "events.load")
    assert labels[0].startswith("id < ") and labels[4] == "id IS NULL", labels
    # One asset event per destination, from publish, with the total rows.
    for db in (d1, d2):
        uri = f"postgres://{db.address.host}:{db.address.port}/{db.name}/public/events"
        (event,) = asset_events(uri)
        assert event["task_id"] == "events.publish" and event["extra"]["rows"] == len(source)


def test_one_table_named_twice_fails_plan_without_retry_and_loads_nothing(
    dbs: tuple[Database, Database, Database],
) -> None:
    src, d1, _ = dbs
    src.execute(EVENTS)
    d1.execute("CREATE TABLE events (id bigint, v text); INSERT INTO events VALUES (1, 'old')")
    run = run_dag(FILE, "copyman_split_same")
    assert run.state == "failed"
    # Bad input: no retry (retries=2), no range loaded, nothing staged.
    assert (run.state_of("events.plan"), run.tries_of("events.plan")) == ("failed", 1)
    assert (run.state_of("same_parallel"), run.tries_of("same_parallel")) == ("failed", 1)
    assert run.state_of("events.publish") != "success"
    assert d1.execute("SELECT * FROM events") == [(1, "old")]
    assert staging_tables(d1) == []


def test_a_range_failing_for_good_leaves_every_destination_unchanged_and_the_next_run_cleans(
    dbs: tuple[Database, Database, Database],
) -> None:
    src, d1, d2 = dbs
    src.execute(EVENTS + "; INSERT INTO events VALUES (5000, 'much too long for varchar 8')")
    d1.execute("CREATE TABLE narrow (id bigint, v varchar(8)); INSERT INTO narrow VALUES (1, 'o')")
    d2.execute("CREATE TABLE events (id bigint, v text); INSERT INTO events VALUES (1, 'old')")
    run = run_dag(FILE, "copyman_split_fail")
    assert run.state == "failed"
    assert run.state_of("events.publish") != "success"
    assert d1.execute("SELECT * FROM narrow") == [(1, "o")]
    assert d2.execute("SELECT * FROM events") == [(1, "old")]
    assert len(staging_tables(d2)) == 1  # left by the failed run, named for a person
    assert staging_tables(d2)[0].startswith("copyman_stage_events_")
    # The next successful run of the group (the bad row gone) drops the leftovers.
    src.execute("DELETE FROM events WHERE id = 5000")
    d1.execute("ALTER TABLE narrow ALTER COLUMN v TYPE text")
    again = run_dag(FILE, "copyman_split_fail", logical_date=LATER)
    assert again.state == "success", again.tis
    assert staging_tables(d1) == [] and staging_tables(d2) == []
    assert sorted_rows(d2, "events") == sorted_rows(src, "events")


def clear_and_rerun(*runs: Run) -> list[Run]:
    """Clear every task instance of these finished DAG runs (as the UI's Clear does) and
    run them again in process, at once: dag.test()'s loop, one task of each run in turn."""
    import time

    from airflow.models.dagrun import DagRun
    from airflow.models.taskinstance import clear_task_instances
    from airflow.sdk import DagRunState
    from airflow.sdk.definitions.dag import _run_task
    from airflow.serialization.serialized_objects import DagSerialization
    from airflow.utils.session import create_session
    from airflow.utils.state import TaskInstanceState
    from sqlalchemy import select

    dag = load_dag(FILE, runs[0].dag_id)
    scheduler_dag = DagSerialization.deserialize_dag(DagSerialization.serialize_dag(dag))
    with create_session() as session:
        drs = []
        for run in runs:
            dr = session.scalar(select(DagRun).where(DagRun.dag_id == run.dag_id,
                                                     DagRun.run_id == run.run_id))
            assert dr is not None
            clear_task_instances(list(dr.get_task_instances(session=session)), session,
                                 dag_run_state=DagRunState.RUNNING)
            dr.dag = scheduler_dag
            drs.append(dr)
        session.commit()
        deadline = time.monotonic() + 60

        def fresh(dr: Any) -> Any:
            # A task run may close the thread's session (the in-process API's): look again.
            dr = session.merge(dr)
            dr.dag = scheduler_dag
            return dr

        while any(fresh(dr).state == DagRunState.RUNNING for dr in drs):
            assert time.monotonic() < deadline, "the cleared runs did not end"
            for i in range(len(drs)):
                session.expire_all()
                dr = drs[i] = fresh(drs[i])
                if dr.state != DagRunState.RUNNING:
                    continue
                schedulable, _ = dr.update_state(session=session)
                for ti in schedulable:
                    ti.try_number += 1
                    ti.state = TaskInstanceState.SCHEDULED
                session.commit()
                scheduled = [t for t in dr.get_task_instances(session=session)
                             if t.state == TaskInstanceState.SCHEDULED]
                if scheduled:  # one task of this run, then one of the next
                    _run_task(ti=scheduled[0], task=dag.task_dict[scheduled[0].task_id])
        drs = [fresh(dr) for dr in drs]
        return [
            Run(dr.dag_id, dr.run_id, str(dr.state),
                {ti.task_id: (str(ti.state), ti.try_number)
                 for ti in dr.get_task_instances(session=session)})
            for dr in drs
        ]


def test_replace_readers_see_only_old_then_only_new_rows(
    dbs: tuple[Database, Database, Database],
) -> None:
    src, d1, d2 = dbs
    src.execute(EVENTS)
    d1.execute("CREATE TABLE events (id bigint, v text);"
               " INSERT INTO events SELECT g, 'old' FROM generate_series(1, 10) g;"
               " CREATE TABLE events_merged (id bigint, v text, note text); CREATE TABLE logs"
               " (line text, n int)")
    d2.execute("CREATE TABLE events (id bigint, v text); CREATE TABLE logs (line text, n int);"
               " CREATE TABLE events_direct (id bigint, v text)")
    src.execute("CREATE TABLE logs (line text, n int)")
    seen: set[tuple[int, int]] = set()
    stop = threading.Event()

    def read() -> None:
        with d1.connect(autocommit=True) as conn:
            while not stop.is_set():
                row = conn.execute("SELECT count(*), count(*) FILTER (WHERE v = 'old')"
                                   " FROM events").fetchone()
                seen.add(row)  # type: ignore[arg-type]
                stop.wait(0.01)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        run = run_dag(FILE, "copyman_split_modes")
    finally:
        stop.set()
        reader.join()
    assert run.state == "success", run.tis
    assert seen <= {(10, 10), (1525, 0)} and (1525, 0) in seen and (10, 10) in seen


def test_rows_inserted_while_the_ranges_load_land_once_and_the_plan_is_frozen_across_a_clear(
    dbs: tuple[Database, Database, Database],
) -> None:
    src, d1, _ = dbs
    src.execute(EVENTS)
    d1.execute("CREATE TABLE events (id bigint, v text)")
    run = run_dag(FILE, "copyman_split_grow")
    assert run.state == "success", run.tis
    loaded = d1.execute("SELECT id, count(*) FROM events GROUP BY id HAVING count(*) > 1"
                        " AND id IS NOT NULL")
    assert loaded == []
    assert d1.scalar("SELECT count(*) FROM events") in (1525, 1625)
    assert d1.scalar("SELECT count(*) FROM events WHERE id IS NULL") == 5
    plan = run.xcom("events.plan")
    # The whole DAG run cleared: the source changed a lot, and its statistics with it, but
    # the plan is the one it made first; a new lineage loads every range again.
    src.execute("INSERT INTO events SELECT g, 'x' FROM generate_series(-10000000, -9000000,"
                " 1000) g; ANALYZE events")
    d1.execute("TRUNCATE events")
    (again,) = clear_and_rerun(run)
    assert again.state == "success", again.tis
    assert again.tries_of("events.plan") == 2
    replanned = again.xcom("events.plan")
    assert [(p["lower"], p["upper"]) for p in replanned] == [
        (p["lower"], p["upper"]) for p in plan
    ]
    assert replanned[0]["lineage"] != plan[0]["lineage"]  # cleared: loaded again, afresh
    # Every row of the source, less the 100 inserted again during this run if their range
    # was read before they came.
    total = src.scalar("SELECT count(*) FROM events")
    assert d1.scalar("SELECT count(*) FROM events") in (total, total - 100)
    assert d1.scalar("SELECT count(*) FROM events WHERE id <= -9000000") == 1001


# Every staging table created in the database gets a trigger that kills its own backend at
# id 1500, once (a sequence is not transactional).
KILL_ONCE = """
CREATE SEQUENCE kill_once;
CREATE FUNCTION kill_me() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.id = 1500 AND nextval('kill_once') = 1 THEN
        PERFORM pg_terminate_backend(pg_backend_pid());
    END IF;
    RETURN NEW;
END $$;
CREATE FUNCTION arm() RETURNS event_trigger LANGUAGE plpgsql AS $$
DECLARE obj record;
BEGIN
    FOR obj IN SELECT * FROM pg_event_trigger_ddl_commands() WHERE object_type = 'table' LOOP
        IF obj.object_identity LIKE '%copyman_stage_%' THEN
            EXECUTE format('CREATE TRIGGER kill_me BEFORE INSERT ON %s FOR EACH ROW'
                           ' EXECUTE FUNCTION kill_me()', obj.object_identity);
        END IF;
    END LOOP;
END $$;
CREATE EVENT TRIGGER arm ON ddl_command_end WHEN TAG IN ('CREATE TABLE') EXECUTE FUNCTION arm();
"""


def test_a_destination_backend_killed_mid_copy_retries_that_range_alone(
    dbs: tuple[Database, Database, Database],
) -> None:
    src, d1, d2 = dbs
    src.execute("CREATE TABLE events (id bigint, v text);"
                " INSERT INTO events SELECT g, 'v' || g FROM generate_series(1, 3000) g")
    d1.execute("CREATE TABLE events (id bigint, v text); INSERT INTO events VALUES (0, 'old')")
    d1.execute(KILL_ONCE)
    d2.execute("CREATE TABLE events (id bigint, v text)")
    run = run_dag(FILE, "copyman_split_kill")
    assert run.state == "success", run.tis
    assert sorted_rows(d1, "events") == sorted_rows(src, "events") == sorted_rows(d2, "events")
    # The killed range's second try loaded d1 only; d2 got every range in its first try.
    query = "SELECT try_number FROM copyman_ledger WHERE task_id = 'events.load' ORDER BY 1"
    assert [r[0] for r in d1.execute(query)] == [1, 1, 1, 2]  # 3 ranges and the NULLs
    assert [r[0] for r in d2.execute(query)] == [1, 1, 1, 1]
    assert run.tries_of("events.publish") == 1


def test_two_runs_of_the_group_at_once_keep_their_staging_apart(
    dbs: tuple[Database, Database, Database],
) -> None:
    src, d1, _ = dbs
    src.execute(EVENTS)
    d1.execute("CREATE TABLE events (id bigint, v text)")
    first = run_dag(FILE, "copyman_split_twice", logical_date=LATER)
    second = run_dag(FILE, "copyman_split_twice")
    assert first.state == second.state == "success"
    # Both cleared and run again at once, a task of each in turn: each has its own staging
    # table, and the publish that ends first does not drop the other run's.
    both = clear_and_rerun(first, second)
    assert [r.state for r in both] == ["success", "success"], [r.tis for r in both]
    assert sorted_rows(d1, "events") == sorted_rows(src, "events")
    assert staging_tables(d1) == []


def test_parallel_ranges_in_one_task_equal_one_snapshot_under_concurrent_updates(
    dbs: tuple[Database, Database, Database],
) -> None:
    src, d1, d2 = dbs
    rows = 20000
    src.execute("CREATE TABLE counters (id int PRIMARY KEY, n int);"
                f" INSERT INTO counters SELECT g, 0 FROM generate_series(1, {rows}) g;"
                " ANALYZE counters")
    for db in (d1, d2):
        db.execute("CREATE TABLE counters (id int, n int)")
    stop, moved = threading.Event(), [0]

    def move() -> None:
        # Each transaction moves 1 from a row of the upper half to one of the lower half:
        # read in one snapshot, the rows sum to 0; read in two, almost never.
        with src.connect(autocommit=True) as conn:
            while not stop.is_set():
                low, high = random.randint(1, rows // 2), random.randint(rows // 2 + 1, rows)
                with conn.transaction():
                    conn.execute("UPDATE counters SET n = n + 1 WHERE id = %s", [low])
                    conn.execute("UPDATE counters SET n = n - 1 WHERE id = %s", [high])
                moved[0] += 1

    worker = threading.Thread(target=move)
    worker.start()
    try:
        run = run_dag(FILE, "copyman_parallel")
    finally:
        stop.set()
        worker.join()
    assert run.state == "success", run.tis
    assert moved[0] > 0
    for db in (d1, d2):
        assert db.execute("SELECT count(*), sum(n), count(DISTINCT id) FROM counters") == [
            (rows, 0, rows)
        ]
    assert sorted_rows(d1, "counters") == sorted_rows(d2, "counters")
    assert d1.scalar("SELECT count(*) FROM copyman_ledger WHERE task_id = 'copy.range'") == 2
    assert staging_tables(d1) == [] and staging_tables(d2) == []
    assert run.xcom("copy")["rows"] == rows
