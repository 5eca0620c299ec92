"""``copyman run LOADFILE.toml``: many destinations, as the operator loads them.

::

    source = "env:SOURCE_DSN"           # or { dsn = "...", name = "sales" }
    sql = "SELECT * FROM orders WHERE day = %(day)s"
    parameters = { day = "2026-12-07" }
    verify = "checksum"                 # and format, receiver_timeout, lock_timeout,
                                        # min_rows, max_bytes_per_second, load_id
    [[destinations]]
    name = "warehouse"                  # optional: the endpoint's name (its conn_id)
    dsn = "service=warehouse"
    table = "public.orders"
    mode = "merge"
    key = ["id"]
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from airflow_copyman import load
from airflow_copyman.cli.request import UsageError, endpoint

#: The load's options a file may set (the command line's win).
OPTIONS = (
    "format", "verify", "receiver_timeout", "lock_timeout", "min_rows", "max_bytes_per_second",
)
TOP_KEYS = frozenset({"source", "sql", "parameters", "load_id", "destinations", *OPTIONS})
#: A destination's keys: where it is (``dsn``, ``name``) and the load's destination keys
#: but ``conn_id`` (the endpoint's name is it).
DESTINATION_KEYS = frozenset({"dsn", "name"} | (load.DESTINATION_KEYS - {"conn_id"}))


@dataclass
class LoadFile:
    source: load.Endpoint
    sql: str
    parameters: Any
    load_id: str | None
    options: dict[str, Any]
    #: Each destination as ``load.Destination.from_value`` takes it (``conn_id`` set).
    destinations: list[dict[str, Any]]
    endpoints: dict[str, load.Endpoint]


def read(path: str) -> LoadFile:
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise UsageError(f"{path}: cannot read it: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: not a TOML file: {exc}") from None
    return parse(data, path)


def parse(data: Mapping[str, Any], path: str) -> LoadFile:
    unknown = sorted(set(data) - TOP_KEYS)
    if unknown:
        raise UsageError(
            f"{path}: unknown key(s) {', '.join(unknown)} (allowed: {', '.join(sorted(TOP_KEYS))})"
        )
    source, sql = _source(data.get("source"), path), data.get("sql")
    if not isinstance(sql, str) or not sql.strip():
        raise UsageError(f"{path}: 'sql' must be a query or a table name")
    load_id = data.get("load_id")
    if load_id is not None and not isinstance(load_id, str):
        raise UsageError(f"{path}: 'load_id' must be a string")
    entries = data.get("destinations")
    if not isinstance(entries, list) or not entries:
        raise UsageError(f"{path}: give at least one [[destinations]] with 'dsn' and 'table'")
    endpoints: dict[str, load.Endpoint] = {}
    dsns: dict[str, str] = {}
    destinations = []
    for i, entry in enumerate(entries):
        where = f"{path}: destination #{i + 1}"
        destination, point, dsn = _destination(entry, where)
        name = point.name
        if dsns.setdefault(name, dsn) != dsn:
            raise UsageError(
                f"{where}: another destination named {name!r} has another dsn: give each "
                "its own 'name'"
            )
        endpoints.setdefault(name, point)
        destinations.append({**destination, "conn_id": name})
    return LoadFile(
        source=source,
        sql=sql,
        parameters=data.get("parameters"),
        load_id=load_id,
        options={k: data[k] for k in OPTIONS if k in data},
        destinations=destinations,
        endpoints=endpoints,
    )


def _source(value: Any, path: str) -> load.Endpoint:
    """``source = "DSN"``, or ``source = { dsn = "DSN", name = "sales" }``."""
    where = f"{path}: source"
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - {"dsn", "name"})
        if unknown:
            raise UsageError(f"{where}: unknown key(s) {', '.join(unknown)} (allowed: dsn, name)")
        name = value.get("name", "source")
        if not isinstance(name, str) or not name.strip():
            raise UsageError(f"{where}: 'name' must be a non-empty string")
        value = value.get("dsn")
    else:
        name = "source"
    if not isinstance(value, str) or not value:
        raise UsageError(f"{where}: must be a DSN (a string), or a table with 'dsn' and 'name'")
    return endpoint(value, where, name)


def _destination(entry: Any, where: str) -> tuple[dict[str, Any], load.Endpoint, str]:
    if not isinstance(entry, Mapping):
        raise UsageError(f"{where}: must be a table with 'dsn' and 'table'")
    unknown = sorted(set(entry) - DESTINATION_KEYS)
    if unknown:
        raise UsageError(
            f"{where}: unknown key(s) {', '.join(unknown)} "
            f"(allowed: {', '.join(sorted(DESTINATION_KEYS))})"
        )
    dsn, name = entry.get("dsn"), entry.get("name")
    if not isinstance(dsn, str) or not dsn:
        raise UsageError(f"{where}: 'dsn' must be a DSN (a string)")
    if name is not None and (not isinstance(name, str) or not name.strip()):
        raise UsageError(f"{where}: 'name' must be a non-empty string")
    point = endpoint(dsn, where, name)
    return {k: v for k, v in entry.items() if k not in ("dsn", "name")}, point, dsn
