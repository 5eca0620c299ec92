"""Waits that end and stops that stop, on the servers too (issue 9, the engine's part).

Every test here ends with each connection usable after a rollback (``SELECT 1``), unless
the server itself ended it.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable

import psycopg
import pytest

from airflow_copyman import copyman
from airflow_copyman.testing.proxy import TcpProxy
from airflow_copyman.testing.servers import ContainerServer, LocalServer
from tests.conftest import Databases
from tests.data import count, create_table, fill_source, fingerprint

Server = LocalServer | ContainerServer


def out_sql(table: str = "items") -> str:
    return f"COPY {table} TO STDOUT"


def in_sql(table: str = "items") -> str:
    return f"COPY {table} FROM STDIN"


def assert_usable(conn: psycopg.Connection) -> None:
    """Not closed, not busy, and answers a statement after a rollback."""
    assert not conn.closed
    assert conn.info.transaction_status != psycopg.pq.TransactionStatus.ACTIVE
    conn.rollback()
    assert conn.execute("SELECT 1").fetchone() == (1,)
    conn.rollback()


def copying(admin: psycopg.Connection, pid: int) -> bool:
    """Whether the backend still runs a statement (its COPY)."""
    row = admin.execute("SELECT state FROM pg_stat_activity WHERE pid = %s", [pid]).fetchone()
    return row is not None and row[0] == "active"


def waiting_for_lock(admin: psycopg.Connection, pid: int) -> bool:
    row = admin.execute(
        "SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", [pid]
    ).fetchone()
    return row is not None and row[0] == "Lock"


def cancel_later(manager: copyman.CopyManager, when: Callable[[], bool]) -> list[float]:
    """Call ``manager.cancel()`` from another thread once ``when()`` holds; the time it did."""
    called: list[float] = []

    def run() -> None:
        deadline = time.monotonic() + 30
        while not when() and time.monotonic() < deadline:
            time.sleep(0.01)
        called.append(time.monotonic())
        manager.cancel()

    threading.Thread(target=run, daemon=True).start()
    return called


@pytest.fixture
def source(dbs: Databases) -> psycopg.Connection:
    conn = dbs.new("src")
    fill_source(conn, 20_000)
    return conn


@pytest.fixture
def big_source(dbs: Databases) -> psycopg.Connection:
    conn = dbs.new("src")
    fill_source(conn, 150_000)
    return conn


# A source that stops sending.


def test_stalled_source_faults_and_the_copy_aborts_cleanly(
    dbs: Databases, big_source: psycopg.Connection, server: Server
) -> None:
    (dest,) = [dbs.new("dst")]
    create_table(dest)
    a = server.address
    with TcpProxy(a.host, a.port) as proxy:
        src = psycopg.connect(
            host=proxy.host, port=proxy.port, user=a.user, password=a.password,
            dbname=big_source.info.dbname,
        )
        dbs.connections.append(src)
        manager = copyman.CopyManager(
            copyman.StatementProducer(src, out_sql()),
            copyman.StatementReceiver(dest, in_sql()),
            producer_timeout=1.0,
        )
        with pytest.raises(copyman.CopyFail) as failed, manager:
            next(manager)
            proxy.set("to_client", "stall")  # the link stays open, nothing arrives
            stalled = time.monotonic()
            with pytest.raises(copyman.ProducerFault) as fault:
                for _ in manager:
                    pass
            assert time.monotonic() - stalled < 10
            cause = fault.value.__cause__
            assert isinstance(cause, copyman.ProducerTimeout)
            assert isinstance(cause, TimeoutError)
            assert "StatementProducer(" in str(cause) and "moved nothing for 1 s" in str(cause)
            proxy.set("to_client", "forward")  # the server answers the abort again
            raise fault.value
        assert isinstance(failed.value.producer_fault, copyman.ProducerTimeout)
        assert not failed.value.receiver_faults  # the destination is not blamed
        assert_usable(src)
        assert_usable(dest)
        assert count(dest) == 0


# cancel() from another thread stops busy servers.


def _slow_rows(conn: psycopg.Connection, seconds: float = 0.01) -> None:
    conn.execute(
        "CREATE FUNCTION slow() RETURNS trigger LANGUAGE plpgsql AS "
        f"$$ BEGIN PERFORM pg_sleep({seconds}); RETURN NEW; END $$"
    )
    conn.execute("CREATE TRIGGER slow BEFORE INSERT ON items FOR EACH ROW EXECUTE FUNCTION slow()")
    conn.commit()


def test_cancel_stops_a_busy_destination_on_its_server(
    dbs: Databases, source: psycopg.Connection
) -> None:
    busy, locked, other = dbs.new("dst"), dbs.new("dst"), dbs.new("dst")
    for conn in (busy, locked, other):
        create_table(conn)
    _slow_rows(busy)  # 10 ms a row: 20,000 rows would take minutes
    holder = connect_like(locked, dbs)
    holder.execute("INSERT INTO items (id) VALUES (5)")  # uncommitted: row 5 waits on it
    admin = dbs.new("admin", autocommit=True)
    pids = [busy.info.backend_pid, locked.info.backend_pid]
    manager = copyman.CopyManager(
        copyman.StatementProducer(source, out_sql()),
        *[copyman.StatementReceiver(c, in_sql()) for c in (busy, locked, other)],
    )
    with pytest.raises(copyman.CopyFail) as failed, manager:
        next(manager)
        called = cancel_later(manager, lambda: waiting_for_lock(admin, pids[1]))
        with pytest.raises(copyman.Cancelled):
            for _ in manager:
                pass
        raise copyman.Cancelled("cancelled")
    stopped = time.monotonic() - called[0]
    assert stopped < 2, f"the copy took {stopped:.1f} s to stop"
    for pid in pids:
        assert not copying(admin, pid)  # gone from the server, not only from the client
    assert not failed.value.receiver_faults
    for conn in (source, busy, locked, other):
        assert_usable(conn)
    holder.rollback()
    assert count(busy) == count(locked) == count(other) == 0


def test_cancel_while_a_copy_waits_for_a_lock_to_start(
    dbs: Databases, source: psycopg.Connection
) -> None:
    free, locked = dbs.new("dst"), dbs.new("dst")
    for conn in (free, locked):
        create_table(conn)
    locker = connect_like(locked, dbs)
    locker.execute("LOCK TABLE items IN ACCESS EXCLUSIVE MODE")  # held until rollback
    admin = dbs.new("admin", autocommit=True)
    manager = copyman.CopyManager(
        copyman.StatementProducer(source, out_sql()),
        copyman.StatementReceiver(free, in_sql()),
        copyman.StatementReceiver(locked, in_sql()),
    )
    called = cancel_later(manager, lambda: copying(admin, locked.info.backend_pid))
    with pytest.raises(copyman.CopyFail, match="cancelled while its COPYs started") as failed:
        with manager:
            pytest.fail("the copy must not start")
    assert isinstance(failed.value.__cause__, copyman.Cancelled)
    assert time.monotonic() - called[0] < 2
    locker.rollback()
    for conn in (source, free, locked):
        assert_usable(conn)
        conn.execute("SELECT pg_sleep(0.2)")  # a late cancel request would hit this
        conn.rollback()


def connect_like(conn: psycopg.Connection, dbs: Databases) -> psycopg.Connection:
    from airflow_copyman.testing.servers import connect

    new = connect(dbs.server.address, conn.info.dbname)
    dbs.connections.append(new)
    return new


def test_cancel_as_a_copy_ends_reads_its_result(dbs: Databases) -> None:
    """CopyDone sent, the result not yet read: the connection is kept, not closed."""
    src, dest = dbs.new("src"), dbs.new("dst")
    fill_source(src, 100)
    create_table(dest)
    dest.execute(
        "CREATE FUNCTION slow_end() RETURNS trigger LANGUAGE plpgsql AS "
        "$$ BEGIN PERFORM pg_sleep(5); RETURN NULL; END $$"
    )
    dest.execute(
        "CREATE TRIGGER slow_end AFTER INSERT ON items "
        "FOR EACH STATEMENT EXECUTE FUNCTION slow_end()"
    )
    dest.commit()
    admin = dbs.new("admin", autocommit=True)
    producer = copyman.StatementProducer(src, out_sql())
    receiver = copyman.StatementReceiver(dest, in_sql())
    manager = copyman.CopyManager(producer, receiver)

    def ending() -> bool:
        # Every row sent and the end of the COPY with it: the server runs its trigger.
        return producer.done and receiver.rows == 100 and copying(admin, dest.info.backend_pid)

    called = cancel_later(manager, ending)
    with pytest.raises(copyman.CopyFail) as failed, manager:
        with pytest.raises(copyman.Cancelled):
            for _ in manager:
                pass
        raise copyman.Cancelled("cancelled")
    assert time.monotonic() - called[0] < 2
    assert not failed.value.receiver_faults
    assert_usable(dest)
    assert count(dest) == 0


def test_cancel_at_random_moments_never_hits_the_next_statement(dbs: Databases) -> None:
    src, first, second = dbs.new("src"), dbs.new("dst"), dbs.new("dst")
    fill_source(src, 50)
    for conn in (first, second):
        create_table(conn)
    rng = random.Random(9)
    outcomes = {"completed": 0, "cancelled": 0}
    started = time.monotonic()
    for _ in range(200):
        manager = copyman.CopyManager(
            copyman.StatementProducer(src, out_sql()),
            copyman.StatementReceiver(first, in_sql()),
            copyman.StatementReceiver(second, in_sql()),
        )
        timer = threading.Timer(rng.uniform(0, 0.01), manager.cancel)
        timer.start()
        try:
            manager.run()
            outcomes["completed"] += 1
        except copyman.CopyFail as failed:
            assert isinstance(failed.__cause__, copyman.Cancelled), failed
            outcomes["cancelled"] += 1
        for conn in (src, first, second):
            conn.rollback()
            # Long enough for a stray cancel request to land in it (the timer may still
            # be about to fire: a cancel() after the copy must do nothing at all).
            conn.execute("SELECT pg_sleep(0.003)")
            conn.rollback()
        timer.join()
    assert time.monotonic() - started < 60
    # Cancels landed before, during and after the COPYs (a copy here takes a few ms).
    assert outcomes["cancelled"] >= 10, outcomes
    assert count(first) == count(second) == 0


# A receiver stalled while its server is still there.


def test_receiver_on_a_row_lock_times_out_with_its_connection_usable(
    dbs: Databases, big_source: psycopg.Connection
) -> None:
    fast, blocked = dbs.new("dst"), dbs.new("dst")
    for conn in (fast, blocked):
        create_table(conn)
    holder = connect_like(blocked, dbs)
    holder.execute("INSERT INTO items (id) VALUES (5)")  # uncommitted: row 5 waits on it
    receivers = [copyman.StatementReceiver(c, in_sql()) for c in (fast, blocked)]
    faults: dict[copyman.Receiver, BaseException] = {}
    with copyman.CopyManager(
        copyman.StatementProducer(big_source, out_sql()), *receivers, receiver_timeout=1.0
    ) as manager:
        while True:
            try:
                for _ in manager:
                    pass
                break
            except copyman.ReceiverFault as fault:
                faults.update(fault.faults)
                # Usable at once, while the copy goes on: its COPY already ended and
                # the connection is released (a held lock would hang a rollback here).
                assert blocked.lock.acquire(blocking=False)
                blocked.lock.release()
                assert_usable(blocked)
    assert list(faults) == [receivers[1]]
    assert isinstance(faults[receivers[1]], copyman.ReceiverTimeout)
    assert manager.completed == {receivers[0]}
    fast.commit()
    assert fingerprint(fast) == fingerprint(big_source)
    assert_usable(blocked)  # its COPY was cancelled and read to its end, not closed
    holder.rollback()
    assert count(blocked) == 0


# The server's own words.


def test_source_terminated_mid_copy_keeps_the_servers_error(
    dbs: Databases, big_source: psycopg.Connection
) -> None:
    dests = [dbs.new("dst") for _ in range(2)]
    for conn in dests:
        create_table(conn)
    admin = dbs.new("admin", autocommit=True)
    pid = big_source.info.backend_pid
    with pytest.raises(copyman.CopyFail) as failed:
        with copyman.CopyManager(
            copyman.StatementProducer(big_source, out_sql()),
            *[copyman.StatementReceiver(d, in_sql()) for d in dests],
        ) as manager:
            next(manager)
            admin.execute("SELECT pg_terminate_backend(%s)", [pid])
            with pytest.raises(copyman.ProducerFault) as fault:
                for _ in manager:
                    pass
            raise fault.value
    error = failed.value.producer_fault
    assert isinstance(error, psycopg.errors.AdminShutdown), repr(error)
    assert error.sqlstate == "57P01"
    assert "terminating connection due to administrator command" in str(error)
    assert "StatementProducer(" in str(fault.value)  # the source is named
    assert not failed.value.receiver_faults  # the destinations are not blamed
    for conn in dests:
        assert_usable(conn)
        assert count(conn) == 0


def test_a_rejected_row_keeps_the_servers_diagnostics(
    dbs: Databases, source: psycopg.Connection
) -> None:
    dest = dbs.new("dst")
    create_table(dest)
    dest.execute("INSERT INTO items (id) VALUES (5)")
    dest.commit()
    receiver = copyman.StatementReceiver(dest, in_sql())
    faults: dict[copyman.Receiver, BaseException] = {}
    with pytest.raises(copyman.CopyFail):
        with copyman.CopyManager(copyman.StatementProducer(source, out_sql()), receiver) as m:
            try:
                for _ in m:
                    pass
            except copyman.ReceiverFault as fault:
                faults.update(fault.faults)
    error = faults[receiver]
    assert isinstance(error, psycopg.errors.UniqueViolation)
    assert error.diag.message_detail == "Key (id)=(5) already exists."
    assert "COPY items, line 5" in (error.diag.context or "")
    assert_usable(dest)



@pytest.mark.parametrize(
    ("option", "value"),
    [("receiver_timeout", 0), ("receiver_timeout", "5"), ("producer_timeout", -1),
     ("producer_timeout", True), ("queue_bytes", None)],
)
def test_time_outs_and_sizes_must_be_positive_numbers(option: str, value: object) -> None:
    with pytest.raises(copyman.CopyUsageError, match=f"{option} must be a positive number"):
        copyman.CopyManager(copyman.NullProducer(), copyman.NullReceiver(), **{option: value})
