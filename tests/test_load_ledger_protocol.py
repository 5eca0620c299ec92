"""One place decides "loaded already": the ledger a load is handed (``load.LoadLedger``).
Any object with its methods serves; the load asks it before connecting, once connected,
in each load transaction, and after each commit. The ledger table and the Airflow task's
``task_state_store`` record are two such ledgers (tested where they live)."""

from __future__ import annotations

from typing import Any

import psycopg

from airflow_copyman import load
from tests.conftest import Database
from tests.test_readback import endpoint


class DictLedger:
    """A ledger in a dict: label -> rows (what an earlier try recorded)."""

    name = "a dict"
    try_number = 2
    atomic = False

    def __init__(self, before_connecting: dict[str, int], connected: dict[str, int]) -> None:
        self.before_connecting, self.connected = before_connecting, connected
        self.calls: list[tuple[str, str]] = []

    def recorded(self, spec: load.Destination) -> load.Entry | None:
        self.calls.append(("recorded", spec.label))
        rows = self.before_connecting.get(spec.label)
        return None if rows is None else load.Entry("l", 1, rows, 10 * rows)

    def loaded_already(self, conn: psycopg.Connection[Any], slot: load.Slot) -> load.Entry | None:
        self.calls.append(("loaded_already", slot.key))
        rows = self.connected.get(slot.key)
        return None if rows is None else load.Entry("l", 1, rows, 10 * rows)

    def prepare(self, conn: psycopg.Connection[Any], slot: load.Slot) -> None:
        self.calls.append(("prepare", slot.key))

    def claim_load(self, conn: psycopg.Connection[Any], slot: load.Slot) -> load.Entry | None:
        self.calls.append(("claim_load", slot.key))
        return None

    def record_load(
        self, conn: psycopg.Connection[Any], slot: load.Slot, rows: int, nbytes: int,
        extras: load.Extras,
    ) -> load.Entry | None:
        self.calls.append(("record_load", f"{slot.key}:{rows}"))
        return None

    def committed(self, result: load.DestinationResult) -> None:
        self.calls.append(("committed", result.label))


def test_the_ledger_handed_in_decides_what_is_loaded_already(
    pair: tuple[Database, Database],
) -> None:
    source_db, dest_db = pair
    source_db.execute("CREATE TABLE items AS SELECT g AS id FROM generate_series(1, 5) g")
    dest_db.execute("CREATE TABLE a (id int); CREATE TABLE b (id int); CREATE TABLE c (id int)")
    # "gone" refuses connections: recorded before connecting, it is never connected to.
    gone = load.postgres("gone", "host=127.0.0.1 port=1 dbname=x connect_timeout=1")
    ledger = DictLedger({"gone:c": 3}, {"public.b": 4})
    report = load.run(
        endpoint(source_db, "src"), "items",
        [{"conn_id": "dst", "table": "a"}, {"conn_id": "dst", "table": "b"},
         {"conn_id": "gone", "table": "c"}],
        endpoints={"dst": endpoint(dest_db, "dst"), "gone": gone}, ledger=ledger,
    )
    a, b, c = report.destinations
    assert (a.status, a.rows, a.try_number) == ("loaded", 5, 2)
    assert (b.status, b.rows) == ("already_loaded", 4)
    assert (c.status, c.rows) == ("already_loaded", 3)
    assert dest_db.scalar("SELECT count(*) FROM a") == 5
    assert dest_db.scalar("SELECT count(*) FROM b") == 0
    assert ledger.calls == [
        ("recorded", "dst:a"), ("recorded", "dst:b"), ("recorded", "gone:c"),
        ("loaded_already", "public.a"), ("loaded_already", "public.b"),
        ("prepare", "public.a"), ("claim_load", "public.a"),
        ("record_load", "public.a:5"), ("committed", "dst:a"),
    ]
