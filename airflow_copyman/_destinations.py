"""The provider's values and errors: the load layer's destinations, results and report, and
the Airflow exceptions its errors become.

:mod:`airflow_copyman.load` raises its own errors (no Airflow there); the hook and the
operator turn them into :class:`CopyManConfigError` (an ``AirflowException``) here.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from airflow.sdk.exceptions import AirflowException

from airflow_copyman.load import (
    DESTINATION_KEYS,
    ConfigError,
    Destination,
    DestinationResult,
    Status,
    TransferReport,
)
from airflow_copyman.load import destinations_from as load_destinations_from

__all__ = [
    "DESTINATION_KEYS",
    "CopyManConfigError",
    "CopyManError",
    "Destination",
    "DestinationResult",
    "Status",
    "TransferReport",
    "destinations_from",
]


class CopyManError(AirflowException):
    """Base class of the errors of this provider."""


class CopyManConfigError(CopyManError, ConfigError):
    """Bad input (unknown connection, not PostgreSQL, missing table, column mismatch...).

    Raised before any destination has been written; no retry can fix it.
    """


def config_error(exc: ConfigError) -> CopyManConfigError:
    """The provider's error for the load layer's."""
    if isinstance(exc, CopyManConfigError):
        return exc
    return CopyManConfigError(str(exc))


def destinations_from(values: Iterable[Any], *, rendered: bool = True) -> list[Destination]:
    """Parse an operator's ``destinations`` argument (see :meth:`Destination.from_value`)."""
    try:
        return load_destinations_from(values, rendered=rendered)
    except ConfigError as exc:
        raise config_error(exc) from None
