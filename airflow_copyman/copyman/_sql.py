"""A cheap look at a COPY statement before it runs, so bad input fails before data moves.

The server has the last word (psycopg checks the COPY result when it starts); this catches
the common mistakes with a clearer message and before any other COPY has started.
"""

from __future__ import annotations

import re

from ._errors import CopyUsageError

_LEADING_NOISE = re.compile(r"\A(?:\s+|--[^\n]*(?:\n|\Z)|/\*.*?\*/)*", re.DOTALL)
_COPY = re.compile(r"COPY\b", re.IGNORECASE)
_DIRECTIONS = {
    "out": (re.compile(r"\bTO\s+STDOUT\b", re.IGNORECASE), "COPY ... TO STDOUT"),
    "in": (re.compile(r"\bFROM\s+STDIN\b", re.IGNORECASE), "COPY ... FROM STDIN"),
}


def check_copy_statement(text: str, direction: str, role: str) -> None:
    """Raise ``CopyUsageError`` unless ``text`` is a COPY in the given direction."""
    body = text[_LEADING_NOISE.match(text).end() :]  # type: ignore[union-attr]
    pattern, wanted = _DIRECTIONS[direction]
    shown = " ".join(text.split())[:100]
    if not _COPY.match(body):
        raise CopyUsageError(f"{role} needs a {wanted} statement, got: {shown!r}")
    if not pattern.search(body):
        raise CopyUsageError(
            f"{role} needs a {wanted} statement (wrong direction?), got: {shown!r}"
        )
