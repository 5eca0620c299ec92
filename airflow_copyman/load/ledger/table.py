"""The load ledger: a row in each destination database per destination a task loaded.

Why a table in the destination, and not only Airflow's ``task_state_store``: the ledger
row is written in the destination's own transaction, right before its commit, so the data
and the record of having loaded it commit together or not at all. A try that dies between
a destination's commit and any bookkeeping outside that database (the worker killed, the
Airflow API unreachable) leaves a ledger row behind it, and the next try skips that
destination instead of loading it twice. ``task_state_store`` mirrors the ledger for
observability and is the only record when the ledger is turned off.

A row's key is (dag_id, task_id, run_id, map_index, conn_id, destination table), the table
as its server resolved it (``quote_ident(schema).quote_ident(name)``: ``public.orders``
whether a try spells it ``orders``, ``public.orders`` or ``"public"."orders"``); rows of
earlier versions, keyed by the spelling, are still found by it. Its
``lineage`` says which series of tries wrote it: retries of a task share one lineage, a
manual clear (or a re-created DAG run) starts a new one, and a new lineage loads every
destination again, as Airflow users expect from a re-run. The insert checks the lineage
in the same statement, so two tries of one lineage racing each other (a zombie and its
retry) cannot both commit: the second one finds the first one's row and rolls back. Before
loading, a try also claims the destination (:meth:`Ledger.claim`, an advisory lock held
until its commit) and reads the ledger again, so a retry waits for a zombie still loading
and then reports ``already_loaded`` instead of colliding with its rows.

By default the table lives in the destination table's own schema (a loader role that may
create tables only there works).

This module imports no Airflow module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import sql

from airflow_copyman.load.catalog.relation import Relation
from airflow_copyman.load.catalog.tables import PlanError, TableName
from airflow_copyman.load.connection import classify
from airflow_copyman.load.ledger.protocol import Slot
from airflow_copyman.load.modes import create

if TYPE_CHECKING:
    from airflow_copyman.load.spec import Destination, DestinationResult

TABLE = "copyman_ledger"

_CREATE = """
CREATE TABLE IF NOT EXISTS {table} (
    dag_id      text        NOT NULL,
    task_id     text        NOT NULL,
    run_id      text        NOT NULL,
    map_index   integer     NOT NULL,
    conn_id     text        NOT NULL,
    destination text        NOT NULL,
    lineage     text        NOT NULL,
    try_number  integer     NOT NULL,
    rows        bigint      NOT NULL,
    bytes       bigint      NOT NULL,
    loaded_at   timestamptz NOT NULL DEFAULT now(),
    inserted    bigint,
    updated     bigint,
    checksum    text,
    table_oid   oid,
    PRIMARY KEY (dag_id, task_id, run_id, map_index, conn_id, destination)
)
"""

#: What the loading try measured beyond rows and bytes (a merge's counts, the checksum of
#: verify="checksum"), so a retry reports them for a destination it skips. A ledger table
#: created by an earlier version lacks these columns and is never altered (an ALTER TABLE
#: takes an ACCESS EXCLUSIVE lock: it would queue behind every load transaction holding the
#: ledger, and block all of them behind itself); such a table records no extras, and reads
#: them as NULL (through ``to_jsonb`` of the row, which has whatever columns the table has).
EXTRAS = ("inserted", "updated", "checksum")
#: The destination table's OID, beside the name it is keyed by: in ledger tables created
#: from this version on (earlier ones are never altered, as for EXTRAS).
OID_COLUMN = "table_oid"


@dataclass(frozen=True)
class TaskKey:
    """The task instance and the lineage of tries it belongs to."""

    dag_id: str
    task_id: str
    run_id: str
    map_index: int
    lineage: str
    try_number: int


@dataclass(frozen=True)
class Entry:
    lineage: str
    try_number: int
    rows: int
    bytes: int
    #: What the loading try measured (None where it measured nothing, or the ledger table
    #: predates these columns).
    inserted: int | None = None
    updated: int | None = None
    checksum: str | None = None
    #: The table as its server named it when loaded (a record that knows it).
    relation: Relation | None = None


@dataclass(frozen=True)
class Extras:
    """What a load measured beyond rows and bytes, for its ledger row."""

    inserted: int | None = None
    updated: int | None = None
    checksum: str | None = None


class Ledger:
    """The ledger table in the destination databases.

    :param schema: the schema holding ``copyman_ledger``; None (the default of the
        operator): the destination table's own schema, where a role allowed to load a
        table can normally create one (PostgreSQL 15+ gives no CREATE on ``public``).
    :param key: the task instance and lineage this try records under.
    :param resume_on_clear: count rows of earlier lineages as loaded too (a cleared task
        then loads only what was never loaded for this DAG run).
    """

    def __init__(
        self, schema: str | None, key: TaskKey, *, resume_on_clear: bool = False
    ) -> None:
        self.schema = schema
        self.key = key
        self.resume_on_clear = resume_on_clear
        #: schema -> whether its ledger table has OID_COLUMN (as ensure_table found it).
        self._oid_columns: dict[str, bool] = {}
        #: (conn_id, table key) -> the schema of its ledger table (None: none yet), and
        #: whether that table has the columns of EXTRAS (as ensure_table found it).
        self._schemas: dict[tuple[str, str], str | None] = {}
        self._extras: dict[tuple[str, str], bool | None] = {}

    # The load's ledger (airflow_copyman.load.ledger.protocol.LoadLedger).

    @property
    def try_number(self) -> int:
        return self.key.try_number

    @property
    def atomic(self) -> bool:
        return True

    def recorded(self, spec: Destination) -> Entry | None:
        """Nothing is known before connecting: the rows are in the destinations."""
        return None

    def loaded_already(self, conn: psycopg.Connection[Any], slot: Slot) -> Entry | None:
        schema = self._schema_of(conn, slot)
        if schema is None:
            conn.rollback()
            return None
        return self.lookup(conn, schema, slot.conn_id, slot.key, slot.spelling)

    def prepare(self, conn: psycopg.Connection[Any], slot: Slot) -> None:
        schema = self._schemas.get((slot.conn_id, slot.key))
        if schema is None:
            schema = self._schema_of(conn, slot)
        if schema is None:  # pragma: no cover - planning found the table
            raise PlanError(f"table {slot.table} does not exist")
        try:
            self._extras[(slot.conn_id, slot.key)] = self.ensure_table(conn, schema)
        except psycopg.Error as exc:
            if not classify.is_permanent(exc):
                raise
            raise PlanError(
                f"cannot create the ledger table {self.name_in(schema)} "
                f"({classify.describe(exc)}); set ledger_schema to a schema the connection "
                "may write, or ledger=False to keep no ledger"
            ) from exc

    def claim_load(self, conn: psycopg.Connection[Any], slot: Slot) -> Entry | None:
        schema = self._schemas.get((slot.conn_id, slot.key))
        if schema is None:
            return None
        # Keyed by the table the server resolved: a try spelling it otherwise is
        # waited for and found all the same.
        self.claim(conn, slot.conn_id, slot.key)
        return self.read(conn, schema, slot.conn_id, slot.key, slot.spelling)

    def record_load(
        self, conn: psycopg.Connection[Any], slot: Slot, rows: int, nbytes: int,
        extras: Extras,
    ) -> Entry | None:
        where = (slot.conn_id, slot.key)
        schema = self._schemas.get(where)
        if schema is None:
            return None
        # Positional: a Ledger subclass may pass them on as *args.
        if self.record(
            conn, schema, slot.conn_id, slot.key, rows, nbytes, extras,
            self._extras.get(where),
        ):
            return None
        conn.rollback()
        entry = self.lookup(conn, schema, slot.conn_id, slot.key, slot.spelling)
        if entry is None:
            raise psycopg.errors.SerializationFailure("the ledger changed meanwhile")
        return entry

    def committed(self, result: DestinationResult) -> None:
        """Recorded with the rows, in their transaction."""

    def _schema_of(self, conn: psycopg.Connection[Any], slot: Slot) -> str | None:
        """The schema of ``slot``'s ledger table (where the load creates the table, if it
        may), kept for the later steps."""
        schema = self.schema_for(conn, slot.table)
        if schema is None and slot.create:
            schema = create.schema_for(conn, slot.table)
        self._schemas[(slot.conn_id, slot.key)] = schema
        return schema

    @property
    def name(self) -> str:
        if self.schema is None:
            return f"{TABLE} (in each destination table's schema)"
        return f"{self.schema}.{TABLE}"

    def name_in(self, schema: str) -> str:
        return f"{schema}.{TABLE}"

    def schema_for(self, conn: psycopg.Connection[Any], table: TableName) -> str | None:
        """The schema of the ledger for ``table``: the one given, else the table's own
        (None while the table does not exist: nothing can have been loaded into it)."""
        if self.schema is not None:
            return self.schema
        if table.schema is not None:
            return table.schema
        row = conn.execute(
            "SELECT n.nspname::text FROM pg_class c JOIN pg_namespace n "
            "ON n.oid = c.relnamespace WHERE c.oid = to_regclass(%s)",
            [table.regclass_text],
        ).fetchone()
        return row[0] if row else None

    def _key_params(self, conn_id: str, destination: str) -> list[Any]:
        k = self.key
        return [k.dag_id, k.task_id, k.run_id, k.map_index, conn_id, destination]

    def lookup(
        self, conn: psycopg.Connection[Any], schema: str, conn_id: str, destination: str,
        spelling: str | None = None,
    ) -> Entry | None:
        """This destination's row if it counts as loaded for this lineage. Ends the
        transaction it opens (the load gets a fresh one). ``destination``: the table as
        its server resolved it; ``spelling``: as the destination spells it, the key of
        rows written by earlier versions."""
        try:
            return self.read(conn, schema, conn_id, destination, spelling)
        finally:
            conn.rollback()

    def read(
        self, conn: psycopg.Connection[Any], schema: str, conn_id: str, destination: str,
        spelling: str | None = None,
    ) -> Entry | None:
        """Like :meth:`lookup`, in the current transaction (which it leaves open)."""
        exists = conn.execute(
            "SELECT to_regclass(%s) IS NOT NULL", [_regclass(schema)]
        ).fetchone()
        if not exists or not exists[0]:
            return None
        keys = [destination] if spelling in (None, destination) else [destination, spelling]
        k = self.key
        rows = conn.execute(
            sql.SQL(
                "SELECT lineage, try_number, rows, bytes, (to_jsonb(l) ->> 'inserted')::bigint,"
                " (to_jsonb(l) ->> 'updated')::bigint, to_jsonb(l) ->> 'checksum'"
                " FROM {} AS l WHERE dag_id = %s AND task_id = %s AND run_id = %s"
                " AND map_index = %s AND conn_id = %s AND destination = ANY(%s)"
                # The resolved table's row first, then one an earlier version keyed by
                # the spelling.
                " ORDER BY destination = %s DESC"
            ).format(sql.Identifier(schema, TABLE)),
            [k.dag_id, k.task_id, k.run_id, k.map_index, conn_id, keys, destination],
        ).fetchall()
        for row in rows:
            entry = Entry(*row)
            if entry.lineage == self.key.lineage or self.resume_on_clear:
                return entry
        return None

    def claim(self, conn: psycopg.Connection[Any], conn_id: str, destination: str) -> None:
        """Own this destination's load until the current transaction ends: a
        transaction-scoped advisory lock on the ledger key. Another try of the lineage
        loading it at the same time (a zombie and its retry) holds it until its commit;
        this waits (as long as the connection's statements may), then the caller reads
        the ledger again and finds that try's row."""
        k = self.key
        text = "\x1f".join(
            [TABLE, k.dag_id, k.task_id, k.run_id, str(k.map_index), conn_id, destination]
        )
        conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", [text])

    def ensure_table(self, conn: psycopg.Connection[Any], schema: str) -> bool | None:
        """Create the ledger table if needed, in a short transaction of its own.

        Returns whether the table has the columns of :data:`EXTRAS` (False: created by an
        earlier version, left as it is), None if unknown (another task created it at the
        same moment): :meth:`record` then looks.
        """
        try:
            found = conn.execute(_HAS_EXTRAS, [_regclass(schema)]).fetchone()
            has_extras: bool | None
            if found is None or found[0] is None:
                conn.execute(
                    sql.SQL(_CREATE).format(table=sql.Identifier(schema, TABLE))  # type: ignore[arg-type]
                )
                has_extras = True
                self._oid_columns[schema] = True
            else:
                has_extras = bool(found[0])
                self._oid_columns[schema] = bool(found[1])
            conn.commit()
            return has_extras
        except classify.CREATED_CONCURRENTLY:
            # Another task created it at the same moment (CREATE TABLE IF NOT EXISTS races
            # on the catalog).
            conn.rollback()
            return None
        except BaseException:
            conn.rollback()
            raise

    def has_extras(self, conn: psycopg.Connection[Any], schema: str) -> bool:
        """Whether the ledger table in ``schema`` has the columns of :data:`EXTRAS`, in the
        current transaction."""
        found = conn.execute(_HAS_EXTRAS, [_regclass(schema)]).fetchone()
        return bool(found and found[0])

    def record(
        self, conn: psycopg.Connection[Any], schema: str, conn_id: str, destination: str,
        rows: int, nbytes: int, extras: Extras | None = None, has_extras: bool | None = None,
    ) -> bool:
        """Write this destination's row in the current (load) transaction.

        ``extras``: what the load measured beyond rows and bytes, written where the table
        has their columns (``has_extras``, as :meth:`ensure_table` returned it; None: look
        in the catalog now). Returns False if a try of the same lineage recorded it first
        (committed while this one loaded): the caller must roll back, the destination is
        loaded already.
        """
        k = self.key
        columns = ["lineage", "try_number", "rows", "bytes"]
        values: list[Any] = [k.lineage, k.try_number, rows, nbytes]
        if has_extras is None:
            has_extras = self.has_extras(conn, schema)
        if has_extras:
            # Always, None included: a row of an earlier lineage keeps none of its own.
            extras = extras or Extras()
            columns += EXTRAS
            values += [extras.inserted, extras.updated, extras.checksum]
        placeholders: list[sql.Composable] = [sql.Placeholder()] * (6 + len(columns))
        if self._oid_columns.get(schema):
            # Resolved in the load transaction: a table it created has its OID by now.
            columns.append(OID_COLUMN)
            values.append(destination)
            placeholders.append(sql.SQL("to_regclass({})::oid").format(sql.Placeholder()))
        names = ["dag_id", "task_id", "run_id", "map_index", "conn_id", "destination", *columns]
        result = conn.execute(
            sql.SQL(
                "INSERT INTO {table} AS l ({names}) VALUES ({values})"
                " ON CONFLICT (dag_id, task_id, run_id, map_index, conn_id, destination)"
                " DO UPDATE SET {updates}, loaded_at = now()"
                " WHERE l.lineage <> EXCLUDED.lineage RETURNING 1"
            ).format(
                table=sql.Identifier(schema, TABLE),
                names=sql.SQL(", ").join(map(sql.Identifier, names)),
                values=sql.SQL(", ").join(placeholders),
                updates=sql.SQL(", ").join(
                    sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(c)) for c in columns
                ),
            ),
            [*self._key_params(conn_id, destination), *values],
        ).fetchone()
        return result is not None


#: NULL: no ledger table; else whether it has the columns of EXTRAS, and OID_COLUMN (one
#: query: no extra round trip over the existence check it replaces).
_HAS_EXTRAS = (
    "SELECT (SELECT count(*) = 3 FROM pg_attribute WHERE attrelid = t.oid"
    " AND attname IN ('inserted', 'updated', 'checksum') AND NOT attisdropped),"
    " EXISTS (SELECT FROM pg_attribute WHERE attrelid = t.oid"
    " AND attname = 'table_oid' AND NOT attisdropped)"
    " FROM (SELECT to_regclass(%s) AS oid) t WHERE t.oid IS NOT NULL"
)


def _regclass(schema: str) -> str:
    return ".".join('"' + p.replace('"', '""') + '"' for p in (schema, TABLE))


def ledger_rows(
    conn: psycopg.Connection[Any], schema: str, *, dag_id: str, task_id: str, run_id: str,
    lineage: str, conn_id: str, destination: str,
) -> list[tuple[int, int, int]]:
    """(map_index, rows, bytes) of every range the ledger in ``schema`` records as loaded
    into ``destination`` (the staging table, as its server resolved it) by the mapped load
    task ``task_id`` for this DAG run and lineage, in the current transaction. Reads the
    ledger table's layout, which is this module's."""
    found = _range_rows(conn, schema, "rows, bytes",
                        [dag_id, task_id, run_id, lineage, conn_id, destination])
    return [(int(m), int(r), int(b)) for m, r, b in found]


def ledger_checksums(
    conn: psycopg.Connection[Any], schema: str, *, dag_id: str, task_id: str, run_id: str,
    lineage: str, conn_id: str, destination: str,
) -> list[tuple[int, str | None]]:
    """(map_index, checksum text or None) of the same ledger rows as :func:`ledger_rows`:
    what each range's ``verify="checksum"`` recorded (None: no checksum, or a ledger table
    made before its ``checksum`` column)."""
    found = _range_rows(conn, schema, "to_jsonb(l) ->> 'checksum'",
                        [dag_id, task_id, run_id, lineage, conn_id, destination])
    return [(int(m), c) for m, c in found]


def _range_rows(
    conn: psycopg.Connection[Any], schema: str, columns: str, key: list[str]
) -> list[tuple[Any, ...]]:
    """``map_index`` and ``columns`` (SQL over the ledger row ``l``) of the ledger rows of
    one mapped task's ranges, by (dag_id, task_id, run_id, lineage, conn_id, destination);
    none where the schema has no ledger table."""
    exists = conn.execute(
        "SELECT to_regclass(%s) IS NOT NULL",
        [sql.Identifier(schema, TABLE).as_string(conn)],
    ).fetchone()
    if not exists or not exists[0]:
        return []
    return conn.execute(
        sql.SQL(
            "SELECT map_index, {} FROM {} AS l WHERE dag_id = %s AND task_id = %s"
            " AND run_id = %s AND lineage = %s AND conn_id = %s AND destination = %s"
            " ORDER BY map_index"
        ).format(sql.SQL(columns), sql.Identifier(schema, TABLE)),
        key,
    ).fetchall()
