"""``mode="merge"``: rows whose key is in the table are updated, the others inserted.

The COPY streams into a temporary staging table (created in the load transaction, dropped
at its end), which is then applied with UPDATE ... FROM and INSERT ... WHERE NOT EXISTS:
no unique index on the key is needed, and the two statements' row counts are the
``updated`` and ``inserted`` counts. Before the table is touched:

* a key with a NULL is refused (``key_nulls="refuse"``, the default): it would match no row,
  so every run would insert it again. ``key_nulls="match"`` matches NULLs as equal
  (``IS NOT DISTINCT FROM``, which PostgreSQL can neither hash nor look up in an index: a
  join of every staged row with every row of the table, for small tables);
* a key that occurs twice in the source is refused (which of the two rows would win is not
  the load's to guess): a unique index on the staging table finds it.

The UPDATE rewrites only rows whose values differ: compared by each type's binary send
function (its exact value: ``1.0`` and ``1.00``, ``0`` and ``-0`` differ, as they do for the
checksum), or its text where a type has none; so a rerun of the same source changes
nothing (no new row versions, no UPDATE trigger fires, ``updated`` is 0).

A unique violation on the key (or a deadlock, a serialization failure) while applying is a
concurrent writer's doing: it inserted a key after the merge looked for it. A retry merges
it, so the error is transient (:class:`MergeConflictError`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg import sql

from airflow_copyman.copyman import _versions
from airflow_copyman.load.catalog import hints, keytypes, tables
from airflow_copyman.load.modes import statements
from airflow_copyman.load.modes.base import MergeCounts, Mode
from airflow_copyman.load.spec import DuplicateKeyError, LoadError

#: The oldest version a load connects to (copyman/_versions.py: MERGE's and NULLS NOT
#: DISTINCT's too); kept here for the mode's own check, which a server too old to connect
#: to never reaches.
MIN_SERVER_VERSION = _versions.OLDEST_SUPPORTED * 10000
#: work_mem of the merge's own statements (a hash of the staging table's keys fits).
MERGE_WORK_MEM = "64MB"


class NullKeyError(LoadError):
    """A merge key column is NULL in the source (``key_nulls="refuse"``): no retry can fix it."""

    permanent = True


class MergeConflictError(LoadError):
    """A concurrent writer inserted or locked a key while the merge applied: a retry merges
    it."""

    permanent = False


#: The unique indexes of the table (and its partitions) whose key columns include every
#: merge key column: a violation of one means the key exists, though the merge found none.
_KEY_INDEXES = """
SELECT c.relname::text
FROM pg_index i
JOIN pg_class c ON c.oid = i.indexrelid
WHERE (i.indrelid = %(table)s::regclass
       OR i.indrelid IN (SELECT relid FROM pg_partition_tree(%(table)s::regclass)))
  AND i.indisunique AND i.indexprs IS NULL
  AND (SELECT array_agg(a.attnum) FROM pg_attribute a
       WHERE a.attrelid = i.indrelid AND a.attname = ANY(%(key)s))
      <@ (i.indkey::int2[])[0:i.indnkeyatts - 1]
"""

#: Each column's binary send function (NULL: none); a domain's are its base type's.
_SEND_FUNCTIONS = """
SELECT a.attname::text, n.nspname::text, s.proname::text
FROM pg_attribute a
JOIN pg_type t ON t.oid = a.atttypid
LEFT JOIN pg_proc s ON s.oid = t.typsend
LEFT JOIN pg_namespace n ON n.oid = s.pronamespace
WHERE a.attrelid = %(table)s::regclass AND a.attnum > 0 AND NOT a.attisdropped
"""


class Merge(Mode):
    name = "merge"
    privileges = ("SELECT", "UPDATE")
    lock_before_finish = True

    def __init__(
        self, table: tables.TableName, key: Sequence[str], key_nulls: str = "refuse"
    ) -> None:
        super().__init__(table, key)
        #: "refuse" or "match" (see the module's docstring).
        self.key_nulls = key_nulls

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
                f"the merge key column {hints.with_hint(missing[0], columns)} is not among "
                f"the columns loaded ({', '.join(columns)})"
            )
        types = conn.execute(
            "SELECT attname::text, format_type(atttypid, NULL) FROM pg_attribute "
            "WHERE attrelid = to_regclass(%s) AND attname = ANY(%s) AND attnum > 0 "
            "AND NOT attisdropped",
            [self.table.regclass_text, list(self.key)],
        ).fetchall()
        problem = keytypes.refusal(conn, [(n, t) for n, t in types], created=False)
        return problem or super().check(conn, columns)

    def begin(
        self, conn: psycopg.Connection[Any], columns: Sequence[str], *, created: bool
    ) -> None:
        # ON COMMIT DROP, and created by the load transaction: gone at its end either way,
        # so a transaction that starts again (a retry, a restarted copy) creates it anew.
        # Exactly the loaded columns, with the table's types (and typmods, collations); no
        # constraints, so the duplicate-key check below can say which key repeats.
        conn.execute(statements.create_stage(self.table.identifier, columns))

    def copy_in(
        self, fmt: tables.Format, columns: Sequence[str], *, created: bool
    ) -> sql.Composed:
        return statements.copy_into_stage(columns, fmt)

    def finish(
        self, conn: psycopg.Connection[Any], rows: int, columns: Sequence[str]
    ) -> MergeCounts:
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
        if self.key_nulls != "match":
            self._refuse_null_keys(conn)
        self._refuse_duplicate_keys(conn)
        counts = self._apply(conn, columns)
        conn.execute("SELECT set_config('work_mem', %s, true)", [work_mem])
        conn.execute("SELECT set_config('maintenance_work_mem', %s, true)", [maintenance])
        return counts

    def _refuse_null_keys(self, conn: psycopg.Connection[Any]) -> None:
        """A staged key with a NULL matches no row: every run would insert it again."""
        counts = conn.execute(statements.null_key_count(self.key)).fetchone()
        assert counts is not None
        if not counts[0]:
            return
        per_key = ", ".join(
            f"{k}: {n}" for k, n in zip(self.key, counts[1:], strict=True) if n
        )
        raise NullKeyError(
            f"table {self.table}: {counts[0]} row(s) of the source have a NULL in the merge "
            f"key ({per_key}); a NULL key matches no row, so each run would insert them "
            "again: nothing was written (key_nulls='match' matches NULL keys as equal)"
        )

    def _refuse_duplicate_keys(self, conn: psycopg.Connection[Any]) -> None:
        # A unique index on the staging table is the cheapest check (a sort, about half a
        # hash aggregate's time) and its error names one duplicate key. Under "match",
        # NULLs are equal keys, so repeated ones are duplicates too.
        try:
            conn.execute(statements.unique_key_index(self.key, nulls_match=self._nulls_match))
        except psycopg.errors.UniqueViolation as exc:
            duplicate = (exc.diag.message_detail or "").strip().rstrip(".")
            raise DuplicateKeyError(
                f"table {self.table}: the merge key ({', '.join(self.key)}) occurs more than "
                f"once in the source ({duplicate or 'a key is duplicated'}): nothing was written"
            ) from None

    def _apply(self, conn: psycopg.Connection[Any], columns: Sequence[str]) -> MergeCounts:
        # Read before the statements: the transaction is unusable once one fails.
        key_indexes = self._key_indexes(conn)
        try:
            updated = self._update(conn, columns)
            inserted = conn.execute(
                statements.insert_missing(
                    self.table.identifier, columns, self.key, nulls_match=self._nulls_match
                )
            ).rowcount
        except psycopg.errors.UniqueViolation as exc:
            if exc.diag.constraint_name not in key_indexes:
                raise  # another unique column: the source's own value, permanent
            raise MergeConflictError(
                f"table {self.table}: a concurrent writer inserted a key this merge was "
                f"inserting ({_detail(exc)}), after the merge looked for it: nothing was "
                "written; a retry merges it"
            ) from exc
        except (psycopg.errors.SerializationFailure, psycopg.errors.DeadlockDetected) as exc:
            raise MergeConflictError(
                f"table {self.table}: the merge conflicted with a concurrent writer "
                f"({_detail(exc)}): nothing was written; a retry merges it"
            ) from exc
        return MergeCounts(inserted=inserted, updated=updated)

    def _update(self, conn: psycopg.Connection[Any], columns: Sequence[str]) -> int:
        """Update the rows whose key was staged and whose values differ; how many."""
        if all(c in self.key for c in columns):  # a found row has nothing to change
            return 0
        update = statements.update_changed(
            self.table.identifier, columns, self.key, self._send_functions(conn),
            nulls_match=self._nulls_match,
        )
        return 0 if update is None else conn.execute(update).rowcount

    def _send_functions(self, conn: psycopg.Connection[Any]) -> dict[str, sql.Identifier | None]:
        return send_functions(conn, self.table.regclass_text)

    def _key_indexes(self, conn: psycopg.Connection[Any]) -> frozenset[str]:
        return key_indexes(conn, self.table.regclass_text, self.key)

    def written(
        self, conn: psycopg.Connection[Any]
    ) -> tuple[sql.Composable, sql.Composable | None]:
        """The target's rows whose key was staged (matched as the merge matched them), read
        after the merge: a trigger that changed them, a collation that matched another key,
        a second row with the key all show."""
        return self.table.identifier, statements.merged_rows(
            self.key, nulls_match=self._nulls_match
        )

    @property
    def _nulls_match(self) -> bool:
        return self.key_nulls == "match"


def send_functions(
    conn: psycopg.Connection[Any], regclass_text: str
) -> dict[str, sql.Identifier | None]:
    """Each column of the table and its type's binary send function (None: none), as
    :func:`statements.update_changed` compares values."""
    rows = conn.execute(
        _SEND_FUNCTIONS,  # type: ignore[arg-type]
        {"table": regclass_text},
    ).fetchall()
    return {
        name: sql.Identifier(schema, function) if function is not None else None
        for name, schema, function in rows
    }


def key_indexes(
    conn: psycopg.Connection[Any], regclass_text: str, key: Sequence[str]
) -> frozenset[str]:
    """The unique indexes whose violation means a merge key exists (a concurrent writer)."""
    rows = conn.execute(
        _KEY_INDEXES,  # type: ignore[arg-type]
        {"table": regclass_text, "key": list(key)},
    ).fetchall()
    return frozenset(name for (name,) in rows)


def _detail(exc: psycopg.Error) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    # One line: the failure is described by its first line.
    detail = " ".join((exc.diag.message_detail or "").split()).rstrip(".")
    return f"{text}: {detail}" if detail else text
