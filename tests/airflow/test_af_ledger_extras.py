"""A destination loaded by an earlier try reports what that try measured (a merge's
``inserted`` and ``updated``, ``verify="checksum"``'s checksum): kept in the ledger row, or
in the ``task_state_store`` mirror without a ledger. Real task runs (``dag.test()``) on real
servers: try 1 commits the merge while the other destination's backend dies; try 2 skips it
as ``already_loaded``."""

from __future__ import annotations

from typing import Any

import pytest
from af_support import (
    OLD_LEDGER,
    OLD_LEDGER_COLUMNS,
    Database,
    PgServers,
    create_orders,
    create_orders_table,
    rows_of,
    run_dag,
)
from test_af_assets import _events, _uri

pytestmark = pytest.mark.usefixtures("airflow_db")

DAG_FILE = "copyman_test_dags.py"

KILL_ONCE = """
CREATE SEQUENCE kill_once;
CREATE FUNCTION kill_me() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- A sequence is not transactional: only the first try's backend dies.
    IF NEW.id = 500 AND nextval('kill_once') = 1 THEN
        PERFORM pg_terminate_backend(pg_backend_pid());
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER kill_me BEFORE INSERT ON orders FOR EACH ROW EXECUTE FUNCTION kill_me();
"""

def _setup(pg: PgServers, monkeypatch: pytest.MonkeyPatch, prefix: str) -> tuple[Database, ...]:
    src, d1, d2 = (pg.database(s, prefix) for s in (pg.src, pg.dst1, pg.dst2))
    create_orders(src, 1000)
    create_orders_table(d1)
    create_orders_table(d2)
    # A tenth of the keys exist: try 1's merge updates 100 rows and inserts 900 (a merge
    # applied again by try 2 would update 1000).
    d1.execute("INSERT INTO orders (id, day) SELECT g, '2020-01-01' FROM generate_series(1, 100) g")
    d2.execute(KILL_ONCE)
    for conn_id, db in (("pg_src", src), ("pg_d1", d1), ("pg_d2", d2)):
        monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", db.uri())
    return src, d1, d2


def _columns(db: Database, schema: str) -> list[str]:
    return [
        r[0] for r in db.execute(
            "SELECT column_name::text FROM information_schema.columns WHERE table_schema = %s "
            "AND table_name = 'copyman_ledger' ORDER BY ordinal_position", [schema],
        )
    ]


def _retried(dag: str, src: Database, d1: Database, d2: Database) -> list[dict[str, Any]]:
    """Run the DAG: try 1 commits d1 (the merge), d2's backend dies; try 2 loads d2."""
    run = run_dag(DAG_FILE, dag)
    assert run.tis["extras"] == ("success", 2), run.tis
    assert rows_of(d1, "orders") == rows_of(src, "orders") == rows_of(d2, "orders")
    merged, flaky = run.xcom("extras")["destinations"]
    assert (merged["status"], merged["mode"]) == ("already_loaded", "merge"), merged
    assert flaky["status"] == "loaded", flaky
    # Try 2 verified d2: the same rows, the same checksum as try 1's merge had.
    assert flaky["checksum"].startswith("1000:copy-binary:"), flaky
    run_entries: list[dict[str, Any]] = [merged, flaky]
    state = run.task_state("extras", "copyman")["destinations"]
    run_entries.append(state["pg_d1:public.orders"])
    return run_entries


def _event_extra(db: Database) -> dict[str, Any]:
    (event,) = _events(_uri(db, "public", "orders"))
    extra: dict[str, Any] = event["extra"]
    return extra


def test_a_retry_reports_what_the_loading_try_measured_from_the_ledger(
    pg: PgServers, monkeypatch: pytest.MonkeyPatch
) -> None:
    src, d1, d2 = _setup(pg, monkeypatch, "xl")

    merged, flaky, stored = _retried("copyman_test_extras_ledger", src, d1, d2)

    # The ledger row try 1 wrote in its load transaction holds what it measured.
    ((try_number, inserted, updated, checksum),) = d1.execute(
        "SELECT try_number, inserted, updated, checksum FROM copyman_ledger"
    )
    assert (try_number, inserted, updated) == (1, 900, 100)
    assert checksum == flaky["checksum"]
    # Try 2 skipped d1 and reports try 1's numbers: in XCom, in the asset event, and in
    # the task_state_store mirror.
    measured = {"try_number": 1, "inserted": 900, "updated": 100, "checksum": checksum}
    assert {k: merged.get(k) for k in ("inserted", "updated", "checksum")} == {
        k: measured[k] for k in ("inserted", "updated", "checksum")
    }, merged
    assert {k: _event_extra(d1).get(k) for k in measured} == measured
    assert {k: stored.get(k) for k in measured} == measured, stored
    # d2's ledger row (written by try 2) has its checksum too; an append counts no merge.
    assert d2.execute("SELECT try_number, inserted, updated, checksum FROM copyman_ledger") == [
        (2, None, None, flaky["checksum"])
    ]


def test_a_ledger_table_of_an_earlier_version_works_without_the_extras(
    pg: PgServers, monkeypatch: pytest.MonkeyPatch
) -> None:
    src, d1, d2 = _setup(pg, monkeypatch, "xo")
    for db in (d1, d2):
        db.execute(OLD_LEDGER)

    merged, flaky, _ = _retried("copyman_test_extras_old_ledger", src, d1, d2)

    # Never altered: the old table records the loads without the extras...
    for db in (d1, d2):
        assert _columns(db, "old") == OLD_LEDGER_COLUMNS
        assert _columns(db, "public") == []
    assert d1.execute("SELECT try_number, rows FROM old.copyman_ledger") == [(1, 1000)]
    assert d2.execute("SELECT try_number, rows FROM old.copyman_ledger") == [(2, 1000)]
    # ... so the skipped destination reports none (as before), the loaded one its own.
    assert (merged["inserted"], merged["updated"], merged.get("checksum")) == (None, None, None)
    assert merged["rows"] == 1000
    assert flaky["checksum"].startswith("1000:copy-binary:")
    extra = _event_extra(d1)
    assert extra["try_number"] == 1 and not {"inserted", "updated", "checksum"} & set(extra)


def test_without_a_ledger_the_state_store_restores_what_the_loading_try_measured(
    pg: PgServers, monkeypatch: pytest.MonkeyPatch
) -> None:
    src, d1, d2 = _setup(pg, monkeypatch, "xs")

    merged, flaky, stored = _retried("copyman_test_extras_store", src, d1, d2)

    assert d1.scalar("SELECT to_regclass('copyman_ledger') IS NULL")
    # Try 1 recorded d1 in task_state_store as it committed; try 2 restored it from there.
    measured = {"try_number": 1, "inserted": 900, "updated": 100, "checksum": flaky["checksum"]}
    assert {k: stored.get(k) for k in measured} == measured, stored
    assert {k: merged.get(k) for k in ("inserted", "updated", "checksum")} == {
        k: measured[k] for k in ("inserted", "updated", "checksum")
    }, merged
    assert {k: _event_extra(d1).get(k) for k in measured} == measured
