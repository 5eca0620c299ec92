"""An order-independent checksum of a set of rows, computed by the servers: the ``row-text``
method of ``verify="checksum"``, for a destination where a column's type differs from the
source's (the others are verified by their COPY stream, :mod:`.readback`, which reads the
source only once).

A load is verified by comparing what the source sent with what the destination holds, each
side summarised by one query on its own server (no row passes through Python):

* every row is rendered as text, ``ROW(c1, c2, ...)::text`` (``record_out``: each value in
  its type's text output, quoted where needed, NULL as nothing and ``''`` as ``""``, so the
  rendering is unambiguous);
* each rendering is hashed to 64 bits (``hashtextextended(text, 0)``, the hash of hash
  partitioning, stable across major versions);
* the checksum is ``(count(*), sum(hash))``, the sum taken as ``numeric`` (``sum(int8)`` is
  numeric in PostgreSQL: it cannot overflow). A sum does not depend on the rows' order; a
  changed value changes its row's hash, a duplicated or a missing row adds or takes one
  hash and changes the count: each changes the checksum unless two 64-bit hashes collide.

Both sides render the same values the same way:

* the destination renders its own columns (the types the data now has);
* the source renders each column as the destination's type would: where the types differ
  (``format_type`` with its modifier: ``numeric`` into ``numeric(12,2)``, ``text`` into
  ``int``), the source's text output is read as the destination's type, exactly what COPY
  did with it (``concat(c)::type``: ``concat`` uses the type's output function, a plain
  ``::text`` cast does not for ``bool``, ``inet``, ``char(n)``); where the destination's
  type does not exist on the source (a user enum, composite, an extension's type, arrays of
  those; a domain counts as its base type), the source's own text form is compared as it
  is. That is identical for an enum (its label) and for the same type on both sides; where a
  destination type normalises its input (``text`` into ``hstore``, say) the checksums
  differ: a false alarm, never a false pass;
* the query runs with the same settings on every server (``TimeZone = UTC``, ISO dates,
  ``postgres`` intervals, exact floats, ``lc_monetary = C``, hex ``bytea``), set for that
  query only: a savepoint around it is rolled back after it, so the load transaction keeps
  its own settings and nothing else is undone (the checksum query writes nothing);
* the hash is of the UTF-8 bytes: both servers' databases must be UTF8 (checked, with a
  probe of the hash function, by :func:`require_comparable`).

The source checksum runs on the source's connection inside its ``REPEATABLE READ`` transaction
(before or after its COPY: the same snapshot, the same rows), or on a second source connection
that imported that snapshot (:func:`export_snapshot`, :func:`import_snapshot`). It runs the
source query a second time, so the query must be deterministic (no ``random()``,
``clock_timestamp()``, ``LIMIT`` without ``ORDER BY``). The destination checksum runs in the
load transaction after the COPY, over the rows that load wrote (:func:`this_transaction` for
an append).

This module imports no Airflow module and nothing else of the project.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import psycopg
from psycopg import generators, pq, sql

from airflow_copyman.load.catalog.tables import FIRST_NORMAL_OID

T = TypeVar("T")


#: The settings every checksum query runs with (for that query only).
RENDER_SETTINGS: dict[str, str] = {
    "TimeZone": "UTC",
    "DateStyle": "ISO, MDY",
    "IntervalStyle": "postgres",
    "extra_float_digits": "3",
    "lc_monetary": "C",
    "bytea_output": "hex",
}


class Only(sql.Composed):
    """``ONLY table`` as a relation to read: the table's own rows, not its inheritance
    children's (a replace into an inheritance parent replaced only its own)."""

    def __init__(self, table: sql.Composable) -> None:
        super().__init__([sql.SQL("ONLY "), table])
        self.table = table


def table_of(relation: sql.Composable) -> sql.Composable:
    """The table a relation to read names (``ONLY t``: ``t``), for its catalog look-ups."""
    return relation.table if isinstance(relation, Only) else relation


def this_transaction(conn: psycopg.Connection[Any]) -> sql.Composable:
    """``WHERE`` for an append: the rows ``conn``'s open (top-level) transaction inserted.

    Its xid is read first and written as a constant: ``pg_current_xact_id_if_assigned()`` is
    parallel-unsafe, a constant lets the server scan with parallel workers. Rows written by a
    subtransaction (a COPY inside a savepoint) carry the subtransaction's xid and are not
    counted: the load runs its COPY in the top-level transaction. The scan reads the whole
    table (no index finds rows by xmin): on a large table, an append's checksum costs a scan
    of all of it."""
    row = conn.execute("SELECT pg_current_xact_id_if_assigned()::xid::text").fetchone()
    return inserted_by(row[0] if row is not None else None)


def inserted_by(xid: str | None) -> sql.Composable:
    """The condition selecting the rows the transaction ``xid`` inserted (None: it wrote
    nothing yet, so no row is its)."""
    if xid is None:
        return sql.SQL("false")
    return sql.SQL("xmin = {}::xid").format(sql.Literal(xid))


#: The hash of a fixed UTF-8 string on every supported server: a server whose hash differs
#: (another byte order, another algorithm) cannot be compared.
_PROBE_TEXT = "copyman checksum probe \u00e9\u20ac"
_PROBE_HASH = 2691900900076062560

_SAVEPOINT = sql.Identifier("copyman_checksum")


class ChecksumError(psycopg.ProgrammingError):
    """A checksum could not be taken (no retry fixes it)."""


class ChecksumMismatch(ChecksumError):
    """The rows a destination holds are not the rows the source sent."""

    def __init__(self, table: str, source: Checksum, destination: Checksum) -> None:
        self.table, self.source, self.destination = table, source, destination
        super().__init__(
            f"table {table}: the checksum of the rows loaded ({destination}) differs from "
            f"the source's ({source}): the destination changed the rows (a trigger, a "
            "rule, a type that reads values differently) or lost or duplicated some, or the "
            "source query returns other rows each time it runs (random(), LIMIT without "
            "ORDER BY)"
        )


#: The method of this module's checksums: each row's ``ROW(...)::text`` hashed by the server.
ROW_TEXT = "row-text"


@dataclass(frozen=True)
class Checksum:
    """The number of rows and the sum of their 64-bit hashes, and how they were hashed:
    :data:`ROW_TEXT` (this module), or ``copy-binary`` / ``copy-text`` / ``copy-csv`` (the
    rows' COPY stream, :mod:`.readback`; the sum is modulo 2**64). Only checksums of the
    same method compare."""

    rows: int
    total: int
    method: str = ROW_TEXT

    def __str__(self) -> str:
        return f"{self.rows} rows, {self.method} hash sum {self.total}"

    @property
    def text(self) -> str:
        """A compact form for XCom and asset extras: ``rows:method:sum``."""
        return f"{self.rows}:{self.method}:{self.total}"

    def __sub__(self, other: Checksum) -> Checksum:
        """The rows of ``self`` not in ``other`` (a baseline taken before the COPY)."""
        total = self.total - other.total
        if self.method != ROW_TEXT:
            total &= (1 << 64) - 1
        return Checksum(self.rows - other.rows, total, self.method)


def verify(table: str, source: Checksum, destination: Checksum) -> None:
    """Raise :class:`ChecksumMismatch` unless both checksums are the same."""
    if source != destination:
        raise ChecksumMismatch(table, source, destination)


@dataclass(frozen=True)
class ColumnRendering:
    """How one destination column is rendered: its name, the type it has there (base type
    of a domain, with modifier), and whether the source can cast to that type by name."""

    name: str
    type_sql: str
    builtin: bool


_DESTINATION_COLUMNS = """
SELECT a.attname::text,
       format_type(bt.oid, CASE WHEN t.typtype = 'd' THEN t.typtypmod ELSE a.atttypmod END),
       bt.oid < %(first_normal)s
FROM pg_attribute a
JOIN pg_type t ON t.oid = a.atttypid
JOIN pg_type bt ON bt.oid = CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.oid END
WHERE a.attrelid = %(relation)s::regclass AND a.attnum > 0 AND NOT a.attisdropped
"""


def destination_renderings(
    conn: psycopg.Connection[Any], relation: sql.Composable, columns: Sequence[str]
) -> list[ColumnRendering]:
    """The renderings of ``columns`` (names as the table spells them, in the COPY's order)
    of ``relation`` on the destination. A domain is rendered as its base type (its text form
    is the base type's); a domain over a domain is resolved one level only, and so compared
    by its text form, which is the same."""
    # Built-in types (OIDs below FIRST_NORMAL_OID) are the only ones cast to by name on the
    # source, where a user type of the destination may not exist.
    rows = conn.execute(
        _DESTINATION_COLUMNS,  # type: ignore[arg-type]
        {"relation": relation.as_string(conn), "first_normal": FIRST_NORMAL_OID},
    ).fetchall()
    found = {row[0]: ColumnRendering(*row) for row in rows}
    missing = [c for c in columns if c not in found]
    if missing:
        raise ChecksumError(f"{relation.as_string(conn)} has no column {missing[0]!r}")
    return [found[c] for c in columns]


def require_comparable(conn: psycopg.Connection[Any], what: str) -> None:
    """Raise :class:`ChecksumError` unless ``conn``'s checksums compare with other servers':
    a UTF8 database, and the hash function every supported server has."""
    encoding = conn.info.parameter_status("server_encoding")
    if encoding != "UTF8":
        raise ChecksumError(
            f"{what}: verify='checksum' needs UTF8 databases (this one is {encoding}): the "
            "checksum hashes the rows' UTF-8 text"
        )
    row = conn.execute("SELECT hashtextextended(%s, 0)", [_PROBE_TEXT]).fetchone()
    if row is None or int(row[0]) != _PROBE_HASH:
        raise ChecksumError(
            f"{what}: this server's hashtextextended() differs from the one verify='checksum' "
            "compares with (another byte order?)"
        )


class Pending(Generic[T]):
    """A checksum query sent and not yet waited for: start every side's, then wait for them
    (the servers compute at once)."""

    def __init__(
        self,
        conn: psycopg.Connection[Any],
        query: sql.Composable,
        read: Callable[[tuple[Any, ...]], T],
    ) -> None:
        self.conn, self._read = conn, read
        with_settings(conn)
        conn.pgconn.send_query(query.as_bytes(conn))

    def wait(self) -> T:
        conn = self.conn
        encoding = conn.info.encoding
        results = conn.wait(generators.execute(conn.pgconn))
        result = results[-1]
        if result.status != pq.ExecStatus.TUPLES_OK:
            raise psycopg.errors.error_from_result(result, encoding=encoding)
        values = tuple(
            (result.get_value(0, i) or b"0").decode(encoding) for i in range(result.nfields)
        )
        undo_settings(conn)
        return self._read(values)


def with_settings(
    conn: psycopg.Connection[Any],
    settings: Mapping[str, str] = RENDER_SETTINGS,
    savepoint: sql.Identifier = _SAVEPOINT,
) -> None:
    """Open ``savepoint`` and set ``settings`` in it, for the statement that follows:
    :func:`undo_settings` rolls them back, and nothing else of the transaction."""
    values = sql.SQL(", ").join(
        sql.SQL("set_config({}, {}, true)").format(sql.Literal(k), sql.Literal(v))
        for k, v in settings.items()
    )
    conn.execute(sql.SQL("SAVEPOINT {}").format(savepoint))
    conn.execute(sql.SQL("SELECT {}").format(values))


def undo_settings(conn: psycopg.Connection[Any], savepoint: sql.Identifier = _SAVEPOINT) -> None:
    """Back to the settings from before :func:`with_settings` (the statement wrote nothing)."""
    conn.execute(sql.SQL("ROLLBACK TO SAVEPOINT {0}; RELEASE SAVEPOINT {0}").format(savepoint))


def _aggregate(rendering: sql.Composable) -> sql.Composed:
    return sql.SQL("count(*), coalesce(sum(hashtextextended({}, 0)), 0)").format(rendering)


def _row_text(values: Sequence[sql.Composable]) -> sql.Composed:
    # ROW() of one value is still a record ("(x)"); of none it is "()".
    return sql.SQL("ROW({})::text").format(sql.SQL(", ").join(values))


def start_destination_checksum(
    conn: psycopg.Connection[Any],
    relation: sql.Composable,
    columns: Sequence[str],
    where: sql.Composable | None = None,
) -> Pending[Checksum]:
    """Start the checksum of ``columns`` (the COPY's, in its order) of the rows of
    ``relation`` (optionally those ``where`` selects), in ``conn``'s open transaction."""
    values = [sql.SQL("r.{}").format(sql.Identifier(c)) for c in columns]
    query = sql.SQL("SELECT {} FROM {} AS r").format(_aggregate(_row_text(values)), relation)
    if where is not None:
        query = sql.SQL("{} WHERE {}").format(query, where)

    def read(values: tuple[Any, ...]) -> Checksum:
        return Checksum(int(values[0]), int(values[1]))

    return Pending(conn, query, read)


def destination_checksum(
    conn: psycopg.Connection[Any],
    relation: sql.Composable,
    columns: Sequence[str],
    where: sql.Composable | None = None,
) -> Checksum:
    """The checksum of the rows of ``relation`` (``where`` selects, if given); see
    :func:`start_destination_checksum`."""
    return start_destination_checksum(conn, relation, columns, where).wait()


def source_renderings(
    conn: psycopg.Connection[Any],
    select: sql.Composable,
    renderings: Sequence[Sequence[ColumnRendering]],
) -> list[list[sql.Composable]]:
    """For each destination's renderings, the expressions that render the source's columns
    (``s."1"``, ``s."2"``... in the select's order) as that destination's types do."""
    described = conn.execute(
        sql.SQL("SELECT * FROM ({}\n) AS s LIMIT 0").format(select)
    ).pgresult
    assert described is not None
    types = [(described.ftype(i), described.fmod(i)) for i in range(described.nfields)]
    wanted = sorted({r.type_sql for rs in renderings for r in rs if r.builtin})
    row = conn.execute(
        "SELECT array(SELECT format_type(t, m) FROM unnest(%s::oid[], %s::int[]) AS u(t, m)),"
        " array(SELECT to_regtype(n) IS NOT NULL FROM unnest(%s::text[]) AS n)",
        [[t for t, _ in types], [m for _, m in types], wanted],
    ).fetchone()
    assert row is not None
    source_types: list[str] = row[0]
    castable = {name for name, ok in zip(wanted, row[1], strict=True) if ok}
    out = []
    for rendering in renderings:
        if len(rendering) != len(source_types):
            raise ChecksumError(
                f"the source has {len(source_types)} columns, the destination "
                f"{len(rendering)}"
            )
        exprs: list[sql.Composable] = []
        for i, (column, source_type) in enumerate(zip(rendering, source_types, strict=True)):
            value = sql.SQL("s.{}").format(sql.Identifier(str(i + 1)))
            if column.type_sql != source_type and column.type_sql in castable:
                # What COPY did: the source's text output read as the destination's type.
                value = sql.SQL("CASE WHEN {0} IS NULL THEN NULL ELSE concat({0})::{1} END").format(
                    value, sql.SQL(column.type_sql)
                )
            exprs.append(value)
        out.append(exprs)
    return out


def start_source_checksums(
    conn: psycopg.Connection[Any],
    select: sql.Composable,
    renderings: Sequence[Sequence[ColumnRendering]],
) -> Pending[list[Checksum]]:
    """Start the checksums of the rows ``select`` returns, once per destination's renderings
    (one scan; destinations of the same types share a sum), in ``conn``'s open transaction:
    the ``REPEATABLE READ`` one of the source's COPY, so the same snapshot and rows."""
    if not renderings:
        raise ChecksumError("no destination to take the source's checksum for")
    expressions = source_renderings(conn, select, renderings)
    distinct: list[sql.Composed] = []
    index: list[int] = []
    keys: list[str] = []
    for exprs in expressions:
        rendered = _row_text(exprs)
        key = rendered.as_string(conn)
        if key not in keys:
            keys.append(key)
            distinct.append(
                sql.SQL("coalesce(sum(hashtextextended({}, 0)), 0)").format(rendered)
            )
        index.append(keys.index(key))
    names = sql.SQL(", ").join(sql.Identifier(str(i + 1)) for i in range(_width(expressions)))
    query = sql.SQL("SELECT count(*), {} FROM ({}\n) AS s({})").format(
        sql.SQL(", ").join(distinct), select, names
    )

    def read(values: tuple[Any, ...]) -> list[Checksum]:
        rows = int(values[0])
        return [Checksum(rows, int(values[1 + i])) for i in index]

    return Pending(conn, query, read)


def _width(expressions: Sequence[Sequence[sql.Composable]]) -> int:
    return len(expressions[0]) if expressions else 0


def source_checksums(
    conn: psycopg.Connection[Any],
    select: sql.Composable,
    renderings: Sequence[Sequence[ColumnRendering]],
) -> list[Checksum]:
    """The source's checksum for each destination; see :func:`start_source_checksums`."""
    return start_source_checksums(conn, select, renderings).wait()


def source_checksum(
    conn: psycopg.Connection[Any],
    select: sql.Composable,
    renderings: Sequence[ColumnRendering],
) -> Checksum:
    """The source's checksum rendered as one destination's columns."""
    return source_checksums(conn, select, [renderings])[0]


def export_snapshot(conn: psycopg.Connection[Any]) -> str:
    """The id of ``conn``'s transaction snapshot (``pg_export_snapshot()``), valid while that
    transaction is open: a second source connection that imports it
    (:func:`import_snapshot`) reads exactly the rows the COPY reads, so the source's checksum
    can run during the COPY instead of after it."""
    row = conn.execute("SELECT pg_export_snapshot()").fetchone()
    assert row is not None
    return str(row[0])


def import_snapshot(conn: psycopg.Connection[Any], snapshot: str) -> None:
    """Begin ``conn``'s transaction (``REPEATABLE READ, READ ONLY``; the connection must be
    idle) in the snapshot another transaction exported."""
    conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
    conn.read_only = True
    conn.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot)))


@dataclass(frozen=True)
class Written:
    """The rows one destination's load wrote, to verify: ``table`` names it in errors,
    ``relation``/``where`` select the rows (see the module's docstring), ``renderings`` come
    from :func:`destination_renderings` (taken at planning, before anything moved)."""

    table: str
    conn: psycopg.Connection[Any]
    relation: sql.Composable
    renderings: Sequence[ColumnRendering]
    where: sql.Composable | None = None
    #: Subtracted from the destination's checksum: what :func:`this_transaction` selected
    #: before the COPY (rows a preoperator wrote into the table in the same transaction).
    baseline: Checksum | None = None


def verify_all(
    source: psycopg.Connection[Any],
    select: sql.Composable,
    written: Sequence[Written],
) -> list[Checksum | BaseException]:
    """Take the source's checksums (one scan, in ``source``'s open transaction) and each
    destination's at once, wait for them together and compare. Per destination, in order: its
    checksum where it matches the source's, else the error (a :class:`ChecksumMismatch`, or
    the server's error, the source's for all of them if the source's failed). Every query
    started is waited for, so every connection is left between statements (in a failed
    transaction where its query failed: roll it back). A stop or a time-out (the
    connections' own bounds) is returned as that destination's error, like any other."""
    columns = [[r.name for r in w.renderings] for w in written]
    try:
        source_pending: Pending[list[Checksum]] | BaseException = start_source_checksums(
            source, select, [w.renderings for w in written]
        )
    except Exception as exc:  # also a stop (Cancelled), a time-out
        source_pending = exc
    pending: list[Pending[Checksum] | BaseException] = []
    for w, names in zip(written, columns, strict=True):
        try:
            pending.append(start_destination_checksum(w.conn, w.relation, names, w.where))
        except Exception as exc:  # also a stop (Cancelled), a time-out
            pending.append(exc)
    sums: list[Checksum] | BaseException
    try:
        sums = source_pending.wait() if isinstance(source_pending, Pending) else source_pending
    except Exception as exc:  # also a stop (Cancelled), a time-out
        sums = exc
    out: list[Checksum | BaseException] = []
    for i, (w, p) in enumerate(zip(written, pending, strict=True)):
        try:
            got = p.wait() if isinstance(p, Pending) else p
        except Exception as exc:  # also a stop (Cancelled), a time-out
            got = exc
        if isinstance(got, Checksum) and w.baseline is not None:
            got = got - w.baseline
        if isinstance(sums, BaseException):
            out.append(sums)
        elif isinstance(got, Checksum) and got != sums[i]:
            out.append(ChecksumMismatch(w.table, sums[i], got))
        else:
            out.append(got)
    return out
