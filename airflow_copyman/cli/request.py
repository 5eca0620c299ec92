"""One load as the command line describes it: endpoints by name, destinations, options,
and the ledger of ``--load-id``. Both commands (``copy``, ``run``) build one; every check
that can fail before connecting is made here (:class:`UsageError`, exit status 2)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from psycopg.conninfo import conninfo_to_dict

from airflow_copyman import load

#: The ledger of ``--load-id`` records loads under this task, the id as their run and
#: lineage: a rerun with the same id is one more try of the same load.
LEDGER_DAG = "copyman"
LEDGER_TASK = "cli"


class UsageError(Exception):
    """Bad arguments or load file: exit status 2. Its message never holds a DSN."""


@dataclass
class LoadRequest:
    """What to run: ``load.Transfer``'s arguments, checked."""

    source: load.Endpoint
    sql: str
    destinations: list[load.Destination]
    endpoints: dict[str, load.Endpoint]
    options: load.LoadOptions
    ledger: load.Ledger | None = None
    #: Every password the endpoints hold, to keep out of anything printed.
    secrets: list[str] = field(default_factory=list)


def conninfo(value: str, where: str) -> str:
    """A libpq connection string or URL; ``env:VAR`` reads it from the environment."""
    if value.startswith("env:"):
        var = value[len("env:"):]
        text = os.environ.get(var, "")
        if not var or not text.strip():
            raise UsageError(f"{where}: environment variable {var!r} is not set or empty")
        return text
    return value


def endpoint(value: str, where: str, name: str | None = None) -> load.Endpoint:
    """An endpoint from a DSN (see :func:`conninfo`), named ``name`` or after where it
    points (``host:port/dbname``, ``service=NAME``): the name is a destination's ``conn_id``,
    in its label and in the ledger's key, so it must stay the same from run to run."""
    text = conninfo(value, where)
    try:
        args = conninfo_to_dict(text)
    except Exception:
        # The message of a bad DSN may quote it, password included: never print it.
        raise UsageError(
            f"{where}: not a libpq connection string or URL (postgresql://..., "
            "'host=... dbname=...', service=NAME)"
        ) from None
    if name is None:
        service = args.get("service")
        if service and not args.get("host"):
            name = f"service={service}"
        else:
            host, port = args.get("host") or "localhost", args.get("port") or 5432
            name = f"{host}:{port}/{args.get('dbname') or args.get('user') or ''}"
    return load.postgres(name, text)


def secrets_of(endpoints: Sequence[load.Endpoint]) -> list[str]:
    return [s for e in endpoints for s in e.secrets]


def options(values: Mapping[str, Any]) -> load.LoadOptions:
    """The load's options (None values: the load's default)."""
    given = {k: v for k, v in values.items() if v is not None}
    try:
        return load.LoadOptions(**given)
    except (load.ArgumentError, TypeError) as exc:
        raise UsageError(str(exc)) from None


def ledger(load_id: str | None) -> load.Ledger | None:
    """``--load-id``: a ledger row per destination loaded, in the destination's database,
    committed with its rows; a rerun with the same id skips the destinations it finds."""
    if load_id is None:
        return None
    if not load_id.strip() or "\x00" in load_id:
        raise UsageError("--load-id must be a non-empty name without NUL characters")
    key = load.TaskKey(
        dag_id=LEDGER_DAG, task_id=LEDGER_TASK, run_id=load_id, map_index=-1,
        lineage=load_id, try_number=1,
    )
    return load.Ledger(None, key)


def destinations(values: Sequence[Mapping[str, Any]]) -> list[load.Destination]:
    try:
        return load.destinations_from(values)
    except load.ConfigError as exc:
        raise UsageError(str(exc)) from None


def parameters(pairs: Sequence[str]) -> dict[str, str]:
    """``-p NAME=VALUE`` pairs, for ``%(NAME)s`` in the query (text: the server casts it)."""
    found: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise UsageError(f"-p takes NAME=VALUE, got {pair!r}")
        found[name.strip()] = value
    return found
