"""Which PostgreSQL versions a copy may join, and where binary COPY is exact between them.

Binary COPY carries each value in its type's send/receive form, and the receiving server
reads it with its own ``*_recv``: between two major versions that is exact only where the
type's binary form *and its meaning* are the same in both. Text is the values' own
spelling, which a receiver that cannot represent a value refuses loudly (15 reads
``'infinity'::interval`` as an error, where in binary it would take the same bits as a
finite interval and say nothing).

``BINARY_CHANGES`` lists the built-in types whose binary form or meaning changed between
PostgreSQL 13 and 18, from the release notes and the commits they cite. Every other
built-in type's send/receive functions are unchanged over that span. Arrays, ranges and
multiranges of a listed type carry its values, so they are listed by the element's name
(:func:`binary_change` strips ``[]``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ._sql import _LEADING_NOISE

#: The oldest major version a load connects to: the oldest PostgreSQL release still
#: supported by the PostgreSQL project (13 and 14 have reached their end of life).
OLDEST_SUPPORTED = 15
#: The versions the test suite runs on (README "PostgreSQL versions").
TESTED = (15, 18)


@dataclass(frozen=True)
class BinaryChange:
    type_name: str  # format_type() of the type, as planning sees it
    since: int  # the major version whose binary form or meaning differs from the one before
    why: str
    source: str


BINARY_CHANGES: tuple[BinaryChange, ...] = (
    BinaryChange(
        "numeric", 14,
        "numeric gained Infinity and -Infinity, sent with sign codes older servers refuse "
        "or read as something else",
        "https://www.postgresql.org/docs/release/14.0/ (\"Add support for infinity and "
        "-infinity values to the numeric data type\"; discussion: "
        "https://postgrespro.com/list/id/1199108.1595369906@sss.pgh.pa.us)",
    ),
    BinaryChange(
        "interval", 17,
        "interval gained infinity and -infinity, sent as the largest and smallest finite "
        "intervals of 16 and older: an older server stores them as finite intervals, a "
        "newer one reads those finite intervals as infinite",
        "https://www.postgresql.org/docs/release/17.0/ (commit "
        "https://github.com/postgres/postgres/commit/519fc1bd9e9d7b408903e44f55f83f6db30742b7)",
    ),
)

#: Range and multirange types whose bounds are a listed type's values.
_CONTAINERS = {
    "numrange": "numeric",
    "nummultirange": "numeric",
}


def major(server_version: int) -> int:
    """The major version of a ``server_version_num`` (180001 -> 18)."""
    return server_version // 10000


def describe(server_version: int) -> str:
    """``server_version_num`` as PostgreSQL writes it (150018 -> 15.18)."""
    return f"{server_version // 10000}.{server_version % 10000}"


def too_old(server_version: int) -> str | None:
    """Why a server of this version is refused, or None."""
    if major(server_version) >= OLDEST_SUPPORTED:
        return None
    return (
        f"PostgreSQL {describe(server_version)} is older than the oldest supported version "
        f"({OLDEST_SUPPORTED}; its release has reached its end of life)"
    )


def binary_change(type_name: str, version_a: int, version_b: int) -> BinaryChange | None:
    """The change to ``type_name``'s binary form or meaning between major versions
    ``version_a`` and ``version_b`` (either order), or None when binary COPY of it
    between them is exact."""
    low, high = sorted((version_a, version_b))
    if low == high:
        return None
    base = type_name.removesuffix("[]")
    base = _CONTAINERS.get(base, base)
    for change in BINARY_CHANGES:
        if change.type_name == base and low < change.since <= high:
            return change
    return None


def changes_between(version_a: int, version_b: int) -> list[BinaryChange]:
    """The listed changes that lie between two major versions (none for one version)."""
    low, high = sorted((version_a, version_b))
    return [c for c in BINARY_CHANGES if low < c.since <= high]


# The engine's view of a receiver: ``COPY table [(columns)] FROM STDIN``. An identifier is
# quoted ("" inside doubles a quote) or bare (folded to lower case, as the server does).
_IDENT = r'(?:"(?:[^"]|"")*"|[^\s(),."]+)'
_COPY_TARGET = re.compile(
    rf"\A\s*COPY\s+(?P<table>{_IDENT}(?:\s*\.\s*{_IDENT}){{0,2}})\s*"
    rf"(?:\((?P<columns>[^)]*)\))?\s*FROM\s+STDIN\b",
    re.IGNORECASE,
)


def copy_target(statement: str) -> tuple[str, list[str] | None] | None:
    """The table (as ``to_regclass`` reads it) and the column names (None: all) a
    ``COPY ... FROM STDIN`` fills, or None where the statement cannot be read so."""
    match = _COPY_TARGET.match(statement[_LEADING_NOISE.match(statement).end() :])  # type: ignore[union-attr]
    if match is None:
        return None
    table = re.sub(r"\s*\.\s*", ".", match["table"])
    if match["columns"] is None:
        return table, None
    names = [
        name[1:-1].replace('""', '"') if name.startswith('"') else name.lower()
        for name in re.findall(_IDENT, match["columns"])
    ]
    return table, names


#: Every type inside each column a COPY fills (itself, and recursively an array's
#: element, a domain's base type, a range's subtype, a multirange's range, a composite's
#: attributes' types), by ``format_type``: binary COPY carries each inner value in its
#: own type's binary form. Parameters: ``table`` (to_regclass text), ``columns`` (or NULL).
COLUMN_TYPES_SQL = """
WITH RECURSIVE inner_types(name, oid) AS (
    SELECT a.attname::text, a.atttypid
    FROM pg_attribute a
    WHERE a.attrelid = to_regclass(%(table)s) AND a.attnum > 0 AND NOT a.attisdropped
      AND a.attgenerated = '' AND (%(columns)s::text[] IS NULL OR a.attname = ANY(%(columns)s))
  UNION
    SELECT i.name, x.oid
    FROM inner_types i
    JOIN pg_type t ON t.oid = i.oid
    CROSS JOIN LATERAL (
        SELECT t.typelem WHERE t.typelem <> 0 AND t.typlen = -1
        UNION ALL SELECT t.typbasetype WHERE t.typtype = 'd'
        UNION ALL SELECT r.rngsubtype FROM pg_range r WHERE r.rngtypid = t.oid
        UNION ALL SELECT r.rngtypid FROM pg_range r WHERE r.rngmultitypid = t.oid
        UNION ALL SELECT c.atttypid FROM pg_attribute c
                  WHERE t.typrelid <> 0 AND c.attrelid = t.typrelid AND c.attnum > 0
                    AND NOT c.attisdropped
    ) x(oid)
)
SELECT name, format_type(oid, NULL) FROM inner_types
"""
