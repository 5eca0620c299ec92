"""Tables known by identity, not spelling (issue 15): the ledger keys a destination by the
table its server resolved, so a retry spelling it otherwise is ``already_loaded``; ledger
rows of earlier versions (keyed by the spelling) are still found; two destinations of one
load creating one new table (two spellings, two connection ids) are refused before anything
moves. Real loads through ``load.run``."""

from __future__ import annotations

import itertools
import time
from typing import Any

import psycopg
import pytest

from airflow_copyman import load
from airflow_copyman.testing.servers import ContainerServer, LocalServer, create_database

_names = itertools.count()
Server = LocalServer | ContainerServer


class Pair:
    """A source database holding ``src(id, v)`` (ids 1..2), and a destination database
    reachable as ``wh`` and as ``wh2``."""

    def __init__(self, server: Server) -> None:
        n = next(_names)
        self.names = (f"ident_src_{n}", f"ident_dst_{n}")
        for name in self.names:
            create_database(server.address, name)
        self.src_info, self.dst_info = (server.address.conninfo(x) for x in self.names)
        with psycopg.connect(self.src_info, autocommit=True) as conn:
            conn.execute("CREATE TABLE src AS SELECT g AS id, 'v' || g AS v "
                         "FROM generate_series(1, 2) g")

    def dst(self, statement: str, params: Any = None) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.dst_info, autocommit=True) as conn:
            cur = conn.execute(statement, params)  # type: ignore[arg-type]
            return cur.fetchall() if cur.description else []

    def run(
        self, *destinations: load.Destination, ledger: load.Ledger | None = None,
        receiver_timeout: float = 300.0,
    ) -> load.TransferReport:
        return load.run(
            load.postgres("src", self.src_info), "src", list(destinations),
            endpoints={name: load.postgres(name, self.dst_info) for name in ("wh", "wh2")},
            ledger=ledger, receiver_timeout=receiver_timeout,
        )


@pytest.fixture
def pair(server: Server) -> Pair:
    return Pair(server)


def _ledger(try_number: int) -> load.Ledger:
    return load.Ledger(None, load.TaskKey("dag", "task", "run", -1, "lineage-1", try_number))


def test_a_retry_spelling_the_table_otherwise_is_already_loaded(pair: Pair) -> None:
    pair.dst("CREATE TABLE ledt (id int, v text)")
    first = pair.run(load.Destination("wh", "ledt"), ledger=_ledger(1))
    assert [d.status for d in first.destinations] == ["loaded"]
    for try_number, spelling in enumerate(['public.ledt', '"public"."ledt"', "PUBLIC.LEDT"], 2):
        again = pair.run(load.Destination("wh", spelling), ledger=_ledger(try_number))
        (result,) = again.destinations
        assert (result.status, result.try_number) == ("already_loaded", 1), (spelling, result)
    assert pair.dst("SELECT count(*) FROM ledt") == [(2,)]
    # One row, keyed by the table as the server names it.
    assert pair.dst(
        "SELECT destination, try_number, table_oid = 'ledt'::regclass FROM copyman_ledger"
    ) == [("public.ledt", 1, True)]


def test_a_ledger_row_of_an_earlier_version_keyed_by_the_spelling_is_still_found(
    pair: Pair,
) -> None:
    pair.dst("CREATE TABLE ledt (id int, v text); INSERT INTO ledt VALUES (1, 'v1'), (2, 'v2')")
    with psycopg.connect(pair.dst_info) as conn:
        assert _ledger(1).ensure_table(conn, "public") is True
    # What an earlier version recorded for "ledt": the spelling, quoted.
    pair.dst(
        "INSERT INTO copyman_ledger (dag_id, task_id, run_id, map_index, conn_id, destination,"
        " lineage, try_number, rows, bytes) VALUES"
        " ('dag', 'task', 'run', -1, 'wh', '\"ledt\"', 'lineage-1', 1, 2, 20)"
    )
    report = pair.run(load.Destination("wh", "ledt"), ledger=_ledger(2))
    (result,) = report.destinations
    assert (result.status, result.try_number, result.rows) == ("already_loaded", 1, 2), result
    assert pair.dst("SELECT count(*) FROM ledt") == [(2,)]


@pytest.mark.parametrize(
    "second",
    [("wh", "public.newt"), ("wh2", "newt")],
    ids=["two spellings", "two connection ids"],
)
def test_two_destinations_creating_one_new_table_are_refused_before_anything_moves(
    pair: Pair, second: tuple[str, str]
) -> None:
    conn_id, table = second
    started = time.monotonic()
    with pytest.raises(load.ConfigError) as raised:
        pair.run(
            load.Destination("wh", "newt", create="if_missing"),
            load.Destination(conn_id, table, create="if_missing"),
            # Bounds the second CREATE's wait behind the first's if the check misses it.
            receiver_timeout=3.0,
        )
    assert time.monotonic() - started < 10
    message = str(raised.value)
    assert "destination #2" in message and "the same table as destination #1" in message, message
    assert "newt" in message, message
    assert pair.dst("SELECT to_regclass('public.newt')") == [(None,)]


def test_two_new_tables_of_one_name_in_two_schemas_both_load(pair: Pair) -> None:
    pair.dst("CREATE SCHEMA other")
    report = pair.run(
        load.Destination("wh", "newt", create="if_missing"),
        load.Destination("wh2", "other.newt", create="if_missing"),
        ledger=_ledger(1),
    )
    assert [d.status for d in report.destinations] == ["loaded", "loaded"]
    # Each ledger row names its table as created, and its OID (taken once it existed).
    for schema in ("public", "other"):
        assert pair.dst(
            f"SELECT destination, table_oid = '{schema}.newt'::regclass "
            f"FROM {schema}.copyman_ledger"
        ) == [(f"{schema}.newt", True)]
