"""What a Dagster load is, as data: the source, the query, the destinations, the checks.

Checked when the code location loads (a destination with a bad option fails the import, not a
run), and with no connection string in it: those reach :class:`CopyManResource` at run time.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from airflow_copyman import load

#: A PostgreSQL identifier, plain (folded to lower case) or double-quoted.
_IDENT = r'(?:[A-Za-z_][A-Za-z0-9_$]*|"(?:[^"]|"")+")'
_TABLE = re.compile(rf"\s*({_IDENT})(?:\s*\.\s*({_IDENT}))?\s*")
#: A table nobody schema-qualified lives, for the asset key, in ``public`` (the decorator
#: cannot ask a server for its ``search_path``).
DEFAULT_SCHEMA = "public"


def table_parts(name: str) -> tuple[str, str] | None:
    """``(schema, table)`` as PostgreSQL stores them (plain names folded to lower case,
    quoted ones as written), or None where ``name`` is not a table name (a query)."""
    found = _TABLE.fullmatch(name)
    if found is None:
        return None
    first, second = found.group(1), found.group(2)
    if second is None:
        return DEFAULT_SCHEMA, _unquote(first)
    return _unquote(first), _unquote(second)


def _unquote(ident: str) -> str:
    if ident.startswith('"'):
        return ident[1:-1].replace('""', '"')
    return ident.lower()


def _destination(value: load.Destination | Mapping[str, Any], position: int) -> load.Destination:
    """A checked destination; ``conn`` is accepted for ``conn_id`` (the name of a connection
    of :class:`CopyManResource`)."""
    if isinstance(value, Mapping) and "conn" in value:
        if "conn_id" in value:
            raise load.ConfigError(
                f"destination #{position + 1}: give 'conn' or 'conn_id', not both"
            )
        value = {("conn_id" if k == "conn" else k): v for k, v in value.items()}
    return load.Destination.from_value(value, position)


@dataclass(frozen=True)
class CopyManLoad:
    """One pass of ``sql`` from ``source`` into every destination.

    :param source: the name of a connection of :class:`CopyManResource`.
    :param sql: a query (with ``%(name)s`` placeholders filled from ``parameters``) or a
        table name; a table name makes the source table an upstream asset.
    :param destinations: :class:`airflow_copyman.load.Destination` objects or mappings with
        its keys (``conn`` may stand for ``conn_id``): one asset each.
    :param verify: ``"count"`` (the COPYs' row counts) or ``"checksum"``: the result is an
        asset check on each destination's asset.
    :param format: the COPY format (None: binary where every type allows it).
    :param min_rows: fewer source rows fail the load (transient: late data may arrive).
    :param name: the op's name (default: the decorated function's).
    """

    source: str
    sql: str
    destinations: Sequence[load.Destination | Mapping[str, Any]]
    verify: str = "count"
    format: str | None = None
    min_rows: int = 0
    name: str | None = None
    specs: tuple[load.Destination, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.source, str) or not self.source:
            raise load.ConfigError("'source' must be the name of a connection")
        if not isinstance(self.sql, str) or not self.sql.strip():
            raise load.ConfigError("'sql' must be a query or a table name")
        if self.verify not in ("count", "checksum"):
            raise load.ConfigError(f"'verify' must be 'count' or 'checksum', got {self.verify!r}")
        if isinstance(self.destinations, str | bytes | Mapping):
            raise load.ConfigError("'destinations' must be a list")
        specs = tuple(_destination(d, i) for i, d in enumerate(self.destinations))
        if not specs:
            raise load.ConfigError("no destinations: give at least one")
        object.__setattr__(self, "specs", specs)

    @property
    def source_table(self) -> tuple[str, str] | None:
        """The source table ``(schema, table)`` where ``sql`` names one."""
        return table_parts(self.sql)
