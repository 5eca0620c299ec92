"""Destination tables as Airflow assets: real task runs (``dag.test()``) of
``dags/copyman_asset_dags.py``, the events read back from the metadata database and by a
DAG scheduled on the tables."""

from __future__ import annotations

import datetime
import importlib.util
import json
import sys
from typing import Any
from urllib.parse import urlsplit

import pytest
from af_support import (
    Database,
    PgServers,
    Run,
    create_orders,
    create_orders_table,
    dags_folder,
    rows_of,
)

DAG_FILE = "copyman_asset_dags.py"
pytestmark = pytest.mark.usefixtures("airflow_db")
UTC = datetime.UTC

# The second destination's backend dies mid-copy on the first try only (a sequence is not
# transactional), so try 1 fails after the first destination committed.
KILL_ONCE = """
CREATE SEQUENCE kill_once;
CREATE FUNCTION kill_me() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.id = 300 AND nextval('kill_once') = 1 THEN
        PERFORM pg_terminate_backend(pg_backend_pid());
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER kill_me BEFORE INSERT ON sales.orders FOR EACH ROW EXECUTE FUNCTION kill_me();
"""


def _run(dag_id: str, logical_date: datetime.datetime) -> Run:
    """Run a DAG of the file, imported afresh: its schedule reads the URIs of this test."""
    path = dags_folder() / DAG_FILE
    name = f"copyman_assets_{dag_id}_{logical_date:%Y%m%d}"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    dag = next(v for v in vars(module).values() if getattr(v, "dag_id", None) == dag_id)
    dr = dag.test(logical_date=logical_date)
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session

    with create_session() as session:
        fresh = session.get(DagRun, dr.id)
        tis = {
            ti.task_id: (str(ti.state), ti.try_number)
            for ti in fresh.get_task_instances(session=session)
        }
    return Run(dag_id, dr.run_id, str(dr.state), tis)


def _uri(db: Database, schema: str, table: str) -> str:
    return f"postgres://{db.address.host}:{db.address.port}/{db.name}/{schema}/{table}"


def _events(uri: str) -> list[dict[str, Any]]:
    """The asset events of ``uri`` in the metadata database, oldest first."""
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        rows = session.execute(
            select(AssetEvent.extra, AssetEvent.source_dag_id, AssetEvent.source_task_id)
            .join(AssetModel, AssetModel.id == AssetEvent.asset_id)
            .where(AssetModel.uri == uri)
            .order_by(AssetEvent.id)
        ).all()
    return [{"extra": e, "dag_id": d, "task_id": t} for e, d, t in rows]


def _queued_for(dag_id: str) -> set[str]:
    """The assets whose events queued a run of ``dag_id`` (the scheduler's input)."""
    from airflow.models.asset import AssetDagRunQueue, AssetModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        return set(
            session.scalars(
                select(AssetModel.uri)
                .join(AssetDagRunQueue, AssetDagRunQueue.asset_id == AssetModel.id)
                .where(AssetDagRunQueue.target_dag_id == dag_id)
            )
        )


def _alias_assets(name: str) -> set[str]:
    from airflow.models.asset import AssetAliasModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        alias = session.scalar(select(AssetAliasModel).where(AssetAliasModel.name == name))
        return {a.uri for a in alias.assets} if alias is not None else set()


def _scheduler_creates_run(dag_id: str) -> list[tuple[str, dict[str, Any]]]:
    """Run the scheduler's asset-triggered step for ``dag_id`` (no scheduler loop: only the
    step that turns queued asset events into a DAG run); the events the run consumed."""
    from airflow.jobs.job import Job
    from airflow.jobs.scheduler_job_runner import SchedulerJobRunner
    from airflow.models.dag import DagModel
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        job = Job()
        session.add(job)
        session.flush()
        runner = SchedulerJobRunner(job=job, executors=[])
        dag_model = session.scalar(select(DagModel).where(DagModel.dag_id == dag_id))
        runner._create_dag_runs_asset_triggered(dag_models=[dag_model], session=session)
        session.flush()
        run = session.scalar(
            select(DagRun).where(DagRun.dag_id == dag_id, DagRun.run_type == "asset_triggered")
        )
        assert run is not None
        consumed = sorted((e.asset.uri, e.extra) for e in run.consumed_asset_events)
        # Undone: a run left queued (no start_date) makes Airflow 3.3.2's execution API fail
        # to list the events that created it, so inlet_events below would fail.
        session.rollback()
        return consumed


def _databases(pg: PgServers, prefix: str) -> tuple[Database, Database, Database]:
    src = pg.database(pg.src, f"{prefix}src")
    create_orders(src, 1000)
    d1, d2 = pg.database(pg.dst1, f"{prefix}d1"), pg.database(pg.dst2, f"{prefix}d2")
    create_orders_table(d1, "archive.orders")
    # "orders" at d2 is sales.orders: its search_path puts sales first (public.orders is
    # there too, and must stay empty).
    create_orders_table(d2, "sales.orders")
    create_orders_table(d2, "public.orders")
    d2.execute(f'ALTER DATABASE "{d2.name}" SET search_path = sales, public')
    return src, d1, d2


def _point(monkeypatch: pytest.MonkeyPatch, **databases: Database) -> None:
    for conn_id, db in databases.items():
        monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", db.uri())


def test_asset_events_read_by_a_dag_scheduled_on_the_tables(
    pg: PgServers, monkeypatch: pytest.MonkeyPatch
) -> None:
    src, d1, d2 = _databases(pg, "as")
    d2.execute(KILL_ONCE)
    uri1, uri2 = _uri(d1, "archive", "orders"), _uri(d2, "sales", "orders")
    monkeypatch.setenv("COPYMAN_ASSET_URIS", f"{uri1} {uri2}")
    _point(monkeypatch, pg_src=src, pg_d1=d1, pg_d2=d2)

    run = _run("copyman_assets_load", datetime.datetime(2024, 3, 1, tzinfo=UTC))

    # Try 1 committed d1 and failed on d2 (its backend died); try 2 loaded d2.
    assert run.tis["load"] == ("success", 2), run.tis
    assert rows_of(d2, "sales.orders") == rows_of(src, "orders")
    assert rows_of(d2, "public.orders") == []
    # One event per load, from the try that succeeded, named as the servers name the
    # tables (an unqualified name through the search_path): the failed try emitted none.
    got1, got2 = _events(uri1), _events(uri2)
    assert len(got1) == 1 and len(got2) == 1, (got1, got2)
    for got, conn_id, loaded_by in ((got1, "pg_d1", 1), (got2, "pg_d2", 2)):
        (event,) = got
        assert event["dag_id"] == "copyman_assets_load" and event["task_id"] == "load"
        extra = event["extra"]
        assert extra["rows"] == 1000 and extra["bytes"] > 0, extra
        assert extra["mode"] == "append" and extra["conn_id"] == conn_id
        assert extra["try_number"] == loaded_by
    # Through the task's documented alias, which now resolves to both tables.
    assert {uri1, uri2} <= _alias_assets("copyman:copyman_assets_load:load")
    # The scheduler's queue holds a run of the DAG scheduled on both tables.
    assert _queued_for("copyman_assets_consumer") == {uri1, uri2}
    # The scheduler's own step creates that run, consuming exactly these events (what the
    # DAG's tasks then get as triggering_asset_events).
    assert _scheduler_creates_run("copyman_assets_consumer") == sorted(
        [(uri1, got1[0]["extra"]), (uri2, got2[0]["extra"])]
    )
    # No login or password in any URI or extra.
    for uri in (uri1, uri2):
        assert urlsplit(uri).username is None and urlsplit(uri).password is None
    extras = [got1[0]["extra"], got2[0]["extra"]]
    assert not {d1.address.user, d2.address.user} & {str(v) for e in extras for v in e.values()}
    text = json.dumps([uri1, uri2, extras])
    for password in pg.passwords:
        assert password not in text

    # The DAG scheduled on the tables reads the metrics from the events (no XCom).
    consumer = _run("copyman_assets_consumer", datetime.datetime(2024, 3, 1, tzinfo=UTC))
    assert consumer.state == "success", consumer.tis
    read = consumer.xcom("read_metrics")
    assert read == {uri1: [got1[0]["extra"]], uri2: [got2[0]["extra"]]}, read


def test_a_failed_destination_emits_no_event(
    pg: PgServers, monkeypatch: pytest.MonkeyPatch
) -> None:
    src, d1, d2 = _databases(pg, "af")
    # A row the table refuses: a permanent failure mid-copy, so the task fails at once.
    d2.execute("ALTER TABLE sales.orders ADD CONSTRAINT small CHECK (id < 500)")
    _point(monkeypatch, pg_src=src, pg_d1=d1, pg_d2=d2)

    run = _run("copyman_assets_load", datetime.datetime(2024, 3, 2, tzinfo=UTC))

    assert run.tis["load"] == ("failed", 1), run.tis
    assert rows_of(d1, "archive.orders") == rows_of(src, "orders")  # d1 committed
    assert rows_of(d2, "sales.orders") == []
    # Airflow keeps no outlet event of a failed task: d1's load is announced by the try
    # that succeeds after the fix (the ledger then skips it as already loaded).
    assert _events(_uri(d2, "sales", "orders")) == []
    assert _events(_uri(d1, "archive", "orders")) == []


# The URI and the alias, without a task run.


def test_asset_uri_forms() -> None:
    from airflow.sdk import Asset

    from airflow_copyman._assets import asset_uri
    from airflow_copyman.load.catalog.relation import Relation

    plain = Relation("shop", "public", "orders")
    assert asset_uri("db.example", None, plain) == "postgres://db.example:5432/shop/public/orders"
    assert asset_uri("10.0.0.5", 6432, plain) == "postgres://10.0.0.5:6432/shop/public/orders"
    assert asset_uri("::1", 5433, plain) == "postgres://[::1]:5433/shop/public/orders"
    # A socket directory, or names with / or spaces, stay one part each.
    odd = Relation("my db", "Sales/EU", "Orders 2024")
    uri = asset_uri("/var/run/postgresql", None, odd)
    assert uri == "postgres://%2Fvar%2Frun%2Fpostgresql:5432/my%20db/Sales%2FEU/Orders%202024"
    # Airflow's normalization (the postgres provider's) leaves each one as it is.
    for value in (uri, asset_uri(None, None, plain), asset_uri("::1", 5433, plain)):
        assert Asset(value).uri == value


def test_alias_declared_unless_the_user_gave_one() -> None:
    from airflow.sdk import DAG, AssetAlias

    from airflow_copyman.operators.copyman import CopyManOperator

    kwargs: dict[str, Any] = {
        "source_conn_id": "pg_src",
        "sql": "orders",
        "destinations": [{"conn_id": "pg_d1", "table": "orders"}],
    }
    with DAG("copyman_alias_check", schedule=None):
        ours = CopyManOperator(task_id="group.copy", **kwargs)
        mine = AssetAlias("warehouse-loads")
        theirs = CopyManOperator(task_id="theirs", outlets=[mine], **kwargs)
    assert ours.outlets == [AssetAlias("copyman:copyman_alias_check:group.copy")]
    assert theirs.outlets == [mine]


def test_each_load_is_announced_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tries of one task instance share its task_state_store: a load announced by a try
    that succeeded is not announced again (a clear with resume_on_clear), a new load is."""
    from airflow.sdk.execution_time.context import OutletEventAccessors
    from test_af_offline_checks import DictStore

    from airflow_copyman._assets import emit
    from airflow_copyman._destinations import Destination, DestinationResult, TransferReport
    from airflow_copyman._task_state import TaskStateLedger
    from airflow_copyman.load.catalog.relation import Relation
    from airflow_copyman.operators.copyman import CopyManOperator

    monkeypatch.setenv("AIRFLOW_CONN_PG_A", "postgresql://someone:s3cret@db.example:6432/shop")
    from airflow.sdk import DAG

    with DAG("copyman_announce_check", schedule=None):
        op = CopyManOperator(
            task_id="copy",
            source_conn_id="pg_src",
            sql="orders",
            destinations=[{"conn_id": "pg_a", "table": "a"}, {"conn_id": "pg_a", "table": "b"}],
        )
    specs = [Destination("pg_a", "a"), Destination("pg_a", "b", truncate=True)]
    store = DictStore()

    def result(table: str, status: Any, try_number: int | None) -> DestinationResult:
        return DestinationResult(
            "pg_a", table, status, 5, 50, try_number=try_number,
            relation=Relation("shop", "public", table),
        )

    def run(*results: DestinationResult, try_number: int) -> list[tuple[str, dict[str, Any]]]:
        context = {"outlet_events": OutletEventAccessors(), "task_state_store": store}
        return emit(context, op, specs, TransferReport(5, 50, "binary", 0.1, list(results)),
                    try_number)

    # Try 2 loads b; a was committed by try 1 (which failed): both announced now.
    first = run(result("a", "already_loaded", 1), result("b", "loaded", 2), try_number=2)
    assert [(u, e["try_number"], e["mode"]) for u, e in first] == [
        ("postgres://db.example:6432/shop/public/a", 1, "append"),
        ("postgres://db.example:6432/shop/public/b", 2, "replace"),
    ]
    assert "s3cret" not in json.dumps(first) and "someone" not in json.dumps(first)
    # Cleared and resumed: both skipped as loaded, both announced already.
    assert run(result("a", "already_loaded", 1), result("b", "already_loaded", 2),
               try_number=3) == []
    # A new load of b is announced; a failed destination never is.
    again = run(result("a", "failed", None), result("b", "loaded", 4), try_number=4)
    assert [(u, e["try_number"]) for u, e in again] == [
        ("postgres://db.example:6432/shop/public/b", 4)
    ]
    # A table that cannot be named (its connection gone) costs its event, not the task.
    specs[0] = Destination("pg_gone", "a")
    gone = result("a", "loaded", 5)
    gone.conn_id = "pg_gone"
    assert [u for u, _ in run(gone, result("b", "loaded", 5), try_number=5)] == [
        "postgres://db.example:6432/shop/public/b"
    ]
    specs[0] = Destination("pg_a", "a")
    # Without a ledger, the task_state_store mirror keeps the table's name for a later try.
    mirror = TaskStateLedger(DictStore(), 3, resume_on_clear=False)
    mirror.record(result("a", "loaded", 1), 1)
    loaded = mirror.loaded(specs[0])
    assert loaded is not None and loaded.relation == Relation("shop", "public", "a")
