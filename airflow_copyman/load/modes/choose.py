"""The mode unit for a destination: which :class:`~._mode.Mode` class loads it."""

from __future__ import annotations

import logging
from typing import Any

from airflow_copyman.load.catalog import tables
from airflow_copyman.load.modes.append import Append
from airflow_copyman.load.modes.base import Mode
from airflow_copyman.load.modes.merge import Merge
from airflow_copyman.load.modes.replace import ReplaceByDelete, ReplaceByTruncate
from airflow_copyman.load.spec import ConfigError, Destination


def mode_for(
    spec: Destination,
    table: tables.TableName,
    log: logging.Logger | logging.LoggerAdapter[Any] | None = None,
) -> Mode:
    if spec.mode == "append":
        return Append(table)
    if spec.mode == "replace":
        options: dict[str, Any] = {"cascade": spec.cascade, "label": spec.label, "log": log}
        if spec.replace_with == "delete":
            return ReplaceByDelete(table, **options)
        return ReplaceByTruncate(table, **options)
    if spec.mode == "merge":
        key = tables.parse_columns(spec.key, "'key'")
        if not key:
            raise ConfigError("mode='merge' needs 'key' (the key's column names)")
        return Merge(table, key, spec.key_nulls)
    raise ConfigError(f"unknown mode {spec.mode!r}")  # pragma: no cover - checked before
