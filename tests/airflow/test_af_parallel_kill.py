"""on_kill of ``CopyManOperator(..., parallel=N)``: SIGTERM to the task cancels every range's
COPY on its server and publishes nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from af_support import Database, PgServers

HERE = Path(__file__).resolve().parent
pytestmark = pytest.mark.usefixtures("airflow_db")

#: The load's statements running (COPYs, and a range's wait for the staging table's lock).
ACTIVE = """
SELECT count(*) FILTER (WHERE query LIKE 'COPY%%'), count(*)
FROM pg_stat_activity
WHERE datname = current_database() AND pid <> pg_backend_pid()
  AND state = 'active'
"""

RUNNER = """
import sys
sys.path.insert(0, {here!r})
from af_support import run_dag
run = run_dag("copyman_split_dags.py", "copyman_parallel_kill")
print("RUN_RESULT", run.state, run.tis, flush=True)
"""


def _wait(condition: object, timeout: float, what: str) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return time.monotonic()
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_sigterm_cancels_every_range_copy_and_publishes_nothing(
    pg: PgServers, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    src = pg.database(pg.src, "pksrc")
    d1, d2 = pg.database(pg.dst1, "pkd1"), pg.database(pg.dst2, "pkd2")
    for conn_id, db in (("pg_ss", src), ("pg_sd1", d1), ("pg_sd2", d2)):
        monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", db.uri())
    src.execute("CREATE TABLE counters (id int PRIMARY KEY, n int);"
                " INSERT INTO counters SELECT g, 0 FROM generate_series(1, 200000) g;"
                " ANALYZE counters")
    for db in (d1, d2):
        db.execute("CREATE TABLE counters (id int, n int); INSERT INTO counters VALUES (-1, 7)")

    def copies(db: Database) -> int:
        return int(db.execute(ACTIVE)[0][0])

    def statements(db: Database) -> int:
        return int(db.execute(ACTIVE)[0][1])

    log = tmp_path / "task.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", RUNNER.format(here=str(HERE))],
            stdout=out, stderr=subprocess.STDOUT, env=os.environ.copy(),
        )
    try:
        # Two ranges, each reading at ~20 kB/s (a minute or more); in each destination one
        # COPYs into the staging table while the other waits for its load lock.
        _wait(lambda: copies(d1) and copies(d2), 120,
              "a range COPYing into both destinations")
        time.sleep(0.5)  # mid-copy
        killed = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            stopped: float | None = _wait(
                lambda: not any(statements(db) for db in (src, d1, d2)), 4,
                "the ranges' COPYs to end on their servers",
            )
        except AssertionError:
            stopped = None
        proc.wait(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    output = log.read_text()
    assert "RUN_RESULT failed" in output, output[-3000:]
    assert "killed" in output, output[-3000:]
    # Stop means stop on the servers: every range's COPY is gone within 2 s of SIGTERM.
    assert stopped is not None and stopped - killed < 2.0, (killed, stopped)
    for db in (d1, d2):  # nothing published: the old rows, no publish in the ledger
        assert db.execute("SELECT id, n FROM counters") == [(-1, 7)]
        assert db.scalar("SELECT count(*) FROM copyman_ledger WHERE task_id = 'copy'") == 0
