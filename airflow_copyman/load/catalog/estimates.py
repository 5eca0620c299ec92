"""How big the source is likely to be, known cheaply before the copy, for progress lines.

A table's size comes from its statistics (``pg_class.reltuples`` per page, scaled to the
table's current size, as the planner does; summed over its partitions and inheritance
children, which the copy reads too), a query's from the planner (``EXPLAIN (FORMAT JSON)``,
which plans the query without running it). Never a ``count(*)``: that would read the whole
source once more before the copy reads it.

Both are estimates and are shown as such ("~45%", "~1m20s left (estimate)"). Where there is
nothing to go by, a table never analyzed (``reltuples = -1``, or a query over one, where the
planner's figure is a default guess), there is no estimate and the progress lines show no
percentage rather than a made-up one.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import ClientCursor

from airflow_copyman.load.catalog import tables

#: A percentage never reaches 100 while the copy runs: the estimate may be low.
MAX_PERCENT = 99


@dataclass(frozen=True)
class SizeEstimate:
    """The source's row count as estimated before the copy."""

    rows: int
    basis: str  # where the figure comes from, for the log


def estimate_source(
    conn: psycopg.Connection[Any],
    source: tables.Source,
    params: tables.Params | None,
    log: Any = None,
) -> SizeEstimate | None:
    """The estimated row count of the source's COPY, or None where there is nothing to go
    by. Never fails: an estimate that cannot be had is no estimate. Runs in a savepoint, so
    it leaves the caller's transaction (and its snapshot) as it was."""
    log = log or logging.getLogger(__name__)
    try:
        with conn.transaction():
            if source.table is not None:
                estimate = _table_estimate(conn, source.table)
            else:
                assert source.query is not None
                text = source.query
                if params:  # as the server will see it (parameters are bound client-side)
                    text = ClientCursor(conn).mogrify(text, params)
                estimate = _query_estimate(conn, text)
    except (psycopg.Error, LookupError, TypeError, ValueError) as exc:
        # A server error, or a plan of an unexpected shape: no estimate, and the copy goes on.
        log.info(
            "No size estimate for the source (%s): progress shows no percentage",
            type(exc).__name__,
        )
        return None
    if estimate is None:
        log.info(
            "No size estimate for the source (a table it reads was never analyzed): progress "
            "shows no percentage"
        )
    else:
        log.info("Source size estimate: ~%s rows (%s)", f"{estimate.rows:,}", estimate.basis)
    return estimate


_RELATION_STATS = """
SELECT c.reltuples::float8, c.relpages::int8,
       pg_relation_size(c.oid) / current_setting('block_size')::int8
FROM pg_class c
WHERE c.oid = ANY(%s::oid[]) AND c.relkind IN ('r', 'm')
"""


def _rows_from_stats(reltuples: float, relpages: int, pages_now: int) -> float | None:
    """A relation's rows as the planner estimates them: the density its last ANALYZE or
    VACUUM saw, times its current number of pages; None if there is nothing to go by."""
    if pages_now == 0:
        return 0.0
    if reltuples < 0 or relpages <= 0:
        # Never analyzed (-1), or analyzed while empty: no density to scale.
        return None
    return reltuples / relpages * pages_now


def _sum_relations(conn: psycopg.Connection[Any], oids: list[int]) -> float | None:
    rows = conn.execute(_RELATION_STATS, [oids]).fetchall()
    total = 0.0
    for reltuples, relpages, pages_now in rows:
        part = _rows_from_stats(reltuples, relpages, pages_now)
        if part is None:
            return None
        total += part
    return total


_DESCENDANTS = """
WITH RECURSIVE tree(oid) AS (
    SELECT %s::oid
    UNION
    SELECT i.inhrelid FROM pg_inherits i JOIN tree t ON i.inhparent = t.oid
)
SELECT oid::int8 FROM tree
"""


def _table_estimate(conn: psycopg.Connection[Any], table: tables.TableName) -> SizeEstimate | None:
    row = conn.execute("SELECT to_regclass(%s)::oid::int8", [table.regclass_text]).fetchone()
    if row is None or row[0] is None:
        return None
    # A table as ``sql`` is copied as ``SELECT ... FROM`` it: its partitions and inheritance
    # children too. Partitioned parents hold no rows (_RELATION_STATS skips their relkind).
    oids = [r[0] for r in conn.execute(_DESCENDANTS, [row[0]]).fetchall()]
    rows = _sum_relations(conn, oids)
    if rows is None:
        return None
    return SizeEstimate(round(rows), "table statistics")


def _query_estimate(conn: psycopg.Connection[Any], text: str) -> SizeEstimate | None:
    # VERBOSE names each scanned relation's schema, to look its statistics up. EXPLAIN
    # without ANALYZE plans the query and runs nothing.
    cur = conn.execute(("EXPLAIN (FORMAT JSON, VERBOSE)\n" + text).encode(conn.info.encoding))
    row = cur.fetchone()
    if row is None:
        return None
    value = row[0]
    plan = (json.loads(value) if isinstance(value, str) else value)[0]["Plan"]
    relations = sorted(_scanned_relations(plan))
    if relations:
        oids = [
            r[0]
            for r in conn.execute(
                "SELECT to_regclass(quote_ident(s) || '.' || quote_ident(r))::oid::int8 "
                "FROM unnest(%s::text[], %s::text[]) AS t(s, r)",
                [[s for s, _ in relations], [r for _, r in relations]],
            ).fetchall()
            if r[0] is not None
        ]
        # The planner's figure over a table never analyzed is a default guess.
        if _sum_relations(conn, oids) is None:
            return None
    return SizeEstimate(round(float(plan["Plan Rows"])), "the planner's estimate")


def _scanned_relations(plan: dict[str, Any]) -> set[tuple[str, str]]:
    found = set()
    if "Relation Name" in plan and "Schema" in plan:
        found.add((plan["Schema"], plan["Relation Name"]))
    for child in plan.get("Plans", ()):
        found |= _scanned_relations(child)
    return found


def progress_note(estimate: SizeEstimate | None, rows: int, elapsed: float) -> str:
    """What a progress line adds about how far along the copy is: ``, ~45% (estimate), ~1m20s
    left (estimate)``; nothing without an estimate."""
    if estimate is None or estimate.rows <= 0:
        return ""
    if rows > estimate.rows:
        # The estimate was low: the copy may be nearly done, or far from it.
        return (
            f", ~{MAX_PERCENT}% (more rows than the ~{estimate.rows:,} estimated; time left "
            "unknown)"
        )
    percent = min(MAX_PERCENT, int(rows * 100 / estimate.rows))
    note = f", ~{percent}% of ~{estimate.rows:,} rows (estimate)"
    if rows > 0 and elapsed > 0:
        left = elapsed * (estimate.rows - rows) / rows
        note += f", ~{duration(left)} left (estimate)"
    return note


def duration(seconds: float) -> str:
    """``45s``, ``1m20s``, ``2h05m``."""
    total = max(0, round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"
