"""The bandwidth cap (issue 10): ``max_bytes_per_second`` against real servers.

Each cycle's bytes and the moment its ``__next__`` returned are recorded from the iterator;
the cap must hold in every one-second window, the copy must take as long as the cap says,
the cap's waits must count towards no time-out, and ``cancel()`` must stop a capped wait.
"""

from __future__ import annotations

import math
import socket
import threading
import time

import psycopg
import pytest

from airflow_copyman import copyman
from airflow_copyman.copyman._pace import SLICES
from tests.conftest import Databases
from tests.data import count, create_table, fill_source, fingerprint

CAP = 1024 * 1024  # bytes per second
#: How late a cycle's timestamp may be after its read (the read itself, a busy machine):
#: the windows checked are this much shorter than a second, so that jitter in the
#: timestamps never makes a window look fuller than the cap allowed.
JITTER = 0.1


def out_sql(table: str = "items", options: str = "") -> str:
    return f"COPY {table} TO STDOUT {options}"


def in_sql(table: str = "items", options: str = "") -> str:
    return f"COPY {table} FROM STDIN {options}"


def assert_usable(conn: psycopg.Connection) -> None:
    conn.rollback()
    assert conn.execute("SELECT 1").fetchone() == (1,)
    conn.rollback()


def fullest_window(cycles: list[tuple[float, int]], length: float) -> int:
    """The most bytes the cycles moved within any window of ``length`` seconds."""
    most = 0
    for i, (start, _) in enumerate(cycles):
        most = max(most, sum(n for t, n in cycles[i:] if t < start + length))
    return most


@pytest.fixture
def source(dbs: Databases) -> psycopg.Connection:
    conn = dbs.new("src")
    fill_source(conn, 20_000)  # about 3 MiB as text: about 3 s at the cap
    return conn


@pytest.mark.parametrize("options", ["", "(FORMAT binary)"])
def test_a_capped_copy_holds_the_cap_in_every_second(
    dbs: Databases, source: psycopg.Connection, options: str
) -> None:
    dest = dbs.new("dst")
    create_table(dest)
    cycles: list[tuple[float, int]] = []
    rows = 0
    manager = copyman.CopyManager(
        copyman.StatementProducer(source, out_sql(options=options)),
        copyman.StatementReceiver(dest, in_sql(options=options)),
        max_bytes_per_second=CAP,
    )
    with manager:
        began = time.monotonic()
        for num_rows, num_bytes in manager:
            cycles.append((time.monotonic(), num_bytes))
            rows += num_rows
    dest.commit()
    total = sum(n for _, n in cycles)
    assert total == manager.producer.bytes > 2.5 * CAP
    assert rows == 20_000 and fingerprint(dest) == fingerprint(source)
    # No read takes more than its share of a second (statement batches never exceed what
    # was asked for), so the copy moves evenly.
    assert max(n for _, n in cycles) <= CAP // SLICES
    # At most the cap in any second (the first one too), and on average since the start,
    # so at least total / cap seconds (the first second has no allowance of its own).
    assert fullest_window(cycles, 1.0 - JITTER) <= CAP
    assert cycles[-1][0] - began >= total / CAP
    # And it does not crawl either: the cap is a ceiling, not a pace of its own.
    assert cycles[-1][0] - began < total / CAP + 3.0


def big_rows(dbs: Databases, rows: int, kib: int) -> tuple[psycopg.Connection, psycopg.Connection]:
    """A source of ``rows`` rows of ``kib`` KiB each, and an empty destination."""
    src, dest = dbs.new("src"), dbs.new("dst")
    for conn in (src, dest):
        conn.execute("CREATE TABLE big (id int, body text)")
        conn.commit()
    src.execute(
        "INSERT INTO big SELECT g, string_agg(md5(g::text || h::text), '') "
        "FROM generate_series(1, %s) g, generate_series(1, %s) h GROUP BY g ORDER BY g",
        [rows, kib * 32],
    )
    src.commit()
    return src, dest


def test_waiting_for_the_cap_is_not_the_producers_stall(dbs: Databases) -> None:
    """Rows of 512 KiB under a cap of 1 MiB/s: after each one the copy waits half a second
    for the cap. The source makes its last row 0.8 s after the others, and sends the end of
    each row with the next one, so the copy reads the second row 0.8 s after the first:
    it waits for the cap 0.5 s, then 0.3 s for the source, its stall, under its time-out
    of 0.6 s; counting the cap's wait too would be 0.8 s."""
    src, dest = big_rows(dbs, 3, 512)
    began = time.monotonic()
    rows, nbytes = copyman.transfer(
        (src, "COPY (SELECT id, body FROM big WHERE id < 3 OR pg_sleep(0.8)::text = '') "
         "TO STDOUT"),
        (dest, "COPY big FROM STDIN"),
        max_bytes_per_second=CAP,
        producer_timeout=0.6,
    )
    dest.commit()
    assert rows == 3 and nbytes > 1.5 * CAP
    assert time.monotonic() - began > 2 * 0.6  # the time-out passed, and then some
    assert fingerprint(dest, "big") == fingerprint(src, "big")


class BusyOnce(copyman.CallReceiver):
    """A receiver of the test's own that finds its destination busy at its first try at
    each batch (as a socket that is full), and delivers it at the next try, as soon as the
    socket it names is writable (a socket pair's end: at once)."""

    def __init__(self, sock: socket.socket) -> None:
        self.taken: list[bytes] = []
        super().__init__(self.taken.extend)
        self._sock = sock
        self._tried = False

    def fileno(self) -> int:
        return self._sock.fileno()

    def transmit(self) -> copyman.Wait:
        if self._queue and not self._tried:
            self._tried = True
            return copyman.Wait.WRITE
        self._tried = False
        return super().transmit()


def test_waiting_for_the_cap_is_not_a_receivers_stall(dbs: Databases) -> None:
    """Rows of 512 KiB under a cap of 1 MiB/s: the copy waits half a second for the cap
    after each one, while its receivers have nothing to do. A receiver that then finds its
    destination busy for a moment has stalled for that moment, not since its last batch:
    its time-out of 0.3 s must not fire."""
    src, dest = big_rows(dbs, 3, 512)
    ends = socket.socketpair()
    busy = BusyOnce(ends[0])
    manager = copyman.CopyManager(
        copyman.StatementProducer(src, "COPY big TO STDOUT"),
        copyman.StatementReceiver(dest, "COPY big FROM STDIN"),
        busy,
        max_bytes_per_second=CAP,
        receiver_timeout=0.3,
        producer_timeout=30,
    )
    began = time.monotonic()
    try:
        manager.run()
    finally:
        for end in ends:
            end.close()
    dest.commit()
    assert time.monotonic() - began > 2 * 0.3
    assert len(busy.taken) == 3 and manager.completed == set(manager.receivers)
    assert fingerprint(dest, "big") == fingerprint(src, "big")


def test_cancel_stops_a_capped_wait_within_2_s(
    dbs: Databases, source: psycopg.Connection
) -> None:
    """A cap of 16 bytes a second: one row is more than ten seconds' worth, so the copy
    waits for the cap when ``cancel()`` comes; it stops within 2 s, and keeps nothing."""
    dest = dbs.new("dst")
    create_table(dest)
    manager = copyman.CopyManager(
        copyman.StatementProducer(source, out_sql()),
        copyman.StatementReceiver(dest, in_sql()),
        max_bytes_per_second=16,
    )
    with pytest.raises(copyman.CopyFail), manager:
        next(manager)  # the first row; the next one waits for the cap
        threading.Timer(0.5, manager.cancel).start()
        waiting = time.monotonic()
        with pytest.raises(copyman.Cancelled):
            next(manager)
        cancelled = time.monotonic()
    stopped = time.monotonic()
    assert cancelled - waiting >= 0.4 and stopped - (waiting + 0.5) < 2.0
    assert_usable(source)
    assert_usable(dest)
    assert count(dest) == 0


@pytest.mark.parametrize("value", [0, -1, "5", True, math.nan, math.inf])
def test_bad_caps_are_refused(value: object) -> None:
    with pytest.raises(copyman.CopyUsageError, match="max_bytes_per_second must be a positive"):
        copyman.CopyManager(
            copyman.NullProducer(), copyman.NullReceiver(), max_bytes_per_second=value
        )
