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
    """The records one cycle moves: read once, shared by every receiver.

    ``data`` is the records joined (a COPY stream accepts any split of it), which is what
    statement receivers send; ``records`` is the list of records, kept only when a receiver
    asked for it (see ``Producer.keep_records``).
    """

    __slots__ = ("_as_bytes", "data", "nbytes", "records", "rows")

    def __init__(
        self, data: Buffer, rows: int, records: Sequence[Buffer] | None = None
    ) -> None:
        self.data = data
        self.nbytes = len(memoryview(data))
        self.rows = rows
        self.records = records
        self._as_bytes: list[bytes] | None = None

    @classmethod
    def of_records(cls, records: Sequence[Buffer], rows: int) -> Batch:
        return cls(b"".join(records), rows, records)

    def record_list(self) -> list[bytes]:
        """The records as ``bytes`` (what call receivers are given), made on first use."""
        if self._as_bytes is None:
            if self.records is None:
                raise RuntimeError("this batch kept no records (Producer.keep_records)")
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
        return self.count_parts(len(records), records[0], records[-1]) if records else 0

    def count_parts(self, n: int, first: Buffer, last: Buffer) -> int:
        """Rows among ``n`` records of a batch, given its first and last record."""
        rows = n
        if self.binary is None:
            head = memoryview(first)
            self.binary = head[: len(BINARY_SIGNATURE)] == BINARY_SIGNATURE
            if self.binary and (
                len(head) == BINARY_HEADER_SIZE
                or (
                    len(head) == BINARY_HEADER_SIZE + 2
                    and head[BINARY_HEADER_SIZE:] == BINARY_TRAILER
                )
            ):
                rows -= 1
        if self.binary and rows and last == BINARY_TRAILER:
            rows -= 1
        return rows
