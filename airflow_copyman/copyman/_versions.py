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

from dataclasses import dataclass

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
