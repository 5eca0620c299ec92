"""``mode="replace"``: after the load the table holds exactly the source's rows.

Until the commit every other session sees the old rows. ``truncate`` empties the table
with TRUNCATE (an ACCESS EXCLUSIVE lock until the commit: readers wait) so the COPY may
FREEZE its rows (written already frozen: no later anti-wraparound rewrite, no hint-bit
writes on first read). ``delete`` empties it with DELETE (readers never wait; the dead rows
stay until VACUUM).

A replace touches only its table. An inheritance parent's own rows are replaced (``TRUNCATE
ONLY``, ``DELETE FROM ONLY``): its children are tables of their own. A partitioned table's
rows are its partitions', so it is replaced whole. A table other tables reference by foreign
keys (itself included) is refused while planning, naming them, unless the destination says
``cascade=True``: then TRUNCATE ... CASCADE empties every table that references it (and
those referencing them), and DELETE applies each key's ON DELETE action; the log says which.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg import sql

from airflow_copyman.load.catalog import tables
from airflow_copyman.load.modes import statements
from airflow_copyman.load.modes.base import Mode
from airflow_copyman.load.verify import checksum

#: What a key's ON DELETE does to the referencing rows when the table's rows are deleted.
ON_DELETE = {
    "a": "NO ACTION", "r": "RESTRICT", "c": "CASCADE", "n": "SET NULL", "d": "SET DEFAULT",
}

_TABLE = """
SELECT c.oid::int8, c.relkind::text,
       EXISTS (SELECT 1 FROM pg_inherits i WHERE i.inhparent = c.oid)
FROM pg_class c WHERE c.oid = to_regclass(%s)
"""

#: The foreign keys referencing the tables of ``scope``, as declared: a key on or to a
#: partitioned table is cloned onto each partition (``conparentid`` names the original).
_REFERENCES = """
SELECT format('%%I.%%I', n.nspname, k.relname), c.conname::text, c.confdeltype::text,
       c.condeferred
FROM pg_constraint c
JOIN pg_class k ON k.oid = c.conrelid
JOIN pg_namespace n ON n.oid = k.relnamespace
WHERE c.contype = 'f' AND c.conparentid = 0 AND c.confrelid = ANY(%s::oid[])
ORDER BY 1, 2
"""

#: Every table a TRUNCATE ... CASCADE of ``scope`` empties: those referencing it, and those
#: referencing them, named as declared (a partitioned table, not its partitions).
_TRUNCATE_REACHES = """
WITH RECURSIVE reached(oid) AS (
    SELECT c.conrelid FROM pg_constraint c
    WHERE c.contype = 'f' AND c.confrelid = ANY(%(scope)s::oid[])
  UNION
    SELECT c.conrelid FROM pg_constraint c JOIN reached r ON c.confrelid = r.oid
    WHERE c.contype = 'f'
)
SELECT format('%%I.%%I', n.nspname, k.relname)
FROM reached JOIN pg_class k ON k.oid = reached.oid
JOIN pg_namespace n ON n.oid = k.relnamespace
WHERE NOT k.relispartition AND k.oid <> ALL(%(scope)s::oid[])
ORDER BY 1
"""


class _Replace(Mode):
    """What both replace methods share: what the replace reaches, checked while planning."""

    name = "replace"

    def __init__(
        self,
        table: tables.TableName,
        *,
        cascade: bool = False,
        label: str = "",
        log: logging.Logger | logging.LoggerAdapter[Any] | None = None,
    ) -> None:
        super().__init__(table)
        self.cascade = cascade
        self.label = label or str(table)
        self.log = log or logging.getLogger("airflow_copyman.load")
        #: A plain table: only its own rows (an inheritance parent's children keep theirs).
        self.only = False
        self.relkind = ""

    def check(self, conn: psycopg.Connection[Any], columns: Any) -> str | None:
        row = conn.execute(_TABLE, [self.table.regclass_text]).fetchone()
        if row is not None:
            oid, self.relkind, has_children = row
            self.only = self.relkind == "r"
            if self.only and has_children:
                self.log.info(
                    "%s: an inheritance parent: replacing its own rows only (ONLY); its "
                    "child tables keep theirs", self.label,
                )
            problem = self._check_references(conn, oid)
            if problem is not None:
                return problem
        return super().check(conn, columns)

    def _scope(self, conn: psycopg.Connection[Any], oid: int) -> list[int]:
        """The tables whose rows the replace removes: a partitioned table's partitions too."""
        if self.relkind != "p":
            return [oid]
        rows = conn.execute("SELECT relid::int8 FROM pg_partition_tree(%s::oid)", [oid]).fetchall()
        return [r[0] for r in rows]

    def _check_references(self, conn: psycopg.Connection[Any], oid: int) -> str | None:
        scope = self._scope(conn, oid)
        keys = conn.execute(_REFERENCES, [scope]).fetchall()  # type: ignore[arg-type]
        if not keys:
            return None
        named = "; ".join(
            f"{table} ({name}, ON DELETE {ON_DELETE.get(action, action)})"
            for table, name, action, _ in keys
        )
        if not self.cascade:
            return (
                f"table {self.table} is referenced by foreign keys: {named}; mode='replace' "
                f"would reach those tables (TRUNCATE cannot leave them alone, DELETE applies "
                f"each key's ON DELETE action): give cascade=True to replace it anyway, or "
                f"load it with mode='merge'"
            )
        self._say_what_cascades(conn, scope, keys)
        return None

    def _say_what_cascades(
        self, conn: psycopg.Connection[Any], scope: list[int], keys: list[Any]
    ) -> None:
        raise NotImplementedError

    def written(
        self, conn: psycopg.Connection[Any]
    ) -> tuple[sql.Composable, sql.Composable | None]:
        # The table's rows, an inheritance parent's own ones only (its children's were kept).
        if self.only:
            return checksum.Only(self.table.identifier), None
        return self.table.identifier, None


class ReplaceByTruncate(_Replace):
    privileges = ("TRUNCATE",)
    lock_mode = "ACCESS EXCLUSIVE"

    def __init__(self, table: tables.TableName, **options: Any) -> None:
        super().__init__(table, **options)
        #: COPY FREEZE refuses partitioned tables (and views): plain COPY there.
        self.freeze = True

    def check(self, conn: psycopg.Connection[Any], columns: Any) -> str | None:
        problem = super().check(conn, columns)
        self.freeze = self.relkind == "r"
        return problem

    def _say_what_cascades(
        self, conn: psycopg.Connection[Any], scope: list[int], keys: list[Any]
    ) -> None:
        rows = conn.execute(_TRUNCATE_REACHES, {"scope": scope}).fetchall()  # type: ignore[arg-type]
        reached = [r[0] for r in rows]
        self.log.warning(
            "%s: cascade=True: TRUNCATE ... CASCADE empties every row of %s too (tables "
            "referencing %s by foreign keys, and those referencing them)",
            self.label, ", ".join(reached) or "no other table", self.table,
        )

    def begin(
        self, conn: psycopg.Connection[Any], columns: Sequence[str], *, created: bool
    ) -> None:
        if not created:
            conn.execute(
                statements.truncate(self.table.identifier, only=self.only, cascade=self.cascade)
            )

    def copy_in(
        self, fmt: tables.Format, columns: Sequence[str], *, created: bool
    ) -> sql.Composed:
        return tables.copy_in(self.table, columns, fmt, freeze=self.freeze or created)


class ReplaceByDelete(_Replace):
    privileges = ("DELETE",)

    def _say_what_cascades(
        self, conn: psycopg.Connection[Any], scope: list[int], keys: list[Any]
    ) -> None:
        for table, name, action, deferred in keys:
            self.log.warning(
                "%s: cascade=True: DELETE reaches %s (%s, ON DELETE %s): %s",
                self.label, table, name, ON_DELETE.get(action, action),
                _what_delete_does(action, deferred),
            )

    def begin(
        self, conn: psycopg.Connection[Any], columns: Sequence[str], *, created: bool
    ) -> None:
        if not created:
            conn.execute(statements.delete_all(self.table.identifier, only=self.only))


def _what_delete_does(action: str, deferred: bool) -> str:
    if action == "c":
        return "its rows referencing the table are deleted (and what cascades from them)"
    if action in ("n", "d"):
        value = "NULL" if action == "n" else "their defaults"
        return f"its referencing columns are set to {value} (the rows stay)"
    if deferred and action == "a":  # RESTRICT is checked at once, deferred or not
        return (
            "checked at the commit: every key its rows reference must be loaded again, or "
            "the load fails (rolled back)"
        )
    return (
        "checked by the DELETE itself: the load fails (rolled back) while any of its rows "
        "references the table; empty or reload those rows yourself, or make the key "
        "DEFERRABLE INITIALLY DEFERRED so that it is checked after the reload"
    )
