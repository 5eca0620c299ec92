"""Running ``copyman`` as a subprocess against the tests' real servers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from af_support import Database

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Result:
    status: int
    stdout: str
    stderr: str

    @property
    def report(self) -> dict[str, Any]:
        parsed: dict[str, Any] = json.loads(self.stdout)
        return parsed

    def by_table(self) -> dict[str, dict[str, Any]]:
        return {d["table"]: d for d in self.report["destinations"]}


def environment(password: str, **extra: str) -> dict[str, str]:
    """The command's environment: the password from PGPASSWORD (never on the command line),
    this checkout's code first."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(PGPASSWORD=password, PYTHONPATH=str(ROOT), **extra)
    return env


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "airflow_copyman.cli", *args]


def copyman(*args: str, password: str, timeout: float = 60, **env: str) -> Result:
    """Run ``copyman ARGS``; no output of it may hold the password."""
    done = subprocess.run(
        command(*args), capture_output=True, text=True, timeout=timeout,
        env=environment(password, **env), check=False,
    )
    result = Result(done.returncode, done.stdout, done.stderr)
    assert_no_password(result, password)
    return result


def assert_no_password(result: Result, password: str) -> None:
    from urllib.parse import quote

    for stream in (result.stdout, result.stderr):
        assert password not in stream
        assert quote(password, safe="") not in stream


def dsn(db: Database) -> str:
    """A libpq keyword string without the password (it comes from PGPASSWORD)."""
    a = db.address
    return f"host={a.host} port={a.port} user={a.user} dbname={db.name}"
