"""A split load under a real scheduler: ``airflow scheduler`` (LocalExecutor, parallelism 4),
``dag-processor`` and ``api-server`` (the tasks' execution API) as subprocesses, a throwaway
AIRFLOW_HOME and a throwaway PostgreSQL metadata database (LocalExecutor refuses SQLite).
The ranges of one DAG run must run at the same time. About 30 s."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from af_support import Database, PgServers

AIRFLOW = str(Path(sys.executable).with_name("airflow"))
REPO = Path(__file__).resolve().parents[2]
ROWS = 20000
#: Each range reads its ~150 KB at this rate (about 6 s): long enough to overlap even when
#: a busy 2-core machine starts the four task processes seconds apart.
BYTES_PER_SECOND = 25000
DAG_FILE = f"""
import datetime
from airflow.sdk import DAG
from airflow_copyman.operators.copyman import CopyManSplitGroup

with DAG("copyman_split_sched", schedule=None, start_date=datetime.datetime(2024, 1, 1)):
    CopyManSplitGroup(
        "items", source_conn_id="pg_ss", table="items", split_by="id", parts=4,
        destinations=[{{"conn_id": "pg_sd1", "table": "items", "mode": "replace"}}],
        max_bytes_per_second={BYTES_PER_SECOND}, retries=0,
    )
"""
#: The longest the DAG run may take from the trigger (it takes about 20 s here).
RUN_LIMIT = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def environment(home: Path, meta: Database, src: Database, dst: Database) -> dict[str, str]:
    """The test process's environment without its Airflow settings (its SQLite home), and
    the scheduler's own."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env.update({
        "AIRFLOW_HOME": str(home),
        "PYTHONPATH": str(REPO),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": meta.uri().replace(
            "postgresql://", "postgresql+psycopg://", 1),
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__PARALLELISM": "4",
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_FOLDER": str(home / "dags"),
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(16),
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "1",
        "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "1",
        "AIRFLOW_CONN_PG_SS": src.uri(),
        "AIRFLOW_CONN_PG_SD1": dst.uri(),
    })
    return env


@pytest.fixture
def airflow_services(
    pg: PgServers, tmp_path: Path
) -> Iterator[tuple[dict[str, str], Database, Database, Database]]:
    meta, src = pg.database(pg.src, "afmeta"), pg.database(pg.src, "schedsrc")
    dst = pg.database(pg.dst1, "scheddst")
    (tmp_path / "dags").mkdir()
    (tmp_path / "dags" / "copyman_split_sched.py").write_text(DAG_FILE)
    env = environment(tmp_path, meta, src, dst)
    migrated = subprocess.run([AIRFLOW, "db", "migrate"], env=env, capture_output=True,
                              text=True, timeout=120)
    assert migrated.returncode == 0, migrated.stderr[-2000:]
    port = env["AIRFLOW__API__PORT"]
    procs = []
    for command in (["api-server", "--host", "127.0.0.1", "--port", port], ["scheduler"],
                    ["dag-processor"]):
        log = (tmp_path / f"{command[0]}.log").open("w")
        procs.append(subprocess.Popen([AIRFLOW, *command], env=env, stdout=log,
                                      stderr=subprocess.STDOUT, start_new_session=True))
    try:
        yield env, meta, src, dst
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def wait_for(what: str, check: Any, deadline: float, home: Path) -> Any:
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.5)
    logs = "\n".join(f"--- {p.name}\n{p.read_text()[-1500:]}" for p in home.glob("*.log"))
    raise AssertionError(f"{what} did not happen in time\n{logs}")


def test_ranges_run_at_the_same_time_under_a_local_executor(
    airflow_services: tuple[dict[str, str], Database, Database, Database],
) -> None:
    env, meta, src, dst = airflow_services
    home = Path(env["AIRFLOW_HOME"])
    src.execute("CREATE TABLE items (id int PRIMARY KEY, v text);"
                f" INSERT INTO items SELECT g, repeat('x', 20) FROM generate_series(1, {ROWS}) g;"
                " ANALYZE items")
    dst.execute("CREATE TABLE items (id int, v text); INSERT INTO items VALUES (-1, 'old')")
    deadline = time.monotonic() + RUN_LIMIT
    wait_for("parsing the DAG", lambda: meta.scalar(
        "SELECT count(*) FROM dag WHERE dag_id = 'copyman_split_sched'"), deadline, home)
    trigger = subprocess.run([AIRFLOW, "dags", "trigger", "copyman_split_sched"], env=env,
                             capture_output=True, text=True, timeout=60)
    assert trigger.returncode == 0, trigger.stderr[-2000:]

    def ended() -> str | None:
        rows = meta.execute("SELECT state FROM dag_run WHERE dag_id = 'copyman_split_sched'")
        return rows[0][0] if rows and rows[0][0] in ("success", "failed") else None

    state = wait_for("the DAG run's end", ended, deadline, home)
    ranges = meta.execute(
        "SELECT map_index, state, start_date, end_date FROM task_instance WHERE dag_id ="
        " 'copyman_split_sched' AND task_id = 'items.load' ORDER BY map_index")
    assert state == "success", ranges
    assert [(m, s) for m, s, _, _ in ranges] == [(i, "success") for i in range(4)]
    # All four ranges were running at one moment: the last to start began before the first
    # to end was done.
    assert max(start for _, _, start, _ in ranges) < min(end for _, _, _, end in ranges), ranges
    assert dst.execute("SELECT count(*), min(id), max(id) FROM items") == [(ROWS, 1, ROWS)]
