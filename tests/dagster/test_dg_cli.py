"""The example project run by the ``dagster`` command line (a real run: its own process, the
default multiprocess executor), and a run terminated while its COPYs stream (issue 19)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.dagster.conftest import EXAMPLE, PER_DAY, Warehouse

ROOT = Path(__file__).resolve().parents[2]
DAGSTER = Path(sys.executable).parent / "dagster"
DAY = "2024-01-02"


def command(min_amount: int = 0) -> list[str]:
    config = {"ops": {"orders_assets": {"config": {"min_amount": min_amount}}}}
    return [
        str(DAGSTER), "asset", "materialize", "-f", str(EXAMPLE), "--select", "*",
        "--partition", DAY, "--config-json", json.dumps(config),
    ]


def environment(warehouse: Warehouse, home: Path) -> dict[str, str]:
    env = {**os.environ, **warehouse.environment(), "DAGSTER_HOME": str(home)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    return env


def test_the_example_runs_from_the_command_line(warehouse: Warehouse, tmp_path: Path) -> None:
    done = subprocess.run(
        command(min_amount=21), env=environment(warehouse, tmp_path), cwd=ROOT,
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    wanted = [r for r in warehouse.source_rows(DAY) if r[2] >= 21]
    assert len(wanted) == PER_DAY - 20
    assert warehouse.day_rows(warehouse.wh1, "orders", DAY) == wanted
    assert warehouse.day_rows(warehouse.wh2, "analytics.orders", DAY) == wanted
    out = done.stdout + done.stderr
    assert "ASSET_MATERIALIZATION" in out and "Asset check 'copyman_verify'" in out
    assert warehouse.password not in out
    # Nor in what the instance stored: the run, its events, its captured logs.
    stored = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.suffix == ".db" for p in stored)
    assert not [p for p in stored if warehouse.password.encode() in p.read_bytes()]


def copies(warehouse: Warehouse) -> list[tuple[str, str]]:
    """The COPY statements running in the three databases."""
    names = [warehouse.src.name, warehouse.wh1.name, warehouse.wh2.name]
    return warehouse.src.execute(
        "SELECT datname::text, left(query, 60) FROM pg_stat_activity WHERE datname = ANY(%s) "
        "AND state = 'active' AND query ILIKE 'COPY%%'",
        [names],
    )


def test_terminating_the_run_stops_every_copy(warehouse: Warehouse, tmp_path: Path) -> None:
    # The source's orders of the day trickle out (a view sleeping on every row): the three
    # COPYs run until stopped.
    warehouse.src.execute(
        "ALTER TABLE orders RENAME TO orders_data; "
        "CREATE FUNCTION slow(n int) RETURNS int LANGUAGE plpgsql AS "
        "$$BEGIN PERFORM pg_sleep(0.01); RETURN n; END$$; "
        "CREATE VIEW orders AS SELECT slow(g) AS id, date '2024-01-02' AS day, 1 AS amount, "
        "'x'::text AS note FROM generate_series(1, 100000) g"
    )
    run = subprocess.Popen(
        command(), env=environment(warehouse, tmp_path), cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while len(copies(warehouse)) < 3:
            assert run.poll() is None, run.communicate()[0][-3000:]
            assert time.monotonic() < deadline, "the COPYs never started"
            time.sleep(0.1)
        # Terminating a run signals its process (the run launchers send SIGTERM).
        run.send_signal(signal.SIGTERM)
        stopped = time.monotonic()
        while copies(warehouse) and time.monotonic() - stopped < 10:
            time.sleep(0.05)
        took = time.monotonic() - stopped
        assert copies(warehouse) == []
        out, _ = run.communicate(timeout=60)
        assert took < 2.0, f"the COPYs ran {took:.1f} s after the run was terminated: {out}"

    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert run.returncode != 0
    # Nothing committed.
    assert warehouse.wh1.scalar("SELECT count(*) FROM orders") == 0
    assert warehouse.wh2.scalar("SELECT count(*) FROM analytics.orders") == 0
    assert "DagsterExecutionInterruptedError" in out
    print(f"COPYs gone {took:.2f} s after SIGTERM")
