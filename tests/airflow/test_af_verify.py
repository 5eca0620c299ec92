"""``verify="checksum"`` (issue 10): real task runs (``dag.test()``) on real servers: a
checksum in every mode, in XCom and in the asset events' extras; a destination whose trigger
alters one value fails for good and rolls back while the other destination commits."""

from __future__ import annotations

from typing import Any

import pytest
from af_support import Events, PgServers, create_orders, create_orders_table, rows_of, run_dag
from test_af_assets import _events, _uri

pytestmark = pytest.mark.usefixtures("airflow_db")

ALTER_ONE_VALUE = """
CREATE FUNCTION alter_one() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.id = 7 THEN
        NEW.amount := NEW.amount + 1;
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER alter_one BEFORE INSERT ON orders_altered FOR EACH ROW
    EXECUTE FUNCTION alter_one();
"""


def test_checksums_verified_in_every_mode_and_a_mismatch_fails_only_its_table(
    pg: PgServers, monkeypatch: pytest.MonkeyPatch, events: Events
) -> None:
    src, d1, d2 = pg.database(pg.src, "vsrc"), pg.database(pg.dst1, "vd1"), pg.database(
        pg.dst2, "vd2"
    )
    create_orders(src, 1000)
    for db, table in ((d1, "orders"), (d1, "orders_replaced"), (d1, "orders_altered"),
                      (d2, "orders"), (d2, "orders_plain")):
        create_orders_table(db, table)
    d1.execute("INSERT INTO orders (id, day) VALUES (-2, '2020-01-01')")  # stays (append)
    # An append without a preoperator: its checksum covers only the rows it inserted.
    d2.execute("INSERT INTO orders_plain (id, day) VALUES (-3, '2020-01-01')")
    d1.execute("INSERT INTO orders_replaced (id, day) VALUES (5000, '2020-01-01')")  # goes
    # A tenth of the keys exist (updated), the rest are inserted.
    d2.execute("INSERT INTO orders (id, day) SELECT g, '2020-01-01' FROM generate_series(1, 100) g")
    d1.execute(ALTER_ONE_VALUE)
    for conn_id, db in (("pg_src", src), ("pg_d1", d1), ("pg_d2", d2)):
        monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", db.uri())

    run = run_dag("copyman_test_dags.py", "copyman_test_verify")

    # Every mode verified: the same rows of the same types have the same checksum.
    assert run.tis["verified"] == ("success", 1), run.tis
    entries = run.xcom("verified")["destinations"]
    assert [(e["table"], e["mode"], e["status"]) for e in entries] == [
        ("orders", "append", "loaded"), ("orders_replaced", "replace", "loaded"),
        ("orders", "merge", "loaded"),
    ]
    checksums = {e["checksum"] for e in entries}
    # All by their COPY stream (the same types on both sides): the source was read once.
    assert len(checksums) == 1 and next(iter(checksums)).startswith("1000:copy-binary:"), entries
    assert rows_of(d1, "orders", where="WHERE id > 0") == rows_of(src, "orders")
    assert d1.execute("SELECT id FROM orders WHERE id < 0 ORDER BY id") == [(-2,), (-1,)]
    assert rows_of(d1, "orders_replaced") == rows_of(src, "orders")
    assert rows_of(d2, "orders") == rows_of(src, "orders")
    # And in each table's asset event, for a downstream DAG that reads no XCom.
    for db, table, mode in ((d1, "orders_replaced", "replace"), (d2, "orders", "merge"),
                            (d1, "orders", "append")):
        (event,) = _events(_uri(db, "public", table))
        extra: dict[str, Any] = event["extra"]
        assert (extra["mode"], extra["checksum"]) == (mode, entries[0]["checksum"]), extra

    # One altered value: that table fails for good (no retry), nothing of it committed;
    # the other destination of the task commits.
    assert run.tis["altered"] == ("failed", 1), run.tis
    assert d1.execute("SELECT count(*) FROM orders_altered") == [(0,)]
    assert rows_of(d2, "orders_plain", where="WHERE id > 0") == rows_of(src, "orders")
    assert d2.execute("SELECT count(*) FROM orders_plain WHERE id < 0") == [(1,)]
    (failure,) = events.of("altered")
    assert failure["exception"] == "CopyManPermanentFailure", failure
    message = failure["message"]
    assert "pg_d1:orders_altered: verifying the checksum: ChecksumMismatch: table " in message
    assert 'table "orders_altered": the checksum of the rows loaded' in message, message
    assert "Loaded: pg_d2:orders_plain (1000 rows)" in message, message
    # Both checksums: the table's, then the source's (the one every mode above verified).
    sums = [
        part.split(")")[0] for part in message.split("(1000 rows, copy-binary hash sum ")[1:]
    ]
    assert len(sums) == 2 and sums[0] != sums[1], message
    assert f"1000:copy-binary:{sums[1]}" == entries[0]["checksum"], message
    assert not _events(_uri(d1, "public", "orders_altered"))


@pytest.mark.parametrize("value", ["sha256", "Checksum", None, True])
def test_a_wrong_verify_fails_at_parse_time(value: Any) -> None:
    from airflow_copyman.operators.copyman import CopyManOperator

    with pytest.raises(ValueError, match="verify must be one of 'count', 'checksum'"):
        CopyManOperator(task_id="t", source_conn_id="s", sql="t",
                        destinations=[{"conn_id": "d", "table": "t"}], verify=value)
