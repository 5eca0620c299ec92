"""Real task runs through ``dag.test()``: connections from ``AIRFLOW_CONN_*`` pointing at
throwaway servers, the DAGs of ``dags/copyman_test_dags.py``."""

from __future__ import annotations

import datetime
import re
from collections.abc import Iterator

import pytest
from af_support import (
    Database,
    Events,
    PgServers,
    Run,
    create_orders,
    create_orders_table,
    rows_of,
    run_dag,
)

DAG_FILE = "copyman_test_dags.py"
pytestmark = pytest.mark.usefixtures("airflow_db")


def _point(monkeypatch: pytest.MonkeyPatch, **databases: Database) -> None:
    for conn_id, db in databases.items():
        # Both forms Airflow accepts: URI, and JSON (for pg_d2).
        value = db.connection_json() if conn_id == "pg_d2" else db.uri()
        monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", value)


# A clean fan-out, templating, truncate/preoperator, csv with columns: one DAG run.


@pytest.fixture(scope="module")
def fanout(pg: PgServers, airflow_db: None) -> Iterator[tuple[Run, dict[str, Database]]]:
    src = pg.database(pg.src, "fsrc")
    create_orders(src, 3000)
    d1, d2, d3 = (
        pg.database(pg.dst1, "fd1"),
        pg.database(pg.dst2, "fd2"),
        pg.database(pg.dst1, "fd3"),
    )
    create_orders_table(d1, "orders")
    create_orders_table(d2, "orders")
    create_orders_table(d3, "archive.orders")
    # Text instead of binary: amount is a float here, and id an integer.
    d1.execute(
        "CREATE TABLE orders_day (id integer, day date, customer text, amount float8, "
        "tags text[], payload jsonb, created_at timestamptz, flag boolean, raw bytea)"
    )
    d1.execute("CREATE TABLE people (customer text, id bigint, extra text DEFAULT 'x')")
    create_orders_table(d2, "orders_trunc")
    d2.execute(
        "INSERT INTO orders_trunc (id, day) "
        "SELECT g, date '2023-12-31' FROM generate_series(1, 5) g"
    )
    create_orders_table(d3, "orders_preop")
    d3.execute(
        "INSERT INTO orders_preop (id, day) VALUES (900001, '2024-01-02'), (900002, '2024-01-01')"
    )
    d3.execute("CREATE TABLE load_audit (day date, task text)")
    databases = {"src": src, "d1": d1, "d2": d2, "d3": d3}
    with pytest.MonkeyPatch.context() as mp:
        _point(mp, pg_src=src, pg_d1=d1, pg_d2=d2, pg_d3=d3)
        run = run_dag(DAG_FILE, "copyman_test_fanout")
    yield run, databases


def test_fanout_to_three_destinations(fanout: tuple[Run, dict[str, Database]]) -> None:
    run, dbs = fanout
    assert run.state == "success", run.tis
    assert run.tis["fanout3"] == ("success", 1)
    expected = rows_of(dbs["src"], "orders")
    assert len(expected) == 3000
    for db, table in ((dbs["d1"], "orders"), (dbs["d2"], "orders"), (dbs["d3"], "archive.orders")):
        assert rows_of(db, table) == expected
    totals = run.xcom("fanout3")
    assert totals["rows"] == 3000 and totals["bytes"] > 0 and totals["format"] == "binary"
    assert totals["destinations"] == [
        {"conn_id": conn_id, "table": table, "rows": 3000, "bytes": totals["bytes"],
         "status": "loaded", "error": None, "mode": "append"}
        for conn_id, table in (("pg_d1", "orders"), ("pg_d2", "public.orders"),
                               ("pg_d3", "archive.orders"))
    ]
    assert run.xcom("fanout3", "rows") == 3000
    assert run.xcom("fanout3", "bytes") == totals["bytes"]
    # The downstream task read both XComs.
    assert run.xcom("report") == {
        "rows": 3000,
        "statuses": ["loaded"] * 3,
        "tables": ["orders", "public.orders", "archive.orders"],
    }
    # The ledger in each destination database, and its mirror in task_state_store.
    assert dbs["d2"].execute(
        "SELECT dag_id, task_id, conn_id, destination, rows, try_number FROM copyman_ledger "
        "WHERE task_id = 'fanout3'"
    ) == [("copyman_test_fanout", "fanout3", "pg_d2", "public.orders", 3000, 1)]
    state = run.task_state("fanout3", "copyman")
    # Keyed by the tables as their servers resolved them (pg_d1 spells it "orders").
    assert sorted(state["destinations"]) == [
        "pg_d1:public.orders", "pg_d2:public.orders", "pg_d3:archive.orders"
    ]
    assert state["failed"] == []


def test_templated_sql_file_and_table(fanout: tuple[Run, dict[str, Database]]) -> None:
    run, dbs = fanout
    assert run.tis["templated"] == ("success", 1)
    # templated_orders.sql: the logical date's rows with an even id, into {{ params.target }}.
    where = "WHERE day = '2024-01-02' AND id % 2 = 0"
    expected = dbs["src"].execute(
        f"SELECT id, amount::float8, payload FROM orders {where} ORDER BY id"
    )
    got = dbs["d1"].execute("SELECT id, amount, payload FROM orders_day ORDER BY id")
    assert got == expected and len(got) == 500
    totals = run.xcom("templated")
    assert totals["format"] == "text"  # integer/float8 columns: binary would not do
    assert totals["destinations"][0]["table"] == "public.orders_day"
    assert totals["rows"] == 500


def test_truncate_and_preoperator(fanout: tuple[Run, dict[str, Database]]) -> None:
    run, dbs = fanout
    assert run.tis["truncate_preop"] == ("success", 1)
    day = rows_of(dbs["src"], "orders", where="WHERE day = '2024-01-02'")
    # truncate: only the load's rows are left.
    assert rows_of(dbs["d2"], "orders_trunc") == day
    # preoperator: the day's stale row is gone, the other day's row stays, the audit row
    # was written in the load's transaction.
    got = rows_of(dbs["d3"], "orders_preop")
    assert got[:-1] == day and got[-1][:2] == (900002, datetime.date(2024, 1, 1))
    assert dbs["d3"].execute("SELECT day::text, task FROM load_audit") == [
        ("2024-01-02", "truncate_preop")
    ]


def test_csv_with_columns_and_parameters(fanout: tuple[Run, dict[str, Database]]) -> None:
    run, dbs = fanout
    assert run.tis["csv_columns"] == ("success", 1)
    assert run.xcom("csv_columns")["format"] == "csv"
    expected = dbs["src"].execute(
        "SELECT customer, id, 'x' FROM orders WHERE id <= 100 ORDER BY id"
    )
    assert dbs["d1"].execute("SELECT * FROM people ORDER BY id") == expected


# Retries that load only what failed.

KILL_ONCE = """
CREATE SEQUENCE kill_once;
CREATE FUNCTION kill_me() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- A sequence is not transactional: only the first try's backend dies.
    IF NEW.id = 5000 AND nextval('kill_once') = 1 THEN
        PERFORM pg_terminate_backend(pg_backend_pid());
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER kill_me BEFORE INSERT ON orders FOR EACH ROW EXECUTE FUNCTION kill_me();
"""


def test_backend_dies_mid_copy_then_retry_loads_only_it(
    pg: PgServers, monkeypatch: pytest.MonkeyPatch, events: Events,
    capfd: pytest.CaptureFixture[str],
) -> None:
    src = pg.database(pg.src, "rsrc")
    create_orders(src, 20_000)
    d1, d2, d3 = (pg.database(s, "r") for s in (pg.dst1, pg.dst2, pg.dst1))
    for db in (d1, d2, d3):
        create_orders_table(db)
    d2.execute(KILL_ONCE)
    _point(monkeypatch, pg_src=src, pg_d1=d1, pg_d2=d2, pg_d3=d3)

    run = run_dag(DAG_FILE, "copyman_test_retry")

    assert run.state == "success"
    assert run.tis["retry_once"] == ("success", 2)
    # The log says what the ledger skips, on each try.
    out, _ = capfd.readouterr()
    assert "0 destination(s) already loaded (skipped), 3 to load" in out
    assert "2 destination(s) already loaded (skipped), 1 to load" in out
    (retry,) = events.of("retry_once")
    assert retry["event"] == "retry" and retry["try_number"] == 1
    assert retry["exception"] == "CopyManDestinationsFailed"
    assert "1 of 3 destination(s) failed" in retry["message"]
    assert "pg_d2:orders" in retry["message"]
    # The backend's death shows as its FATAL message, or as the socket closing under us.
    assert re.search(
        "administrator command|server closed the connection|connection (lost|closed)",
        retry["message"],
    ), retry["message"]
    totals = run.xcom("retry_once")
    assert [(d["conn_id"], d["status"], d["rows"]) for d in totals["destinations"]] == [
        ("pg_d1", "already_loaded", 20_000),
        ("pg_d2", "loaded", 20_000),
        ("pg_d3", "already_loaded", 20_000),
    ]
    assert totals["rows"] == 20_000
    expected = rows_of(src, "orders")
    for db in (d1, d2, d3):
        # Every row exactly once (orders has a primary key, and the data is equal).
        assert rows_of(db, "orders") == expected
        assert db.execute("SELECT try_number FROM copyman_ledger") == [
            (2 if db is d2 else 1,)
        ]
    state = run.task_state("retry_once", "copyman")
    assert {k: v["try_number"] for k, v in state["destinations"].items()} == {
        "pg_d1:public.orders": 1, "pg_d2:public.orders": 2, "pg_d3:public.orders": 1
    }


# Failures no retry can fix, and bad input: fail on the first try, before writing.


def test_permanent_errors_and_bad_input_fail_at_once(
    pg: PgServers, monkeypatch: pytest.MonkeyPatch, events: Events,
    capfd: pytest.CaptureFixture[str],
) -> None:
    src = pg.database(pg.src, "psrc")
    create_orders(src, 500)
    d1, d2 = pg.database(pg.dst1, "pd1"), pg.database(pg.dst2, "pd2")
    for table in ("orders", "orders_untouched", "orders_leak"):
        create_orders_table(d1, table)
    create_orders_table(d2, "orders")
    create_orders_table(d2, "orders_checked")
    d2.execute("ALTER TABLE orders_checked ADD CHECK (id > 400)")
    d2.execute("CREATE TABLE orders_narrow (id bigint, day date, customer text)")
    _point(monkeypatch, pg_src=src, pg_d1=d1, pg_d2=d2)
    monkeypatch.setenv("AIRFLOW_CONN_NOT_PG", "mysql://shop:mysql-secret-pw@db.example:3306/shop")
    # The test servers run without SSL: requiring it is refused, for good.
    monkeypatch.setenv("AIRFLOW_CONN_PG_SSL", d2.uri() + "?sslmode=require")

    run = run_dag(DAG_FILE, "copyman_test_failures")

    assert run.state == "failed"
    failures = {e["task_id"]: e for e in events if e["event"] == "failure"}
    assert not [e for e in events if e["event"] == "retry"], "no retry may be spent"
    expected_messages = {
        "permanent_mid_copy": ["pg_d2:orders_checked", "violates check constraint",
                               "Loaded: pg_d1:orders (500 rows)"],
        "unknown_conn": ["destination #2 (pg_missing, table orders)",
                         "connection 'pg_missing' is not defined"],
        "not_postgres": ["connection 'not_pg' is of type 'mysql'"],
        "missing_table": ["destination #2 (pg_d2, table public.no_such_table)",
                          'table "public"."no_such_table" does not exist'],
        "column_mismatch": ["destination #2 (pg_d2, table orders_narrow): column count mismatch",
                            "the source has 9 columns", "the destination 3"],
        "bad_sql": ["source pg_src", "SyntaxError [42601]"],
        "leaky_preoperator": ["pg_d2:orders", "RaiseException [P0001]: leak ***"],
        "templated_bad_parameters": ["parameters must be a list", "the string '5'"],
        "ssl_refused": ["destination #2 (pg_ssl", "SSL"],
    }
    for task_id, fragments in expected_messages.items():
        assert run.tis[task_id] == ("failed", 1), task_id
        event = failures[task_id]
        assert "AirflowFailException" in event["bases"], event
        for fragment in fragments:
            assert fragment in event["message"], (task_id, fragment, event["message"])
    # Others go on: the good destination of the mid-copy failure committed.
    assert rows_of(d1, "orders") == rows_of(src, "orders")
    assert d2.scalar("SELECT count(*) FROM orders_checked") == 0
    assert d1.scalar("SELECT count(*) FROM orders_leak") == 500
    # Bad input is found before any destination is written.
    assert d1.scalar("SELECT count(*) FROM orders_untouched") == 0
    assert d1.execute("SELECT task_id FROM copyman_ledger ORDER BY 1") == [
        ("leaky_preoperator",), ("permanent_mid_copy",)
    ]
    # No password in logs, error messages or XCom.
    out, err = capfd.readouterr()
    secrets = [*pg.passwords, "mysql-secret-pw"]
    for text in (out, err, *(e["message"] for e in events)):
        for secret in secrets:
            assert secret not in text
