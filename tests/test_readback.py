"""``verify="checksum"`` by the COPY stream (``copyman._digest``, ``load._readback``) on real
servers: the digest of the rows the engine forwarded equals the digest of the destination's
rows read back as the same COPY, in every format, whatever the sessions' settings and the
rows' order; every changed value, even a subtle one, changes it; through a whole load the
source is read once, a read-back that stalls or is stopped ends."""

from __future__ import annotations

import logging
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from airflow_copyman import copyman, load
from airflow_copyman.copyman import Digest, StreamDigest
from airflow_copyman.load.connection.bounded import BoundedConnection, Bounds, StatementTimeout
from airflow_copyman.load.verify import checksum as ck
from airflow_copyman.load.verify import readback
from airflow_copyman.testing.proxy import TcpProxy
from tests.conftest import pinned

sys.path.insert(0, str(Path(__file__).resolve().parent / "airflow"))
from af_support import Database
from exact_support import LOCAL_TYPE_COLUMNS, SUBTLE, create_types, swaps, type_names

_counter = iter(range(10**6))

#: Changes that keep the value and change only how it is written: each must be seen too.
SAME_VALUE = {
    "numeric bound scale only": "UPDATE {t} SET rn = '(,5.50]' WHERE id = 1",
    "jsonb number scale": """UPDATE {t} SET jb = '{"k": [1, "x", null, 0.00001]}' WHERE id = 1""",
    "float8 -0 in an array": "UPDATE {t} SET a_f = '{NaN,-Infinity,0,1.1}' WHERE id = 1",
}


def read_back(
    dst: psycopg.Connection[Any],
    columns: list[str],
    fmt: str,
    settings: dict[str, str] | None,
    *,
    whole_table: bool = False,
) -> Digest:
    """The digest of the rows ``dst``'s transaction wrote into ``types`` (or all of them)."""
    where = None if whole_table else ck.this_transaction(dst)
    (got,) = readback.digests(
        [(dst, readback.query(dst, sql.Identifier("types"), columns, where, fmt))],
        settings,
        Bounds(60.0),
    )
    assert isinstance(got, Digest), got
    return got


def plan_of_read_back(dst: psycopg.Connection[Any], columns: list[str], fmt: str) -> str:
    """EXPLAIN of the read-back's SELECT, under the read-back's own settings."""
    statement = readback.query(dst, sql.Identifier("types"), columns, None, fmt).as_string(dst)
    select = statement[len("COPY (") : statement.rindex(") TO STDOUT")]
    dst.execute("SAVEPOINT plan")
    for name, value in readback.PARALLEL.items():
        dst.execute(sql.SQL("SET LOCAL {} = {}").format(sql.Identifier(name), value))
    plan = "\n".join(row[0] for row in dst.execute(f"EXPLAIN {select}").fetchall())  # type: ignore[arg-type]
    dst.execute("ROLLBACK TO SAVEPOINT plan")
    return plan


def copy_types(
    src: psycopg.Connection[Any], dst: psycopg.Connection[Any], columns: list[str], fmt: str
) -> Digest:
    """COPY the type table through the engine (newest row first), digesting it."""
    producer = copyman.StatementProducer(
        src,
        f"COPY (SELECT {', '.join(columns)} FROM types ORDER BY id DESC) TO STDOUT "
        f"(FORMAT {fmt})",
        digest=True,
    )
    copyman.transfer(producer, (dst, f"COPY types ({', '.join(columns)}) FROM STDIN "
                                      f"(FORMAT {fmt})"))
    sent = producer.digest()
    assert sent is not None
    return sent


def columns_for(fmt: str) -> list[str]:
    # Binary carries local types' OIDs: the engine never sends those in binary.
    return [c for c in type_names() if fmt != "binary" or c not in LOCAL_TYPE_COLUMNS]


@pytest.mark.parametrize("fmt", ["text", "csv", "binary"])
def test_the_rows_sent_digest_as_the_destination_holds_them(
    pair: tuple[Database, Database], fmt: str
) -> None:
    source_db, dest_db = pair
    create_types(source_db, fill=True)
    create_types(dest_db)
    columns = columns_for(fmt)
    with (
        pinned(source_db, options="-c TimeZone=Asia/Kathmandu -c bytea_output=escape") as src,
        pinned(dest_db, options="-c TimeZone=Pacific/Chatham") as dst,
    ):
        sent = copy_types(src, dst, columns, fmt)
        # Rows read back in another order than sent: the first row sent (id 4, with the
        # binary header before it) moves to the end of the table.
        dst.execute("UPDATE types SET id = id WHERE id = 4")
        settings = None if fmt == "binary" else readback.render_settings(src)
        held = read_back(dst, columns, fmt, settings)
        assert held == sent and sent.rows == 4, (held, sent)
        # And rendered by parallel workers (each type's send or output function in the
        # read-back's SELECT), as a large table is: the same bytes.
        dst.execute("SET min_parallel_table_scan_size = 0")
        assert "Gather" in plan_of_read_back(dst, columns, fmt)
        held = read_back(dst, columns, fmt, settings)
        assert held == sent and sent.rows == 4, (held, sent)
        assert sent.layout == ("binary" if fmt == "binary" else "text")
        # The read-back's settings were its own (a savepoint): the session's are back.
        assert dst.execute("SHOW TimeZone").fetchone() == ("Pacific/Chatham",)
        assert dst.execute("SHOW bytea_output").fetchone() == ("hex",)
        if fmt != "binary":
            # Rendered in the destination's own settings, the text would differ: the
            # source's settings are what make the two comparable.
            assert read_back(dst, columns, fmt, None) != sent
        dst.rollback()


@pytest.mark.parametrize("fmt", ["text", "binary"])
def test_every_changed_value_changes_the_digest(pair: tuple[Database, Database], fmt: str) -> None:
    source_db, dest_db = pair
    create_types(source_db, fill=True)
    create_types(dest_db)
    columns = columns_for(fmt)
    changes = swaps(source_db, columns)
    changes.update(SUBTLE)
    changes.update(SAME_VALUE)
    changes["a duplicated row"] = "INSERT INTO {t} SELECT * FROM {t} WHERE id = 3 LIMIT 1"
    changes["a missing row"] = "DELETE FROM {t} WHERE id = 4"
    with pinned(source_db) as src, pinned(dest_db) as dst:
        sent = copy_types(src, dst, columns, fmt)
        settings = None if fmt == "binary" else readback.render_settings(src)
        assert read_back(dst, columns, fmt, settings) == sent
        assert read_back(dst, columns, fmt, settings, whole_table=True) == sent
        dst.execute("ALTER TABLE types DROP CONSTRAINT types_pkey")  # for the duplicate
        missed = []
        for name, statement in changes.items():
            dst.execute("SAVEPOINT change")
            dst.execute(statement.replace("{t}", "types"))  # type: ignore[arg-type]
            # The whole table: rows a savepoint changed carry its own xid.
            if read_back(dst, columns, fmt, settings, whole_table=True) == sent:
                missed.append(name)
            dst.execute("ROLLBACK TO SAVEPOINT change")
        dst.rollback()
    assert missed == []


def test_the_binary_wrapping_is_no_row() -> None:
    """The header (whatever its extension area) and the trailer count as no row: an empty
    binary stream digests as nothing, and the first row as any other."""
    signature = b"PGCOPY\n\xff\r\n\x00" + bytes(4)
    row_a, row_b, trailer = b"\x00\x01\x00\x00\x00\x01a", b"\x00\x01\x00\x00\x00\x01b", b"\xff\xff"

    def digest(*messages: bytes) -> Digest:
        d = StreamDigest()
        d.add(messages)
        return d.digest()

    plain = digest(signature + bytes(4) + row_a, row_b, trailer)
    assert plain == digest(signature + (3).to_bytes(4, "big") + b"ext" + row_b, row_a, trailer)
    assert plain.rows == 2 and plain.layout == "binary"
    assert digest(signature + bytes(4) + trailer) == Digest(0, 0, "binary")
    assert digest() == Digest(0, 0, "text")
    assert digest(b"a\n", b"b\n") == digest(b"b\n", b"a\n") != digest(b"a\n", b"a\n")
    assert plain - digest(signature + bytes(4) + row_a, trailer) == digest(
        signature + bytes(4) + row_b, trailer
    )


# Through a whole load (airflow_copyman.load, no Airflow).


def endpoint(db: Database, name: str, port: int | None = None) -> load.Endpoint:
    address = db.address
    return load.postgres(
        name,
        address.conninfo(db.name).replace(f"port={address.port}", f"port={port or address.port}"),
    )


def seq_scans(db: Database, table: str, after: int = -1) -> int:
    """The table's sequential scans, once the counters show more than ``after`` (a backend
    reports its counts when it exits, shortly after its connection closes)."""
    deadline = time.monotonic() + 10
    while True:
        with db.connect(autocommit=True) as conn:
            row = conn.execute(
                "SELECT seq_scan FROM pg_stat_user_tables WHERE relname = %s", [table]
            ).fetchone()
        count = int(row[0]) if row else 0
        if count > after or time.monotonic() > deadline:
            return count
        time.sleep(0.2)


def test_the_source_is_read_once_and_a_query_of_random_values_verifies(
    pair: tuple[Database, Database],
) -> None:
    source_db, dest_db = pair
    source_db.execute("CREATE TABLE items AS SELECT g AS id, 'v' || g AS v "
                      "FROM generate_series(1, 20000) g")
    dest_db.execute("CREATE TABLE items (id int, v text); CREATE TABLE wide (id bigint, v text);"
                    "CREATE TABLE noise (id int, r float8);"
                    "CREATE TABLE noise8 (id bigint, r float8)")
    src, dst = endpoint(source_db, "src"), endpoint(dest_db, "dst")
    before = seq_scans(source_db, "items")

    report = load.run(src, "items", [{"conn_id": "dst", "table": "items"}],
                      endpoints={"dst": dst}, verify="checksum")
    (result,) = report.destinations
    assert (result.status, result.rows) == ("loaded", 20000), result
    assert result.checksum is not None and result.checksum.startswith("20000:copy-binary:")
    # One scan: the COPY's. The checksum read nothing more of the source.
    assert seq_scans(source_db, "items", before) == before + 1
    # A column of another type (int into bigint) is compared by its text: the source's query
    # runs again for that, a second scan.
    report = load.run(src, "items", [{"conn_id": "dst", "table": "wide"}],
                      endpoints={"dst": dst}, verify="checksum")
    assert report.destinations[0].checksum.startswith("20000:row-text:")  # type: ignore[union-attr]
    assert seq_scans(source_db, "items", before + 1) == before + 3

    # Rows that change at every run verify by their stream (read once)...
    noise = "SELECT g AS id, random() AS r FROM generate_series(1, 5000) g"
    report = load.run(src, noise, [{"conn_id": "dst", "table": "noise"}],
                      endpoints={"dst": dst}, verify="checksum")
    assert report.destinations[0].status == "loaded", report
    # ... and fail, as documented, where the source's query must run twice.
    report = load.run(src, noise, [{"conn_id": "dst", "table": "noise8"}],
                      endpoints={"dst": dst}, verify="checksum")
    (failed,) = report.destinations
    assert (failed.status, failed.permanent) == ("failed", True), failed
    assert "ChecksumMismatch" in (failed.error or "") and "random()" in (failed.error or "")
    assert dest_db.scalar("SELECT count(*) FROM noise8") == 0


def test_text_loads_render_as_the_source_session_does(pair: tuple[Database, Database]) -> None:
    """A source session in another time zone and bytea output than the destination's: the
    text read-back renders as the source did, in every mode, and the load verifies."""
    source_db, dest_db = pair
    source_db.execute(f"ALTER DATABASE {source_db.name} SET TimeZone = 'Asia/Tokyo';"
                      f"ALTER DATABASE {source_db.name} SET bytea_output = 'escape'")
    dest_db.execute(f"ALTER DATABASE {dest_db.name} SET TimeZone = 'America/New_York'")
    source_db.execute(
        "CREATE TABLE ev AS SELECT g AS id, timestamptz '2024-03-10 01:30+00' + g * interval "
        "'7 hours' AS at, decode(md5(g::text), 'hex') AS b FROM generate_series(1, 3000) g"
    )
    for table in ("ev_a", "ev_r", "ev_m"):
        dest_db.execute(f"CREATE TABLE {table} (id int, at timestamptz, b bytea)")
    dest_db.execute("INSERT INTO ev_m (id) SELECT generate_series(1, 300)")
    report = load.run(
        endpoint(source_db, "src"), "ev",
        [{"conn_id": "dst", "table": "ev_a"},
         {"conn_id": "dst", "table": "ev_r", "mode": "replace", "replace_with": "delete"},
         {"conn_id": "dst", "table": "ev_m", "mode": "merge", "key": ["id"]}],
        endpoints={"dst": endpoint(dest_db, "dst")}, format="text", verify="checksum",
    )
    assert [(d.status, d.checksum) for d in report.destinations] == [
        ("loaded", report.destinations[0].checksum)
    ] * 3, report
    assert str(report.destinations[0].checksum).startswith("3000:copy-text:")


class _OnCopied(logging.Handler):
    """Runs ``action`` once, when the load logs that its COPY is done (the read-back next)."""

    def __init__(self, action: Any) -> None:
        super().__init__()
        self.action = action

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("Done: source") and self.action is not None:
            action, self.action = self.action, None
            action()


def _logger(action: Any) -> logging.Logger:
    log = logging.getLogger(f"test_readback.{next(_counter)}")
    log.setLevel(logging.INFO)
    log.addHandler(_OnCopied(action))
    return log


def test_a_read_back_that_stalls_times_out_and_rolls_back(pair: tuple[Database, Database]) -> None:
    source_db, dest_db = pair
    source_db.execute("CREATE TABLE items AS SELECT g AS id FROM generate_series(1, 1000) g")
    dest_db.execute("CREATE TABLE items (id int)")
    with TcpProxy(dest_db.address.host, dest_db.address.port) as proxy:
        started = time.monotonic()
        report = load.run(
            endpoint(source_db, "src"), "items", [{"conn_id": "dst", "table": "items"}],
            endpoints={"dst": endpoint(dest_db, "dst", proxy.port)}, verify="checksum",
            receiver_timeout=2, log=_logger(lambda: proxy.set("to_client", "stall")),
        )
        elapsed = time.monotonic() - started
        proxy.forward_all()
    (failed,) = report.destinations
    assert (failed.status, failed.permanent) == ("failed", False), failed
    assert "verifying the checksum" in (failed.error or ""), failed
    # The statement that found the link stalled says so (the read-back's own deadline is
    # test_a_read_back_without_data_ends_at_its_deadline).
    assert "from the server within 2 s" in (failed.error or ""), failed
    assert elapsed < 20, elapsed
    assert dest_db.scalar("SELECT count(*) FROM items") == 0


def test_a_stop_during_the_read_back_ends_it(pair: tuple[Database, Database]) -> None:
    source_db, dest_db = pair
    source_db.execute("CREATE TABLE items AS SELECT g AS id FROM generate_series(1, 1000) g")
    dest_db.execute("CREATE TABLE items (id int)")
    with TcpProxy(dest_db.address.host, dest_db.address.port) as proxy:
        transfer: load.Transfer

        def stall_then_stop() -> None:
            proxy.set("to_client", "stall")
            threading.Timer(0.5, transfer.cancel).start()

        transfer = load.Transfer(
            endpoint(source_db, "src"), "items", [{"conn_id": "dst", "table": "items"}],
            endpoints={"dst": endpoint(dest_db, "dst", proxy.port)}, verify="checksum",
            log=_logger(stall_then_stop),
        )
        started = time.monotonic()
        report = transfer.run()
        elapsed = time.monotonic() - started
        proxy.forward_all()
    (failed,) = report.destinations
    assert failed.status == "failed", failed
    assert "stopped" in (failed.error or "") or "killed" in (failed.error or ""), failed
    assert elapsed < 15, elapsed  # not the 300 s receiver timeout
    assert dest_db.scalar("SELECT count(*) FROM items") == 0


def test_a_read_back_error_is_the_servers(pair: tuple[Database, Database]) -> None:
    _, dest_db = pair
    with pinned(dest_db) as dst:
        dst.execute("CREATE TABLE t AS SELECT 1 AS id")
        with pytest.raises(psycopg.errors.UndefinedColumn, match="no column 'nope'"):
            readback.query(dst, sql.Identifier("t"), ["nope"], None, "binary")
        (got,) = readback.digests(
            [(dst, readback.query(dst, sql.Identifier("t"), ["id"], sql.SQL("r.id / 0 = 1"),
                                   "binary"))],
            None,
            Bounds(10.0),
        )
        assert isinstance(got, psycopg.errors.DivisionByZero), got
        dst.rollback()


def test_a_read_back_without_data_ends_at_its_deadline(pair: tuple[Database, Database]) -> None:
    """A server whose rows do not come (busy: here sleeping on every row) is cancelled at the
    deadline; its connection stays usable, and the other read was not held up."""
    _, dest_db = pair
    dest_db.execute("CREATE TABLE t AS SELECT g AS id FROM generate_series(1, 100000) g")
    with pinned(dest_db) as dst, pinned(dest_db) as other:
        busy = sql.SQL("pg_sleep(5) IS NOT NULL")
        reads = [
            (dst, readback.query(dst, sql.Identifier("t"), ["id"], busy, "binary")),
            (other, readback.query(other, sql.Identifier("t"), ["id"], None, "binary")),
        ]
        started = time.monotonic()
        slow, fine = readback.digests(reads, None, Bounds(1.0))
        elapsed = time.monotonic() - started
        assert isinstance(slow, StatementTimeout), slow
        assert "no data from the server within 1 s" in str(slow)
        assert isinstance(fine, Digest) and fine.rows == 100000, fine
        assert elapsed < 1 + 2, elapsed  # the deadline, then at most the cancel's own wait
        dst.rollback()  # the cancel ended the statement: the connection is usable
        assert dst.execute("SELECT 1").fetchone() == (1,)


def test_a_read_back_whose_link_stalls_is_abandoned(pair: tuple[Database, Database]) -> None:
    """A link that stalls mid-read (the server's replies held, a cancel unanswerable): the
    read ends at the deadline plus the cancel's wait, its connection closed."""
    _, dest_db = pair
    dest_db.execute("CREATE TABLE t AS SELECT g AS id FROM generate_series(1, 100000) g")
    with TcpProxy(dest_db.address.host, dest_db.address.port) as proxy:
        conninfo = dest_db.address.conninfo(dest_db.name).replace(
            f"port={dest_db.address.port}", f"port={proxy.port}"
        )
        with BoundedConnection.connect(conninfo) as dst:
            dst.bounds = Bounds(1.0)
            # The first row comes after the deadline; the link stalls long before that, so
            # the cancel's reply is held too.
            late = sql.SQL("r.id <> 1 OR pg_sleep(2) IS NOT NULL")
            reads = [(dst, readback.query(dst, sql.Identifier("t"), ["id"], late, "binary"))]
            dst.execute("SELECT 1")  # in a transaction, as a load's read-back is
            threading.Timer(0.2, proxy.set, ("to_client", "stall")).start()
            started = time.monotonic()
            (got,) = readback.digests(reads, None, dst.bounds)
            elapsed = time.monotonic() - started
            proxy.forward_all()
            assert isinstance(got, StatementTimeout), got
            assert "within 1 s" in str(got)
            assert elapsed < 1 + 2 + 2 + 1, elapsed
            assert dst.closed


def encoded(server: Any, encoding: str) -> Database:
    name = f"rb{encoding.lower()}_{next(_counter)}"
    with psycopg.connect(server.address.conninfo(), autocommit=True) as admin:
        admin.execute(
            f"CREATE DATABASE {name} ENCODING '{encoding}' LC_COLLATE 'C' LC_CTYPE 'C' "  # type: ignore[arg-type]
            "TEMPLATE template0"
        )
    return Database(server, name)


TEXTS = {
    "EUC_JP": ["日本語のテキスト", "ｶﾀｶﾅ と ひらがな", "表示 ソ 能"],
    "LATIN1": ["déjà vu", "Grüße, ¤ ½ ÿ", "naïve façade"],
}


@pytest.mark.parametrize("encoding", ["EUC_JP", "LATIN1"])
@pytest.mark.parametrize("fmt", ["text", "binary"])
def test_databases_in_other_encodings_verify_by_their_stream(
    server: Any, encoding: str, fmt: str
) -> None:
    """The COPY stream is UTF-8 on both sides (the pinned client encoding): a source and a
    destination in LATIN1 or EUC_JP verify, as a UTF8 destination does. The by-text method
    hashes the servers' own text and needs UTF8: a destination that would use it is refused
    before anything moves."""
    source, same, utf8 = encoded(server, encoding), encoded(server, encoding), encoded(
        server, "UTF8"
    )
    rows = ", ".join(f"({i}, '{text}')" for i, text in enumerate(TEXTS[encoding] * 100))
    with source.connect(client_encoding="UTF8") as conn:
        conn.execute(f"CREATE TABLE t (id int, s text); INSERT INTO t VALUES {rows}")  # type: ignore[arg-type]
    for db in (same, utf8):
        db.execute("CREATE TABLE t (id int, s text); CREATE TABLE wide (id bigint, s text)")
    endpoints = {"same": endpoint(same, "same"), "utf8": endpoint(utf8, "utf8")}
    report = load.run(
        endpoint(source, "src"), "t",
        [{"conn_id": "same", "table": "t"}, {"conn_id": "utf8", "table": "t"}],
        endpoints=endpoints, format=fmt, verify="checksum",
    )
    loaded = [(d.status, d.checksum) for d in report.destinations]
    assert loaded == [("loaded", loaded[0][1])] * 2, report
    assert str(loaded[0][1]).startswith(f"300:copy-{fmt}:")
    for db in (source, same, utf8):
        with db.connect(client_encoding="UTF8") as conn:
            assert [r[0] for r in conn.execute("SELECT s FROM t ORDER BY id LIMIT 3")] == (
                TEXTS[encoding]
            )
    with pytest.raises(load.ConfigError, match=f"needs UTF8 databases .*{encoding}"):
        load.run(endpoint(source, "src"), "t", [{"conn_id": "utf8", "table": "wide"}],
                 endpoints=endpoints, verify="checksum")
    assert utf8.scalar("SELECT count(*) FROM wide") == 0
