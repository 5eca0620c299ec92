"""Checks of the arguments of a transfer, shared by the operator and the hook.

Bad arguments must fail before any connection is used: when the DAG is parsed for the
values known then (``CopyManOperator.__init__``), otherwise on the first try before
connecting (templated values, after rendering; ``CopyManHook.transfer``). Each check names
the argument. This module imports no Airflow module.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping, Sequence
from typing import Any


class ArgumentError(ValueError):
    """An argument of a transfer is of the wrong type or value."""


def is_template(value: Any) -> bool:
    """Whether ``value`` is a Jinja template still to be rendered (checked after rendering)."""
    return isinstance(value, str) and ("{{" in value or "{%" in value)


def is_deferred(value: Any) -> bool:
    """Whether ``value`` is known only when the task runs: a Jinja template, or an object
    Airflow resolves then (an ``XComArg``, ``task.output``)."""
    if isinstance(value, str):
        return is_template(value)
    return callable(getattr(value, "resolve", None))


def seconds(name: str, value: Any, *, zero_ok: bool) -> float:
    """A number of seconds: an int or float (not a bool, not a string), finite, positive
    (or zero where ``zero_ok``)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ArgumentError(f"{name} must be a number of seconds, got {kind(value)}")
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero_ok):
        bound = "zero or more" if zero_ok else "more than zero"
        raise ArgumentError(f"{name} must be {bound} seconds, got {value!r}")
    return float(value)


def bytes_per_second(name: str, value: Any, *, rendered: bool = False) -> float | None:
    """None (no cap) or a number of bytes per second: an int or float (not a bool), finite,
    more than zero. ``rendered``: a value Jinja rendered, so the text of a number (or
    ``None``, or nothing) is taken as what it was."""
    if rendered and isinstance(value, str):
        text = value.strip()
        if text in ("", "None"):
            return None
        with contextlib.suppress(ValueError):
            value = float(text)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ArgumentError(
            f"{name} must be a number of bytes per second, or None, got {kind(value)}"
        )
    if not math.isfinite(value) or value <= 0:
        raise ArgumentError(f"{name} must be more than zero bytes per second, got {value!r}")
    return float(value)


#: What ``verify`` may be: the COPY's row counts, or a checksum of the rows too.
VERIFY = ("count", "checksum")


def verify(value: Any) -> str:
    """``verify``: ``"count"`` or ``"checksum"``."""
    if value not in VERIFY:
        raise ArgumentError(
            f"verify must be one of {', '.join(map(repr, VERIFY))}, got {value!r}"
        )
    return str(value)


def parameters(value: Any) -> None:
    """Query parameters: None, a sequence (``%s``) or a mapping (``%(name)s``)."""
    if value is None or isinstance(value, Mapping):
        return
    if isinstance(value, str | bytes | bytearray) or not isinstance(value, Sequence):
        raise ArgumentError(
            "parameters must be a list (for %s placeholders) or a mapping (for %(name)s), "
            f"got {kind(value)}"
        )


def ledger_schema(value: Any) -> None:
    """None (the destination table's own schema) or a schema name."""
    if value is None:
        return
    if not isinstance(value, str) or not value.strip():
        raise ArgumentError(
            f"ledger_schema must be a schema name, or None for the destination table's "
            f"schema, got {kind(value)}"
        )
    no_nul(f"ledger_schema {value!r}", value)


def sql(value: Any) -> None:
    if not isinstance(value, str):
        raise ArgumentError(f"sql must be a query or a table name, got {kind(value)}")
    no_nul("sql", value)


def no_nul(name: str, value: str) -> None:
    # PostgreSQL text cannot hold NUL; libpq would cut the statement short there.
    if "\x00" in value:
        raise ArgumentError(f"{name} contains a NUL character")


def boolean(name: str, value: Any) -> bool:
    """A boolean, or the text Jinja renders a boolean as ("True"/"False")."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ArgumentError(f"{name} must be true or false, got {kind(value)}")


def kind(value: Any) -> str:
    if isinstance(value, str):
        return f"the string {value!r}" if value else "an empty string"
    return type(value).__name__


def count(name: str, value: Any) -> int:
    """A whole number, zero or more (not a bool; a string of digits, as Jinja renders one)."""
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int):
        raise ArgumentError(f"{name} must be a whole number, got {kind(value)}")
    if value < 0:
        raise ArgumentError(f"{name} must be zero or more, got {value!r}")
    return value
