"""on_kill: SIGTERM to the process running a long transfer cancels every COPY at once and
commits nothing anywhere."""

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

ACTIVE_COPIES = """
SELECT count(*) FROM pg_stat_activity
WHERE datname = current_database() AND application_name LIKE 'copyman %%'
  AND state = 'active' AND query LIKE 'COPY%%'
"""

RUNNER = """
import sys
sys.path.insert(0, {here!r})
from af_support import run_dag
run = run_dag("copyman_test_dags.py", {dag_id!r})
print("RUN_RESULT", run.state, run.tis, flush=True)
"""


def _wait(condition: object, timeout: float, what: str) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return time.monotonic()
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_sigterm_cancels_every_copy_and_commits_nothing(
    pg: PgServers, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    src = pg.database(pg.src, "ksrc")
    d1, d2 = pg.database(pg.dst1, "kd1"), pg.database(pg.dst2, "kd2")
    for db in (d1, d2):
        db.execute("CREATE TABLE kill_target (id integer, note text)")
    monkeypatch.setenv("AIRFLOW_CONN_PG_SRC", src.uri())
    monkeypatch.setenv("AIRFLOW_CONN_PG_D1", d1.uri())
    monkeypatch.setenv("AIRFLOW_CONN_PG_D2", d2.uri())
    log = tmp_path / "task.log"

    def copying(db: Database) -> bool:
        return bool(db.scalar(ACTIVE_COPIES))

    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", RUNNER.format(here=str(HERE), dag_id="copyman_test_kill")],
            stdout=out, stderr=subprocess.STDOUT, env=os.environ.copy(),
        )
    try:
        _wait(lambda: copying(d1) and copying(d2), 120, "both destination COPYs to start")
        time.sleep(1.5)  # mid-copy: rows are flowing (the source runs for minutes)
        killed = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        stopped = _wait(
            lambda: not copying(d1) and not copying(d2) and not copying(src),
            10,
            "the COPYs to be cancelled",
        )
        # The supervisor sends SIGKILL 5 s after SIGTERM: the cancel must beat it.
        assert stopped - killed < 5.0
        proc.wait(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    output = log.read_text()
    assert "RUN_RESULT failed" in output, output[-3000:]
    assert "the task was killed" in output
    for db in (d1, d2):
        assert db.scalar("SELECT count(*) FROM kill_target") == 0
        assert db.scalar("SELECT count(*) FROM copyman_ledger") == 0


SLOW_ROWS = """
CREATE FUNCTION slow_row() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_sleep(0.01);
    RETURN NEW;
END $$;
CREATE TRIGGER slow_row BEFORE INSERT ON kill_target FOR EACH ROW EXECUTE FUNCTION slow_row();
"""


def test_sigterm_stops_a_busy_destination_on_its_server(
    pg: PgServers, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A destination whose server works through a backlog (10 ms a row in a trigger): its
    COPY must end on the server within 2 s of SIGTERM, not when the backlog is done."""
    src = pg.database(pg.src, "bsrc")
    d1, d2 = pg.database(pg.dst1, "bd1"), pg.database(pg.dst2, "bd2")
    for db in (d1, d2):
        db.execute("CREATE TABLE kill_target (id integer, note text)")
    d1.execute(SLOW_ROWS)
    monkeypatch.setenv("AIRFLOW_CONN_PG_SRC", src.uri())
    monkeypatch.setenv("AIRFLOW_CONN_PG_D1", d1.uri())
    monkeypatch.setenv("AIRFLOW_CONN_PG_D2", d2.uri())
    log = tmp_path / "task.log"

    def copying(db: Database) -> bool:
        return bool(db.scalar(ACTIVE_COPIES))

    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c",
             RUNNER.format(here=str(HERE), dag_id="copyman_test_kill_busy")],
            stdout=out, stderr=subprocess.STDOUT, env=os.environ.copy(),
        )
    try:
        _wait(lambda: copying(d1), 120, "the busy destination's COPY to start")
        time.sleep(1.5)  # a backlog builds up in d1's socket buffers and server
        killed = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            stopped = _wait(
                lambda: not copying(d1) and not copying(d2) and not copying(src),
                4,
                "the COPYs to end on their servers",
            )
        except AssertionError:
            stopped = None
        proc.wait(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
        # Whatever the outcome, leave no backlog running on the shared server.
        d1.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND application_name LIKE 'copyman %%'"
        )
    output = log.read_text()
    assert "RUN_RESULT failed" in output, output[-3000:]
    assert "the task was killed" in output
    for db in (d1, d2):
        assert db.scalar("SELECT count(*) FROM kill_target") == 0
    # Stop means stop on the server too: the COPY is gone within 2 s of SIGTERM.
    assert stopped is not None and stopped - killed < 2.0, (killed, stopped)
