"""The checksum of rows already written (a split load's staging table) in the method some
loads' ``verify="checksum"`` recorded, and the sum of those loads' checksums: the rows of
ranges loaded one by one must add up to the rows staged (a sum of per-row hashes does not
depend on how the rows were cut)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg import sql

from airflow_copyman.load.connection.bounded import Bounds
from airflow_copyman.load.verify import checksum, readback
from airflow_copyman.load.verify.checksum import Checksum

_MASK = (1 << 64) - 1


def parse_checksum(text: str) -> Checksum:
    """A checksum from its ``rows:method:sum`` text (:attr:`Checksum.text`)."""
    rows, method, total = text.split(":")
    return Checksum(int(rows), int(total), method)


def sum_checksums(parts: Sequence[Checksum]) -> Checksum:
    """The checksum of the union of disjoint sets of rows, each checksummed in one method
    (a copy stream's sum is modulo 2**64, as its digests are)."""
    methods = {p.method for p in parts}
    if len(methods) != 1:
        raise ValueError(f"checksums of different methods do not add up: {sorted(methods)}")
    (method,) = methods
    total = sum(p.total for p in parts)
    if method != checksum.ROW_TEXT:
        total &= _MASK
    return Checksum(sum(p.rows for p in parts), total, method)


def relation_checksum(
    conn: psycopg.Connection[Any], relation: sql.Composable, columns: Sequence[str],
    method: str, *, settings: dict[str, str] | None, timeout: float,
) -> Checksum:
    """The checksum of ``columns`` (in the loads' COPY order) of every row of ``relation``,
    in ``conn``'s open transaction, taken as ``method`` takes it: ``row-text`` by the server,
    ``copy-<format>`` by reading the rows back as that COPY (``settings``: the source's
    rendering settings for text and CSV, :func:`readback.render_settings`)."""
    if method == checksum.ROW_TEXT:
        return checksum.destination_checksum(conn, relation, columns)
    fmt = method.removeprefix("copy-")
    if fmt not in ("binary", "text", "csv"):
        raise ValueError(f"unknown checksum method {method!r}")
    query = readback.query(conn, relation, columns, None, fmt)
    (outcome,) = readback.digests(
        [(conn, query)], None if fmt == "binary" else settings, Bounds(timeout)
    )
    if isinstance(outcome, BaseException):
        raise outcome
    return Checksum(outcome.rows, outcome.total, method)
