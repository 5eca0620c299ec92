"""Merge keys with NULLs (issue 15) through the operator: ``key_nulls`` templated in a
destination mapping, its counts in XCom over two runs, and the default's permanent failure
(``dag.test()``, real servers)."""

from __future__ import annotations

import datetime

import pytest
from af_support import LOGICAL_DATE, Events, PgServers, run_dag

pytestmark = pytest.mark.usefixtures("airflow_db")


def test_null_keys_are_matched_when_asked_and_refused_by_default(
    pg: PgServers, monkeypatch: pytest.MonkeyPatch, events: Events
) -> None:
    src, d1, d2 = (pg.database(server, "kn") for server in (pg.src, pg.dst1, pg.dst2))
    src.execute("CREATE TABLE items (id int, v text); "
                "INSERT INTO items VALUES (1, 'a'), (NULL, 'b'), (3, 'c')")
    d1.execute("CREATE TABLE items (id int, v text); INSERT INTO items VALUES (NULL, 'old');"
               "CREATE TABLE refused (id int, v text)")
    d2.execute("CREATE TABLE items (id int, v text)")
    for conn_id, db in (("pg_src", src), ("pg_d1", d1), ("pg_d2", d2)):
        monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", db.uri())

    first = run_dag("copyman_test_dags.py", "copyman_test_key_nulls")
    assert first.tis["nulls_matched"] == ("success", 1), first.tis
    (matched,) = first.xcom("nulls_matched")["destinations"]
    assert (matched["status"], matched["inserted"], matched["updated"]) == ("loaded", 2, 1)
    rows = "SELECT id, v FROM items ORDER BY id NULLS FIRST"
    assert d1.execute(rows) == [(None, "b"), (1, "a"), (3, "c")]

    # The default refuses the NULL key: no retry (permanent), nothing of it committed, the
    # other destination of the task commits.
    assert first.tis["nulls_refused"] == ("failed", 1), first.tis
    (failure,) = events.of("nulls_refused")
    assert failure["exception"] == "CopyManPermanentFailure", failure
    assert "pg_d1:refused: applying the merge: NullKeyError: table " in failure["message"]
    assert "1 row(s) of the source have a NULL in the merge key (id: 1)" in failure["message"]
    assert d1.execute("SELECT count(*) FROM refused") == [(0,)]
    assert d2.execute("SELECT count(*) FROM items") == [(3,)]

    # The next run merges the same rows: nothing changes.
    second = run_dag("copyman_test_dags.py", "copyman_test_key_nulls",
                     LOGICAL_DATE + datetime.timedelta(days=1))
    (again,) = second.xcom("nulls_matched")["destinations"]
    assert (again["status"], again["inserted"], again["updated"]) == ("loaded", 0, 0), again
    assert d1.execute(rows) == [(None, "b"), (1, "a"), (3, "c")]


def test_a_wrong_key_nulls_fails_at_parse_time() -> None:
    from airflow_copyman.operators.copyman import CopyManOperator

    with pytest.raises(ValueError, match="'key_nulls' must be one of 'refuse', 'match'"):
        CopyManOperator(task_id="t", source_conn_id="s", sql="t", destinations=[
            {"conn_id": "d", "table": "t", "mode": "merge", "key": ["id"], "key_nulls": "no"},
        ])
