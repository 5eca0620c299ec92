"""What describes a CopyMan transfer as data: destinations, their results, the report, errors.

Plain values, with no connection and no Airflow hook in them: the operator builds them from
its arguments, :class:`airflow_copyman.hooks.copyman.CopyManHook` takes and returns them,
and :mod:`airflow_copyman._load` fills them in while a transfer runs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from airflow.sdk.exceptions import AirflowException

#: Keys a destination mapping may have.
DESTINATION_KEYS = frozenset({"conn_id", "table", "columns", "truncate", "preoperator"})

Status = Literal["pending", "loaded", "already_loaded", "failed"]


class CopyManError(AirflowException):
    """Base class of the errors of this provider."""


class CopyManConfigError(CopyManError):
    """Bad input (unknown connection, not PostgreSQL, missing table, column mismatch...).

    Raised before any destination has been written; no retry can fix it.
    """


@dataclass(frozen=True)
class Destination:
    """Where to load: a table behind a connection, and how.

    :param conn_id: a ``postgres`` connection id.
    :param table: the table (``schema.table``, SQL syntax: quote mixed-case names).
    :param columns: the table's columns to fill, in the order of the source's columns
        (default: every column but generated ones, in table order): plain names, exactly as
        the table spells them (``("Id", "amount")``), not SQL.
    :param truncate: empty the table first, in the load's transaction.
    :param preoperator: SQL run in the load's transaction before the COPY (after the
        truncate); a string (may hold several statements) or a list of strings.
    """

    conn_id: str
    table: str
    columns: tuple[str, ...] | None = None
    truncate: bool = False
    preoperator: tuple[str, ...] = ()

    @classmethod
    def from_value(cls, value: Any, position: int) -> Destination:
        """A destination from an operator argument (a mapping, or a ``Destination``)."""
        if isinstance(value, Destination):
            return value
        where = f"destination #{position + 1}"
        if not isinstance(value, Mapping):
            raise CopyManConfigError(
                f"{where} must be a mapping with 'conn_id' and 'table', got {value!r}"
            )
        unknown = sorted(set(value) - DESTINATION_KEYS)
        if unknown:
            raise CopyManConfigError(
                f"{where}: unknown key(s) {', '.join(unknown)} "
                f"(allowed: {', '.join(sorted(DESTINATION_KEYS))})"
            )
        conn_id, table = value.get("conn_id"), value.get("table")
        if not isinstance(conn_id, str) or not conn_id:
            raise CopyManConfigError(f"{where}: 'conn_id' must be a connection id")
        if not isinstance(table, str) or not table.strip():
            raise CopyManConfigError(f"{where} ({conn_id}): 'table' must be a table name")
        columns = value.get("columns")
        if columns is not None and (
            isinstance(columns, str) or not all(isinstance(c, str) and c.strip() for c in columns)
        ):
            raise CopyManConfigError(f"{where} ({conn_id}): 'columns' must be a list of names")
        preoperator = value.get("preoperator") or ()
        if isinstance(preoperator, str):
            preoperator = (preoperator,)
        if not all(isinstance(s, str) for s in preoperator):
            raise CopyManConfigError(
                f"{where} ({conn_id}): 'preoperator' must be SQL or a list of SQL"
            )
        truncate = value.get("truncate", False)
        if not isinstance(truncate, bool):
            raise CopyManConfigError(f"{where} ({conn_id}): 'truncate' must be true or false")
        return cls(
            conn_id=conn_id,
            table=table.strip(),
            columns=tuple(columns) if columns is not None else None,
            truncate=truncate,
            preoperator=tuple(s for s in preoperator if s.strip()),
        )

    @property
    def label(self) -> str:
        return f"{self.conn_id}:{self.table}"


@dataclass
class DestinationResult:
    """What happened to one destination."""

    conn_id: str
    table: str
    status: Status = "pending"
    rows: int | None = None
    bytes: int | None = None
    error: str | None = None
    permanent: bool = False
    try_number: int | None = None
    seconds: float | None = None

    @property
    def label(self) -> str:
        return f"{self.conn_id}:{self.table}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "conn_id": self.conn_id,
            "table": self.table,
            "rows": self.rows,
            "bytes": self.bytes,
            "status": self.status,
            "error": self.error,
        }


@dataclass
class TransferReport:
    """The outcome of :meth:`CopyManHook.transfer`."""

    rows: int
    bytes: int
    format: str | None
    seconds: float
    destinations: list[DestinationResult] = field(default_factory=list)

    @property
    def failed(self) -> list[DestinationResult]:
        return [d for d in self.destinations if d.status == "failed"]

    def as_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "bytes": self.bytes,
            "format": self.format,
            "destinations": [d.as_dict() for d in self.destinations],
        }


def destinations_from(values: Iterable[Any]) -> list[Destination]:
    """Parse an operator's ``destinations`` argument."""
    return [Destination.from_value(v, i) for i, v in enumerate(values)]
