"""The mode unit for a destination: which :class:`~._mode.Mode` class loads it."""

from __future__ import annotations

import logging
from typing import Any

from airflow_copyman.load import _plan
from airflow_copyman.load._append import Append
from airflow_copyman.load._merge import Merge
from airflow_copyman.load._mode import Mode
from airflow_copyman.load._replace import ReplaceByDelete, ReplaceByTruncate
from airflow_copyman.load._spec import ConfigError, Destination


def mode_for(
    spec: Destination,
    table: _plan.TableName,
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
        key = _plan.parse_columns(spec.key, "'key'")
        if not key:
            raise ConfigError("mode='merge' needs 'key' (the key's column names)")
        return Merge(table, key, spec.key_nulls)
    raise ConfigError(f"unknown mode {spec.mode!r}")  # pragma: no cover - checked before
