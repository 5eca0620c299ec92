"""CopyManHook against real servers, outside a task run: connections, options, transfers."""

from __future__ import annotations

import json
import threading

import pytest
from af_support import Database, PgServers, create_orders, create_orders_table, rows_of

from airflow_copyman.hooks.copyman import CopyManConfigError, CopyManHook, Destination
from airflow_copyman.load.ledger.table import Ledger, TaskKey


def test_unknown_and_foreign_connections(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(CopyManConfigError, match="connection 'pg_nowhere' is not defined"):
        CopyManHook("pg_nowhere").get_conn()
    monkeypatch.setenv("AIRFLOW_CONN_MY_MYSQL", "mysql://user:s3cretpass@db.example:3306/shop")
    with pytest.raises(CopyManConfigError, match="'my_mysql' is of type 'mysql'") as info:
        CopyManHook("my_mysql").get_conn()
    assert "s3cretpass" not in str(info.value)


def test_connection_options_are_honoured(pg: PgServers, monkeypatch: pytest.MonkeyPatch) -> None:
    db = pg.database(pg.dst1, "opts")
    # Every extra is a libpq keyword, as in PostgresHook; "cursor" must not change our rows.
    monkeypatch.setenv(
        "AIRFLOW_CONN_PG_OPTS",
        db.connection_json(
            options="-c statement_timeout=1234", application_name="mine", cursor="dictcursor"
        ),
    )
    monkeypatch.setenv("AIRFLOW_CONN_PG_PLAIN", db.uri() + "?connect_timeout=5")
    with CopyManHook("pg_opts").get_conn() as conn:
        assert conn.execute("SHOW statement_timeout").fetchone() == ("1234ms",)
        assert conn.execute("SHOW application_name").fetchone() == ("mine",)
        assert conn.autocommit is False
    hook = CopyManHook("pg_plain")
    with hook.get_conn() as conn:
        assert conn.execute("SHOW application_name").fetchone() == ("airflow-copyman",)
    assert db.address.password not in hook.describe()
    assert hook.describe().startswith(f"pg_plain (127.0.0.1:{db.address.port}/")


def _setup(pg: PgServers, monkeypatch: pytest.MonkeyPatch, rows: int) -> tuple[Database, ...]:
    src = pg.database(pg.src, "hsrc")
    create_orders(src, rows)
    d1, d2 = pg.database(pg.dst1, "hd1"), pg.database(pg.dst2, "hd2")
    for db in (d1, d2):
        create_orders_table(db)
    for conn_id, db in (("pg_hsrc", src), ("pg_hd1", d1), ("pg_hd2", d2)):
        monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", db.uri())
    return src, d1, d2


def test_transfer_without_airflow_task(pg: PgServers, monkeypatch: pytest.MonkeyPatch) -> None:
    src, d1, d2 = _setup(pg, monkeypatch, 2000)
    report = CopyManHook("pg_hsrc").transfer(
        "SELECT * FROM orders WHERE id <= %s",
        [Destination("pg_hd1", "orders"), {"conn_id": "pg_hd2", "table": "public.orders"}],
        parameters=[1500],
    )
    assert (report.rows, report.format) == (1500, "binary")
    assert [(d.status, d.rows) for d in report.destinations] == [("loaded", 1500)] * 2
    expected = rows_of(src, "orders", where="WHERE id <= 1500")
    assert rows_of(d1, "orders") == expected == rows_of(d2, "orders")


def test_a_failing_destination_does_not_stop_the_others(
    pg: PgServers, monkeypatch: pytest.MonkeyPatch
) -> None:
    src, d1, d2 = _setup(pg, monkeypatch, 3000)
    d2.execute("ALTER TABLE orders ADD CHECK (id < 2500)")
    key = TaskKey("dag", "task", "run", -1, "lineage-1", 1)
    report = CopyManHook("pg_hsrc").transfer(
        "orders",
        [Destination("pg_hd1", "orders"), Destination("pg_hd2", "orders")],
        ledger=Ledger("public", key),
        raise_on_failure=False,
    )
    ok, bad = report.destinations
    assert (ok.status, ok.rows) == ("loaded", 3000)
    assert bad.status == "failed" and bad.permanent
    assert "violates check constraint" in (bad.error or "")
    assert d2.scalar("SELECT count(*) FROM orders") == 0
    assert rows_of(d1, "orders") == rows_of(src, "orders")
    # The ledger records the committed destination only, in its own database.
    assert d1.execute("SELECT conn_id, rows, lineage FROM copyman_ledger") == [
        ("pg_hd1", 3000, "lineage-1")
    ]
    assert d2.scalar("SELECT count(*) FROM copyman_ledger") == 0
    # The next try of the lineage skips what the ledger lists; a new lineage loads again.
    d2.execute("ALTER TABLE orders DROP CONSTRAINT orders_id_check")
    again = CopyManHook("pg_hsrc").transfer(
        "orders",
        [Destination("pg_hd1", "orders"), Destination("pg_hd2", "orders")],
        ledger=Ledger("public", TaskKey("dag", "task", "run", -1, "lineage-1", 2)),
    )
    assert [d.status for d in again.destinations] == ["already_loaded", "loaded"]
    assert d1.scalar("SELECT count(*) FROM orders") == 3000
    rerun = CopyManHook("pg_hsrc").transfer(
        "orders",
        [Destination("pg_hd1", "orders", truncate=True)],
        ledger=Ledger("public", TaskKey("dag", "task", "run", -1, "lineage-2", 3)),
    )
    assert [d.status for d in rerun.destinations] == ["loaded"]
    assert d1.execute("SELECT rows, lineage, try_number FROM copyman_ledger") == [
        (3000, "lineage-2", 3)
    ]


def test_ledger_refuses_a_second_load_of_one_lineage(pg: PgServers) -> None:
    """Two tries of one lineage racing (a zombie and its retry): one commit wins."""
    db = pg.database(pg.dst1, "race")
    ledger = Ledger("public", TaskKey("dag", "task", "run", -1, "L", 1))
    with db.connect() as a, db.connect() as b:
        ledger.ensure_table(a, "public")
        assert ledger.record(a, "public", "pg", "t", 10, 100)
        # b's insert waits for a's row lock; once a commits, b sees the row and backs off.
        result: list[bool] = []
        waiter = threading.Thread(
            target=lambda: result.append(ledger.record(b, "public", "pg", "t", 10, 100))
        )
        waiter.start()
        a.commit()
        waiter.join(10)
        assert result == [False]
        b.rollback()
        entry = ledger.lookup(b, "public", "pg", "t")
        assert entry is not None and entry.rows == 10


def test_bad_input_fails_before_writing(pg: PgServers, monkeypatch: pytest.MonkeyPatch) -> None:
    _, d1, d2 = _setup(pg, monkeypatch, 100)
    d2.execute("CREATE TABLE narrow (id bigint, day date)")
    with pytest.raises(CopyManConfigError) as info:
        CopyManHook("pg_hsrc").transfer(
            "orders",
            [
                Destination("pg_hd1", "orders", truncate=True),
                Destination("pg_hd2", "narrow"),
                Destination("pg_hd2", "missing"),
            ],
            ledger=Ledger("public", TaskKey("d", "t", "r", -1, "L", 1)),
        )
    message = str(info.value)
    assert "destination #2 (pg_hd2, table narrow): column count mismatch" in message
    assert "destination #3 (pg_hd2, table missing): table \"missing\" does not exist" in message
    # Nothing was written anywhere, not even the ledger table.
    for db in (d1, d2):
        assert db.scalar("SELECT to_regclass('copyman_ledger')") is None
    with pytest.raises(CopyManConfigError, match="no destinations"):
        CopyManHook("pg_hsrc").transfer("orders", [])


def test_connection_refused_for_good_is_bad_input(
    pg: PgServers, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, d1, _ = _setup(pg, monkeypatch, 10)
    wrong = json.loads(d1.connection_json())
    wrong["password"] = "not-the-password"
    monkeypatch.setenv("AIRFLOW_CONN_PG_WRONG", json.dumps(wrong))
    with pytest.raises(CopyManConfigError, match="password authentication failed") as info:
        CopyManHook("pg_hsrc").transfer("orders", [Destination("pg_wrong", "orders")])
    assert "not-the-password" not in str(info.value)



def test_a_crash_right_after_a_commit_never_loads_twice(
    pg: PgServers, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ledger row commits with the data: a try that dies between a destination's
    commit and any bookkeeping outside it leaves the next try nothing to redo there."""
    src, d1, d2 = _setup(pg, monkeypatch, 1000)

    class WorkerDied(BaseException):
        pass

    def die(result: object) -> None:
        raise WorkerDied  # the first commit is done; nothing else happens in this try

    destinations = [Destination("pg_hd1", "orders"), Destination("pg_hd2", "orders")]
    with pytest.raises(WorkerDied):
        CopyManHook("pg_hsrc").transfer(
            "orders", destinations, ledger=Ledger("public", TaskKey("d", "t", "r", -1, "L", 1)),
            on_commit=die,
        )
    # The COMMITs go out together: both committed, each with its ledger row.
    assert (d1.scalar("SELECT count(*) FROM orders"), d2.scalar("SELECT count(*) FROM orders")) == (
        1000, 1000
    )
    again = CopyManHook("pg_hsrc").transfer(
        "orders", destinations, ledger=Ledger("public", TaskKey("d", "t", "r", -1, "L", 2))
    )
    assert [d.status for d in again.destinations] == ["already_loaded", "already_loaded"]
    for db in (d1, d2):
        assert rows_of(db, "orders") == rows_of(src, "orders")


def test_an_empty_source_loads_nothing_but_still_truncates(
    pg: PgServers, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, d1, _ = _setup(pg, monkeypatch, 10)
    d1.execute("INSERT INTO orders (id, day) VALUES (1, '2020-01-01')")
    report = CopyManHook("pg_hsrc").transfer(
        "SELECT * FROM orders WHERE false", [Destination("pg_hd1", "orders", truncate=True)]
    )
    assert (report.rows, report.destinations[0].status) == (0, "loaded")
    assert d1.scalar("SELECT count(*) FROM orders") == 0
