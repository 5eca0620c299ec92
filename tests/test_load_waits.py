"""One way to wait (issue 16, item 4): the load layer's own statements, its COMMITs and its
read-backs are all steps of the engine's one driver (``copyman.Driver``); a statement past
its deadline is cancelled and its end read as the step that follows it, not abandoned."""

from __future__ import annotations

import ast
import pathlib
import socket
import time
from typing import Any, ClassVar

import psycopg
import pytest

from airflow_copyman import copyman
from airflow_copyman.load.connection import bounded

LOAD = pathlib.Path(bounded.__file__).parents[1]


class _Seen(copyman.Driver[Any]):
    """The engine's driver, remembering each run's steps (which ended, how)."""

    runs: ClassVar[list[_Seen]] = []

    def __init__(self, steps: Any) -> None:
        super().__init__(steps)
        _Seen.runs.append(self)


@pytest.fixture
def seen(monkeypatch: pytest.MonkeyPatch) -> list[_Seen]:
    _Seen.runs = []
    monkeypatch.setattr(copyman, "Driver", _Seen)
    return _Seen.runs


def _bounded(conn: psycopg.Connection[Any]) -> bounded.BoundedConnection:
    info = conn.info
    return bounded.BoundedConnection.connect(
        **info.get_parameters(), password=info.password or None
    )


def test_a_statement_and_a_commit_wait_on_the_one_driver(
    dbs: Any, seen: list[_Seen]
) -> None:
    holder = dbs.new("waits")
    holder.execute("CREATE TABLE locked (id int)")
    holder.commit()
    with _bounded(holder) as conn:
        conn.bounds = bounded.Bounds(0.3)
        with holder.transaction():
            holder.execute("LOCK TABLE locked")
            started = time.monotonic()
            with pytest.raises(bounded.StatementTimeout, match=r"no answer .* 0\.3 s"):
                conn.execute("SELECT * FROM locked")
            assert time.monotonic() - started < 0.3 + bounded.CANCEL_WAIT + 1
        # The cancel was a phase of the same step: its end (57014) was read on the driver,
        # so the connection is not closed and is usable after a rollback.
        lock_wait = seen[-1]
        assert not lock_wait.expired and not lock_wait.pending
        assert isinstance(lock_wait.finished[0].error, psycopg.errors.QueryCanceled)
        assert not conn.closed
        conn.rollback()
        conn.execute("INSERT INTO locked VALUES (1)")
        statements = len(seen)
        assert bounded.commit_all([conn], 5.0, conn.bounds.stop) == [None]
        assert len(seen) == statements + 1  # the COMMIT: a step of the same driver
    assert holder.execute("SELECT count(*) FROM locked").fetchone() == (1,)


def test_a_step_past_its_deadline_carries_on_as_its_on_expire_says() -> None:
    here, server = socket.socketpair()

    def statement() -> copyman.Steps:
        yield here.fileno(), copyman.Wait.READ  # nothing comes until the "cancel"
        return here.recv(16)

    def cancel(expired: copyman.Step) -> copyman.Step:
        server.send(b"57014")  # the cancel makes the statement's end come
        return expired.follow(time.monotonic() + 5)

    with here, server:
        driver: copyman.Driver[int] = copyman.Driver(
            {0: copyman.Step(statement(), time.monotonic(), on_expire=cancel)}
        )
        driver.run()
        assert driver.finished[0].value == b"57014" and not driver.expired
        # Without on_expire the step is given up (closed) at its deadline.
        plain: copyman.Driver[int] = copyman.Driver(
            {0: copyman.Step(statement(), time.monotonic())}
        )
        plain.run()
        assert list(plain.expired) == [0] and plain.expired[0].gen.gi_frame is None


def test_the_load_layer_has_no_wait_loop_of_its_own() -> None:
    loops = []
    for path in sorted(LOAD.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names] if isinstance(node, ast.Import)
                else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            )
            waits = [n for n in names if n in ("select", "selectors")]
            loops += [f"{path.relative_to(LOAD)}: {n}" for n in waits]
    assert loops == []
