"""The bandwidth cap through the provider (issue 10): ``max_bytes_per_second`` on the hook
and the operator, checked like the other arguments, shown in the progress lines, and held by
a real task run (``dag.test()``)."""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterator

import pytest
import structlog
from af_support import Database, Events, PgServers, create_orders, create_orders_table, run_dag

from airflow_copyman.hooks.copyman import CopyManConfigError, CopyManHook, Destination

DAG_FILE = "copyman_test_dags.py"
CAP = 512 * 1024
ROWS = 12_000  # about 1.5 MiB: about 3 s at the cap


@pytest.fixture(scope="module")
def databases(pg: PgServers) -> tuple[Database, Database]:
    src = pg.database(pg.src, "capsrc")
    create_orders(src, ROWS)
    dest = pg.database(pg.dst1, "capdst")
    create_orders_table(dest)
    create_orders_table(dest, "orders_untouched")
    return src, dest


@pytest.fixture
def hook(
    databases: tuple[Database, Database], monkeypatch: pytest.MonkeyPatch
) -> Iterator[CopyManHook]:
    src, dest = databases
    monkeypatch.setenv("AIRFLOW_CONN_PG_SRC", src.uri())
    monkeypatch.setenv("AIRFLOW_CONN_PG_D1", dest.uri())
    yield CopyManHook("pg_src")
    dest.execute("TRUNCATE orders")


def test_the_hook_holds_the_cap_and_logs_it(hook: CopyManHook) -> None:
    """A cap that makes the copy last three times its receiver_timeout: it succeeds, takes
    at least bytes / cap seconds, and every progress line shows the rate (the average since
    the start: never over the cap) and the cap."""
    began = time.monotonic()
    with structlog.testing.capture_logs() as logs:
        report = hook.transfer(
            "orders",
            [Destination("pg_d1", "orders")],
            max_bytes_per_second=CAP,
            receiver_timeout=1.0,
            progress_interval=0.5,
        )
    took = time.monotonic() - began
    assert report.rows == ROWS and report.destinations[0].status == "loaded"
    assert took >= report.bytes / CAP >= 2.5
    lines = [str(entry["event"]) for entry in logs]
    source_lines = [line for line in lines if re.match(r"(Progress|Done): source pg_src:", line)]
    assert len(source_lines) >= 3, lines
    rate = re.compile(r", ([\d.]+) KiB/s \(capped at 512\.0 KiB/s\)")
    for line in source_lines:
        match = rate.search(line)
        assert match, line
        assert float(match.group(1)) <= 512.0, line  # the average so far, never over


@pytest.mark.parametrize("value", [0, -1, "5", True, math.inf])
def test_the_hook_refuses_bad_caps(hook: CopyManHook, value: object) -> None:
    with pytest.raises(CopyManConfigError, match="max_bytes_per_second must be"):
        hook.transfer("orders", [Destination("pg_d1", "orders")], max_bytes_per_second=value)


@pytest.mark.parametrize("value", [0, -1.5, "5", True, math.nan, [1]])
def test_the_operator_refuses_bad_caps_at_parse_time(value: object) -> None:
    from airflow_copyman.operators.copyman import CopyManOperator

    with pytest.raises(ValueError, match="t: max_bytes_per_second must be"):
        CopyManOperator(
            task_id="t", source_conn_id="s", sql="t",
            destinations=[{"conn_id": "d", "table": "t"}], max_bytes_per_second=value,
        )


@pytest.mark.usefixtures("airflow_db")
def test_a_capped_task_run(
    databases: tuple[Database, Database],
    monkeypatch: pytest.MonkeyPatch,
    events: Events,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """The templated cap renders as text and is taken as the number it was; the task runs
    at most at the cap, past its receiver_timeout; a cap rendering to -5 fails its task at
    once (permanent), before any destination is written."""
    src, dest = databases
    monkeypatch.setenv("AIRFLOW_CONN_PG_SRC", src.uri())
    monkeypatch.setenv("AIRFLOW_CONN_PG_D1", dest.uri())
    try:
        run = run_dag(DAG_FILE, "copyman_test_cap")
        assert run.tis["capped"] == ("success", 1)
        totals = run.xcom("capped")
        assert totals["rows"] == ROWS
        assert dest.scalar("SELECT count(*) FROM orders") == ROWS
        out = capfd.readouterr().out
        # The transfer's own time (the task's also holds Airflow's start-up), to 0.1 s.
        (took,) = re.findall(r"CopyMan transfer finished in ([\d.]+) s", out)
        assert float(took) + 0.05 >= totals["bytes"] / CAP >= 2.5
        assert "(capped at 512.0 KiB/s)" in out
        assert run.tis["capped_bad"] == ("failed", 1)
        (failure,) = [e for e in events if e["task_id"] == "capped_bad"]
        assert "AirflowFailException" in failure["bases"], failure
        assert "max_bytes_per_second must be more than zero bytes per second, got -5.0" in (
            failure["message"]
        )
        assert dest.scalar("SELECT count(*) FROM orders_untouched") == 0
    finally:
        dest.execute("TRUNCATE orders")

