"""Task runs (``dag.test()``) for issue 9: templated Destination objects and booleans."""

from __future__ import annotations

import pytest
from af_support import PgServers, create_orders, create_orders_table, rows_of, run_dag

pytestmark = pytest.mark.usefixtures("airflow_db")


def test_destination_objects_and_booleans_are_templated(
    pg: PgServers, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = pg.database(pg.src, "tmsrc")
    create_orders(src, 50)
    d1, d2 = pg.database(pg.dst1, "tmd1"), pg.database(pg.dst2, "tmd2")
    create_orders_table(d1, "orders_obj")
    # The preoperator (a string on a Destination object, templated) deletes id >= 3 only.
    d1.execute("INSERT INTO orders_obj (id, day) VALUES (-1, '2020-01-01'), (5, '2020-01-01')")
    create_orders_table(d2, "orders")
    d2.execute("INSERT INTO orders (id, day) VALUES (9999, '2020-01-01')")
    for conn_id, db in (("pg_src", src), ("pg_d1", d1), ("pg_d2", d2)):
        monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", db.uri())

    run = run_dag("copyman_test_dags.py", "copyman_test_templating")

    assert run.tis["templated_objects"] == ("success", 1), run.tis
    expected = rows_of(src, "orders", where="WHERE id <= 10")
    got = rows_of(d1, "orders_obj")
    assert got[0][0] == -1 and got[1:] == expected
    # "{{ params.full_refresh }}" rendered as "True": the truncate ran.
    assert rows_of(d2, "orders") == expected
    totals = run.xcom("templated_objects")
    assert [d["table"] for d in totals["destinations"]] == ["orders_obj", "orders"]
