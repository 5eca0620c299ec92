"""Planning a transfer: what to COPY out of the source, into each destination, in which format.

The operator builds both COPY statements itself; a DAG author gives a query or a table name
(``sql``) and destination tables. This module parses those names, looks up the column types
on both sides and picks the COPY format, all before any data moves, so that bad input fails
before a destination is written. It imports no Airflow module.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

import psycopg
from psycopg import ClientCursor, generators, pq, sql

from airflow_copyman.copyman._sql import is_copy_statement
from airflow_copyman.load.catalog import hints
from airflow_copyman.load.catalog.names import PlanError as PlanError
from airflow_copyman.load.catalog.names import TableName as TableName
from airflow_copyman.load.catalog.names import parse_table as parse_table
from airflow_copyman.load.catalog.names import quote_ident as quote_ident

Format: TypeAlias = Literal["binary", "text", "csv"]
FORMATS: tuple[Format, ...] = ("binary", "text", "csv")
#: ``format=None`` (the default) means binary where the column types allow it, else text.
AUTO_FORMAT = None

Params: TypeAlias = Sequence[Any] | Mapping[str, Any]

# Built-in types have OIDs below FirstNormalObjectId (16384) and the same OID on every
# server of a major version; binary COPY embeds element and field type OIDs in arrays and
# composites, so only those (and enums, sent as their labels) are safe in binary between
# databases. Anything else falls back to text, which every type supports.
FIRST_NORMAL_OID = 16384
# OID-alias types are built in, but their binary form is the bare OID of the object they
# name, which means something else (or nothing) in another database; their text form is the
# name, which the destination resolves (or rejects) by name.
OID_ALIAS_TYPES = frozenset(
    {
        "regclass", "regtype", "regproc", "regprocedure", "regoper", "regoperator",
        "regnamespace", "regrole", "regconfig", "regdictionary", "regcollation",
    }
)

def parse_columns(columns: Iterable[str] | None, what: str) -> list[str] | None:
    """Column names, taken exactly as given (``Id`` is the column ``Id``): plain names, not
    SQL. They are matched against the table's columns when the table is described
    (:func:`airflow_copyman.load.catalog.hints.resolve_columns`)."""
    if columns is None:
        return None
    if isinstance(columns, str):
        raise PlanError(f"{what}: columns must be a list of column names, not a string")
    names = list(columns)
    for column in names:
        if not isinstance(column, str) or not column.strip():
            raise PlanError(f"{what}: {column!r} is not a column name")
    if not names:
        raise PlanError(f"{what}: columns is empty (leave it out to load every column)")
    if len(set(names)) != len(names):
        raise PlanError(f"{what}: a column is listed twice in {names}")
    return names




def strip_query(text: str) -> str:
    """The query without trailing blanks and semicolons (it is wrapped in ``COPY (...)``)."""
    query = text.strip()
    while query.endswith(";"):
        query = query[:-1].rstrip()
    if not query:
        raise PlanError("sql is empty")
    return query


def normalize_format(value: str | None) -> Format | None:
    if value is None or value == "auto":
        return AUTO_FORMAT
    lowered = value.lower() if isinstance(value, str) else value
    if lowered not in FORMATS:
        raise PlanError(f"format must be one of {', '.join(FORMATS)} (or None), got {value!r}")
    return lowered  # type: ignore[return-value]


@dataclass(frozen=True)
class Column:
    name: str
    type_oid: int
    type_name: str  # format_type() of the type, without modifier
    type_kind: str  # pg_type.typtype: b(ase), e(num), c(omposite), r(ange), d(omain)...
    #: format_type() with the modifier (``numeric(12,2)``): the type to create a column of.
    type_sql: str = ""
    #: The column's collation (schema, name) where it is not its type's default, as far as
    #: it is known: a table's columns, and a query's plain references to a table's columns
    #: (an expression's collation is not in the row description).
    collation: tuple[str, str] | None = None
    #: Whether its type (and an array's element type) has binary send and receive
    #: functions: ``aclitem`` has none, and a binary COPY of it fails on the server.
    binary_io: bool = True

    @property
    def collation_name(self) -> str:
        return ".".join(self.collation) if self.collation else ""

    @property
    def is_oid_alias(self) -> bool:
        return self.type_name.removesuffix("[]") in OID_ALIAS_TYPES

    def binary_safe_with(self, other: Column) -> bool:
        """Whether binary COPY from this column into ``other`` is byte-for-byte safe."""
        if not (self.binary_io and other.binary_io):
            return False
        if self.type_name != other.type_name or self.is_oid_alias:
            return False
        if self.type_kind == "e" and other.type_kind == "e":
            return True
        return self.type_oid == other.type_oid and self.type_oid < FIRST_NORMAL_OID


@dataclass(frozen=True)
class Source:
    """What to COPY out of the source: a table, or a query."""

    text: str
    table: TableName | None
    query: str | None

    @classmethod
    def parse(cls, text: str) -> Source:
        if not isinstance(text, str) or not text.strip():
            raise PlanError("sql must be a query or a table name, got an empty value")
        if is_copy_statement(text):
            raise PlanError(
                "sql must be a query or a table name, not a COPY statement: the operator "
                "builds the COPY itself"
            )
        table = TableName.parse(text)
        if table is not None:
            return cls(text, table, None)
        return cls(text, None, strip_query(text))

    def select(self, columns: Sequence[Column]) -> sql.Composable:
        """The query whose rows are copied. A table is read with ``SELECT`` (of the columns
        :meth:`describe` found), never ``COPY table TO``, which skips inheritance children
        and refuses partitioned tables: a table name means every row ``SELECT * FROM`` it
        returns (``SELECT * FROM ONLY t`` is the query for the parent's own rows)."""
        if self.table is not None:
            return sql.SQL("SELECT {} FROM {}").format(
                sql.SQL(", ").join(sql.Identifier(c.name) for c in columns),
                self.table.identifier,
            )
        return sql.SQL(self.query)  # type: ignore[arg-type]

    def copy_out(self, fmt: Format, columns: Sequence[Column]) -> sql.Composed:
        options = sql.SQL("(FORMAT {})").format(sql.SQL(fmt))
        # The newline before ")" keeps a trailing "-- comment" in the query harmless.
        return sql.SQL("COPY (\n{}\n) TO STDOUT {}").format(self.select(columns), options)

    def describe(self, conn: psycopg.Connection[Any], params: Params | None) -> list[Column]:
        """The columns the source's COPY will produce, in order."""
        if self.table is not None:
            columns = table_columns(conn, self.table, None, source=True)
            if columns is None:
                raise PlanError(hints.missing_table(conn, self.table, "source table"))
            return columns
        assert self.query is not None
        text = self.query
        if params:
            # COPY takes no server-side parameters: psycopg binds them client-side, so
            # describe exactly the text the server will see.
            text = ClientCursor(conn).mogrify(text, params)
        try:
            return _describe_query(conn, text)
        except psycopg.errors.UndefinedTable as exc:
            hint = hints.undefined_table_hint(conn, exc)
            if not hint:
                raise
            raise PlanError(f"UndefinedTable [42P01]: {exc.diag.message_primary}{hint}") from None


def copy_in(
    table: TableName, columns: Sequence[str] | None, fmt: Format, *, freeze: bool = False
) -> sql.Composed:
    """``COPY table (columns) FROM STDIN``; ``freeze`` where the table was created or
    truncated by the same transaction (rows written frozen)."""
    target: sql.Composable = table.identifier
    if columns:
        target = sql.SQL("{} ({})").format(
            table.identifier, sql.SQL(", ").join(sql.Identifier(c) for c in columns)
        )
    options = sql.SQL("FORMAT {}, FREEZE" if freeze else "FORMAT {}").format(sql.SQL(fmt))
    return sql.SQL("COPY {} FROM STDIN ({})").format(target, options)


def _describe_query(conn: psycopg.Connection[Any], text: str) -> list[Column]:
    """Describe the query's result columns without running it (an unnamed prepared
    statement), so any query COPY accepts is described as COPY will see it."""
    pgconn = conn.pgconn
    encoding = conn.info.encoding
    # Sent, then waited for through the connection's own wait (deadline-bounded and
    # stoppable on a transfer's connections): libpq's blocking calls would wait forever.
    pgconn.send_prepare(b"", text.encode(encoding))
    (result,) = conn.wait(generators.execute(pgconn))
    if result.status != pq.ExecStatus.COMMAND_OK:
        raise psycopg.errors.error_from_result(result, encoding=encoding)
    pgconn.send_describe_prepared(b"")
    (result,) = conn.wait(generators.execute(pgconn))
    if result.status != pq.ExecStatus.COMMAND_OK:
        raise psycopg.errors.error_from_result(result, encoding=encoding)
    # The row description gives domains as their base type and typmod already.
    fields = [
        ((result.fname(i) or b"?").decode(encoding), result.ftype(i), result.fmod(i))
        for i in range(result.nfields)
    ]
    if not fields:
        raise PlanError("sql returns no columns")
    types = _type_info(conn, [(oid, mod) for _, oid, mod in fields])
    # A result column that is a plain reference to a table's column names that column
    # (its table's OID and attribute number): its collation is the column's.
    origins = [(result.ftable(i), result.ftablecol(i)) for i in range(result.nfields)]
    collations = _collations(conn, origins) if any(rel for rel, _ in origins) else {}
    return [
        Column(name, oid, *types[i][:3], collation=collations.get(i), binary_io=types[i][3])
        for i, (name, oid, _) in enumerate(fields)
    ]


# The collation of each table column (relation OID, attribute number) whose collation is
# not its (base) type's default: the one a created column must be given explicitly.
_COLLATIONS = """
SELECT u.n::int - 1, cn.nspname::text, co.collname::text
FROM unnest(%s::oid[], %s::int[]) WITH ORDINALITY AS u(rel, att, n)
JOIN pg_attribute a ON a.attrelid = u.rel AND a.attnum = u.att
JOIN pg_type t ON t.oid = a.atttypid
JOIN pg_type bt ON bt.oid = CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.oid END
JOIN pg_collation co ON co.oid = a.attcollation AND a.attcollation <> bt.typcollation
JOIN pg_namespace cn ON cn.oid = co.collnamespace
"""


def _collations(
    conn: psycopg.Connection[Any], origins: Sequence[tuple[int, int]]
) -> dict[int, tuple[str, str]]:
    """Position -> collation (schema, name) of the result columns whose origin column has
    a collation other than its type's default."""
    rows = conn.execute(
        _COLLATIONS, [[rel for rel, _ in origins], [att for _, att in origins]]
    ).fetchall()
    return {n: (schema, name) for n, schema, name in rows}


# Whether type t (an array: its element type too) has binary send and receive functions.
# A domain has its base type's; an array's typelem is its element type (typlen -1: a
# fixed-length type such as point has a typelem too, but is no array).
_BINARY_IO = """
{t}.typsend::oid <> 0 AND {t}.typreceive::oid <> 0
AND NOT EXISTS (SELECT FROM pg_type et WHERE et.oid = {t}.typelem AND {t}.typlen = -1
                AND (et.typsend::oid = 0 OR et.typreceive::oid = 0))"""


def _type_info(
    conn: psycopg.Connection[Any], types: Sequence[tuple[int, int]]
) -> list[tuple[str, str, str, bool]]:
    rows = conn.execute(
        "SELECT format_type(t.oid, NULL), t.typtype::text, format_type(t.oid, NULLIF(u.mod, -1)), "
        f"{_BINARY_IO.format(t='t')} "
        "FROM unnest(%s::oid[], %s::int[]) WITH ORDINALITY AS u(oid, mod, n) "
        "JOIN pg_type t ON t.oid = u.oid ORDER BY u.n",
        [[oid for oid, _ in types], [mod for _, mod in types]],
    ).fetchall()
    return [(name, kind, full, binary_io) for name, kind, full, binary_io in rows]


# Domains are replaced by their base type, as the server does in a query's row description.
_TABLE_COLUMNS = """
SELECT a.attname::text,
       bt.oid::int,
       format_type(bt.oid, NULL),
       bt.typtype::text,
       {generated} AS generated,
       has_column_privilege(a.attrelid, a.attnum, %(privilege)s) AS allowed,
       format_type(bt.oid, NULLIF(CASE WHEN t.typtype = 'd' THEN t.typtypmod
                                       ELSE a.atttypmod END, -1)),
       cn.nspname::text,
       co.collname::text,
       {binary_io}
FROM pg_attribute a
JOIN pg_type t ON t.oid = a.atttypid
JOIN pg_type bt ON bt.oid = CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.oid END
LEFT JOIN pg_collation co ON co.oid = a.attcollation AND a.attcollation <> bt.typcollation
LEFT JOIN pg_namespace cn ON cn.oid = co.collnamespace
WHERE a.attrelid = %(oid)s AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum
"""


def table_oid(conn: psycopg.Connection[Any], table: TableName) -> int | None:
    row = conn.execute("SELECT to_regclass(%s)::oid::int", [table.regclass_text]).fetchone()
    return row[0] if row else None


def table_columns(
    conn: psycopg.Connection[Any],
    table: TableName,
    columns: Sequence[str] | None,
    *,
    source: bool = False,
) -> list[Column] | None:
    """The columns COPY reads (``source``) or writes for ``table``: the given ones, or every
    column but generated ones. None if the table does not exist; ``PlanError`` for a column
    that does not exist or may not be read/written. ``columns`` are names as given (see
    :mod:`airflow_copyman.load.catalog.hints`); the returned columns carry the names to write
    in SQL."""
    oid = table_oid(conn, table)
    if oid is None:
        return None
    generated = "a.attgenerated <> ''" if conn.info.server_version >= 120000 else "false"
    privilege = "SELECT" if source else "INSERT"
    query = _TABLE_COLUMNS.format(generated=generated, binary_io=_BINARY_IO.format(t="bt"))
    rows = conn.execute(
        query,  # type: ignore[arg-type]
        {"oid": oid, "privilege": privilege},
    ).fetchall()
    by_name = {r[0]: r for r in rows}
    if columns is None:
        chosen = [r for r in rows if not r[4]]
    else:
        names = hints.resolve_columns(columns, [r[0] for r in rows], str(table))
        chosen = [by_name[c] for c in names]
        generated_cols = [r[0] for r in chosen if r[4]]
        if generated_cols:
            raise PlanError(_generated(generated_cols[0], table, "'columns'"))
    denied = [r[0] for r in chosen if not r[5]]
    if denied:
        raise PlanError(
            f"permission denied: no {privilege} privilege on table {table} "
            f"(column {', '.join(denied)})"
        )
    return [
        Column(
            r[0], r[1], r[2], r[3], r[6], (r[7], r[8]) if r[8] is not None else None,
            binary_io=r[9],
        )
        for r in chosen
    ]


def _generated(column: str, table: TableName, where: str) -> str:
    return (
        f"column {column!r} of table {table} is generated: leave it out of {where} "
        "(the server computes it)"
    )


def table_names(conn: psycopg.Connection[Any], table: TableName) -> list[tuple[str, bool]] | None:
    """The table's columns in table order, each with whether it is generated (a COPY
    cannot fill those); None if the table does not exist."""
    oid = table_oid(conn, table)
    if oid is None:
        return None
    generated = "attgenerated <> ''" if conn.info.server_version >= 120000 else "false"
    rows = conn.execute(
        f"SELECT attname::text, {generated} FROM pg_attribute WHERE attrelid = %s "  # type: ignore[arg-type]
        "AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
        [oid],
    ).fetchall()
    return [(name, is_generated) for name, is_generated in rows]


#: What to do when columns do not pair, said with every mismatch.
_PAIRING = (
    "columns pair by name, by position only when no source column is named like a "
    "column of the table: alias the query's columns, or give 'columns'"
)


def match_by_name(
    source: Sequence[Column], table: TableName, found: Sequence[tuple[str, bool]]
) -> tuple[list[str], bool]:
    """The destination columns for the source's columns, and whether they pair by
    position. Columns pair by name: the table's columns named like the source's, in the
    source's order (its other columns take their defaults; generated ones are computed).
    Only when no source column is named like any column of the table, and the counts are
    equal, do they pair by position (``SELECT 1, 2``, or ``SELECT a AS x`` into a table of
    other names, as before names were matched): the caller says so in the log.

    :raises PlanError: any other mismatch (a source column with no namesake, one that
        names a generated column, a name given twice), naming the columns.
    """
    wanted = [c.name for c in source]
    every = [name for name, _ in found]
    insertable = [name for name, generated in found if not generated]
    if not set(wanted) & set(every) and len(wanted) == len(insertable):
        # A name that differs from a column's only in case or quoting says which column
        # it means: position must not pair it with another one ("NAME", "ID" into id, name).
        crossed = [
            w for w, i in zip(wanted, insertable, strict=True)
            if (near := hints.near_names(w, every)) and i not in near
        ]
        if not crossed:
            return insertable, True
        raise PlanError(_unmatched(wanted, wanted, every, insertable))
    generated = [n for n in wanted if (n, True) in found]
    if generated:
        raise PlanError(_generated(generated[0], table, "the query"))
    unmatched = list(dict.fromkeys(n for n in wanted if n not in every))
    if unmatched:
        raise PlanError(_unmatched(wanted, unmatched, every, insertable))
    twice = list(dict.fromkeys(n for n in wanted if wanted.count(n) > 1))
    if twice:
        raise PlanError(
            f"the source names a column twice: {', '.join(map(repr, twice))} "
            "(give each column its own alias, or give 'columns')"
        )
    return wanted, False


def _unmatched(
    wanted: Sequence[str], unmatched: Sequence[str], every: Sequence[str],
    insertable: Sequence[str],
) -> str:
    several = len(unmatched) > 1
    which = ", ".join(hints.with_hint(n, every) for n in unmatched)
    what = (
        f"the source's column{'s' if several else ''} {which} "
        f"{'have' if several else 'has'} no destination column of that name"
    )
    if len(wanted) != len(insertable):
        return (
            f"column count mismatch: the source has {len(wanted)} columns "
            f"({', '.join(wanted)}), the destination {len(insertable)} "
            f"({', '.join(insertable)}); {what}; {_PAIRING}"
        )
    return f"column name mismatch: {what} (the destination has {', '.join(every)}); {_PAIRING}"


def by_position(source: Sequence[Column], names: Sequence[str]) -> str:
    """``x -> b, y -> a``: how the columns pair by position, for the log."""
    return ", ".join(f"{c.name} -> {n}" for c, n in zip(source, names, strict=True))


def has_table_privilege(conn: psycopg.Connection[Any], table: TableName, privilege: str) -> bool:
    row = conn.execute(
        "SELECT has_table_privilege(to_regclass(%s), %s)", [table.regclass_text, privilege]
    ).fetchone()
    return bool(row and row[0])


def column_mismatch(source: Sequence[Column], dest: Sequence[Column]) -> str | None:
    """Why the destination columns cannot take the source columns, or None."""
    if len(source) != len(dest):
        return (
            f"the source has {len(source)} columns ({', '.join(c.name for c in source)}), "
            f"the destination {len(dest)} ({', '.join(c.name for c in dest)})"
        )
    return None


def binary_safe(source: Sequence[Column], dest: Sequence[Column]) -> bool:
    return len(source) == len(dest) and all(
        s.binary_safe_with(d) for s, d in zip(source, dest, strict=True)
    )


def same_types(source: Sequence[Column], dest: Sequence[Column]) -> bool:
    """Whether every column has the same type on both sides (base type of a domain, with its
    modifier): then both sides' COPY of the same values is the same bytes."""
    return len(source) == len(dest) and all(
        s.type_sql and s.type_sql == d.type_sql for s, d in zip(source, dest, strict=True)
    )


def first_type_difference(source: Sequence[Column], dest: Sequence[Column]) -> str | None:
    for s, d in zip(source, dest, strict=False):
        if s.is_oid_alias and s.type_name == d.type_name:
            return f"{s.name} {s.type_name}: an OID-alias type, a bare OID in binary"
        for column in (s, d):
            if not column.binary_io:
                return f"{column.name} {column.type_name}: its type has no binary input/output"
        if not s.binary_safe_with(d):
            return f"{s.name} {s.type_name} -> {d.name} {d.type_name}"
    return None
