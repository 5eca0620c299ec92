"""``copyman``'s progress on stderr: live bars on a terminal (% and ETA where the size is
estimated), the load's plain lines otherwise; only the report on stdout."""

from __future__ import annotations

import itertools
import json
import os
import pty
import subprocess
import time

import pytest
from af_support import Database

from airflow_copyman.testing.servers import create_database
from tests.cli_support import command, copyman, dsn, environment

_names = itertools.count()


@pytest.fixture
def source_and_dest(server: object) -> tuple[Database, Database]:
    made = []
    for prefix in ("src", "dst"):
        name = f"cli_{prefix}_{next(_names)}"
        create_database(server.address, name)  # type: ignore[attr-defined]
        made.append(Database(server, name))  # type: ignore[arg-type]
    src, dst = made
    src.execute("CREATE TABLE items AS SELECT g AS id, md5(g::text) AS name "
                "FROM generate_series(1, 100000) g")
    src.execute("ANALYZE items")  # an estimate: the bars show % and ETA
    dst.execute("CREATE TABLE items (id int, name text)")
    return src, dst


def test_a_terminal_gets_a_live_bar_per_destination(
    source_and_dest: tuple[Database, Database]
) -> None:
    src, dst = source_and_dest
    password = src.address.password
    terminal, stderr_end = pty.openpty()
    process = subprocess.Popen(
        # Capped at 2 MB/s: 4.6 MB take two seconds, so the bars are drawn mid-load.
        command("copy", dsn(src), "items", dsn(dst), "items", "--json",
                "--max-bytes-per-second", "2000000"),
        env=environment(password, COLUMNS="160"), stdout=subprocess.PIPE, stderr=stderr_end,
        text=True,
    )
    os.close(stderr_end)
    drawn = b""
    while True:
        try:
            chunk = os.read(terminal, 65536)
        except OSError:  # the process closed its end
            break
        if not chunk:
            break
        drawn += chunk
    stdout = process.stdout.read() if process.stdout else ""
    assert process.wait(timeout=30) == 0
    os.close(terminal)
    screen = drawn.decode()
    label = f"{dst.address.host}:{dst.address.port}/{dst.name}:items"
    assert label in screen
    assert "copying" in screen and "loaded" in screen and "100%" in screen
    assert any(f"{p}%" in screen for p in range(1, 100))  # a bar mid-way
    assert "\x1b[" in screen  # drawn and redrawn in place
    assert password not in screen and password not in stdout
    assert '"status": "loaded"' in stdout and "\x1b[" not in stdout


def test_elsewhere_progress_is_plain_lines_and_quiet_prints_nothing(
    source_and_dest: tuple[Database, Database]
) -> None:
    src, dst = source_and_dest
    password = src.address.password
    # The destination's table is locked for 5.5 s: the load waits, silent, then loads.
    with dst.connect() as holder:
        holder.execute("LOCK TABLE items IN ACCESS EXCLUSIVE MODE")
        process = subprocess.Popen(
            # A replace TRUNCATEs first: it waits for the lock before any row moves.
            command("copy", dsn(src), "items", dsn(dst), "items", "--mode", "replace",
                    "--json"),
            env=environment(password), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(5.5)
        holder.rollback()
        stdout, stderr = process.communicate(timeout=30)
    assert process.returncode == 0, stderr
    assert password not in stdout + stderr
    lines = stderr.splitlines()
    assert all(line.startswith("copyman: ") for line in lines)
    assert "\x1b[" not in stderr
    # A line at least every 5 s: ours while the load was silent, waiting for the lock.
    assert any(line.startswith("copyman: still loading after ") for line in lines), stderr
    assert lines[-1].startswith("copyman: done in ")
    assert json.loads(stdout)["rows"] == 100000

    quiet = copyman("copy", dsn(src), "items", dsn(dst), "items", "-q", password=password)
    assert (quiet.status, quiet.stdout, quiet.stderr) == (0, "", "")
