"""``mode="replace"``: after the load the table holds exactly the source's rows.

Until the commit every other session sees the old rows. ``truncate`` empties the table
with TRUNCATE (an ACCESS EXCLUSIVE lock until the commit: readers wait) so the COPY may
FREEZE its rows (written already frozen: no later anti-wraparound rewrite, no hint-bit
writes on first read). ``delete`` empties it with DELETE (readers never wait; the dead rows
stay until VACUUM).
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import sql

from airflow_copyman.load import _plan
from airflow_copyman.load._mode import Mode


class ReplaceByTruncate(Mode):
    name = "replace"
    privileges = ("TRUNCATE",)
    lock_mode = "ACCESS EXCLUSIVE"

    def __init__(self, table: _plan.TableName) -> None:
        super().__init__(table)
        #: COPY FREEZE refuses partitioned tables (and views): plain COPY there.
        self.freeze = True

    def check(self, conn: psycopg.Connection[Any], columns: Any) -> str | None:
        row = conn.execute(
            "SELECT relkind::text FROM pg_class WHERE oid = to_regclass(%s)",
            [self.table.regclass_text],
        ).fetchone()
        self.freeze = bool(row and row[0] == "r")
        return super().check(conn, columns)

    def begin(self, conn: psycopg.Connection[Any]) -> None:
        if not self.created:
            conn.execute(sql.SQL("TRUNCATE TABLE {}").format(self.table.identifier))

    def copy_in(self, fmt: _plan.Format) -> sql.Composed:
        return _plan.copy_in(self.table, self.columns, fmt, freeze=self.freeze or self.created)

    def written(
        self, conn: psycopg.Connection[Any]
    ) -> tuple[sql.Composable, sql.Composable | None]:
        return self.table.identifier, None


class ReplaceByDelete(Mode):
    name = "replace"
    privileges = ("DELETE",)

    def begin(self, conn: psycopg.Connection[Any]) -> None:
        if not self.created:
            conn.execute(sql.SQL("DELETE FROM {}").format(self.table.identifier))

    def written(
        self, conn: psycopg.Connection[Any]
    ) -> tuple[sql.Composable, sql.Composable | None]:
        return self.table.identifier, None
