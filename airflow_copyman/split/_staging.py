"""Staging tables: one per destination and DAG run (and lineage of tries), in the
destination table's schema, with its columns and types.

Named ``copyman_stage_<table>_<hash>`` so that a person can tell what it is; its comment
says which DAG, group, run and lineage made it (a JSON object), which is how the next
successful run of the group finds the leftovers of failed ones. Imports no Airflow module.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import psycopg
from psycopg import sql

from airflow_copyman import load

PREFIX = "copyman_stage_"
COMMENT_PREFIX = "copyman split staging "


@dataclass(frozen=True)
class Identity:
    """Whose staging table: the DAG run's group, its lineage of tries, the destination."""

    dag_id: str
    group_id: str
    run_id: str
    lineage: str
    conn_id: str
    table: str  # the destination table as given

    def as_comment(self) -> str:
        return COMMENT_PREFIX + json.dumps(
            {"dag_id": self.dag_id, "group_id": self.group_id, "run_id": self.run_id,
             "lineage": self.lineage, "conn_id": self.conn_id, "table": self.table},
            sort_keys=True,
        )


def staging_name(table_name: str, identity: Identity) -> str:
    """``copyman_stage_<table>_<10 hex>``: at most 63 bytes; the hash of the identity
    (two runs, lineages or destinations never share one)."""
    digest = hashlib.sha256(
        "\x1f".join([identity.dag_id, identity.group_id, identity.run_id, identity.lineage,
                     identity.conn_id, identity.table]).encode()
    ).hexdigest()[:10]
    base = re.sub(r"[^a-z0-9_]+", "_", table_name.lower())[:36]
    return f"{PREFIX}{base}_{digest}"


@dataclass(frozen=True)
class Target:
    """A destination table and its staging table, as the destination's server resolved
    them. ``oid`` None: the table does not exist yet and publish creates it
    (``create="if_missing"``), like the staging table."""

    oid: int | None
    schema: str
    name: str
    staging: str
    database: str = ""

    @property
    def table_id(self) -> sql.Identifier:
        return sql.Identifier(self.schema, self.name)

    @property
    def staging_id(self) -> sql.Identifier:
        return sql.Identifier(self.schema, self.staging)

    @property
    def key(self) -> str:
        """The table as the ledger keys it (``quote_ident(schema).quote_ident(name)``)."""
        return f"{_quote_ident(self.schema)}.{_quote_ident(self.name)}"

    @property
    def staging_key(self) -> str:
        return f"{_quote_ident(self.schema)}.{_quote_ident(self.staging)}"

    @property
    def staging_text(self) -> str:
        """The staging table as SQL text (for a destination's ``table``)."""
        return ".".join('"' + p.replace('"', '""') + '"' for p in (self.schema, self.staging))


def _quote_ident(name: str) -> str:
    if re.fullmatch(r"[a-z_][a-z0-9_$]*", name):
        return name
    return '"' + name.replace('"', '""') + '"'


class StagingError(Exception):
    """The destination table is missing or not a table (no retry fixes it)."""

    permanent = True


def target(
    conn: psycopg.Connection[Any], table: str, identity: Identity, *, create: bool = False
) -> Target:
    """Resolve the destination table and name its staging table: the table must exist
    unless ``create`` (then a missing one is named where it would be created, ``oid``
    None). Ends the transaction it opens."""
    try:
        row = conn.execute(
            "SELECT c.oid::bigint, n.nspname::text, c.relname::text, c.relkind::text,"
            " current_database()::text FROM pg_class c"
            " JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE c.oid = to_regclass(%s)",
            [table],
        ).fetchone()
        if row is None and create:
            return _missing(conn, table, identity)
    finally:
        conn.rollback()
    if row is None:
        raise StagingError(
            f"{identity.conn_id}: destination table {table!r} does not exist (a split load "
            "stages into a copy of its definition: create it first, or give "
            "create='if_missing')"
        )
    if row[3] not in ("r", "p"):
        raise StagingError(f"{identity.conn_id}: {table!r} is not a table (relkind {row[3]!r})")
    return Target(int(row[0]), row[1], row[2], staging_name(row[2], identity), row[4])


def _missing(conn: psycopg.Connection[Any], table: str, identity: Identity) -> Target:
    """A table ``create="if_missing"`` will create: named as the server would name it."""
    name = load.TableName.parse(table)
    if name is None:
        raise StagingError(f"{identity.conn_id}: {table!r} is not a table name")
    schema = load.create_schema_for(conn, name)
    if schema is None:
        raise StagingError(
            f"{identity.conn_id}: table {table!r} does not exist, and create='if_missing' "
            "finds no schema to create it in (none of the search_path exists): name the schema"
        )
    database = conn.execute("SELECT current_database()::text").fetchone()
    staging = staging_name(name.name, identity)
    return Target(None, schema, name.name, staging, database[0] if database else "")


def prepare(
    conn: psycopg.Connection[Any], spec: load.Destination, identity: Identity,
    lock_timeout: float, source_columns: Callable[[], Sequence[load.Column]],
) -> Target:
    """The destination's target and its staging table, made unless it exists (commits).
    A missing table with ``create="if_missing"``: checked as a load that creates it would
    be (schema, privilege, collations, the merge key's type), and staged with the source's
    columns (``source_columns``, asked only then; named as ``spec.columns`` says)."""
    found = target(conn, spec.table, identity, create=spec.create == "if_missing")
    if found.oid is not None:
        ensure_staging(conn, found, identity, lock_timeout)
        return found
    if _staging_exists(conn, found):  # an earlier range checked and made it
        return found
    columns = list(source_columns())
    if spec.columns is not None:
        if len(spec.columns) != len(columns):
            raise StagingError(
                f"{spec.label}: create='if_missing': 'columns' names {len(spec.columns)} "
                f"columns, the source has {len(columns)}"
            )
        columns = [replace(c, name=n) for c, n in zip(columns, spec.columns, strict=True)]
    table = load.TableName(found.schema, found.name)
    try:
        problem = load.create_refusal(conn, table, columns, spec.key)
    finally:
        conn.rollback()
    if problem is not None:
        raise StagingError(f"{spec.label}: {problem}")
    ensure_staging(conn, found, identity, lock_timeout, columns=columns)
    return found


def ensure_staging(
    conn: psycopg.Connection[Any], target: Target, identity: Identity, lock_timeout: float,
    *, unlogged: bool = True, columns: Sequence[load.Column] | None = None,
) -> bool:
    """Create the staging table unless it exists: the destination's columns, types,
    NOT NULL and defaults (no indexes, constraints or triggers), or, for a table that does
    not exist yet, ``columns`` with their exact types and collations. Returns whether it
    created it. Commits.

    ``UNLOGGED`` (default): the staged rows are not written to the WAL (the publish's
    writes into the table are). A destination server that crashes empties an unlogged
    table: publish's count check then finds fewer rows than the ranges' ledger rows report
    and changes nothing (a cleared DAG run loads the ranges again)."""
    if _staging_exists(conn, target):
        return False
    try:
        _set_lock_timeout(conn, lock_timeout)
        conn.execute(_create_staging(target, unlogged, columns))
        conn.execute(
            sql.SQL("COMMENT ON TABLE {} IS {}").format(
                target.staging_id, sql.Literal(identity.as_comment())
            )
        )
        conn.commit()
        return True
    except load.CREATED_CONCURRENTLY:
        # Another range created it at the same moment.
        conn.rollback()
        return False
    except BaseException:
        conn.rollback()
        raise


def _staging_exists(conn: psycopg.Connection[Any], target: Target) -> bool:
    """Whether ``target``'s staging table exists. Ends the transaction it opens."""
    try:
        row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", [target.staging_text]).fetchone()
    finally:
        conn.rollback()
    return bool(row and row[0])


def _create_staging(
    target: Target, unlogged: bool, columns: Sequence[load.Column] | None
) -> sql.Composed:
    if target.oid is not None:
        return sql.SQL("CREATE {}TABLE IF NOT EXISTS {} (LIKE {} INCLUDING DEFAULTS)").format(
            sql.SQL("UNLOGGED " if unlogged else ""), target.staging_id, target.table_id
        )
    if not columns:
        raise ValueError("a staging table for a table to be created needs its columns")
    return load.create_statement(
        load.TableName(target.schema, target.staging), columns, None, unlogged=unlogged
    )


def create_like_staging(
    target: Target, key: Sequence[str] | None, nulls_match: bool
) -> sql.Composed:
    """``CREATE TABLE`` for ``create="if_missing"`` at publish: the staging table's columns
    (the source's exact types and collations, NOT NULL), the merge key as primary key (or a
    unique key whose NULLs are equal, ``key_nulls="match"``), as a load that creates its
    table makes it. Logged, whatever the staging table is."""
    parts: list[sql.Composable] = [sql.SQL("LIKE {}").format(target.staging_id)]
    if key:
        parts.append(load.create_key_constraint(key, nulls_match))
    return sql.SQL("CREATE TABLE {} ({})").format(target.table_id, sql.SQL(", ").join(parts))


def _set_lock_timeout(conn: psycopg.Connection[Any], seconds: float) -> None:
    conn.execute("SELECT set_config('lock_timeout', %s, true)", [f"{int(seconds * 1000)}ms"])


@dataclass(frozen=True)
class Leftover:
    schema: str
    name: str
    run_id: str
    lineage: str


def leftovers(
    conn: psycopg.Connection[Any], schema: str, identity: Identity
) -> list[Leftover]:
    """The staging tables in ``schema`` of the same DAG, group and destination as
    ``identity`` but another run or lineage. Ends its transaction."""
    try:
        found = conn.execute(
            "SELECT c.relname::text, obj_description(c.oid, 'pg_class') FROM pg_class c"
            " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s"
            " AND c.relkind = 'r' AND starts_with(c.relname::text, %s)"
            " AND starts_with(obj_description(c.oid, 'pg_class'), %s)",
            [schema, PREFIX, COMMENT_PREFIX],
        ).fetchall()
    finally:
        conn.rollback()
    out = []
    for name, comment in found:
        try:
            made = json.loads(comment[len(COMMENT_PREFIX):])
        except ValueError:
            continue
        same_owner = all(
            made.get(k) == getattr(identity, k) for k in ("dag_id", "group_id", "conn_id", "table")
        )
        mine = made.get("run_id") == identity.run_id and made.get("lineage") == identity.lineage
        if same_owner and not mine:
            out.append(Leftover(schema, name, str(made.get("run_id")), str(made.get("lineage"))))
    return out


def drop_leftovers(
    conn: psycopg.Connection[Any], schema: str, identity: Identity,
    still_running: Callable[[str], bool], lock_timeout: float,
) -> list[str]:
    """Drop the staging tables of this group's earlier, finished runs (and of this run's
    earlier lineages) in ``schema``; a table in use (lock not granted in time) stays for
    the next run. Returns the names dropped."""
    dropped = []
    for left in leftovers(conn, schema, identity):
        if left.run_id != identity.run_id and still_running(left.run_id):
            continue  # another DAG run of the group at work: its staging is its own
        try:
            _set_lock_timeout(conn, lock_timeout)
            conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(
                sql.Identifier(left.schema, left.name)
            ))
            conn.commit()
            dropped.append(left.name)
        except psycopg.errors.LockNotAvailable:
            conn.rollback()
    return dropped
