"""``mode="merge"``: rows whose key is in the table are updated, the others inserted.

The COPY streams into a temporary staging table (created in the load transaction, dropped
at its end), which is then applied with UPDATE ... FROM and INSERT ... WHERE NOT EXISTS:
no unique index on the key is needed, and the two statements' row counts are the
``updated`` and ``inserted`` counts. A key that occurs twice in the source is refused
before the table is touched (which of the two rows would win is not the load's to guess):
a unique index on the staging table finds it.
Rows whose key has a NULL never match (SQL equality), so they are inserted.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg import sql

from airflow_copyman.copyman import _versions
from airflow_copyman.load import _plan
from airflow_copyman.load._mode import Mode
from airflow_copyman.load._spec import DuplicateKeyError

#: The oldest version a load connects to (copyman/_versions.py); kept here for the mode's
#: own check, which a server too old to connect to never reaches.
MIN_SERVER_VERSION = _versions.OLDEST_SUPPORTED * 10000
#: work_mem of the merge's own statements (a hash of the staging table's keys fits).
MERGE_WORK_MEM = "64MB"
#: The staging table, in the session's own temporary schema.
STAGE = sql.Identifier("pg_temp", "copyman_merge_stage")


class Merge(Mode):
    name = "merge"
    privileges = ("SELECT", "UPDATE")

    def check(self, conn: psycopg.Connection[Any], columns: Sequence[str]) -> str | None:
        version = conn.info.server_version
        if version < MIN_SERVER_VERSION:
            return (
                f"mode='merge' needs PostgreSQL {_versions.OLDEST_SUPPORTED} or later; this "
                f"server is {_versions.describe(version)}"
            )
        missing = [k for k in self.key if k not in columns]
        if missing:
            return (
                f"the merge key column {missing[0]!r} is not among the columns loaded "
                f"({', '.join(columns)})"
            )
        return super().check(conn, columns)

    def begin(self, conn: psycopg.Connection[Any]) -> None:
        assert self.columns is not None
        # ON COMMIT DROP, and created by the load transaction: gone at its end either way,
        # so a transaction that starts again (a retry, a restarted copy) creates it anew.
        # Exactly the loaded columns, with the table's types (and typmods); no
        # constraints, so the duplicate-key check below can say which key repeats.
        conn.execute(
            sql.SQL("CREATE TEMPORARY TABLE {} ON COMMIT DROP AS SELECT {} FROM {} WITH NO DATA")
            .format(STAGE, self._cols(), self.table.identifier)
        )

    def copy_in(self, fmt: _plan.Format) -> sql.Composed:
        target = sql.SQL("{} ({})").format(STAGE, self._cols())
        return sql.SQL("COPY {} FROM STDIN (FORMAT {})").format(target, sql.SQL(fmt))

    def finish(self, conn: psycopg.Connection[Any], rows: int) -> None:
        assert self.columns is not None
        # The check sorts and the apply hashes the whole staging table: with the defaults
        # (4MB, 64MB) they spill to disk. Raised (never lowered) for these statements only,
        # then put back, so the postoperator runs with the session's own.
        (work_mem,) = conn.execute("SELECT current_setting('work_mem')").fetchone() or ("",)
        (maintenance,) = conn.execute(
            "SELECT current_setting('maintenance_work_mem')"
        ).fetchone() or ("",)
        for setting in ("work_mem", "maintenance_work_mem"):
            conn.execute(
                "SELECT set_config(%(s)s, CASE WHEN pg_size_bytes(current_setting(%(s)s))"
                " < pg_size_bytes(%(v)s) THEN %(v)s ELSE current_setting(%(s)s) END, true)",
                {"s": setting, "v": MERGE_WORK_MEM},
            )
        self._apply(conn)
        conn.execute("SELECT set_config('work_mem', %s, true)", [work_mem])
        conn.execute("SELECT set_config('maintenance_work_mem', %s, true)", [maintenance])

    def _apply(self, conn: psycopg.Connection[Any]) -> None:
        assert self.columns is not None
        keys = sql.SQL(", ").join(map(sql.Identifier, self.key))
        try:
            # A unique index on the staging table is the cheapest check (a sort, about
            # half a hash aggregate's time) and its error names one duplicate key. NULL
            # keys are not duplicates here: such rows never match, each is inserted.
            conn.execute(sql.SQL("CREATE UNIQUE INDEX ON {} ({})").format(STAGE, keys))
        except psycopg.errors.UniqueViolation as exc:
            duplicate = (exc.diag.message_detail or "").strip().rstrip(".")
            raise DuplicateKeyError(
                f"table {self.table}: the merge key ({', '.join(self.key)}) occurs more than "
                f"once in the source ({duplicate or 'a key is duplicated'}): nothing was written"
            ) from None
        match = sql.SQL(" AND ").join(
            sql.SQL("t.{k} = s.{k}").format(k=sql.Identifier(k)) for k in self.key
        )
        others = [c for c in self.columns if c not in self.key]
        if others:
            updated = conn.execute(
                sql.SQL("UPDATE {t} AS t SET {sets} FROM {s} AS s WHERE {match}").format(
                    t=self.table.identifier,
                    sets=sql.SQL(", ").join(
                        sql.SQL("{c} = s.{c}").format(c=sql.Identifier(c)) for c in others
                    ),
                    s=STAGE,
                    match=match,
                )
            ).rowcount
        else:  # only key columns: a found row has nothing to change
            found = conn.execute(
                sql.SQL("SELECT count(*) FROM {s} AS s WHERE EXISTS "
                        "(SELECT FROM {t} AS t WHERE {match})").format(
                    s=STAGE, t=self.table.identifier, match=match
                )
            ).fetchone()
            updated = found[0] if found else 0
        inserted = conn.execute(
            sql.SQL("INSERT INTO {t} ({cols}) SELECT {scols} FROM {s} AS s WHERE NOT EXISTS "
                    "(SELECT FROM {t} AS t WHERE {match})").format(
                t=self.table.identifier,
                cols=self._cols(),
                scols=sql.SQL(", ").join(sql.SQL("s.{}").format(sql.Identifier(c))
                                         for c in self.columns),
                s=STAGE,
                match=match,
            )
        ).rowcount
        self.updated, self.inserted = updated, inserted

    def written(
        self, conn: psycopg.Connection[Any]
    ) -> tuple[sql.Composable, sql.Composable | None]:
        return STAGE, None

    def _cols(self) -> sql.Composable:
        assert self.columns is not None
        return sql.SQL(", ").join(map(sql.Identifier, self.columns))
