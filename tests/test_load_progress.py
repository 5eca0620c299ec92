"""``on_progress`` through ``load.run``, without Airflow, on a real server: reports while the
copy runs (no more often than ``progress_interval``), then once at the end with every
destination's status and the report's counts."""

from __future__ import annotations

import itertools
import threading

import pytest

from airflow_copyman import load
from tests.conftest import Database
from tests.test_readback import endpoint


def test_progress_is_reported_while_copying_and_once_at_the_end(
    pair: tuple[Database, Database],
) -> None:
    source_db, dest_db = pair
    source_db.execute("CREATE TABLE big AS SELECT g AS id, repeat('x', 200) AS pad "
                      "FROM generate_series(1, 50000) g; ANALYZE big")
    dest_db.execute("CREATE TABLE big (id int, pad text); CREATE TABLE other (id int, pad text)")
    seen: list[load.Progress] = []
    threads: set[int] = set()

    def on_progress(progress: load.Progress) -> None:
        seen.append(progress)
        threads.add(threading.get_ident())

    report = load.run(
        endpoint(source_db, "src"), "big",
        [{"conn_id": "dst", "table": "big"}, {"conn_id": "dst", "table": "other"}],
        endpoints={"dst": endpoint(dest_db, "dst")},
        # The cap makes the copy last about a second: progress has time to show.
        max_bytes_per_second=8_000_000, progress_interval=0.2, on_progress=on_progress,
    )
    assert not report.failed
    during, last = seen[:-1], seen[-1]
    assert during, "no progress while copying"
    assert threads == {threading.get_ident()}  # the loading thread: no locking needed
    for progress in during:
        assert progress.destinations == (("dst:big", "copying"), ("dst:other", "copying"))
        assert 0 <= progress.rows <= 50000 and progress.bytes >= 0
        assert progress.estimated_rows == 50000  # the table's statistics (ANALYZE)
    assert [p.rows for p in during] == sorted(p.rows for p in during)
    seconds = [p.seconds for p in seen]
    assert seconds == sorted(seconds)
    # Not more often than every progress_interval (generous: the loop may run late).
    assert all(b - a >= 0.19 for a, b in itertools.pairwise(seconds[:-1]))
    assert (last.rows, last.bytes, last.seconds) == (report.rows, report.bytes, report.seconds)
    assert last.destinations == (("dst:big", "loaded"), ("dst:other", "loaded"))


def test_a_failing_progress_display_does_not_fail_the_load(
    pair: tuple[Database, Database],
) -> None:
    source_db, dest_db = pair
    source_db.execute("CREATE TABLE t AS SELECT g AS id FROM generate_series(1, 10) g")
    dest_db.execute("CREATE TABLE t (id int)")

    def broken(progress: load.Progress) -> None:
        raise RuntimeError("display gone")

    report = load.run(
        endpoint(source_db, "src"), "t", [{"conn_id": "dst", "table": "t"}],
        endpoints={"dst": endpoint(dest_db, "dst")}, on_progress=broken,
    )
    assert [r.status for r in report.destinations] == ["loaded"]


def test_on_progress_must_be_a_function() -> None:
    with pytest.raises(load.ArgumentError, match="on_progress must be a function"):
        load.LoadOptions(on_progress="print")  # type: ignore[arg-type]
