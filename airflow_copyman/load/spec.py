"""What describes a load as data: destinations, their results, the report, errors.

Plain values, with no connection and no Airflow in them: the operator builds them from its
arguments, :class:`airflow_copyman.hooks.copyman.CopyManHook` takes and returns them, and
:mod:`airflow_copyman.load.transfer` fills them in while a load runs.
"""

from __future__ import annotations

import ast
import contextlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from airflow_copyman.load import options
from airflow_copyman.load.catalog import tables
from airflow_copyman.load.catalog.relation import Relation

#: Keys a destination mapping may have.
DESTINATION_KEYS = frozenset(
    {
        "conn_id", "table", "columns", "truncate", "preoperator", "postoperator", "mode",
        "replace_with", "key", "create", "key_nulls", "cascade", "load_lock",
    }
)
MODES = ("append", "replace", "merge")
REPLACE_WITH = ("truncate", "delete")
CREATE = ("never", "if_missing")
KEY_NULLS = ("refuse", "match")

Status = Literal["pending", "loaded", "already_loaded", "failed"]


class LoadError(Exception):
    """Base class of the load layer's own errors (the provider maps them onto its own)."""


class ConfigError(LoadError):
    """Bad input (unknown connection, missing table, column mismatch...): found before any
    destination was written; no retry can fix it."""


class DuplicateKeyError(LoadError):
    """A merge key occurs twice in the source: no retry can fix it."""

    permanent = True


class TooFewRowsError(LoadError):
    """The source yielded fewer rows than ``min_rows``: late data may still arrive."""

    permanent = False


@dataclass(frozen=True)
class Append:
    """``mode="append"``: the COPY adds the source's rows."""

    name: ClassVar[str] = "append"


@dataclass(frozen=True)
class Replace:
    """``mode="replace"``: the table holds exactly the source's rows, emptied ``using``
    TRUNCATE or DELETE; ``cascade`` lets it reach tables referencing it."""

    using: Literal["truncate", "delete"] = "truncate"
    cascade: bool = False
    name: ClassVar[str] = "replace"


@dataclass(frozen=True)
class Merge:
    """``mode="merge"``: rows whose ``key`` is in the table are updated, the others inserted;
    ``key_nulls``: ``refuse`` a NULL key, or ``match`` NULL keys as equal."""

    key: tuple[str, ...]
    key_nulls: Literal["refuse", "match"] = "refuse"
    name: ClassVar[str] = "merge"


#: A destination's load mode, typed (:attr:`Destination.load_mode`).
LoadMode = Append | Replace | Merge


@dataclass(frozen=True)
class Destination:
    """Where to load: a table behind a connection, and how.

    :param conn_id: the name of the destination's endpoint (in Airflow: a ``postgres``
        connection id).
    :param table: the table (``schema.table``, SQL syntax: quote mixed-case names).
    :param columns: the table's columns to fill, in the order of the source's columns
        (default: the table's columns named like the source's result columns, by position
        only where none is; the others take their defaults): plain names, exactly as the
        table spells them. The text of a list (``"['a', 'b']"``, as a template renders
        one) is that list.
    :param truncate: shorthand for ``mode="replace"``.
    :param preoperator: SQL run in the load's transaction before the COPY (after the
        truncate); a string (one statement, or several separated by semicolons) or a list.
    :param postoperator: SQL run in the load's transaction after the COPY (and the merge),
        before the ledger row and the commit.
    :param mode: ``append`` (default), ``replace`` (the table holds exactly the source's rows)
        or ``merge`` (rows whose ``key`` exists are updated, the others inserted).
    :param replace_with: ``truncate`` (default: TRUNCATE then ``COPY ... FREEZE``; readers
        wait) or ``delete`` (DELETE then COPY; readers keep reading the old rows).
    :param key: the merge key: column names (a string is one column's name; the text of a
        list is that list).
    :param create: ``never`` (default) or ``if_missing``: create the table from the source's
        result columns in the load's transaction (its schema must exist).
    :param key_nulls: merge only: ``refuse`` (default: a source row with a NULL in a key
        column fails the destination, permanently) or ``match`` (NULL keys match as equal,
        ``IS NOT DISTINCT FROM``).
    :param cascade: ``mode="replace"`` into a table other tables reference by foreign keys:
        replace anyway, and let it reach them (TRUNCATE ... CASCADE empties them; DELETE
        applies each key's ON DELETE action). Default False: such a table is refused.
    :param load_lock: take the table's load lock (default True: one load at a time per
        table). False only with ``mode="append"`` and no ``create``: for a table that only
        appends of independent rows write at once, such as a split load's staging table,
        whose ranges must land side by side.

    In an operator's ``destinations``, every string field is templated, as in a mapping.
    """

    conn_id: str
    table: str
    columns: tuple[str, ...] | None = None
    truncate: bool = False
    preoperator: tuple[str, ...] | str = ()
    postoperator: tuple[str, ...] | str = ()
    mode: str = "append"
    replace_with: str = "truncate"
    key: tuple[str, ...] | None = None
    create: str = "never"
    key_nulls: str = "refuse"
    cascade: bool = False
    load_lock: bool = True

    def __post_init__(self) -> None:
        # A string is one statement (or the statements it holds), never its characters.
        for name in ("preoperator", "postoperator"):
            value = getattr(self, name)
            if isinstance(value, str):
                object.__setattr__(self, name, (value,))
            elif isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        for name in ("columns", "key"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        if isinstance(self.key, str) and not options.is_template(self.key):
            # key="TenantId" is one column (never its characters); text that is no list
            # of names is left for from_value to refuse, saying why.
            with contextlib.suppress(options.ArgumentError):
                object.__setattr__(self, "key", _text_names(self.key, "'key'", one_name=True))
        if self.truncate is True and self.mode == "append":
            object.__setattr__(self, "mode", "replace")

    @property
    def load_mode(self) -> LoadMode:
        """The mode as a typed value (of a checked destination: :meth:`from_value`)."""
        if self.mode == "replace":
            return Replace("delete" if self.replace_with == "delete" else "truncate", self.cascade)
        if self.mode == "merge":
            return Merge(tuple(self.key or ()), "match" if self.key_nulls == "match" else "refuse")
        return Append()

    @property
    def statements(self) -> tuple[str, ...]:
        """The preoperator statements (strings), in order."""
        value = self.preoperator
        return (value,) if isinstance(value, str) else tuple(value)

    @property
    def post_statements(self) -> tuple[str, ...]:
        """The postoperator statements (strings), in order."""
        value = self.postoperator
        return (value,) if isinstance(value, str) else tuple(value)

    def as_mapping(self) -> dict[str, Any]:
        return {
            "conn_id": self.conn_id,
            "table": self.table,
            "columns": _as_list(self.columns),
            "truncate": self.truncate,
            "preoperator": list(self.statements),
            "postoperator": list(self.post_statements),
            "mode": self.mode,
            "replace_with": self.replace_with,
            "key": _as_list(self.key),
            "create": self.create,
            "key_nulls": self.key_nulls,
            "cascade": self.cascade,
            "load_lock": self.load_lock,
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
            raise ConfigError(
                f"{where} must be a mapping with 'conn_id' and 'table', got {value!r}"
            )
        unknown = sorted(set(value) - DESTINATION_KEYS)
        if unknown:
            raise ConfigError(
                f"{where}: unknown key(s) {', '.join(unknown)} "
                f"(allowed: {', '.join(sorted(DESTINATION_KEYS))})"
            )

        def later(v: Any) -> bool:
            return not rendered and options.is_template(v)

        conn_id, table = value.get("conn_id"), value.get("table")
        if not isinstance(conn_id, str) or not conn_id:
            raise ConfigError(f"{where}: 'conn_id' must be a connection id")
        if not isinstance(table, str) or not table.strip():
            raise ConfigError(f"{where} ({conn_id}): 'table' must be a table name")
        where = f"{where} ({conn_id}, table {table.strip()})"
        try:
            if not later(conn_id):
                options.no_nul("'conn_id'", conn_id)
            if not later(table):
                options.no_nul("'table'", table)
                tables.parse_table(table)
            columns = _names_list(value.get("columns"), "'columns'", later)
            key = _names_list(value.get("key"), "'key'", later, one_name=True)
            preoperator = _statements(value.get("preoperator"), "'preoperator'", later)
            postoperator = _statements(value.get("postoperator"), "'postoperator'", later)
            truncate = value.get("truncate", False)
            if not later(truncate):
                truncate = options.boolean("'truncate'", truncate)
            mode = _choice(value.get("mode"), "'mode'", MODES, later)
            replace_with = _choice(value.get("replace_with"), "'replace_with'", REPLACE_WITH, later)
            create = _choice(value.get("create"), "'create'", CREATE, later)
            key_nulls = _choice(value.get("key_nulls"), "'key_nulls'", KEY_NULLS, later)
            cascade = value.get("cascade", False)
            if not later(cascade):
                cascade = options.boolean("'cascade'", cascade)
            load_lock = value.get("load_lock", True)
            if not later(load_lock):
                load_lock = options.boolean("'load_lock'", load_lock)
        except (options.ArgumentError, tables.PlanError) as exc:
            raise ConfigError(f"{where}: {exc}") from None
        known = not any(later(v) for v in (mode, truncate))
        if known and truncate is True and mode not in (None, "replace"):
            raise ConfigError(
                f"{where}: 'truncate' is a shorthand for mode='replace', not for mode={mode!r}"
            )
        if not later(mode) and mode == "merge" and key is None:
            raise ConfigError(f"{where}: mode='merge' needs 'key' (the key's column names)")
        if not later(mode) and mode != "merge" and key is not None:
            raise ConfigError(f"{where}: 'key' is for mode='merge', not mode={mode or 'append'!r}")
        if not later(mode) and mode != "merge" and key_nulls not in (None, "refuse"):
            raise ConfigError(f"{where}: 'key_nulls' is for mode='merge'")
        if (
            not later(mode) and replace_with == "delete"
            and mode != "replace" and not (mode is None and truncate is True)
        ):
            raise ConfigError(f"{where}: 'replace_with' is for mode='replace'")
        if (
            not later(mode) and cascade is True
            and mode != "replace" and not (mode is None and truncate is True)
        ):
            raise ConfigError(f"{where}: 'cascade' is for mode='replace'")
        if load_lock is False and (
            (not later(mode) and mode not in (None, "append")) or truncate is True
            or create not in (None, "never")
        ):
            # A replace, a merge or a create that another load runs beside loses rows.
            raise ConfigError(f"{where}: load_lock=False is only for mode='append' without create")
        if mode is None:
            mode = "replace" if truncate is True else "append"
        return cls(
            conn_id=conn_id,
            table=table.strip(),
            columns=columns,
            truncate=truncate,
            preoperator=preoperator,
            postoperator=postoperator,
            mode=mode,
            replace_with=replace_with or "truncate",
            key=key,
            create=create or "never",
            key_nulls=key_nulls or "refuse",
            cascade=cascade,
            load_lock=load_lock,
        )

    @property
    def label(self) -> str:
        return f"{self.conn_id}:{self.table}"


def _as_list(names: Any) -> Any:
    """A names field for a mapping: a list, or None, or a string as it is (a string is
    never split into its characters)."""
    return list(names) if isinstance(names, tuple | list) else names


def _names_list(
    value: Any, name: str, later: Callable[[Any], bool], *, one_name: bool = False
) -> Any:
    """Plain column names (``columns``, ``key``): None, or a non-empty list of names.
    A string is the text of a list (see :func:`_text_names`) or, where ``one_name``,
    one column's name."""
    if value is None or later(value):
        return value
    if isinstance(value, str):
        value = _text_names(value, name, one_name=one_name)
    if (
        isinstance(value, str | bytes)
        or not isinstance(value, Iterable)
        or not all(isinstance(c, str) for c in value)
    ):
        raise options.ArgumentError(
            f"{name} must be a list of column names, got {type(value).__name__}"
        )
    names = tuple(value)
    if not all(c.strip() for c in names):
        raise options.ArgumentError(f"{name} must be a list of names, not empty")
    tables.parse_columns(names, name)
    return names


def _text_names(text: str, name: str, *, one_name: bool) -> Any:
    """The names a string stands for. A template renders a list as its text
    (``"['a', 'b']"``) unless the DAG sets ``render_template_as_native_obj``: the text of a
    list (or tuple) of strings is that list. Any other bracketed text is refused with how to
    render a list. Other text is one name where ``one_name`` (``key="TenantId"``); else it is
    returned as it is (and refused as a string)."""
    stripped = text.strip()
    if not stripped.startswith(("[", "(")):
        return (text,) if one_name else text
    try:
        parsed = ast.literal_eval(stripped)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        parsed = None
    if isinstance(parsed, list | tuple) and parsed and all(isinstance(n, str) for n in parsed):
        return tuple(parsed)
    raise options.ArgumentError(
        f"{name} is the text {text!r}, not a list of column names: a template renders a "
        "value as text; render a list of strings (['a', 'b']), or set "
        "render_template_as_native_obj=True on the DAG"
    )


def _statements(value: Any, name: str, later: Callable[[Any], bool]) -> tuple[str, ...]:
    """SQL: a string or a list of strings (empty ones dropped)."""
    value = value or ()
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, list | tuple) or not all(isinstance(s, str) for s in value):
        raise options.ArgumentError(f"{name} must be SQL or a list of SQL")
    for statement in value:
        if not later(statement) and "\x00" in statement:
            raise options.ArgumentError(f"{name} contains a NUL character")
    return tuple(s for s in value if s.strip())


def _choice(value: Any, name: str, choices: tuple[str, ...], later: Callable[[Any], bool]) -> Any:
    """One of ``choices`` (None: the default)."""
    if value is None or later(value):
        return value
    if not isinstance(value, str) or value.strip().lower() not in choices:
        raise options.ArgumentError(
            f"{name} must be one of {', '.join(repr(c) for c in choices)}, "
            f"got {options.kind(value)}"
        )
    return value.strip().lower()


@dataclass(frozen=True)
class Progress:
    """How far a load is, for a progress display (``on_progress``): called from the loading
    thread at most every ``progress_interval`` seconds while the copy runs, and once at the
    end. ``rows`` and ``bytes``: read from the source so far (at the end: the report's);
    ``seconds`` since the load started; ``estimated_rows``: the source's size estimated
    before the copy (None: unknown), as is ``estimated_bytes``; ``destinations``: each
    destination's label and status (``copying`` while its COPY runs, then ``loaded``,
    ``already_loaded``, ``failed``, or ``pending`` before it starts)."""

    rows: int
    bytes: int
    seconds: float
    estimated_rows: int | None
    estimated_bytes: int | None
    destinations: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Verification:
    """What the load's verification compared for one destination: the source's row count
    (and, under ``verify="checksum"``, its checksum) against the destination's. Checksums in
    their compact form, ``rows:method:sum``."""

    passed: bool
    source_rows: int | None
    rows: int | None
    source_checksum: str | None = None
    checksum: str | None = None


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
    mode: str = "append"
    #: Merge only: rows of the source whose key was new (inserted), or found with other values
    #: (updated; a found row whose values are the same is left as it is).
    inserted: int | None = None
    updated: int | None = None
    #: The table as its server names it (for asset URIs), once connected.
    relation: Relation | None = None
    #: verify="checksum": the checksum of the rows loaded, ``rows:hash sum``.
    checksum: str | None = None
    #: The verification's outcome: passed once committed (or loaded by an earlier try),
    #: failed where the rows differ; None where nothing was compared (it failed otherwise).
    verification: Verification | None = None

    @property
    def verified(self) -> bool | None:
        return None if self.verification is None else self.verification.passed

    @property
    def label(self) -> str:
        return f"{self.conn_id}:{self.table}"

    def as_dict(self) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "conn_id": self.conn_id,
            "table": self.table,
            "rows": self.rows,
            "bytes": self.bytes,
            "status": self.status,
            "error": self.error,
            "mode": self.mode,
        }
        if self.mode == "merge":
            entry["inserted"], entry["updated"] = self.inserted, self.updated
        if self.checksum is not None:
            entry["checksum"] = self.checksum
        return entry


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
