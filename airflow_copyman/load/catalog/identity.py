"""Which table a name is, by what its server says, so that no table is written twice in a load.

``events``, ``public.events``, ``"events"``, a 70-character name PostgreSQL truncates to 63
bytes, or the same table behind two connection ids: spellings differ, the table is one. A
table is identified by its server (``pg_control_system().system_identifier`` with
``pg_postmaster_start_time()``: a server cloned from a base backup keeps the identifier and
every OID, but runs its own postmaster), its database's OID and its own OID. Two
destinations that are one table would load every row twice; a destination that is a table
the source reads would double the source (and with ``truncate`` wait forever for the
source's lock). Both are refused before anything is written.

A table that does not exist yet (``create="if_missing"`` will create it) is identified by
where ``CREATE TABLE`` would put it: its server, database, schema (by OID) and name (as
truncated to 63 bytes). Two destinations creating one table would each try to create it, the
second waiting behind the first's uncommitted one.

A destination *covers* its table and the tables under it (partitions, inheritance
children): rows written to a partitioned table land in its partitions, and a replace
empties them (an inheritance parent's replace keeps its children's rows, but a reader of
the parent sees both). The source's tables are those its transaction has locked once its
query is planned: every table the query reads, through views, partitions and inheritance.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg

# The cluster's identifier where the role may read it (else the start time alone tells
# servers apart), and the running postmaster's start time.
_CLUSTER = """
coalesce(CASE WHEN has_function_privilege('pg_control_system()', 'EXECUTE')
              THEN (SELECT system_identifier::text FROM pg_control_system()) END, '?')
  || '/' || extract(epoch FROM pg_postmaster_start_time())::text,
(SELECT oid::int8 FROM pg_database WHERE datname = current_database()),
current_database()::text
"""

_COVERED = f"""
WITH RECURSIVE tree(oid) AS (
    SELECT to_regclass(%s)::oid
    UNION
    SELECT i.inhrelid FROM pg_inherits i JOIN tree t ON i.inhparent = t.oid
)
SELECT {_CLUSTER}, to_regclass(%s)::oid::int8,
       ARRAY(SELECT oid::int8 FROM tree WHERE oid IS NOT NULL)
"""

#: Where CREATE TABLE would put a missing table: its schema's OID (NULL: no such schema,
#: planning says so) and its name as stored.
_NEW = f"""
SELECT {_CLUSTER},
       (SELECT n.oid::int8 FROM pg_namespace n
        WHERE n.nspname = coalesce(%s::name, current_schema())),
       coalesce(%s::name, current_schema())::text, %s::name::text
"""

_LOCKED = f"""
SELECT {_CLUSTER},
       ARRAY(SELECT DISTINCT l.relation::int8 FROM pg_locks l
             JOIN pg_class c ON c.oid = l.relation
             WHERE l.pid = pg_backend_pid() AND l.locktype = 'relation'
               AND l.database = (SELECT oid FROM pg_database
                                 WHERE datname = current_database())
               AND c.relkind IN ('r', 'p', 'f', 'm') AND l.relation >= 16384)
"""


@dataclass(frozen=True)
class Tables:
    """Tables of one database, as its server names them."""

    label: str  # who these are, for messages ("destination #2 (pg_b:events)")
    cluster: str  # system identifier / postmaster start time
    database: int
    database_name: str
    table: int | None  # the named table (None for the source's set, or a new table)
    covered: frozenset[int]
    #: A table to be created: (its schema's OID, its name), and how to name it.
    new: tuple[int, str] | None = None
    new_name: str = ""

    def overlaps(self, other: Tables) -> bool:
        return (
            self.cluster == other.cluster
            and self.database == other.database
            and (
                bool(self.covered & other.covered)
                or (self.new is not None and self.new == other.new)
            )
        )


def destination(
    conn: psycopg.Connection[Any], regclass_text: str, label: str,
    create: tuple[str | None, str] | None = None,
) -> Tables | None:
    """The table ``regclass_text`` names at ``conn`` and those under it. If it does not
    exist: with ``create`` (its schema, None for the search_path's first, and its name),
    the table CREATE TABLE would make; else None (planning says so)."""
    row = conn.execute(_COVERED, [regclass_text, regclass_text]).fetchone()  # type: ignore[arg-type]
    assert row is not None
    system_id, database, database_name, oid, covered = row
    if oid is not None:
        return Tables(label, str(system_id), database, database_name, oid, frozenset(covered))
    if create is None:
        return None
    schema, name = create
    row = conn.execute(_NEW, [schema, schema, name]).fetchone()  # type: ignore[arg-type]
    assert row is not None
    system_id, database, database_name, schema_oid, schema_name, stored = row
    if schema_oid is None:
        return None
    return Tables(
        label, str(system_id), database, database_name, None, frozenset(),
        (schema_oid, stored), f"{schema_name}.{stored}",
    )


def source(conn: psycopg.Connection[Any], label: str) -> Tables:
    """The tables the source's transaction has locked (call it once the query is planned)."""
    row = conn.execute(_LOCKED).fetchone()  # type: ignore[arg-type]
    assert row is not None
    system_id, database, database_name, locked = row
    return Tables(label, str(system_id), database, database_name, None,
                  frozenset(locked))


def conflicts(source_tables: Tables | None, destinations: Sequence[Tables]) -> list[str]:
    """Each destination that is (or holds) a table the source reads or another destination
    is, said in one line naming both."""
    problems = []
    for i, dest in enumerate(destinations):
        if source_tables is not None and dest.overlaps(source_tables):
            problems.append(
                f"{dest.label} is a table the source reads ({_where(dest)}): the load would "
                f"write the rows it reads; copy into another table"
            )
        for other in destinations[:i]:
            if dest.overlaps(other):
                same = "the same table as" if dest.table == other.table else "a table under"
                problems.append(
                    f"{dest.label} is {same} {other.label} ({_where(dest)}): each table is "
                    "written once per load; list it once"
                )
    return problems


def _where(tables: Tables) -> str:
    if tables.new is not None:
        return f"new table {tables.new_name} in database {tables.database_name!r}"
    return f"table OID {tables.table} in database {tables.database_name!r}"
