"""Task runs (``dag.test()``) for issue 9: templated Destination objects and booleans."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from af_support import PgServers, create_orders, create_orders_table, rows_of, run_dag

HERE = Path(__file__).resolve().parent
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


RUNNER = """
import sys, time
sys.path.insert(0, {here!r})
from af_support import run_dag
started = time.monotonic()
run = run_dag("copyman_test_dags.py", "copyman_test_lineage")
print("RUN_RESULT", run.state, run.tis, round(time.monotonic() - started, 1), flush=True)
"""


def test_openlineage_events_without_delay(
    pg: PgServers, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Connections in the metadata database, the OpenLineage console transport (in a
    process of its own, as ``airflow dags test`` runs): START and COMPLETE are emitted, and
    the listener never waits out its timeout (our facets look no connection up: its forked
    process cannot)."""
    pytest.importorskip("airflow.providers.openlineage")
    from airflow.models.connection import Connection
    from airflow.utils.session import create_session

    src = pg.database(pg.src, "olsrc")
    create_orders(src, 100)
    dst = pg.database(pg.dst1, "oldst")
    create_orders_table(dst)
    with create_session() as session:
        for conn_id, db in (("ol_meta_src", src), ("ol_meta_dst", dst)):
            session.query(Connection).filter(Connection.conn_id == conn_id).delete()
            session.add(Connection(conn_id=conn_id, uri=db.uri()))
    env = {
        **os.environ,
        "AIRFLOW__OPENLINEAGE__TRANSPORT": '{"type": "console"}',
        "AIRFLOW__OPENLINEAGE__NAMESPACE": "copyman-tests",
    }
    log = tmp_path / "run.log"
    with log.open("w") as out:
        subprocess.run(
            [sys.executable, "-c", RUNNER.format(here=str(HERE))],
            stdout=out, stderr=subprocess.STDOUT, env=env, timeout=120, check=False,
        )
    text = log.read_text()
    assert "RUN_RESULT success" in text, text[-3000:]
    assert rows_of(dst, "orders") == rows_of(src, "orders")
    assert "expired and will be terminated" not in text
    for kind in ("START", "COMPLETE"):
        assert f"Successfully emitted OpenLineage `{kind}` event" in text, (kind, text[-3000:])
    complete = [
        line for line in text.splitlines()
        if '"eventType": "COMPLETE"' in line and f"{dst.name}.public.orders" in line
    ]
    assert complete and '"rowCount": 100' in complete[0], text[-3000:]
    # A listener waiting out its 10 s timeout would show here (a run takes ~10 s with
    # OpenLineage on, most of it in its own listener; before the fix it took 35 s).
    result_line = next(line for line in text.splitlines() if line.startswith("RUN_RESULT"))
    elapsed = float(result_line.split()[-1])
    assert elapsed < 20, elapsed
