"""An order-independent digest of the rows of a COPY stream, taken as they pass.

A server sends a ``COPY ... TO STDOUT`` one row per CopyData message, in text, CSV and
binary alike. The digest of a stream is the number of its rows and the sum, modulo 2**64,
of each row's 64-bit XXH3 hash: a sum does not depend on the rows' order, a changed row
changes its hash, a missing or duplicated row changes the count and the sum. Two streams
of the same rows in the same format have the same digest, whichever server sent them and
in whichever order, so a load can compare what its source sent (hashed as the engine
forwards it, no second read of the source) with what a destination holds (the same
``COPY`` of its rows, hashed the same way).

Binary COPY wraps its rows: the first message starts with a 19-byte (or longer) header
and the last message is a trailer (``-1`` as int16). Neither is a row: the header is cut
off the first message and the trailer is taken out at the end, so that the digest counts
rows only and two binary streams agree whichever row came first.

XXH3 (the ``xxhash`` package, its reference C implementation) costs about 60 ns for a
200-byte row here; ``hashlib.blake2b`` with an 8-byte digest costs 12 times that (an
object per row), and ``zlib.crc32`` is 32 bits and affine (crc(a ^ b) = crc(a) ^ crc(b)
^ crc(0...)), too weak to sum.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import xxhash
from psycopg.abc import Buffer

from ._records import BINARY_SIGNATURE

#: The hash of one row; the hot loops call it directly.
row_hash = xxhash.xxh3_64_intdigest

MASK = (1 << 64) - 1
#: What every binary COPY stream starts with (then a flags int32 and an extension length).
BINARY_TRAILER = b"\xff\xff"
_HEADER_FIXED = len(BINARY_SIGNATURE) + 8


@dataclass(frozen=True)
class Digest:
    """The number of rows of a stream and the sum of their hashes (modulo 2**64)."""

    rows: int
    total: int
    #: The stream's format family: ``"binary"``, or ``"text"`` (text and CSV rows alike).
    layout: str

    def __sub__(self, other: Digest) -> Digest:
        """The rows of ``self`` not in ``other`` (a digest of rows there before)."""
        return Digest(self.rows - other.rows, (self.total - other.total) & MASK, self.layout)


class StreamDigest:
    """Accumulates a stream's digest. The reading loop adds ``row_hash(message)`` of every
    CopyData message to :attr:`total` and their number to :attr:`messages` itself (a method
    call per row would cost more than the hash), and gives :meth:`started` the first
    message once; :meth:`digest` then takes the binary header and trailer out."""

    __slots__ = ("first", "messages", "total")

    def __init__(self) -> None:
        self.messages = 0
        self.total = 0
        self.first: bytes | None = None

    def started(self, first: Buffer) -> None:
        """The stream's first message (kept: the binary header is cut off it at the end)."""
        if self.first is None:
            self.first = bytes(first)

    def add(self, messages: Iterable[Buffer]) -> None:
        """Add messages one by one (for tests and small streams; loops inline this)."""
        for message in messages:
            if self.first is None:
                self.started(message)
            self.total += row_hash(message)
            self.messages += 1

    def digest(self) -> Digest:
        """The digest of the stream read so far (complete once the COPY has ended)."""
        rows, total, first = self.messages, self.total, self.first
        if first is None or not first.startswith(BINARY_SIGNATURE):
            return Digest(rows, total & MASK, "text")
        extension = int.from_bytes(first[_HEADER_FIXED - 4 : _HEADER_FIXED], "big")
        row = first[_HEADER_FIXED + extension :]
        total -= row_hash(first)
        if row:  # the first row, or the trailer of an empty stream
            total += row_hash(row)
        else:
            rows -= 1
        # The trailer, the last message of every complete binary stream.
        return Digest(rows - 1, (total - row_hash(BINARY_TRAILER)) & MASK, "binary")
