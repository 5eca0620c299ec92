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


def is_copy_statement(text: str) -> bool:
    """Whether ``text`` (comments and blanks before it aside) is a COPY statement."""
    body = text[_LEADING_NOISE.match(text).end() :]  # type: ignore[union-attr]
    return _COPY.match(body) is not None


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


_OPTIONS_END = re.compile(r"\bWHERE\b", re.IGNORECASE)
_FORMAT = re.compile(r"\bFORMAT\s*=?\s*['\"]?(\w+)", re.IGNORECASE)
_LEGACY = re.compile(r"\b(BINARY|CSV)\b", re.IGNORECASE)


def copy_format(text: str, direction: str) -> str:
    """``text``, ``csv`` or ``binary``: what the options of a checked COPY ask for."""
    found = _DIRECTIONS[direction][0].search(text)
    options = text[found.end() :] if found else ""
    options = _OPTIONS_END.split(options, maxsplit=1)[0]
    if match := _FORMAT.search(options) or _LEGACY.search(options):
        return match.group(1).lower()
    return "text"
