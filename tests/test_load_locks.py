"""One load at a time into one table, and lock waits bounded and named (issue 15): loads
through ``load.run`` (no Airflow) in threads, on a real server."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from airflow_copyman import load
from airflow_copyman.load.connection import locks
from airflow_copyman.testing.servers import ContainerServer, LocalServer, create_database
from tests.conftest import _names

#: A source of 1,000 rows whose COPY takes a while (so that two loads overlap).
SLOW_SOURCE = (
    "WITH pause AS MATERIALIZED (SELECT pg_sleep({pause})) "
    "SELECT g AS id, '{tag}' || g AS v FROM generate_series(1, 1000) AS g, pause"
)

#: mode, destination options, the table's definition.
CASES = {
    "append": ({"mode": "append"}, "id int, v text"),
    "replace-truncate": ({"mode": "replace"}, "id int, v text"),
    "replace-delete": ({"mode": "replace", "replace_with": "delete"}, "id int, v text"),
    "merge": ({"mode": "merge", "key": ["id"]}, "id int, v text"),
    "merge-unique": ({"mode": "merge", "key": ["id"]}, "id int PRIMARY KEY, v text"),
}


class Dbs:
    def __init__(self, server: LocalServer | ContainerServer) -> None:
        names = f"lk_src_{next(_names)}", f"lk_dst_{next(_names)}"
        for name in names:
            create_database(server.address, name)
        self.src_uri, self.dst_uri = (server.address.uri(name) for name in names)

    def dst(self, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.dst_uri, autocommit=True) as conn:
            cur = conn.execute(sql, params)
            return cur.fetchall() if cur.description else []

    def session(self, application_name: str) -> psycopg.Connection[Any]:
        return psycopg.connect(self.dst_uri, application_name=application_name)

    def run(self, table: str, options: dict[str, Any], *, name: str, tag: str = "a",
            pause: float = 0.6, **kwargs: Any) -> load.TransferReport:
        src = load.postgres("src", self.src_uri)
        dst = load.postgres("wh", self.dst_uri, application_name=name)
        return load.run(
            src, SLOW_SOURCE.format(pause=pause, tag=tag),
            [{"conn_id": "wh", "table": table, **options}], endpoints={"wh": dst}, **kwargs,
        )


@pytest.fixture
def db(server: LocalServer | ContainerServer) -> Iterator[Dbs]:
    yield Dbs(server)


def at_once(*loads: Any) -> list[load.DestinationResult]:
    """Run the loads in threads started together; each one's destination result."""
    results: list[Any] = [None] * len(loads)
    start = threading.Barrier(len(loads))

    def go(i: int) -> None:
        start.wait()
        try:
            results[i] = loads[i]().destinations[0]
        except BaseException as exc:  # pragma: no cover - shown by the assert below
            results[i] = exc

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(loads))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for result in results:
        assert isinstance(result, load.DestinationResult), result
    return results


def key_of(db: Dbs, qualified: str) -> int:
    return int(db.dst("SELECT hashtextextended(%s, 0)", [locks.KEY_PREFIX + qualified])
               [0][0])


@pytest.mark.parametrize("case", list(CASES))
def test_two_loads_of_one_table_at_once_leave_it_exact(db: Dbs, case: str) -> None:
    options, columns = CASES[case]
    db.dst(f"CREATE TABLE t ({columns})")
    # Rows to replace or keep (a merge starts empty, as the issue saw it: rows of its keys
    # would make the second merge's UPDATE wait for the first's rows by chance).
    if not case.startswith("merge"):
        db.dst("INSERT INTO t SELECT g, 'old' FROM generate_series(1, 10) g")
    # Two spellings of one table, two loads (as two tasks, or two runs of one DAG). The
    # postoperator's pause holds each load open after its writes: their windows overlap.
    # Each load also notes how many rows it sees before its commit: one after the other,
    # the second sees the first's rows too.
    db.dst("CREATE TABLE seen (n bigint)")
    slow = {**options, "postoperator": [
        "INSERT INTO seen SELECT count(*) FROM t", "SELECT pg_sleep(0.4)"]}
    first, second = at_once(
        lambda: db.run("t", slow, name="load A", tag="a", pause=0.3),
        lambda: db.run("public.t", slow, name="load B", tag="b", pause=0.3),
    )
    loaded = [r for r in (first, second) if r.status == "loaded"]
    for result in (first, second):
        # Loaded, or failed transient naming the load in the way: never permanent.
        assert result.status == "loaded" or (
            not result.permanent and "load " in (result.error or "")
        ), result
    assert loaded
    rows, ids, tags = db.dst(
        "SELECT count(*), count(DISTINCT id), array_agg(DISTINCT left(v, 1) ORDER BY "
        "left(v, 1)) FROM t WHERE v <> 'old'"
    )[0]
    if case == "append":
        assert (rows, ids) == (1000 * len(loaded), 1000)
        assert db.dst("SELECT count(*) FROM t WHERE v = 'old'") == [(10,)]
        # Never both at once: the later load saw the earlier one's rows.
        assert db.dst("SELECT n FROM seen ORDER BY n") == [(1010,), (2010,)][:len(loaded)]
    elif case.startswith("replace"):
        # Exactly one source's rows: the one that committed last.
        assert (rows, ids, len(tags)) == (1000, 1000, 1)
        assert db.dst("SELECT count(*) FROM t") == [(1000,)]
    else:
        assert (rows, ids) == (1000, 1000)
        assert db.dst("SELECT count(*) FROM t") == [(1000,)]
        if len(loaded) == 2:
            # One merge inserted the new ids; the other found every one of them.
            assert sorted(r.inserted or 0 for r in loaded) == [0, 1000]


@pytest.mark.parametrize(
    ("options", "holding", "lock"),
    [
        ({"mode": "append"}, "SELECT pg_advisory_xact_lock(%s)", "load lock"),
        ({"mode": "merge", "key": ["id"]}, "SELECT pg_advisory_xact_lock(%s)", "load lock"),
        ({"mode": "replace"}, "SELECT count(*) FROM t", "ACCESS EXCLUSIVE"),
        ({"mode": "replace", "replace_with": "delete"}, "LOCK TABLE t IN SHARE MODE",
         "ROW EXCLUSIVE"),
    ],
    ids=["append-behind-a-load", "merge-behind-a-load", "truncate-behind-a-reader",
         "delete-behind-a-share-lock"],
)
def test_a_lock_wait_ends_after_lock_timeout_naming_table_lock_and_holder(
    db: Dbs, options: dict[str, Any], holding: str, lock: str
) -> None:
    db.dst("CREATE TABLE t (id int, v text)")
    key = key_of(db, "public.t")
    with db.session("nightly report") as holder:
        holder.execute(holding, [key] if "%s" in holding else None)  # held: no commit
        started = time.monotonic()
        result = db.run("t", options, name="the load", pause=0, lock_timeout=1).destinations[0]
        waited = time.monotonic() - started
        holder.rollback()
    assert result.status == "failed" and result.permanent is False, result
    error = result.error or ""
    assert "public.t" in error and lock in error, error
    assert "within 1 s (lock_timeout)" in error, error
    assert "'nightly report'" in error and "its transaction has run" in error, error
    assert waited < 10, waited
    assert db.dst("SELECT count(*) FROM t") == [(0,)]


def test_readers_during_a_truncate_replace_behind_a_long_reader_wait_one_try(db: Dbs) -> None:
    db.dst("CREATE TABLE t (id int, v text)")
    db.dst("INSERT INTO t SELECT g, 'old' FROM generate_series(1, 10) g")
    result: list[Any] = []
    with db.session("long reader") as reader:
        reader.execute("SELECT count(*) FROM t")  # its ACCESS SHARE lock stays
        loader = threading.Thread(target=lambda: result.append(
            db.run("t", {"mode": "replace"}, name="replace", pause=0, lock_timeout=8,
                   receiver_timeout=8)))
        loader.start()
        time.sleep(0.4)
        waits = []
        for _ in range(4):
            with db.session("new reader") as other:
                started = time.monotonic()
                other.execute("SELECT count(*) FROM t").fetchone()
                waits.append(time.monotonic() - started)
            time.sleep(0.1)
        reader.rollback()  # the long reader ends: the replace gets its lock
    loader.join(30)
    # A new reader queues behind the waiting TRUNCATE at most one try (0.5 s).
    assert max(waits) < 1.5, waits
    (report,) = result
    assert report.destinations[0].status == "loaded", report.destinations[0]
    assert db.dst("SELECT count(*), min(v) FROM t") == [(1000, "a1")]


def test_create_from_two_tasks_at_once_creates_once_and_never_fails_permanently(
    db: Dbs,
) -> None:
    options = {"create": "if_missing"}
    first, second = at_once(
        lambda: db.run("fresh", options, name="task A"),
        lambda: db.run("public.fresh", options, name="task B"),
    )
    loaded = [r for r in (first, second) if r.status == "loaded"]
    assert loaded
    for result in (first, second):
        assert result.status == "loaded" or result.permanent is False, result
    failed = [r for r in (first, second) if r.status != "loaded"]
    for result in failed:
        assert "created by another load meanwhile" in (result.error or ""), result
    assert db.dst("SELECT count(*) FROM fresh") == [(1000 * len(loaded),)]


def test_lock_timeout_is_checked_before_connecting(db: Dbs) -> None:
    for bad in (0, -1, "60", float("nan")):
        with pytest.raises(load.ConfigError, match="lock_timeout"):
            db.run("t", {}, name="x", lock_timeout=bad)


def test_application_name_names_the_task_within_63_printable_bytes() -> None:
    name = load.application_name_for("dag", "task", "manual__2026-12-07T05:00:00+00:00", 3)
    assert name == "copyman dag.task[3] manual__2026-12-07T05:00:00+00:00"
    long = load.application_name_for("d" * 40, "tâsk", "r" * 40)
    assert len(long.encode()) == 63 and long.isascii() and "t?sk" in long


def test_appends_without_the_load_lock_land_side_by_side(db: Dbs) -> None:
    """A split load's ranges append into one staging table at once: with load_lock=False
    neither waits for the other (each sees only its own rows before its commit)."""
    db.dst("CREATE TABLE t (id int, v text); CREATE TABLE seen (n bigint)")
    options = {"mode": "append", "load_lock": False, "postoperator": [
        "INSERT INTO seen SELECT count(*) FROM t", "SELECT pg_sleep(0.4)"]}
    first, second = at_once(
        lambda: db.run("t", options, name="range 1", tag="a", pause=0.3),
        lambda: db.run("t", options, name="range 2", tag="b", pause=0.3),
    )
    assert (first.status, second.status) == ("loaded", "loaded")
    assert db.dst("SELECT count(*), count(DISTINCT v) FROM t") == [(2000, 2000)]
    # Both were loading at once: neither saw the other's rows before committing.
    assert db.dst("SELECT n FROM seen ORDER BY n") == [(1000,), (1000,)]


@pytest.mark.parametrize("options", [
    {"mode": "merge", "key": ["id"]}, {"mode": "replace"}, {"truncate": True},
    {"create": "if_missing"},
])
def test_load_lock_false_is_only_for_appends(options: dict[str, Any]) -> None:
    with pytest.raises(load.ConfigError, match="load_lock=False is only for mode='append'"):
        load.Destination.from_value({"conn_id": "wh", "table": "t", "load_lock": False,
                                     **options}, 0)
