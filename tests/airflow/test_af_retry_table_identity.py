"""A retry that spells a destination table otherwise is recognised (issue 15, "The ledger
knows tables by identity"): real task runs (``dag.test()``), try 1 names the table
`public.orders` and commits it while the other destination's backend dies, try 2 names it
`orders`;
with the ledger and with ``ledger=False`` (the ``task_state_store`` mirror)."""

from __future__ import annotations

import pytest
from af_support import PgServers, create_orders, create_orders_table, rows_of, run_dag
from test_af_ledger_extras import KILL_ONCE

pytestmark = pytest.mark.usefixtures("airflow_db")

DAG_FILE = "copyman_test_dags.py"


@pytest.mark.parametrize("kind", ["ledger", "store"])
def test_a_retry_spelling_the_table_otherwise_skips_it(
    pg: PgServers, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    src, d1, d2 = (pg.database(s, f"resp{kind[0]}") for s in (pg.src, pg.dst1, pg.dst2))
    create_orders(src, 1000)
    create_orders_table(d1)
    # No primary key on d1: a second load would double the table instead of failing.
    d1.execute("ALTER TABLE orders DROP CONSTRAINT orders_pkey")
    create_orders_table(d2)
    d2.execute(KILL_ONCE)
    for conn_id, db in (("pg_src", src), ("pg_d1", d1), ("pg_d2", d2)):
        monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", db.uri())

    run = run_dag(DAG_FILE, f"copyman_test_respelled_{kind}")

    assert run.tis["respelled"] == ("success", 2), run.tis
    skipped, retried = run.xcom("respelled")["destinations"]
    assert (skipped["table"], skipped["status"]) == ("orders", "already_loaded"), skipped
    assert retried["status"] == "loaded", retried
    assert rows_of(d1, "orders") == rows_of(src, "orders") == rows_of(d2, "orders")
    state = run.task_state("respelled", "copyman")["destinations"]
    assert state["pg_d1:public.orders"]["try_number"] == 1, state
    if kind == "ledger":
        assert d1.execute("SELECT destination, try_number FROM copyman_ledger") == [
            ("public.orders", 1)
        ]
    else:
        assert d1.scalar("SELECT to_regclass('copyman_ledger') IS NULL")
