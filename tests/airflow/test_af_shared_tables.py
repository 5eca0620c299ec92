"""Two runs of one DAG loading the same tables at once (issue 15, "One load at a time into
one table"): two ``dag.test()`` runs in two processes (one process runs one at a time), in
every mode; the tables end exact, and a run that cannot wait long enough names the run
holding the table."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from af_support import PgServers

HERE = Path(__file__).resolve().parent
pytestmark = pytest.mark.usefixtures("airflow_db")

RUNNER = textwrap.dedent(
    """
    import datetime, sys
    sys.path.insert(0, {here!r})
    from af_support import run_dag
    day = datetime.datetime({day}, tzinfo=datetime.UTC)
    run = run_dag("copyman_shared_dags.py", "copyman_test_shared", logical_date=day)
    print("RUN_RESULT", run.run_id, run.tis, flush=True)
    """
)


def test_two_runs_load_the_same_tables_at_once_and_each_table_ends_exact(
    pg: PgServers, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    src = pg.database(pg.src, "shsrc")
    dst = pg.database(pg.dst1, "shdst")
    for name in ("append", "truncate", "delete", "merge", "held"):
        dst.execute(f"CREATE TABLE shared_{name} (id int, v text)")
    dst.execute("CREATE TABLE shared_merge_unique (id int PRIMARY KEY, v text)")
    for name in ("append", "truncate", "delete"):
        dst.execute(f"INSERT INTO shared_{name} SELECT g, 'old' FROM generate_series(1, 10) g")
    monkeypatch.setenv("AIRFLOW_CONN_PG_SRC", src.uri())
    monkeypatch.setenv("AIRFLOW_CONN_PG_D1", dst.uri())
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    monkeypatch.setenv("COPYMAN_SHARED_BARRIER", str(barrier))
    procs = []
    try:
        for day in ("2024, 1, 2", "2024, 1, 3"):
            log = (tmp_path / f"run-{day[-1]}.log").open("w")
            procs.append((log, subprocess.Popen(
                [sys.executable, "-c", RUNNER.format(here=str(HERE), day=day)],
                stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy(),
            )))
            # The second starts once the first wrote the DAG to the metadata database (two
            # dag.test() writing it at once collide there); the barrier aligns them after.
            deadline = time.monotonic() + 120
            while not any(barrier.iterdir()) and procs[0][1].poll() is None:
                assert time.monotonic() < deadline, "the first run never reached its barrier"
                time.sleep(0.1)
        for log, proc in procs:
            proc.wait(timeout=300)
            log.close()
    finally:
        for _, proc in procs:
            if proc.poll() is None:
                proc.kill()
    outputs = [(tmp_path / f"run-{d}.log").read_text() for d in ("2", "3")]
    results = [next(line for line in out.splitlines() if line.startswith("RUN_RESULT"))
               for out in outputs]
    for name in ("append", "truncate", "delete", "merge", "merge_unique"):
        for result in results:
            assert f"'{name}': ('success'" in result, (name, results)
    # Appends add both runs' rows; the others hold one run's 1,000 rows, each id once.
    assert dst.execute(
        "SELECT count(*), count(DISTINCT id), count(DISTINCT left(v, 8)) FROM shared_append "
        "WHERE v <> 'old'"
    ) == [(2000, 1000, 2)]
    for name in ("truncate", "delete", "merge", "merge_unique"):
        assert dst.execute(
            f"SELECT count(*), count(DISTINCT id), count(DISTINCT left(v, 8)) FROM shared_{name}"
        ) == [(1000, 1000, 1)], name
    # The run that waited longer than its lock_timeout names the run holding the table.
    held = [(result, out) for result, out in zip(results, outputs, strict=True)
            if "'held': ('failed'" in result]
    assert len(held) == 1, results
    assert dst.execute("SELECT count(*) FROM shared_held") == [(1000,)]
    (_, out), other = held[0], next(r for r in results if "'held': ('success'" in r)
    holder_run = other.split()[1]
    named = f"'copyman copyman_test_shared.held {holder_run}"[:64]
    assert "transient" in out and "lock_timeout" in out and named in out, out[-4000:]
