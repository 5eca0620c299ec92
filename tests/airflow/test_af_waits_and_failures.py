"""Waits that end, stops that stop, failures named and classified right (issue 9): the hook
against real servers, with a TCP proxy for the network faults."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from af_support import Database, PgServers, create_orders, create_orders_table, rows_of

from airflow_copyman import copyman
from airflow_copyman._outcome import CopyManDestinationsFailed, CopyManPermanentFailure
from airflow_copyman.hooks.copyman import CopyManConfigError, CopyManHook, Destination
from airflow_copyman.load.connection import bounded, endpoint, settings
from airflow_copyman.load.ledger.table import Ledger, TaskKey
from airflow_copyman.testing.proxy import TcpProxy

pytestmark = pytest.mark.usefixtures("airflow_db")


def _point(monkeypatch: pytest.MonkeyPatch, **databases: Database | str) -> None:
    for conn_id, db in databases.items():
        value = db if isinstance(db, str) else db.uri()
        monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", value)


def _via(proxy: TcpProxy, db: Database, **query: str) -> str:
    """The URI of ``db`` through ``proxy``."""
    a = db.address
    uri = db.uri().replace(f"@{a.host}:{a.port}/", f"@{proxy.host}:{proxy.port}/")
    return uri + ("?" + "&".join(f"{k}={v}" for k, v in query.items()) if query else "")


@pytest.fixture
def orders(pg: PgServers, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Database, ...]]:
    src = pg.database(pg.src, "tsrc")
    create_orders(src, 2000)
    d1, d2 = pg.database(pg.dst1, "td1"), pg.database(pg.dst2, "td2")
    for db in (d1, d2):
        create_orders_table(db)
    _point(monkeypatch, pg_tsrc=src, pg_td1=d1, pg_td2=d2)
    yield src, d1, d2


def _key(try_number: int, lineage: str = "L") -> TaskKey:
    return TaskKey("dag", "task", "run", -1, lineage, try_number)


# Bounded statements: a stalled link, a lock wait, a stop.


def test_the_session_check_after_connecting_is_bounded(
    pg: PgServers, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The settings check runs before a load binds the connection: a server that answered
    the handshake and then fell silent must not hold it forever, and the bound it gets for
    that one check is not left on a connection the hook hands out."""
    db = pg.database(pg.dst1, "checkbound")
    a = db.address
    monkeypatch.setattr(bounded, "CONNECT_TIMEOUT", 1)
    with TcpProxy(a.host, a.port) as proxy:
        args = {"host": proxy.host, "port": proxy.port, "user": a.user,
                "password": a.password, "dbname": db.name}
        conn = bounded.BoundedConnection.connect(**settings.connect_args(args))
        endpoint.prepare(conn)
        assert conn.bounds is None  # the check's bound is gone again
        conn.close()
        conn = bounded.BoundedConnection.connect(**settings.connect_args(args))
        proxy.set("to_client", "stall")
        outcome: list[BaseException] = []

        def check() -> None:
            try:
                endpoint.prepare(conn)
            except BaseException as exc:
                outcome.append(exc)

        # In a thread, so that a regression fails this test instead of hanging the suite.
        checker = threading.Thread(target=check, daemon=True)
        checker.start()
        checker.join(1 + 2 * bounded.CANCEL_WAIT + 3)
        assert not checker.is_alive(), "the session check waited on a silent server"
        assert outcome and isinstance(outcome[0], bounded.StatementTimeout), outcome
        assert "no answer" in str(outcome[0])
        conn.close()


def test_statements_end_on_a_stalled_link_a_lock_and_a_stop(pg: PgServers) -> None:
    db = pg.database(pg.dst1, "bounded")
    db.execute("CREATE TABLE locked (id int)")
    a = db.address
    with TcpProxy(a.host, a.port) as proxy:
        conn = bounded.BoundedConnection.connect(
            host=proxy.host, port=proxy.port, user=a.user, password=a.password,
            dbname=db.name,
        )
        conn.bounds = bounded.Bounds(1.0)
        assert conn.execute("SELECT 1").fetchone() == (1,)
        conn.rollback()
        # A link that stalls: the reply never comes; the wait ends, the connection closes.
        proxy.set("to_client", "stall")
        started = time.monotonic()
        with pytest.raises(bounded.StatementTimeout, match="no answer"):
            conn.execute("SELECT 2")
        assert time.monotonic() - started < 1.0 + 2 * bounded.CANCEL_WAIT + 1
        assert conn.closed
    # A lock wait: cancelled at the deadline, the connection usable after a rollback.
    with db.connect() as holder, bounded.BoundedConnection.connect(db.uri()) as conn:
        holder.execute("LOCK TABLE locked")
        conn.bounds = bounded.Bounds(0.5)
        with pytest.raises(bounded.StatementTimeout):
            conn.execute("SELECT * FROM locked")
        conn.rollback()
        assert conn.execute("SELECT 3").fetchone() == (3,)
        holder.rollback()
        # A stop: the owning thread cancels, reads the statement's end; the next statement
        # is not cancelled.
        conn.rollback()
        conn.bounds = bounded.Bounds(30.0)
        threading.Timer(0.3, conn.bounds.stop.set).start()
        started = time.monotonic()
        with pytest.raises(copyman.Cancelled):
            conn.execute("SELECT pg_sleep(20)")
        assert time.monotonic() - started < 2.0
        conn.rollback()
        assert conn.execute("SELECT pg_sleep(0.2), 4").fetchone() == ("", 4)


def test_a_server_that_never_answers_fails_transient_in_bounded_time(
    orders: tuple[Database, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, d1, _ = orders
    with TcpProxy(d1.address.host, d1.address.port, accept_only=True) as proxy:
        _point(monkeypatch, pg_mute=_via(proxy, d1, connect_timeout="1"))
        started = time.monotonic()
        report = CopyManHook("pg_tsrc").transfer(
            "orders",
            [Destination("pg_td2", "orders"), Destination("pg_mute", "orders")],
            raise_on_failure=False,
        )
        elapsed = time.monotonic() - started
    ok, mute = report.destinations
    assert ok.status == "loaded"
    assert mute.status == "failed" and not mute.permanent, mute
    assert "connecting" in (mute.error or "") and "timeout" in (mute.error or "")
    assert elapsed < 10, elapsed
    # Without connect_timeout in the connection, the default bounds the wait.
    assert bounded.connect_args({"host": "h"})["connect_timeout"] == bounded.CONNECT_TIMEOUT
    assert bounded.CONNECT_TIMEOUT <= 30


def _stop_after(hook: CopyManHook, seconds: float) -> threading.Timer:
    timer = threading.Timer(seconds, hook.cancel)  # what on_kill does
    timer.start()
    return timer


def test_a_stop_ends_connecting_and_preoperators(
    orders: tuple[Database, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, d1, d2 = orders
    busy = (
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND state = 'active' AND query LIKE 'SELECT pg_sleep%%'"
    )
    # Stopped in a preoperator: cancelled on its server, nothing committed.
    hook = CopyManHook("pg_tsrc")
    _stop_after(hook, 0.5)
    started = time.monotonic()
    report = hook.transfer(
        "orders",
        [Destination("pg_td1", "orders", preoperator="SELECT pg_sleep(30)"),
         Destination("pg_td2", "orders")],
        raise_on_failure=False,
    )
    assert time.monotonic() - started < 3
    assert [d.status for d in report.destinations] == ["failed", "failed"]
    assert all("stopped" in (d.error or "") for d in report.destinations)
    assert d1.scalar(busy) == 0
    for db in (d1, d2):
        assert db.scalar("SELECT count(*) FROM orders") == 0
    # Stopped while connecting to a server that never answers (connect_timeout 20 s).
    with TcpProxy(d1.address.host, d1.address.port, accept_only=True) as proxy:
        _point(monkeypatch, pg_mute=_via(proxy, d1, connect_timeout="20"))
        hook = CopyManHook("pg_tsrc")
        _stop_after(hook, 0.5)
        started = time.monotonic()
        report = hook.transfer(
            "orders", [Destination("pg_mute", "orders")], raise_on_failure=False
        )
        assert time.monotonic() - started < 3
    assert report.destinations[0].status == "failed"
    assert "stopped" in (report.destinations[0].error or "")


# The commits.


class _LoseCommitReply(Ledger):
    """A ledger that, once it recorded ``conn_id``'s row, loses every reply on its link: the
    server commits, the client never hears of it."""

    def __init__(self, proxy: TcpProxy, conn_id: str, key: TaskKey) -> None:
        super().__init__("public", key)
        self.proxy, self.conn_id = proxy, conn_id

    def record(self, conn: Any, schema: str, conn_id: str, *args: Any) -> bool:
        recorded = super().record(conn, schema, conn_id, *args)
        if conn_id == self.conn_id:
            self.proxy.set("to_client", "drop")
        return recorded


def test_a_lost_commit_reply_holds_no_one_and_the_retry_loads_exactly_once(
    orders: tuple[Database, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    src, d1, d2 = orders
    with TcpProxy(d1.address.host, d1.address.port) as proxy:
        _point(monkeypatch, pg_slow=_via(proxy, d1))
        # The destination whose reply is lost comes first: a COMMIT waited for in turn
        # would hold the second one (and its locks) until the first one's deadline.
        d2_committed: list[float] = []

        def watch() -> None:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                if d2.scalar("SELECT count(*) FROM orders") == 2000:
                    d2_committed.append(time.monotonic())
                    return
                time.sleep(0.05)

        watcher = threading.Thread(target=watch)
        watcher.start()
        started = time.monotonic()
        with pytest.raises(CopyManDestinationsFailed) as info:
            CopyManHook("pg_tsrc").transfer(
                "orders",
                [Destination("pg_slow", "orders"), Destination("pg_td2", "orders")],
                ledger=_LoseCommitReply(proxy, "pg_slow", _key(1)),
                receiver_timeout=3,
            )
        returned = time.monotonic()
        watcher.join()
    assert d2_committed and d2_committed[0] < returned - 1.0, "d2 waited for d1's commit"
    assert not isinstance(info.value, CopyManPermanentFailure)
    report = info.value.report
    assert report is not None
    lost, ok = report.destinations
    assert ok.status == "loaded"
    assert lost.status == "failed" and not lost.permanent
    assert "COMMIT" in (lost.error or "") and "outcome is unknown" in (lost.error or "")
    assert returned - started < 15
    # The server did commit: the next try reads the ledger and loads nothing twice.
    _point(monkeypatch, pg_slow=d1)
    again = CopyManHook("pg_tsrc").transfer(
        "orders",
        [Destination("pg_slow", "orders"), Destination("pg_td2", "orders")],
        ledger=Ledger("public", _key(2)),
    )
    assert [d.status for d in again.destinations] == ["already_loaded", "already_loaded"]
    for db in (d1, d2):
        assert rows_of(db, "orders") == rows_of(src, "orders")


# A zombie and its retry.


SLOW_SOURCE = (
    "SELECT * FROM orders WHERE id % 200 <> 0 OR pg_sleep(0.2) IS NOT NULL"  # ~2 s
)


def test_a_zombie_and_its_retry_into_a_primary_key_table(
    orders: tuple[Database, ...],
) -> None:
    src, d1, _ = orders
    zombie_report: list[Any] = []
    zombie = threading.Thread(
        target=lambda: zombie_report.append(
            CopyManHook("pg_tsrc").transfer(
                SLOW_SOURCE, [Destination("pg_td1", "orders")], ledger=Ledger(None, _key(1))
            )
        )
    )
    zombie.start()
    deadline = time.monotonic() + 20
    while not d1.scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND query LIKE 'COPY%%' AND state = 'active'"
    ):
        assert time.monotonic() < deadline, "the zombie's COPY never started"
        time.sleep(0.05)
    # The retry starts while the zombie loads: it waits for the zombie's claim, then finds
    # the zombie's ledger row, and never collides with its rows.
    retry = CopyManHook("pg_tsrc").transfer(
        SLOW_SOURCE, [Destination("pg_td1", "orders")], ledger=Ledger(None, _key(2))
    )
    zombie.join(30)
    assert [d.status for d in zombie_report[0].destinations] == ["loaded"]
    (result,) = retry.destinations
    assert (result.status, result.try_number) == ("already_loaded", 1)
    assert rows_of(d1, "orders") == rows_of(src, "orders")


# Names and classes of failures.


def test_a_source_terminated_mid_copy_is_named(
    orders: tuple[Database, ...],
) -> None:
    src, d1, d2 = orders
    killer_done = threading.Event()

    def kill_source() -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if src.scalar(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND query LIKE 'COPY%%' "
                "AND state = 'active' AND pid <> pg_backend_pid()"
            ):
                break
            time.sleep(0.05)
        killer_done.set()

    threading.Thread(target=kill_source).start()
    report = CopyManHook("pg_tsrc").transfer(
        SLOW_SOURCE,
        [Destination("pg_td1", "orders"), Destination("pg_td2", "orders")],
        raise_on_failure=False,
    )
    assert killer_done.wait(10)
    for result in report.destinations:
        assert result.status == "failed" and not result.permanent
        error = result.error or ""
        assert error.startswith("source pg_tsrc"), error  # not the destination's fault
    for db in (d1, d2):
        assert db.scalar("SELECT count(*) FROM orders") == 0
    errors = [r.error or "" for r in report.destinations]
    for error in errors:
        assert "57P01" in error, error
        assert "terminating connection due to administrator command" in error, error


def test_server_errors_keep_detail_and_copy_line(
    orders: tuple[Database, ...],
) -> None:
    _, d1, _ = orders
    d1.execute("INSERT INTO orders (id, day) VALUES (7, '2020-01-01')")
    with pytest.raises(CopyManPermanentFailure) as info:
        CopyManHook("pg_tsrc").transfer("orders", [Destination("pg_td1", "orders")])
    error = info.value.report.destinations[0].error or ""  # type: ignore[union-attr]
    assert "UniqueViolation [23505]" in error
    assert "DETAIL: Key (id)=(7) already exists." in error
    assert "CONTEXT: COPY orders" in error, error


def test_ssl_refused_is_permanent(
    orders: tuple[Database, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, d1, _ = orders
    _point(monkeypatch, pg_ssl=d1.uri() + "?sslmode=require")
    with pytest.raises(CopyManConfigError, match=r"destination #1 .*SSL"):
        CopyManHook("pg_tsrc").transfer(
            "orders", [Destination("pg_ssl", "orders")], ledger=Ledger(None, _key(1))
        )
    assert d1.scalar("SELECT to_regclass('copyman_ledger')") is None


# No silent failure, no traps.


def test_the_hook_raises_when_a_destination_failed(orders: tuple[Database, ...]) -> None:
    src, d1, d2 = orders
    d2.execute("ALTER TABLE orders ADD CHECK (id < 1000)")
    with pytest.raises(CopyManPermanentFailure) as info:
        CopyManHook("pg_tsrc").transfer(
            "orders", [Destination("pg_td1", "orders"), Destination("pg_td2", "orders")]
        )
    assert "pg_td2:orders" in str(info.value) and "Loaded: pg_td1:orders" in str(info.value)
    report = info.value.report
    assert report is not None and [d.status for d in report.destinations] == [
        "loaded", "failed"
    ]
    assert rows_of(d1, "orders") == rows_of(src, "orders")


def test_a_string_preoperator_is_one_statement(orders: tuple[Database, ...]) -> None:
    _, d1, _ = orders
    d1.execute("INSERT INTO orders (id, day) VALUES (-1, '2020-01-01'), (5000, '2020-01-01')")
    dest = Destination("pg_td1", "orders", preoperator="DELETE FROM orders WHERE id > 0")
    assert dest.statements == ("DELETE FROM orders WHERE id > 0",)
    CopyManHook("pg_tsrc").transfer("orders", [dest])
    assert d1.scalar("SELECT count(*) FROM orders") == 2001
    assert d1.scalar("SELECT min(id) FROM orders") == -1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"receiver_timeout": 0}, "receiver_timeout must be more than zero seconds"),
        ({"receiver_timeout": "5"}, "receiver_timeout must be a number of seconds"),
        ({"progress_interval": "5"}, "progress_interval must be a number of seconds"),
        ({"parameters": "5"}, "parameters must be a list"),
        ({"ledger": Ledger(5, _key(1))}, "ledger_schema must be a schema name"),  # type: ignore[arg-type]
        ({"sql": 123}, "sql must be a query or a table name, got int"),
        ({"destinations": [Destination("pg_td1", "ord\x00ers")]}, "'table' contains a NUL"),
        ({"destinations": [{"conn_id": "pg_td1", "table": "orders", "columns": 5}]},
         "destination #1 (pg_td1, table orders): 'columns' must be a list of column names"),
    ],
)
def test_wrong_arguments_fail_before_any_connection(
    orders: tuple[Database, ...], kwargs: dict[str, Any], message: str
) -> None:
    _, d1, _ = orders
    args: dict[str, Any] = {
        "sql": "orders",
        "destinations": [Destination("pg_td1", "orders")],
        "ledger": Ledger(None, _key(1)),
        **kwargs,
    }
    sessions = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
    before = d1.scalar(sessions)
    with pytest.raises(CopyManConfigError) as info:
        CopyManHook("pg_tsrc").transfer(args.pop("sql"), args.pop("destinations"), **args)
    assert message in str(info.value)
    assert d1.scalar("SELECT to_regclass('copyman_ledger')") is None
    assert d1.scalar(sessions) == before


def test_a_least_privilege_loader_role(pg: PgServers, monkeypatch: pytest.MonkeyPatch) -> None:
    """CREATE only in its own schema, none on public (PostgreSQL 15+'s default): the
    default ledger goes to the destination table's schema."""
    src = pg.database(pg.src, "lpsrc")
    create_orders(src, 300)
    dst = pg.database(pg.dst1, "lpdst")
    role = f"loader_{dst.name}"
    dst.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'loader-pw'")
    dst.execute(f"GRANT CONNECT ON DATABASE {dst.name} TO {role}")
    dst.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
    dst.execute(f"CREATE SCHEMA sales AUTHORIZATION {role}")
    create_orders_table(dst, "sales.orders")
    dst.execute(f"ALTER TABLE sales.orders OWNER TO {role}")
    a = dst.address
    monkeypatch.setenv(
        "AIRFLOW_CONN_PG_LOADER", f"postgresql://{role}:loader-pw@{a.host}:{a.port}/{dst.name}"
    )
    _point(monkeypatch, pg_lpsrc=src)
    with dst.connect() as conn:
        conn.execute(f"SET ROLE {role}")
        has = conn.execute("SELECT has_schema_privilege('public', 'CREATE')").fetchone()
        assert has == (False,)
    for table in ("sales.orders", "orders"):
        monkeypatch.setenv(
            "AIRFLOW_CONN_PG_LOADER",
            f"postgresql://{role}:loader-pw@{a.host}:{a.port}/{dst.name}"
            + ("" if "." in table else "?options=-csearch_path%3Dsales"),
        )
        report = CopyManHook("pg_lpsrc").transfer(
            "orders", [Destination("pg_loader", table, truncate=True)],
            ledger=Ledger(None, _key(1, lineage=table)),
        )
        assert [d.status for d in report.destinations] == ["loaded"]
    # One table however spelled: the second lineage's row took the first one's place.
    assert dst.execute("SELECT destination, lineage FROM sales.copyman_ledger") == [
        ("sales.orders", "orders")
    ]
    assert dst.scalar("SELECT to_regclass('public.copyman_ledger')") is None
    assert rows_of(dst, "sales.orders") == rows_of(src, "orders")


def test_templated_values_are_checked_after_rendering() -> None:
    from airflow_copyman.operators.copyman import CopyManOperator

    good = [{"conn_id": "pg", "table": "t"}]
    base: dict[str, Any] = {"task_id": "t", "source_conn_id": "s", "sql": "t"}
    # Templates are let through when the DAG is parsed...
    CopyManOperator(
        **base,
        destinations=[
            {"conn_id": "pg", "table": "{{ params.t }}", "truncate": "{{ params.full }}"},
            Destination("pg", "{{ params.t }}", preoperator="DELETE FROM {{ params.t }}"),
        ],
        parameters="{{ params.p }}",
    )
    # ... and so are values Airflow resolves when the task runs (XComArg).
    from airflow.sdk import task

    @task
    def query() -> str:
        return "orders"

    from airflow.sdk import DAG

    with DAG("xcom_args_dag", schedule=None):
        CopyManOperator(
            task_id="from_xcom", source_conn_id="s", sql=query(), destinations=good,
            parameters=query(),
        )
    # ... values known then are refused then, naming the argument.
    for kwargs, message in [
        ({"receiver_timeout": 0}, "receiver_timeout"),
        ({"receiver_timeout": "5"}, "receiver_timeout"),
        ({"progress_interval": "5"}, "progress_interval"),
        ({"parameters": "5"}, "parameters"),
        ({"ledger_schema": 5}, "ledger_schema"),
        ({"sql": 123}, "sql must be a query or a table name, got int"),
        ({"destinations": [{"conn_id": "pg", "table": "a\x00b"}]}, "NUL"),
        ({"destinations": [{"conn_id": "pg", "table": "t", "columns": 5}]},
         "destination #1 (pg, table t): 'columns' must be a list"),
        ({"destinations": [{"conn_id": "pg", "table": "t", "truncate": "yes"}]}, "truncate"),
    ]:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            CopyManOperator(**{**base, "destinations": good, **kwargs})
    # Jinja renders booleans as text: taken as the booleans they were.
    rendered = Destination.from_value({"conn_id": "pg", "table": "t", "truncate": "False"}, 0)
    assert rendered.truncate is False
    assert Destination.from_value({"conn_id": "pg", "table": "t", "truncate": "True"}, 0).truncate
