"""What describes a CopyMan transfer as data: destinations, their results, the report, errors.

Plain values, with no connection and no Airflow hook in them: the operator builds them from
its arguments, :class:`airflow_copyman.hooks.copyman.CopyManHook` takes and returns them,
and :mod:`airflow_copyman._load` fills them in while a transfer runs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from airflow.sdk.exceptions import AirflowException

from airflow_copyman import _arguments, _plan
from airflow_copyman._relation import Relation

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
        truncate); a string (one statement, or several separated by semicolons) or a list
        of strings.

    In an operator's ``destinations``, every string field is templated, as in a mapping.
    """

    conn_id: str
    table: str
    columns: tuple[str, ...] | None = None
    truncate: bool = False
    preoperator: tuple[str, ...] | str = ()

    def __post_init__(self) -> None:
        # A string is one statement (or the statements it holds), never its characters.
        if isinstance(self.preoperator, str):
            object.__setattr__(self, "preoperator", (self.preoperator,))
        elif isinstance(self.preoperator, list):
            object.__setattr__(self, "preoperator", tuple(self.preoperator))
        if isinstance(self.columns, list):
            object.__setattr__(self, "columns", tuple(self.columns))

    @property
    def statements(self) -> tuple[str, ...]:
        """The preoperator statements (strings), in order."""
        value = self.preoperator
        return (value,) if isinstance(value, str) else tuple(value)

    def as_mapping(self) -> dict[str, Any]:
        return {
            "conn_id": self.conn_id,
            "table": self.table,
            "columns": list(self.columns) if self.columns is not None else None,
            "truncate": self.truncate,
            "preoperator": list(self.statements),
        }

    def rendered(self, render: Callable[[Any], Any]) -> Destination:
        """A copy with every field passed through ``render`` (Jinja, in the operator):
        the dataclass is frozen, so it is rebuilt rather than set."""
        values = {k: render(v) for k, v in self.as_mapping().items()}
        return Destination(**values)

    @classmethod
    def from_value(cls, value: Any, position: int, *, rendered: bool = True) -> Destination:
        """A destination from an operator argument (a mapping, or a ``Destination``),
        checked. With ``rendered=False`` (when the DAG is parsed), values that are still
        Jinja templates are let through: they are checked after rendering."""
        where = f"destination #{position + 1}"
        if isinstance(value, Destination):
            value = value.as_mapping()
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

        def later(v: Any) -> bool:
            return not rendered and _arguments.is_template(v)

        conn_id, table = value.get("conn_id"), value.get("table")
        if not isinstance(conn_id, str) or not conn_id:
            raise CopyManConfigError(f"{where}: 'conn_id' must be a connection id")
        if not isinstance(table, str) or not table.strip():
            raise CopyManConfigError(f"{where} ({conn_id}): 'table' must be a table name")
        where = f"{where} ({conn_id}, table {table.strip()})"
        try:
            if not later(conn_id):
                _arguments.no_nul("'conn_id'", conn_id)
            if not later(table):
                _arguments.no_nul("'table'", table)
                _plan.parse_table(table)
        except (_arguments.ArgumentError, _plan.PlanError) as exc:
            raise CopyManConfigError(f"{where}: {exc}") from None
        columns = value.get("columns")
        if columns is not None and not later(columns):
            if (
                isinstance(columns, str | bytes)
                or not isinstance(columns, Iterable)
                or not all(isinstance(c, str) for c in columns)
            ):
                raise CopyManConfigError(
                    f"{where}: 'columns' must be a list of column names, got "
                    f"{type(columns).__name__}"
                )
            if not all(c.strip() for c in columns):
                raise CopyManConfigError(f"{where}: 'columns' must be a list of names, not empty")
            try:
                _plan.parse_columns(columns, "'columns'")
            except _plan.PlanError as exc:
                raise CopyManConfigError(f"{where}: {exc}") from None
        preoperator = value.get("preoperator") or ()
        if isinstance(preoperator, str):
            preoperator = (preoperator,)
        if (
            not isinstance(preoperator, list | tuple)
            or not all(isinstance(s, str) for s in preoperator)
        ):
            raise CopyManConfigError(f"{where}: 'preoperator' must be SQL or a list of SQL")
        for statement in preoperator:
            if not later(statement) and "\x00" in statement:
                raise CopyManConfigError(f"{where}: 'preoperator' contains a NUL character")
        truncate = value.get("truncate", False)
        if not later(truncate):
            try:
                truncate = _arguments.boolean("'truncate'", truncate)
            except _arguments.ArgumentError as exc:
                raise CopyManConfigError(f"{where}: {exc}") from None
        return cls(
            conn_id=conn_id,
            table=table.strip(),
            columns=tuple(columns) if columns is not None and not later(columns) else columns,
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
    #: The table as its server names it (for asset URIs), once connected.
    relation: Relation | None = None

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
    #: conn_id -> (``postgres://host:port``, database) of every connection the transfer
    #: resolved, so lineage needs no second look-up.
    endpoints: dict[str, tuple[str, str]] = field(default_factory=dict)

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


def destinations_from(values: Iterable[Any], *, rendered: bool = True) -> list[Destination]:
    """Parse an operator's ``destinations`` argument (see :meth:`Destination.from_value`)."""
    return [Destination.from_value(v, i, rendered=rendered) for i, v in enumerate(values)]
