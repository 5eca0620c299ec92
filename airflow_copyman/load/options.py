"""The options of a load (:class:`LoadOptions`), checked once, and the checks of the other
arguments of a transfer.

Bad arguments must fail before any connection is used: when the DAG is parsed for the
values known then (``CopyManOperator.__init__`` calls :meth:`LoadOptions.check_known`),
otherwise on the first try before connecting (templated values, after rendering:
:meth:`LoadOptions.from_rendered`). Each check names the argument. This module imports no
Airflow module.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from airflow_copyman.copyman import RECEIVER_TIMEOUT
from airflow_copyman.load.catalog.tables import Format, Params, PlanError, normalize_format

if TYPE_CHECKING:
    from airflow_copyman.load.spec import Progress

#: Seconds a load waits for any one lock, unless told otherwise.
LOCK_TIMEOUT = 60.0
#: Seconds between two progress lines, unless a load says otherwise.
PROGRESS_INTERVAL = 5.0


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


def _format(value: Any) -> Format | None:
    try:
        return normalize_format(value)
    except PlanError as exc:
        raise ArgumentError(str(exc)) from None


def _parameters(value: Any) -> Params | None:
    parameters(value)
    return value or None  # type: ignore[no-any-return]


#: Each option's check, in the order they are checked: it returns the value to keep or
#: raises :class:`ArgumentError` naming the option.
_CHECKS: dict[str, Callable[[Any], Any]] = {
    "parameters": _parameters,
    "receiver_timeout": lambda v: seconds("receiver_timeout", v, zero_ok=False),
    "lock_timeout": lambda v: seconds("lock_timeout", v, zero_ok=False),
    "progress_interval": lambda v: seconds("progress_interval", v, zero_ok=True),
    "min_rows": lambda v: count("min_rows", v),
    "max_bytes_per_second": lambda v: bytes_per_second("max_bytes_per_second", v),
    "verify": verify,
    "format": _format,
}


@dataclass(frozen=True)
class LoadOptions:
    """The options of one load, checked when it is built (:class:`ArgumentError`, a
    ``ValueError``, names the option): ``load.run``, :class:`~airflow_copyman.load.Transfer`,
    the hook and the operator all build one, so the checks live here only.

    ``format``: ``"binary"``, ``"text"``, ``"csv"`` or None (the load picks). ``parameters``:
    the query's (a sequence for ``%s``, a mapping for ``%(name)s``). ``verify``: ``"count"``
    or ``"checksum"``. ``receiver_timeout``: the deadline of every statement and of the copy's
    silences; ``lock_timeout``: of every lock wait. ``progress_interval``: seconds between two
    progress reports (0: every chance). ``min_rows``: fewer rows from the source fail the
    load. ``max_bytes_per_second``: a cap on what is read from the source (None: none).
    """

    format: str | None = None
    parameters: Params | None = None
    verify: str = "count"
    receiver_timeout: float = RECEIVER_TIMEOUT
    lock_timeout: float = LOCK_TIMEOUT
    progress_interval: float = PROGRESS_INTERVAL
    min_rows: int = 0
    max_bytes_per_second: float | None = None
    #: Called with a :class:`~airflow_copyman.load.Progress` from the loading thread, at
    #: most every ``progress_interval`` seconds while the copy runs, and once at the end.
    on_progress: Callable[[Progress], None] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        for name, check in _CHECKS.items():
            object.__setattr__(self, name, check(getattr(self, name)))
        if self.on_progress is not None and not callable(self.on_progress):
            raise ArgumentError(
                f"on_progress must be a function (or None), got {kind(self.on_progress)}"
            )

    @classmethod
    def check_known(cls, templated: Collection[str] = (), **values: Any) -> None:
        """Check the ``values`` known now (at DAG parse time): a value of an option named in
        ``templated`` that is still a template or an ``XComArg`` is checked later, by
        :meth:`from_rendered`."""
        unknown = set(values) - set(_CHECKS)
        if unknown:
            raise TypeError(f"not options of a load: {', '.join(sorted(unknown))}")
        for name, check in _CHECKS.items():
            if name in values and not (name in templated and is_deferred(values[name])):
                check(values[name])

    @classmethod
    def from_rendered(cls, **values: Any) -> LoadOptions:
        """The options from values Jinja may have rendered as text (``"None"``, ``"100"``)."""
        if "max_bytes_per_second" in values:
            values["max_bytes_per_second"] = bytes_per_second(
                "max_bytes_per_second", values["max_bytes_per_second"], rendered=True
            )
        return cls(**values)

