"""Key ranges: pure functions, no server, no Airflow.

A plan is a list of :class:`Range`. Cuts ``c1 < c2 < ... < ck`` make the half-open ranges
``(-inf, c1)``, ``[c1, c2)``, ..., ``[ck, +inf)``: the first has no lower bound and the last
none above, so a value outside what the statistics saw (stale statistics, rows inserted
after the plan) still falls in exactly one range. Rows whose key is NULL are a range of
their own (no comparison is true of NULL). Keyless tables split by ``ctid`` block ranges
the same way: the last range takes every block beyond the planned ones.

Bounds are kept as text (what PostgreSQL prints for the value) so that a plan is JSON and
the server, not Python, compares values: ``'42'``, ``'2024-01-01'``, ``'(128,0)'``.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from decimal import Decimal
from typing import Any, Literal

from psycopg import sql

#: What a range selects: rows whose key lies between its bounds, rows whose key is NULL,
#: or the tuples of a block range.
Kind = Literal["key", "nulls", "ctid"]
#: The column kinds that can split, by how their cuts are computed from min and max.
KeyKind = Literal["integer", "numeric", "date", "timestamp", "timestamptz"]

#: regtype text -> key kind.
SPLITTABLE_TYPES: dict[str, KeyKind] = {
    "smallint": "integer",
    "integer": "integer",
    "bigint": "integer",
    "numeric": "numeric",
    "date": "date",
    "timestamp without time zone": "timestamp",
    "timestamp with time zone": "timestamptz",
}

MAX_PARTS = 1024  # Airflow's default [core] max_map_length


@dataclass(frozen=True)
class Range:
    """One range of a plan. ``lower`` is inclusive, ``upper`` exclusive, None: unbounded."""

    index: int
    kind: Kind
    column: str | None
    lower: str | None = None
    upper: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, value: dict[str, Any]) -> Range:
        return cls(
            int(value["index"]), value["kind"], value.get("column"),
            value.get("lower"), value.get("upper"),
        )

    def predicate(self) -> sql.Composable:
        """The SQL condition selecting this range's rows."""
        if self.kind == "nulls":
            assert self.column is not None
            return sql.SQL("{} IS NULL").format(sql.Identifier(self.column))
        target: sql.Composable = (
            sql.SQL("ctid") if self.kind == "ctid" else sql.Identifier(str(self.column))
        )
        cast = sql.SQL("::tid") if self.kind == "ctid" else sql.SQL("")
        terms: list[sql.Composable] = []
        if self.lower is not None:
            terms.append(sql.SQL("{} >= {}{}").format(target, sql.Literal(self.lower), cast))
        if self.upper is not None:
            terms.append(sql.SQL("{} < {}{}").format(target, sql.Literal(self.upper), cast))
        if not terms:
            # The only range of a one-part plan: every row (but not NULL keys, their own).
            return sql.SQL("{} IS NOT NULL").format(target) if self.kind == "key" else sql.SQL(
                "true"
            )
        return sql.SQL(" AND ").join(terms)

    def describe(self) -> str:
        what = "ctid" if self.kind == "ctid" else self.column
        if self.kind == "nulls":
            return f"{what} IS NULL"
        low = f"{self.lower} <= " if self.lower is not None else ""
        high = f" < {self.upper}" if self.upper is not None else ""
        return f"{low}{what}{high}" if (low or high) else f"every {what}"


def ranges_from_cuts(
    column: str, cuts: Sequence[str], *, nulls: bool, kind: Kind = "key"
) -> list[Range]:
    """The ranges the (strictly increasing) ``cuts`` make, plus the NULL range if
    ``nulls`` (the column may hold NULL)."""
    bounds: list[str | None] = [None, *cuts, None]
    ranges = [
        Range(i, kind, column if kind == "key" else None, bounds[i], bounds[i + 1])
        for i in range(len(bounds) - 1)
    ]
    if nulls:
        ranges.append(Range(len(ranges), "nulls", column))
    return ranges


def distinct_in_order(values: Iterable[str]) -> list[str]:
    """``values`` without repeats (the first of equal neighbours kept)."""
    out: list[str] = []
    for value in values:
        if not out or out[-1] != value:
            out.append(value)
    return out


def cuts_from_histogram(bounds: Sequence[str], parts: int) -> list[str]:
    """At most ``parts - 1`` cuts from a histogram's bounds (ascending, equal-frequency
    buckets, as ``pg_stats.histogram_bounds`` gives them): every ``len/parts``-th inner bound.
    The outermost bounds are not cuts: the first and last ranges are open."""
    n = len(bounds) - 1  # buckets
    if n < 1 or parts < 2:
        return []
    positions = sorted({round(i * n / parts) for i in range(1, parts)})
    return distinct_in_order(bounds[p] for p in positions if 0 < p < n)


def integer_cuts(low: int, high: int, parts: int) -> list[int]:
    """At most ``parts - 1`` increasing cuts spreading ``[low, high]`` evenly."""
    if parts < 2 or high <= low:
        return []
    span = high - low + 1
    cuts = sorted({low + span * i // parts for i in range(1, parts)})
    return [c for c in cuts if low < c <= high]


def numeric_cuts(low: Decimal, high: Decimal, parts: int) -> list[Decimal]:
    if parts < 2 or high <= low:
        return []
    step = (high - low) / parts
    return sorted({low + step * i for i in range(1, parts)})


def cuts_from_bounds(kind: KeyKind, low: str, high: str, parts: int) -> list[str]:
    """Cuts spreading ``[low, high]`` evenly (the column's minimum and maximum as text;
    timestamps as seconds since the epoch, what ``extract(epoch from ...)`` prints)."""
    if kind == "integer":
        return [str(c) for c in integer_cuts(int(low), int(high), parts)]
    if kind == "numeric":
        return distinct_in_order(
            str(c) for c in numeric_cuts(Decimal(low), Decimal(high), parts)
        )
    if kind == "date":
        first = datetime.date.fromisoformat(low).toordinal()
        last = datetime.date.fromisoformat(high).toordinal()
        return [
            datetime.date.fromordinal(c).isoformat()
            for c in integer_cuts(first, last, parts)
        ]
    # Timestamps: microseconds since the epoch, cut as integers (exact, no float drift).
    first_us = int(Decimal(low) * 1_000_000)
    last_us = int(Decimal(high) * 1_000_000)
    return distinct_in_order(
        _timestamp_text(c, kind) for c in integer_cuts(first_us, last_us, parts)
    )


_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)


def _timestamp_text(micros: int, kind: KeyKind) -> str:
    value = _EPOCH + datetime.timedelta(microseconds=micros)
    if kind == "timestamp":
        return value.replace(tzinfo=None).isoformat(sep=" ")
    return value.isoformat(sep=" ")


def block_cuts(blocks: int, parts: int) -> list[str]:
    """``ctid`` cuts spreading ``blocks`` heap blocks evenly: ``(b,0)`` is the first tuple
    of block ``b``."""
    return [f"({b},0)" for b in integer_cuts(0, blocks - 1, parts)] if blocks > 1 else []


def ctid_ranges(blocks: int, parts: int) -> list[Range]:
    """Block ranges of a keyless table; the first starts at block 0 and the last takes
    every block beyond the planned ones (a table that grows while it loads)."""
    return ranges_from_cuts("ctid", block_cuts(blocks, parts), nulls=False, kind="ctid")


# For tests: whether a value falls in a range, comparing as the server would.


def contains(rng: Range, value: Any, parse: Any = int) -> bool:
    """Whether ``value`` (None: NULL) lies in ``rng``; bounds parsed with ``parse``."""
    if rng.kind == "nulls":
        return value is None
    if value is None:
        return False
    if rng.lower is not None and value < parse(rng.lower):
        return False
    return not (rng.upper is not None and value >= parse(rng.upper))
