"""Phase 1 of a load: resolve every endpoint, connect everywhere at once, name each table
as its server does; and closing at the end."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg

from airflow_copyman import copyman
from airflow_copyman.copyman import _versions
from airflow_copyman.load.catalog import readonly, relation, tables
from airflow_copyman.load.connection import bounded, classify
from airflow_copyman.load.connection.endpoint import Endpoint
from airflow_copyman.load.modes import choose
from airflow_copyman.load.phases.run import Run, Session, Target, rollback
from airflow_copyman.load.spec import ConfigError, Destination


@dataclass(frozen=True)
class Resolved:
    """The load's destinations, the secrets of every endpoint (kept out of errors and
    logs), and where each endpoint points (for lineage: no second look-up later)."""

    targets: list[Target]
    secrets: list[str]
    locations: dict[str, tuple[str, str]] = field(default_factory=dict)


@dataclass(frozen=True)
class Connected:
    """The connections a load holds: the source's (None: it could not connect, and every
    destination failed), and one per connected destination."""

    src: psycopg.Connection[Any] | None
    sessions: list[Session]

    def pending(self) -> list[Session]:
        return [s for s in self.sessions if s.target.pending]


def resolve(
    origin: Endpoint,
    specs: Sequence[Destination],
    endpoint_of: Callable[[str], Endpoint],
    log: logging.Logger | logging.LoggerAdapter[Any],
) -> Resolved:
    """Look every connection up before connecting anywhere: bad input fails first.

    :raises ConfigError: every problem found, at once."""
    resolved = Resolved([], [])
    _keep(resolved, origin)
    errors = [f"source: {origin.problem}"] if origin.problem is not None else []
    seen: dict[tuple[str, str], int] = {}
    endpoints: dict[str, Endpoint] = {}
    for i, spec in enumerate(specs):
        where = f"destination #{i + 1} ({spec.conn_id}, table {spec.table})"
        if spec.conn_id not in endpoints:
            endpoints[spec.conn_id] = endpoint_of(spec.conn_id)
        endpoint = endpoints[spec.conn_id]
        try:
            table = tables.parse_table(spec.table)
            columns = tables.parse_columns(spec.columns, f"table {spec.table}")
            mode = choose.mode_for(spec, table, log)
            if endpoint.problem is not None:
                raise ConfigError(endpoint.problem)
        except (ConfigError, tables.PlanError) as exc:
            errors.append(f"{where}: {exc}")
            continue
        # Any error above fails the whole load below: the targets are all complete.
        resolved.targets.append(Target(spec, endpoint, table, mode, columns))
        _keep(resolved, endpoint)
        key = (spec.conn_id, str(table))
        if key in seen:
            errors.append(f"{where}: the same table is destination #{seen[key] + 1} too")
        seen.setdefault(key, i)
    if errors:
        raise ConfigError(classify.redact("; ".join(errors), resolved.secrets))
    return resolved


def _keep(resolved: Resolved, endpoint: Endpoint) -> None:
    resolved.secrets.extend(endpoint.secrets)
    if endpoint.location is not None:
        resolved.locations[endpoint.name] = endpoint.location


def connect(run: Run) -> Connected:
    """Connect to the source and every pending destination at once (each bounded by its
    connect_timeout); a connection refused for good (bad password, no such database, SSL
    refused, invalid option) is bad input, one that may come back fails its side.

    :raises ConfigError: bad input (every connection made is closed first)."""
    # Not those an earlier try's record showed loaded before connecting.
    targets = run.pending()
    ends = [run.origin, *(t.endpoint for t in targets)]
    src_result, *target_results = bounded.connect_all([e.connect for e in ends], run.bounds.stop)
    src = None if isinstance(src_result, BaseException) else run.bind(src_result)
    connected = Connected(src, [
        Session(target, run.bind(result))
        for target, result in zip(targets, target_results, strict=True)
        if not isinstance(result, BaseException)
    ])
    try:
        _check_connected(run, src_result, list(zip(targets, target_results, strict=True)))
        if src is not None:
            readonly.begin(src, run.options.snapshot)
        errors = _too_old(run, connected)
        if errors:
            raise ConfigError(run.redact("; ".join(errors)))
    except BaseException:
        close(run, connected)
        raise
    _log_connections(run, connected)
    if isinstance(src_result, BaseException):
        run.source_failed(src_result, "connecting")
    return connected


def _check_connected(
    run: Run,
    src_result: psycopg.Connection[Any] | BaseException,
    results: list[tuple[Target, psycopg.Connection[Any] | BaseException]],
) -> None:
    """Fail the destinations that could not connect for now; raise what no retry fixes."""
    for result in [src_result, *(r for _, r in results)]:
        # Not a connection failure (an IAM token that cannot be had, say): raised as is.
        if isinstance(result, BaseException) and not isinstance(
            result, psycopg.Error | copyman.Cancelled
        ):
            raise result
    errors = []
    if isinstance(src_result, BaseException) and classify.is_permanent(src_result):
        errors.append(f"source {run.origin.describe()}: {classify.describe(src_result)}")
    for target, result in results:
        if not isinstance(result, BaseException):
            continue
        if classify.is_permanent(result):
            errors.append(
                f"destination #{run.targets.index(target) + 1} ({target.endpoint.describe()}):"
                f" {classify.describe(result)}"
            )
        else:
            run.fail(target, result, "connecting")
    if errors:
        raise ConfigError(run.redact("; ".join(errors)))


def _too_old(run: Run, connected: Connected) -> list[str]:
    """Servers older than the oldest supported version, refused before anything is
    read or written (version-dependent SQL is chosen for 15 and later only)."""
    ends = [(f"source {run.origin.describe()}", connected.src)] + [
        (f"destination #{run.targets.index(s.target) + 1} ({s.target.endpoint.describe()})",
         s.conn)
        for s in connected.sessions
    ]
    found = []
    for where, conn in ends:
        if conn is not None and not conn.closed:
            problem = _versions.too_old(conn.info.server_version)
            if problem is not None:
                found.append(f"{where}: {problem}")
    return found


def locate(run: Run, sessions: list[Session]) -> None:
    """Name each destination's table as its server does (its result's ``relation``, for
    the asset events and the ledger): an unqualified name is resolved through the
    session's search_path, not guessed."""
    for session in sessions:
        if session.conn.closed:
            continue
        try:
            session.target.result.relation = relation.locate(
                session.conn, session.target.table
            )
        except psycopg.Error as exc:
            # Naming is not loading: what is wrong with the connection, the load says.
            run.log.debug(
                "%s: could not name the table: %s",
                session.label,
                classify.describe(exc, run.secrets),
            )
        rollback(session.conn)


def _log_connections(run: Run, connected: Connected) -> None:
    """How many sessions this task holds: a DBA sizing ``max_connections`` (or an
    Airflow pool) multiplies it by the tasks that may run at once."""
    held = [s.target.spec.conn_id for s in connected.sessions]
    run.log.info(
        "Holding %d PostgreSQL connection(s) until the transfer ends: %s to the source "
        "(%s), %d to destinations (%s)",
        len(held) + (connected.src is not None),
        "1" if connected.src is not None else "0",
        run.origin.name,
        len(held),
        ", ".join(held) or "-",
    )


def close(run: Run, connected: Connected) -> None:
    """Roll back and close every connection of the load."""
    for conn in [connected.src, *(s.conn for s in connected.sessions)]:
        if conn is None or conn.closed:
            continue
        if isinstance(conn, bounded.BoundedConnection):
            # Cleaning up must not wait long: a rollback is quick where the server is
            # there, and a connection that cannot roll back is closed anyway.
            conn.bounds = bounded.Bounds(
                min(run.options.receiver_timeout, bounded.CANCEL_WAIT)
            )
        with contextlib.suppress(Exception):
            conn.rollback()
        with contextlib.suppress(Exception):
            conn.close()
