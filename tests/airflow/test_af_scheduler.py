"""A split load under a real scheduler: ``airflow scheduler`` (LocalExecutor, parallelism 4),
``dag-processor`` and ``api-server`` (the tasks' execution API) as subprocesses, a throwaway
AIRFLOW_HOME and a throwaway PostgreSQL metadata database (LocalExecutor refuses SQLite).
The ranges of one DAG run must run at the same time; two DAG runs of one group run at the
same time, each through its own staging table. About 30 s each."""

from __future__ import annotations

import json
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


def dag_file(dag_id: str, parts: int, max_active_runs: int = 1) -> str:
    return f"""
import datetime
from airflow.sdk import DAG
from airflow_copyman.operators.copyman import CopyManSplitGroup

with DAG("{dag_id}", schedule=None, start_date=datetime.datetime(2024, 1, 1),
         max_active_runs={max_active_runs}, params={{"rate": {BYTES_PER_SECOND}}}):
    CopyManSplitGroup(
        "items", source_conn_id="pg_ss", table="items", split_by="id", parts={parts},
        destinations=[{{"conn_id": "pg_sd1", "table": "items", "mode": "replace"}}],
        max_bytes_per_second="{{{{ params.rate }}}}", retries=0,
    )
"""


#: One run of four ranges (all four at once under parallelism 4).
ONE_RUN_DAG = "copyman_split_sched"
#: Two runs at once of two ranges each (still four task processes at once; each range
#: reads ~300 KB: about 12 s, so the runs overlap even when started seconds apart).
TWO_RUNS_DAG = "copyman_split_sched_twice"
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
    (tmp_path / "dags" / f"{ONE_RUN_DAG}.py").write_text(dag_file(ONE_RUN_DAG, parts=4))
    (tmp_path / "dags" / f"{TWO_RUNS_DAG}.py").write_text(
        dag_file(TWO_RUNS_DAG, parts=2, max_active_runs=2))
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


def parsed_and_triggered(env: dict[str, str], meta: Database, dag_id: str, deadline: float,
                         runs: dict[str, int] | None = None) -> None:
    """Wait until the dag-processor has parsed ``dag_id``, then trigger its runs (one with
    Airflow's run id, or one per ``runs``: run id -> the ranges' bytes per second; all at
    once: each CLI takes seconds to start on a busy machine)."""
    home = Path(env["AIRFLOW_HOME"])
    wait_for("parsing the DAG", lambda: meta.scalar(
        "SELECT count(*) FROM dag WHERE dag_id = %s", [dag_id]), deadline, home)
    run_id_args = [["--run-id", run_id, "--conf", json.dumps({"rate": rate})]
                   for run_id, rate in runs.items()] if runs else [[]]
    commands = [[AIRFLOW, "dags", "trigger", dag_id, *args] for args in run_id_args]
    triggers = [subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True) for c in commands]
    for trigger in triggers:
        _, err = trigger.communicate(timeout=60)
        assert trigger.returncode == 0, err[-2000:]


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
    parsed_and_triggered(env, meta, "copyman_split_sched", deadline)

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


def staging_tables(db: Database) -> set[str]:
    return {r[0] for r in db.execute(
        "SELECT relname FROM pg_class WHERE relname LIKE 'copyman\\_stage\\_%'")}


def overlap(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    """Whether two task instances' (..., start_date, end_date) intervals overlap."""
    return bool(a[-2] < b[-1] and b[-2] < a[-1])


def test_two_dag_runs_of_a_group_at_once_under_a_local_executor(
    airflow_services: tuple[dict[str, str], Database, Database, Database],
) -> None:
    env, meta, src, dst = airflow_services
    home = Path(env["AIRFLOW_HOME"])
    src.execute("CREATE TABLE items (id int PRIMARY KEY, v text);"
                " INSERT INTO items SELECT g, left(md5(g::text), 16)"
                f" FROM generate_series(1, {ROWS}) g; ANALYZE items")
    dst.execute("CREATE TABLE items (id int, v text); INSERT INTO items VALUES (-1, 'old')")
    deadline = time.monotonic() + 2 * RUN_LIMIT
    run_ids = ["run_a", "run_b"]
    # Run b reads a little slower: the runs overlap for most of their ranges, and their
    # publishes end seconds apart. Two tasks announcing a table's first asset event at the
    # same moment can fail in Airflow itself (README, Assets).
    parsed_and_triggered(env, meta, TWO_RUNS_DAG, deadline,
                         {"run_a": BYTES_PER_SECOND, "run_b": BYTES_PER_SECOND * 4 // 5})

    # Watch the destination while the runs go: the staging tables that exist at one moment,
    # and the destination's row count (the old row, then the source's rows: never more).
    staged_at_once: list[set[str]] = []
    counts: set[int] = set()

    def ended() -> dict[str, str] | None:
        staged_at_once.append(staging_tables(dst))
        counts.add(dst.scalar("SELECT count(*) FROM items"))
        states = dict(meta.execute(
            "SELECT run_id, state FROM dag_run WHERE dag_id = %s", [TWO_RUNS_DAG]))
        done = sorted(states) == run_ids and all(
            s in ("success", "failed") for s in states.values())
        return states if done else None

    states = wait_for("the end of both DAG runs", ended, deadline, home)
    ranges = meta.execute(
        "SELECT run_id, map_index, state, start_date, end_date FROM task_instance"
        " WHERE dag_id = %s AND task_id = 'items.load' ORDER BY run_id, map_index",
        [TWO_RUNS_DAG])
    assert states == {"run_a": "success", "run_b": "success"}, ranges
    assert [r[:3] for r in ranges] == [
        (run_id, i, "success") for run_id in run_ids for i in range(2)
    ]
    # The runs were at work at one moment: a range of run_a loaded while one of run_b did.
    ranges_a = [r for r in ranges if r[0] == "run_a"]
    ranges_b = [r for r in ranges if r[0] == "run_b"]
    assert any(overlap(a, b) for a in ranges_a for b in ranges_b), ranges

    assert_each_run_staged_apart(dst, staged_at_once)
    # Both published: the destination replaced once per run, each time by the whole table,
    # never holding the two runs' rows (or the old row with new ones) together.
    published = dst.execute(
        "SELECT run_id, destination, rows FROM copyman_ledger"
        " WHERE dag_id = %s AND task_id = 'items.publish' ORDER BY 1", [TWO_RUNS_DAG])
    assert published == [("run_a", "public.items", ROWS), ("run_b", "public.items", ROWS)]
    assert counts <= {1, ROWS}, counts
    select = "SELECT id, v FROM items ORDER BY id"
    assert dst.execute(select) == src.execute(select)
    assert staging_tables(dst) == set()


def assert_each_run_staged_apart(dst: Database, staged_at_once: list[set[str]]) -> None:
    """The ranges' ledger rows name one staging table per run, two different ones, and both
    were there at one moment while the runs went."""
    staged = dst.execute(
        "SELECT run_id, destination, count(*), sum(rows) FROM copyman_ledger"
        " WHERE dag_id = %s AND task_id = 'items.load' GROUP BY 1, 2 ORDER BY 1, 2",
        [TWO_RUNS_DAG])
    assert [(r[0], r[2], r[3]) for r in staged] == [("run_a", 2, ROWS), ("run_b", 2, ROWS)]
    stage_a, stage_b = (r[1].removeprefix("public.") for r in staged)
    assert stage_a != stage_b and {stage_a, stage_b} <= set().union(*staged_at_once), staged
    assert any({stage_a, stage_b} <= now for now in staged_at_once), staged_at_once
