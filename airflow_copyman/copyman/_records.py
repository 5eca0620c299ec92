"""Batches of COPY records and how many of their records are rows."""

from __future__ import annotations

from collections.abc import Sequence

from psycopg.abc import Buffer

# Binary COPY wraps the rows in a 19-byte header (signature, flags, extension length) and a
# 2-byte trailer (a field count of -1). PostgreSQL sends the header glued to the first row
# (or to the trailer when there are no rows) and the trailer as a message of its own.
BINARY_SIGNATURE = b"PGCOPY\n\xff\r\n\x00"
BINARY_HEADER_SIZE = 19
BINARY_TRAILER = b"\xff\xff"


class Batch:
    """The records one cycle moves: read once, shared by every receiver."""

    __slots__ = ("_as_bytes", "data", "nbytes", "records", "rows")

    def __init__(self, records: Sequence[Buffer], rows: int) -> None:
        self.records = records
        self.rows = rows
        # One buffer for receivers that send a stream (COPY accepts any split of it).
        self.data = b"".join(records)
        self.nbytes = len(self.data)
        self._as_bytes: list[bytes] | None = None

    def record_list(self) -> list[bytes]:
        """The records as ``bytes`` (what call receivers are given), made on first use."""
        if self._as_bytes is None:
            self._as_bytes = [bytes(r) for r in self.records]
        return self._as_bytes


class RowCounter:
    """Counts rows in a stream of records: every record is a row, except binary COPY's
    header and trailer when they stand alone (a header glued to the first row, or a trailer
    glued to the last, shares a record with a row and so does not change the count).

    Only the first record of the stream and the last record of each batch are looked at,
    so counting costs nothing per row.
    """

    def __init__(self) -> None:
        self.binary: bool | None = None

    def count(self, records: Sequence[Buffer]) -> int:
        rows = len(records)
        if not rows:
            return 0
        if self.binary is None:
            head = memoryview(records[0])
            self.binary = head[: len(BINARY_SIGNATURE)] == BINARY_SIGNATURE
            if self.binary and (
                len(head) == BINARY_HEADER_SIZE
                or (
                    len(head) == BINARY_HEADER_SIZE + 2
                    and head[BINARY_HEADER_SIZE:] == BINARY_TRAILER
                )
            ):
                rows -= 1
        if self.binary and rows and records[-1] == BINARY_TRAILER:
            rows -= 1
        return rows
