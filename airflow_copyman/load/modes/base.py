"""What a load mode is: how one destination's rows land in its table, in its transaction.

Each mode is a small class (:mod:`.append`, :mod:`.replace`, :mod:`.merge`) with the same
steps, all run in the destination's one load transaction: :meth:`Mode.check` while planning
(nothing written yet), :meth:`Mode.begin` before the COPY, :meth:`Mode.copy_in` the COPY
statement, :meth:`Mode.finish` after the COPY (before the checksum, the postoperator, the
ledger row and the commit), and :meth:`Mode.written`: the rows this transaction wrote, for
verification (read after :meth:`Mode.finish`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import psycopg
from psycopg import sql

from airflow_copyman.load.catalog import tables
from airflow_copyman.load.verify import checksum


@dataclass(frozen=True)
class MergeCounts:
    """What a merge's apply did: the rows it inserted and those it updated."""

    inserted: int
    updated: int


class Mode:
    """One destination's load mode (the base: append's COPY into the table)."""

    name: ClassVar[str] = "append"
    #: Table privileges the mode needs besides INSERT on the columns.
    privileges: ClassVar[tuple[str, ...]] = ()
    #: The lock its statements take on the table (``LOCK TABLE``'s name for it).
    lock_mode: ClassVar[str] = "ROW EXCLUSIVE"
    #: Take the table's load lock (:mod:`airflow_copyman.load.connection.locks`) only right
    #: before :meth:`finish`, not before the COPY: the COPY writes elsewhere (the merge's
    #: staging table), so loads copy in parallel and only their applies are serialized.
    lock_before_finish: ClassVar[bool] = False

    def __init__(self, table: tables.TableName, key: Sequence[str] | None = None) -> None:
        self.table = table
        self.key = list(key or ())

    def check(self, conn: psycopg.Connection[Any], columns: Sequence[str]) -> str | None:
        """Why this mode cannot load the table (planning, nothing written), or None.
        ``columns``: the table columns the COPY fills."""
        for privilege in self.privileges:
            if not tables.has_table_privilege(conn, self.table, privilege):
                return f"permission denied: no {privilege} privilege (mode={self.name!r})"
        return None

    def begin(
        self, conn: psycopg.Connection[Any], columns: Sequence[str], *, created: bool
    ) -> None:
        """Statements before the COPY, in the load transaction. ``columns``: those the COPY
        fills, as the table spells them; ``created``: the transaction created the table."""

    def copy_in(
        self, fmt: tables.Format, columns: Sequence[str], *, created: bool
    ) -> sql.Composed:
        """The COPY ... FROM STDIN statement (a table this transaction created: FREEZE)."""
        return tables.copy_in(self.table, columns, fmt, freeze=created)

    def finish(
        self, conn: psycopg.Connection[Any], rows: int, columns: Sequence[str]
    ) -> MergeCounts | None:
        """Statements after the COPY (``rows`` arrived), in the load transaction; what they
        did (a merge's counts), or None."""
        return None

    def written(
        self, conn: psycopg.Connection[Any]
    ) -> tuple[sql.Composable, sql.Composable | None]:
        """The relation (read as ``r``) and the condition (None: all its rows) that select the
        rows this transaction wrote, for the checksum of what landed: here the rows it inserted (the
        COPY runs in the top-level transaction, so they carry its xid)."""
        return self.table.identifier, checksum.this_transaction(conn)
