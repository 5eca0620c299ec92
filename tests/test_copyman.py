"""The copy engine against real PostgreSQL servers: data, counts, faults, clean failures."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator

import psycopg
import pytest

from airflow_copyman import copyman
from airflow_copyman.testing.servers import connect
from tests.conftest import Databases
from tests.data import count, create_table, fill_source, fingerprint

FORMATS = ["text", "csv", "binary"]


def out_sql(fmt: str = "text", table: str = "items") -> str:
    return f"COPY {table} TO STDOUT (FORMAT {fmt})"


def in_sql(fmt: str = "text", table: str = "items") -> str:
    return f"COPY {table} FROM STDIN (FORMAT {fmt})"


def stream_size(conn: psycopg.Connection, sql: str) -> int:
    """The COPY stream's size as psycopg's own reader sees it."""
    with conn.cursor().copy(sql) as cp:
        size = sum(len(data) for data in cp)
    conn.rollback()
    return size


def assert_usable_and_empty(conn: psycopg.Connection, table: str = "items") -> None:
    """After a failure: the connection works after a rollback and holds none of the data."""
    assert conn.info.transaction_status != psycopg.pq.TransactionStatus.ACTIVE
    conn.rollback()
    assert count(conn, table) == 0


def reopen(dbname: str, dbs: Databases) -> psycopg.Connection:
    """A new connection to a database of the shared server."""
    new = connect(dbs.server.address, dbname)
    dbs.connections.append(new)
    return new


def run_with_faults(manager: copyman.CopyManager, on_cycle=None) -> dict:  # type: ignore[no-untyped-def]
    """Iterate to the end, trapping receiver faults; return them."""
    faults: dict = {}
    moved = 0
    while True:
        try:
            for rows, _ in manager:
                moved += rows
                if on_cycle is not None:
                    on_cycle(moved)
            return faults
        except copyman.ReceiverFault as fault:
            assert fault.manager is manager
            faults.update(fault.faults)


@pytest.fixture
def source(dbs: Databases) -> psycopg.Connection:
    conn = dbs.new("src")
    fill_source(conn, 20_000)
    return conn


def destinations(dbs: Databases, n: int, table: str = "items") -> list[psycopg.Connection]:
    conns = [dbs.new("dst") for _ in range(n)]
    for conn in conns:
        create_table(conn, table)
    return conns


# Moving data.


@pytest.mark.parametrize("fanout", [1, 3])
@pytest.mark.parametrize("fmt", FORMATS)
def test_transfer_copies_every_row_exactly(
    dbs: Databases, source: psycopg.Connection, fmt: str, fanout: int
) -> None:
    dests = destinations(dbs, fanout)
    rows, nbytes = copyman.transfer(
        (source, out_sql(fmt)), *[(d, in_sql(fmt)) for d in dests]
    )
    for d in dests:
        d.commit()
    assert rows == 20_000
    assert nbytes == stream_size(source, out_sql(fmt))
    expected = fingerprint(source)
    for d in dests:
        assert fingerprint(d) == expected


@pytest.mark.parametrize("fmt", FORMATS)
def test_cycle_counts_sum_to_the_servers_counts(
    dbs: Databases, source: psycopg.Connection, fmt: str
) -> None:
    (dest,) = destinations(dbs, 1)
    producer = copyman.StatementProducer(source, out_sql(fmt))
    receiver = copyman.StatementReceiver(dest, in_sql(fmt))
    with copyman.CopyManager(producer, receiver) as manager:
        cycles = list(manager)
    assert len(cycles) > 1  # batched, not one cycle a row nor one for everything
    assert sum(c[0] for c in cycles) == producer.rows == producer.server_rows == 20_000
    assert sum(c[1] for c in cycles) == producer.bytes
    assert receiver.server_rows == receiver.rows == 20_000
    assert manager.completed == {receiver}
    assert not manager.faults


def test_query_with_parameters_and_composed_sql(dbs: Databases, source: psycopg.Connection) -> None:
    (dest,) = destinations(dbs, 1)
    query = psycopg.sql.SQL(
        "COPY (SELECT * FROM items WHERE id <= %s) TO STDOUT (FORMAT binary)"
    )
    rows, _ = copyman.transfer(
        copyman.StatementProducer(source, query, [100]),
        copyman.StatementReceiver(dest, psycopg.sql.SQL(in_sql("binary"))),
    )
    dest.commit()
    assert rows == 100 == count(dest)


def test_iterator_to_call_receiver_needs_no_database() -> None:
    chunks = [[b"a\n", b"bb\n"], [], [b"ccc\n"]]
    got: list[list[bytes]] = []
    receiver = copyman.CallReceiver(got.append)
    with copyman.CopyManager(copyman.IteratorProducer(chunks), receiver) as manager:
        cycles = list(manager)
    assert cycles == [(2, 5), (1, 4)]
    assert got == [[b"a\n", b"bb\n"], [b"ccc\n"]]
    assert receiver.completed and receiver.rows == 3


def test_iterator_into_a_table_and_table_into_a_callable(dbs: Databases) -> None:
    dest = dbs.new("dst")
    dest.execute("CREATE TABLE pairs (id int, name text)")
    dest.commit()
    lines = ([f"{i}\tname {i}\n".encode() for i in range(j, j + 100)] for j in range(0, 1000, 100))
    rows, _ = copyman.transfer(copyman.IteratorProducer(lines), (dest, in_sql(table="pairs")))
    dest.commit()
    assert rows == 1000 == count(dest, "pairs")

    got: list[bytes] = []
    rows, _ = copyman.transfer((dest, out_sql(table="pairs")), copyman.CallReceiver(got.extend))
    assert rows == 1000 and len(got) == 1000 and got[0] == b"0\tname 0\n"


def test_binary_header_and_trailer_are_not_rows() -> None:
    header = b"PGCOPY\n\xff\r\n\x00" + bytes(8)
    row = b"\x00\x01\x00\x00\x00\x01x"
    chunks = [[header], [row, row], [b"\xff\xff"]]
    producer = copyman.IteratorProducer(chunks)
    with copyman.CopyManager(producer, copyman.NullReceiver()) as manager:
        assert list(manager) == [(0, 19), (2, 14), (0, 2)]
    assert producer.rows == 2


@pytest.mark.parametrize("fmt", FORMATS)
def test_zero_rows(dbs: Databases, fmt: str) -> None:
    src = dbs.new("src")
    create_table(src)
    dests = destinations(dbs, 2)
    producer = copyman.StatementProducer(src, out_sql(fmt))
    receivers = [copyman.StatementReceiver(d, in_sql(fmt)) for d in dests]
    with copyman.CopyManager(producer, *receivers) as manager:
        list(manager)
    assert producer.rows == 0 and producer.server_rows == 0
    assert all(r.completed and r.server_rows == 0 for r in receivers)


@pytest.mark.parametrize("fmt", ["text", "binary"])
def test_zero_column_tables(dbs: Databases, fmt: str) -> None:
    src, dest = dbs.new("src"), dbs.new("dst")
    src.execute("CREATE TABLE nothing ()")
    src.execute("INSERT INTO nothing SELECT FROM generate_series(1, 5)")
    src.commit()
    dest.execute("CREATE TABLE nothing ()")
    dest.commit()
    rows, _ = copyman.transfer(
        (src, out_sql(fmt, "nothing")), (dest, in_sql(fmt, "nothing"))
    )
    dest.commit()
    assert rows == 5 == count(dest, "nothing")


# Receiver faults: the failed receiver leaves, the others finish.


@pytest.fixture
def big_source(dbs: Databases) -> psycopg.Connection:
    conn = dbs.new("src")
    fill_source(conn, 150_000)
    return conn


def test_destination_backend_terminated_mid_copy(
    dbs: Databases, big_source: psycopg.Connection
) -> None:
    dests = destinations(dbs, 3)
    admin = dbs.new("admin", autocommit=True)
    victim_pid, victim_db = dests[1].info.backend_pid, dests[1].info.dbname
    receivers = [copyman.StatementReceiver(d, in_sql()) for d in dests]
    killed: list[int] = []

    def kill(moved: int) -> None:
        if moved > 20_000 and not killed:
            admin.execute("SELECT pg_terminate_backend(%s)", [victim_pid])
            killed.append(moved)

    with copyman.CopyManager(copyman.StatementProducer(big_source, out_sql()), *receivers) as m:
        faults = run_with_faults(m, kill)
    assert list(faults) == [receivers[1]]
    assert isinstance(faults[receivers[1]], psycopg.OperationalError)
    assert m.completed == {receivers[0], receivers[2]}
    for d in (dests[0], dests[2]):
        d.commit()
        assert fingerprint(d) == fingerprint(big_source)
    # The server is still there: a new connection sees nothing of the aborted load.
    assert dests[1].closed  # the server ended that session: nothing to roll back
    assert count(reopen(victim_db, dbs)) == 0


def test_destination_server_stopped_mid_copy(
    dbs: Databases, big_source: psycopg.Connection, spare_server
) -> None:  # type: ignore[no-untyped-def]
    first, second = destinations(dbs, 2)
    doomed = dbs.new("dst", server=spare_server, autocommit=True)
    create_table(doomed)
    doomed.execute("CHECKPOINT")  # throwaway servers commit asynchronously: make it durable
    doomed.autocommit = False
    receivers = [copyman.StatementReceiver(d, in_sql()) for d in (first, doomed, second)]
    stopped: list[int] = []

    def stop(moved: int) -> None:
        if moved > 20_000 and not stopped:
            spare_server.stop("immediate")
            stopped.append(moved)

    with copyman.CopyManager(copyman.StatementProducer(big_source, out_sql()), *receivers) as m:
        faults = run_with_faults(m, stop)
    assert list(faults) == [receivers[1]]
    assert "had been sent" in "".join(getattr(faults[receivers[1]], "__notes__", []))
    for d in (first, second):
        d.commit()
        assert fingerprint(d) == fingerprint(big_source)
    spare_server.start()
    with connect(spare_server.address, doomed.info.dbname) as again:
        assert count(again) == 0


def test_destination_rejecting_a_row(dbs: Databases, source: psycopg.Connection) -> None:
    good, strict = destinations(dbs, 2)
    strict.execute("INSERT INTO items (id) VALUES (5)")  # the source's row 5 will collide
    strict.commit()
    receivers = [copyman.StatementReceiver(d, in_sql()) for d in (good, strict)]
    with copyman.CopyManager(copyman.StatementProducer(source, out_sql()), *receivers) as m:
        faults = run_with_faults(m)
    assert isinstance(faults[receivers[1]], psycopg.errors.UniqueViolation)
    good.commit()
    assert fingerprint(good) == fingerprint(source)
    strict.rollback()
    assert count(strict) == 1  # only its own row: nothing of the copy


def test_column_mismatch_is_that_receivers_fault(
    dbs: Databases, source: psycopg.Connection
) -> None:
    (good,) = destinations(dbs, 1)
    narrow = dbs.new("dst")
    narrow.execute("CREATE TABLE items (id bigint, ts timestamptz)")
    narrow.commit()
    receivers = [copyman.StatementReceiver(d, in_sql()) for d in (good, narrow)]
    with copyman.CopyManager(copyman.StatementProducer(source, out_sql()), *receivers) as m:
        faults = run_with_faults(m)
    assert isinstance(faults[receivers[1]], psycopg.errors.BadCopyFileFormat)
    assert "extra data" in str(faults[receivers[1]])
    good.commit()
    assert count(good) == 20_000
    assert_usable_and_empty(narrow)


def test_call_receiver_that_fails_once_is_reconciled(
    dbs: Databases, source: psycopg.Connection
) -> None:
    (dest,) = destinations(dbs, 1)
    got: list[bytes] = []
    calls = []

    def flaky(records: list[bytes]) -> None:
        calls.append(len(records))
        if len(calls) == 2:
            raise ConnectionResetError("flaky sink")
        got.extend(records)

    flaky_receiver = copyman.CallReceiver(flaky)
    statement_receiver = copyman.StatementReceiver(dest, in_sql())
    producer = copyman.StatementProducer(source, out_sql())
    reconciled = 0
    with copyman.CopyManager(producer, flaky_receiver, statement_receiver) as manager:
        while True:
            try:
                for _ in manager:
                    pass
                break
            except copyman.ReceiverFault as fault:
                assert isinstance(fault.faults[flaky_receiver], ConnectionResetError)
                assert flaky_receiver not in manager.receivers
                manager.reconcile(flaky_receiver)
                reconciled += 1
    assert reconciled == 1
    dest.commit()
    assert len(got) == 20_000  # nothing lost, nothing twice
    assert {int(line.split(b"\t", 1)[0]) for line in got} == set(range(1, 20_001))
    assert manager.completed == {flaky_receiver, statement_receiver}


def test_reconcile_refuses_what_it_cannot_make_whole(
    dbs: Databases, source: psycopg.Connection
) -> None:
    (dest,) = destinations(dbs, 1)
    dest.execute("INSERT INTO items (id) VALUES (1)")
    dest.commit()
    failing = copyman.CallReceiver(lambda records: 1 / 0)
    statement_receiver = copyman.StatementReceiver(dest, in_sql())
    stranger = copyman.NullReceiver()
    with pytest.raises(copyman.CopyFail), copyman.CopyManager(
        copyman.StatementProducer(source, out_sql()), failing, statement_receiver
    ) as manager:
        with pytest.raises(copyman.CopyUsageError, match="not a receiver of this copy"):
            manager.reconcile(stranger)
        next(manager)
        with pytest.raises(copyman.ReceiverFault):
            next(manager)
        next(manager)  # the copy moves on without the failed receiver...
        with pytest.raises(copyman.CopyUsageError, match="moved on"):
            manager.reconcile(failing)  # ...so it can no longer be made whole
        faults = run_with_faults(manager)
        with pytest.raises(copyman.CopyUsageError, match="aborted when it faulted"):
            manager.reconcile(statement_receiver)
        assert list(faults) == [statement_receiver]
        raise RuntimeError("leave")


def test_unreconciled_fault_does_not_fail_the_others(
    dbs: Databases, source: psycopg.Connection
) -> None:
    (dest,) = destinations(dbs, 1)
    failing = copyman.CallReceiver(lambda records: 1 / 0)
    with copyman.CopyManager(
        copyman.StatementProducer(source, out_sql()),
        failing,
        copyman.StatementReceiver(dest, in_sql()),
    ) as manager:
        faults = run_with_faults(manager)  # __exit__ raises nothing: one receiver completed
    assert isinstance(faults[failing], ZeroDivisionError)
    dest.commit()
    assert count(dest) == 20_000


def test_every_receiver_faulting_fails_the_copy(dbs: Databases, source: psycopg.Connection) -> None:
    with pytest.raises(copyman.CopyFail, match="no receivers left") as info:
        with copyman.CopyManager(
            copyman.StatementProducer(source, out_sql()),
            copyman.CallReceiver(lambda records: 1 / 0),
        ) as manager:
            run_with_faults(manager)
    assert all(isinstance(e, ZeroDivisionError) for e in info.value.receiver_faults.values())
    source.rollback()
    assert count(source) == 20_000


def test_stalled_receiver_times_out_while_the_others_finish(
    dbs: Databases, big_source: psycopg.Connection
) -> None:
    fast, stalled = destinations(dbs, 2)
    pid, stalled_db = stalled.info.backend_pid, stalled.info.dbname
    receivers = [copyman.StatementReceiver(d, in_sql()) for d in (fast, stalled)]
    stopped: list[int] = []

    def stall(moved: int) -> None:
        if not stopped:
            os.kill(pid, signal.SIGSTOP)  # the backend stops reading: its socket fills up
            stopped.append(moved)

    try:
        with copyman.CopyManager(
            copyman.StatementProducer(big_source, out_sql()), *receivers, receiver_timeout=1.0
        ) as manager:
            faults = run_with_faults(manager, stall)
    finally:
        os.kill(pid, signal.SIGCONT)
    assert isinstance(faults[receivers[1]], copyman.ReceiverTimeout)
    fast.commit()
    assert count(fast) == 150_000
    assert count(reopen(stalled_db, dbs)) == 0


# Producer faults and failed copies: nothing partial is ever kept.


def test_producer_iterator_raises(dbs: Databases) -> None:
    (dest,) = destinations(dbs, 1)
    dest.execute("DROP TABLE items")
    dest.execute("CREATE TABLE items (id int)")
    dest.commit()

    def chunks() -> Iterator[list[bytes]]:
        yield [b"1\n", b"2\n"]
        raise ValueError("upstream broke")

    receiver = copyman.StatementReceiver(dest, in_sql())
    with pytest.raises(copyman.CopyFail) as failed:
        with copyman.CopyManager(copyman.IteratorProducer(chunks()), receiver) as manager:
            assert next(manager) == (2, 4)
            with pytest.raises(copyman.ProducerFault) as fault:
                next(manager)
            assert isinstance(fault.value.__context__, ValueError)
            assert "upstream broke" in str(fault.value)
            raise fault.value
    assert isinstance(failed.value.producer_fault, ValueError)
    assert_usable_and_empty(dest)


def test_source_backend_terminated_mid_copy(
    dbs: Databases, big_source: psycopg.Connection
) -> None:
    dests = destinations(dbs, 2)
    admin = dbs.new("admin", autocommit=True)
    pid = big_source.info.backend_pid
    with pytest.raises(copyman.CopyFail) as failed:
        with copyman.CopyManager(
            copyman.StatementProducer(big_source, out_sql()),
            *[copyman.StatementReceiver(d, in_sql()) for d in dests],
        ) as manager:
            moved = 0
            with pytest.raises(copyman.ProducerFault) as fault:
                for rows, _ in manager:
                    moved += rows
                    if moved > 20_000 and pid:
                        admin.execute("SELECT pg_terminate_backend(%s)", [pid])
                        pid = 0
            assert isinstance(fault.value.__context__, psycopg.OperationalError)
            raise fault.value
    assert failed.value.producer_fault is not None
    for d in dests:
        assert_usable_and_empty(d)


def test_loop_broken_early_aborts_everything(
    dbs: Databases, big_source: psycopg.Connection
) -> None:
    dests = destinations(dbs, 2)
    with pytest.raises(copyman.CopyFail, match="abandoned"):
        with copyman.CopyManager(
            copyman.StatementProducer(big_source, out_sql()),
            *[copyman.StatementReceiver(d, in_sql()) for d in dests],
        ) as manager:
            for _ in manager:
                break
    for d in dests:
        assert_usable_and_empty(d)
    big_source.rollback()
    assert count(big_source) == 150_000  # the source connection works again


@pytest.mark.parametrize("exc_type", [RuntimeError, KeyboardInterrupt])
def test_exception_in_with_block_aborts_everything(
    dbs: Databases, source: psycopg.Connection, exc_type: type[BaseException]
) -> None:
    dests = destinations(dbs, 2)
    with pytest.raises(copyman.CopyFail, match=exc_type.__name__) as failed:
        with copyman.CopyManager(
            copyman.StatementProducer(source, out_sql()),
            *[copyman.StatementReceiver(d, in_sql()) for d in dests],
        ) as manager:
            next(manager)
            raise exc_type("stop")
    assert isinstance(failed.value.__cause__, exc_type)
    for d in dests:
        assert_usable_and_empty(d)
    source.rollback()
    assert count(source) == 20_000


def test_cancel_from_another_thread(dbs: Databases, big_source: psycopg.Connection) -> None:
    dests = destinations(dbs, 2)
    manager = copyman.CopyManager(
        copyman.StatementProducer(big_source, out_sql()),
        *[copyman.StatementReceiver(d, in_sql()) for d in dests],
    )
    with pytest.raises(copyman.CopyFail) as failed, manager:
        next(manager)
        threading.Thread(target=manager.cancel).start()
        started = time.monotonic()
        with pytest.raises(copyman.Cancelled):
            for _ in manager:
                time.sleep(0.01)
        assert time.monotonic() - started < 10
        raise copyman.Cancelled("cancelled")
    assert isinstance(failed.value.__cause__, copyman.Cancelled)
    for d in dests:
        assert_usable_and_empty(d)


# Bad input: a clear error before any data moves.


def test_statements_must_be_copies_in_the_right_direction(
    dbs: Databases, source: psycopg.Connection
) -> None:
    (dest,) = destinations(dbs, 1)
    with pytest.raises(copyman.CopyUsageError, match=r"COPY \.\.\. TO STDOUT"):
        copyman.StatementProducer(source, "SELECT * FROM items")
    with pytest.raises(copyman.CopyUsageError, match="wrong direction"):
        copyman.StatementProducer(source, in_sql())
    with pytest.raises(copyman.CopyUsageError, match="wrong direction"):
        copyman.StatementReceiver(dest, "-- load\n" + out_sql())
    with pytest.raises(copyman.CopyUsageError, match=r"COPY \.\.\. FROM STDIN"):
        copyman.StatementReceiver(dest, "INSERT INTO items VALUES (1)")
    assert count(dest) == 0


def test_unusable_connections_are_refused(dbs: Databases, source: psycopg.Connection) -> None:
    closed, busy, failed = destinations(dbs, 3)
    closed.close()
    with pytest.raises(copyman.CopyUsageError, match="closed"):
        copyman.StatementReceiver(closed, in_sql())
    with busy.cursor().copy(in_sql()), pytest.raises(copyman.CopyUsageError, match="busy"):
        copyman.StatementReceiver(busy, in_sql())
    with pytest.raises(psycopg.errors.UndefinedTable):
        failed.execute("SELECT * FROM nowhere")
    with pytest.raises(copyman.CopyUsageError, match="failed transaction"):
        copyman.StatementReceiver(failed, in_sql())


def test_fittings_cannot_be_shared(dbs: Databases, source: psycopg.Connection) -> None:
    (dest,) = destinations(dbs, 1)
    receiver = copyman.StatementReceiver(dest, in_sql())
    producer = copyman.StatementProducer(source, out_sql())
    with pytest.raises(copyman.CopyUsageError, match="given twice"):
        copyman.CopyManager(producer, receiver, receiver)
    with pytest.raises(copyman.CopyUsageError, match="share a connection"):
        copyman.CopyManager(producer, receiver, copyman.StatementReceiver(dest, in_sql()))
    with pytest.raises(copyman.CopyUsageError, match="share a connection"):
        copyman.CopyManager(producer, copyman.StatementReceiver(source, in_sql()))
    with pytest.raises(copyman.CopyUsageError, match="must be a Receiver"):
        copyman.CopyManager(producer, dest)  # type: ignore[arg-type]


def test_missing_table_fails_at_start_and_leaves_everything_usable(
    dbs: Databases, source: psycopg.Connection
) -> None:
    good = destinations(dbs, 1)[0]
    bare = dbs.new("dst")
    with pytest.raises(copyman.CopyFail, match="could not start") as failed:
        with copyman.CopyManager(
            copyman.StatementProducer(source, out_sql()),
            copyman.StatementReceiver(good, in_sql()),
            copyman.StatementReceiver(bare, in_sql()),
        ):
            pytest.fail("the copy must not start")
    assert isinstance(failed.value.__cause__, psycopg.errors.UndefinedTable)
    assert_usable_and_empty(good)
    source.rollback()
    assert count(source) == 20_000


def test_a_manager_and_its_fittings_run_once(dbs: Databases, source: psycopg.Connection) -> None:
    (dest,) = destinations(dbs, 1)
    receiver = copyman.StatementReceiver(dest, in_sql())
    manager = copyman.CopyManager(copyman.StatementProducer(source, out_sql()), receiver)
    manager.run()
    dest.commit()
    with pytest.raises(copyman.CopyUsageError):
        manager.__enter__()
    with pytest.raises(copyman.CopyFail, match="already used"):
        copyman.CopyManager(copyman.StatementProducer(source, out_sql()), receiver).run()
    assert count(dest) == 20_000


def test_run_raises_only_copyfail(dbs: Databases, source: psycopg.Connection) -> None:
    (dest,) = destinations(dbs, 1)
    dest.execute("INSERT INTO items (id) VALUES (7)")
    dest.commit()
    with pytest.raises(copyman.CopyFail) as failed:
        copyman.CopyManager(
            copyman.StatementProducer(source, out_sql()),
            copyman.StatementReceiver(dest, in_sql()),
        ).run()
    assert isinstance(failed.value.__cause__, copyman.ReceiverFault)
    dest.rollback()
    assert count(dest) == 1
    assert "password" not in str(failed.value)
    assert dbs.server.address.password not in str(failed.value)


def test_a_row_rejected_at_once_is_always_a_fault(dbs: Databases) -> None:
    """The server's error and its end of COPY can reach us in separate reads: the receiver
    must still see the error (a lost result once made a failed COPY look complete)."""
    src, good, strict = dbs.new("src"), dbs.new("dst"), dbs.new("dst")
    src.execute("CREATE TABLE t AS SELECT g AS id FROM generate_series(1, 500) g")
    src.commit()
    for conn, check in ((good, ""), (strict, " CHECK (id > 400)")):
        conn.execute(f"CREATE TABLE t (id int{check})")
        conn.commit()
    for _ in range(20):
        receivers = [copyman.StatementReceiver(c, in_sql(table="t")) for c in (good, strict)]
        with copyman.CopyManager(
            copyman.StatementProducer(src, out_sql(table="t")), *receivers
        ) as manager:
            faults = run_with_faults(manager)
        assert isinstance(faults[receivers[1]], psycopg.errors.CheckViolation)
        assert manager.completed == {receivers[0]}
        for conn in (src, good, strict):
            conn.rollback()
