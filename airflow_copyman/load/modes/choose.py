"""Which :class:`~.base.Mode` loads a destination, from its typed mode."""

from __future__ import annotations

import logging
from typing import Any

from airflow_copyman.load import spec as spec_
from airflow_copyman.load.catalog import tables
from airflow_copyman.load.modes.append import Append
from airflow_copyman.load.modes.base import Mode
from airflow_copyman.load.modes.merge import Merge
from airflow_copyman.load.modes.replace import ReplaceByDelete, ReplaceByTruncate
from airflow_copyman.load.spec import MODES, ConfigError, Destination


def mode_for(
    spec: Destination,
    table: tables.TableName,
    log: logging.Logger | logging.LoggerAdapter[Any] | None = None,
) -> Mode:
    if spec.mode not in MODES:
        raise ConfigError(f"unknown mode {spec.mode!r}")  # pragma: no cover - checked before
    how = spec.load_mode
    if isinstance(how, spec_.Replace):
        options: dict[str, Any] = {"cascade": how.cascade, "label": spec.label, "log": log}
        if how.using == "delete":
            return ReplaceByDelete(table, **options)
        return ReplaceByTruncate(table, **options)
    if isinstance(how, spec_.Merge):
        key = tables.parse_columns(how.key or None, "'key'")
        if not key:
            raise ConfigError("mode='merge' needs 'key' (the key's column names)")
        return Merge(table, key, how.key_nulls)
    return Append(table)
