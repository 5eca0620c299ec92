"""``copyman``'s exit statuses, each provoked for real (a subprocess against real servers):
0 loaded, 1 refused or failed for good, 75 every failure transient, 2 usage, 130 / 143 on
SIGINT / SIGTERM with every COPY stopped on its server and nothing committed. And no
password in any output."""

from __future__ import annotations

import itertools
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from af_support import Database

from airflow_copyman.testing.servers import create_database
from tests.cli_support import Result, assert_no_password, command, copyman, dsn, environment

_names = itertools.count()


@pytest.fixture
def new_db(server: object) -> Callable[[str], Database]:
    def make(prefix: str) -> Database:
        name = f"cli_{prefix}_{next(_names)}"
        create_database(server.address, name)  # type: ignore[attr-defined]
        return Database(server, name)  # type: ignore[arg-type]
    return make


@pytest.fixture
def src(new_db: Callable[[str], Database]) -> Database:
    db = new_db("src")
    db.execute("CREATE TABLE items AS SELECT g AS id FROM generate_series(1, 100) g")
    return db


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_loadfile(path: Path, source: str, *destinations: tuple[str, str]) -> str:
    text = f'source = "{source}"\nsql = "items"\n'
    for conninfo, table in destinations:
        text += f'[[destinations]]\ndsn = "{conninfo}"\ntable = "{table}"\n'
    path.write_text(text)
    return str(path)


def test_missing_tables_refuse_the_whole_load_with_status_1(
    src: Database, new_db: Callable[[str], Database], tmp_path: Path
) -> None:
    dst = new_db("dst")
    dst.execute("CREATE TABLE items (id int)")
    loadfile = write_loadfile(tmp_path / "l.toml", dsn(src), (dsn(dst), "items"),
                              (dsn(dst), "missing"), (dsn(dst), "absent"))
    done = copyman("run", loadfile, "--quiet", password=src.address.password)
    assert done.status == 1
    # One line per problem, each naming its destination.
    first, second = done.stderr.splitlines()
    assert first.startswith("copyman: refused, nothing was written: destination #2 (")
    assert 'table "missing" does not exist' in first
    assert second.startswith("copyman: refused, nothing was written: destination #3 (")
    assert 'table "absent" does not exist' in second
    assert dst.scalar("SELECT count(*) FROM items") == 0


def test_a_permanent_failure_of_one_destination_is_status_1(
    src: Database, new_db: Callable[[str], Database], tmp_path: Path
) -> None:
    good, bad = new_db("good"), new_db("bad")
    good.execute("CREATE TABLE items (id int)")
    bad.execute("CREATE TABLE items (id int CHECK (id < 50))")
    loadfile = write_loadfile(tmp_path / "l.toml", dsn(src), (dsn(good), "items"),
                              (dsn(bad), "items"))
    done = copyman("run", loadfile, "--quiet", "--json", password=src.address.password)
    assert done.status == 1
    [line] = done.stderr.splitlines()
    assert f"/{bad.name}:items: failed (for good)" in line and "check constraint" in line
    assert [d["status"] for d in done.report["destinations"]] == ["loaded", "failed"]
    assert (good.scalar("SELECT count(*) FROM items"), bad.scalar("SELECT count(*) FROM items")
            ) == (100, 0)


def test_a_destination_refusing_connections_is_status_75(
    src: Database, new_db: Callable[[str], Database], tmp_path: Path
) -> None:
    dst = new_db("dst")
    dst.execute("CREATE TABLE items (id int)")
    nowhere = f"host=127.0.0.1 port={free_port()} user=loader dbname=nowhere"
    loadfile = write_loadfile(tmp_path / "l.toml", dsn(src), (dsn(dst), "items"),
                              (nowhere, "items"))
    done = copyman("run", loadfile, "--quiet", "--json", password=src.address.password)
    assert done.status == 75
    [line] = done.stderr.splitlines()
    assert "/nowhere:items: failed (may pass, retry later)" in line
    assert "Connection refused" in line
    assert [d["status"] for d in done.report["destinations"]] == ["loaded", "failed"]


def test_an_unreachable_source_is_status_75(new_db: Callable[[str], Database]) -> None:
    dst = new_db("dst")
    dst.execute("CREATE TABLE items (id int)")
    nowhere = f"postgresql://reader@127.0.0.1:{free_port()}/sales"
    done = copyman("copy", nowhere, "items", dsn(dst), "items", "-q",
                   password=dst.address.password)
    assert done.status == 75, done.stderr
    assert "Connection refused" in done.stderr


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["copy", "host=x", "items", "host=y"], "the following arguments are required: TABLE"),
        (["copy", "host=x", "items", "host=y", "t", "--mode", "upsert"], "invalid choice"),
        (["copy", "host=x", "items", "host=y", "t", "--mode", "merge"], "needs 'key'"),
        (["copy", "host=x", "items", "host=y", "t", "--receiver-timeout", "0"],
         "receiver_timeout must be more than zero"),
        (["copy", "env:COPYMAN_NOT_SET", "items", "host=y", "t"], "'COPYMAN_NOT_SET' is not set"),
        (["copy", "host=x", "items", "host=y", "t", "-p", "day"], "-p takes NAME=VALUE"),
        (["run", "/nonexistent/load.toml"], "cannot read it"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_usage_errors_are_status_2(args: list[str], says: str) -> None:
    done = copyman(*args, password="unused-password")
    assert done.status == 2
    assert says in done.stderr
    assert done.stdout == ""


def test_a_bad_load_file_is_status_2(tmp_path: Path) -> None:
    loadfile = tmp_path / "l.toml"
    loadfile.write_text('source = "host=x"\nsql = "items"\n[[destinations]]\ndsn = "host=y"\n'
                        'table = "t"\ncolour = "red"\n')
    done = copyman("run", str(loadfile), password="unused-password")
    assert done.status == 2
    assert "destination #1: unknown key(s) colour" in done.stderr


def test_help_shows_an_example_for_each_command() -> None:
    for args in (["--help"], ["copy", "--help"], ["run", "--help"]):
        done = copyman(*args, password="unused-password")
        assert done.status == 0
        assert "example" in done.stdout and "copyman " in done.stdout


def test_no_password_is_printed_even_when_it_is_in_a_dsn(
    src: Database, new_db: Callable[[str], Database]
) -> None:
    dst = new_db("dst")
    dst.execute("CREATE TABLE items (id int)")
    password = src.address.password
    source_url = src.uri()  # the password in the URL, on purpose
    assert password in source_url
    wrong = "Wrong-Pass-4711"
    bad_dest = f"{dsn(dst)} password={wrong}"
    checked = [
        copyman("copy", source_url, "items", dsn(dst), "items", "--json", password=password),
        copyman("copy", source_url, "items", bad_dest, "items", password=password),
        copyman("copy", source_url, "no_such_table", dsn(dst), "items", password=password),
        copyman("copy", f"{dsn(src)} password={password} =broken", "items", dsn(dst), "items",
                password=password),
    ]
    assert [r.status for r in checked] == [0, 1, 1, 2]
    assert "password authentication failed" in checked[1].stderr
    for result in checked:
        assert_no_password(result, wrong)


# SIGINT and SIGTERM in the middle of a busy load.


def slow_source(db: Database) -> str:
    """A query that yields a row every 2 ms (100,000 rows: minutes)."""
    db.execute(
        "CREATE FUNCTION slow(n int) RETURNS int LANGUAGE plpgsql AS "
        "$$ BEGIN PERFORM pg_sleep(0.002); RETURN n; END $$"
    )
    return "SELECT slow(g) AS id FROM generate_series(1, 100000) g"


def copies(db: Database, *names: str) -> list[tuple[str, str]]:
    """The COPYs running in these databases (the load's, by their application_name)."""
    return [
        tuple(row)
        for row in db.execute(
            "SELECT datname, query FROM pg_stat_activity WHERE datname = ANY(%s) "
            "AND application_name = 'airflow-copyman' AND state = 'active' "
            "AND query ILIKE 'copy%%'",
            [list(names)],
        )
    ]


def wait_until(check: Callable[[], bool], limit: float) -> bool:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return check()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_stops_every_copy_and_commits_nothing(
    src: Database, new_db: Callable[[str], Database], signum: int
) -> None:
    dst1 = new_db("dst")
    dst1.execute("CREATE TABLE items (id int)")
    names = (src.name, dst1.name)
    password = src.address.password
    process = subprocess.Popen(
        command("copy", dsn(src), slow_source(src), dsn(dst1), "items", "--json"),
        env=environment(password), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        # Mid-load: the source's COPY and the destination's both running, rows flowing.
        assert wait_until(lambda: len(copies(src, *names)) == 2, 15), copies(src, *names)
        time.sleep(0.5)
        process.send_signal(signum)
        stdout, stderr = process.communicate(timeout=10)
    finally:
        process.kill()
    result = Result(process.returncode, stdout, stderr)
    assert_no_password(result, password)
    assert result.status == 128 + signum, result.stderr
    # Every COPY stopped on its server (the process waited for it before it exited).
    assert wait_until(lambda: not copies(src, *names), 2), copies(src, *names)
    assert dst1.scalar("SELECT count(*) FROM items") == 0
    assert f"stopped by {signal.Signals(signum).name}; nothing was committed" in result.stderr
    assert result.stdout == "" or result.report["destinations"][0]["status"] == "failed"
