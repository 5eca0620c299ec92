"""Phase 2 of a load: describe the source and every destination, pick the format, refuse
bad input before anything is written (in the source's one snapshot)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import psycopg
from psycopg import sql

from airflow_copyman.copyman import _versions
from airflow_copyman.load.catalog import estimates, hints, identity, keytypes, readonly, tables
from airflow_copyman.load.catalog.tables import Column
from airflow_copyman.load.connection import classify
from airflow_copyman.load.modes import create
from airflow_copyman.load.phases.run import Run, Session, Target
from airflow_copyman.load.spec import ConfigError
from airflow_copyman.load.verify import checksum


@dataclass(frozen=True)
class DestinationPlan:
    """What planning found for one destination: the columns the COPY fills (described, as
    the table spells them), whether the load creates the table, and how ``verify="checksum"``
    compares it (by its COPY stream where every type is the source's, else by the rows'
    text)."""

    columns: tuple[Column, ...]
    create: bool = False
    by_stream: bool = False

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.columns]


@dataclass(frozen=True)
class Plan:
    """The plan of a load, made in the source's one snapshot before anything is written:
    the COPY format, the source's columns, its SELECT (parameters bound: the text checksum
    runs it again), the size estimate, and each pending destination's plan by its label."""

    format: tables.Format
    source_columns: tuple[Column, ...]
    select: sql.Composable
    estimate: estimates.SizeEstimate | None
    destinations: Mapping[str, DestinationPlan]

    def of(self, target: Target) -> DestinationPlan:
        return self.destinations[target.label]


@dataclass
class _Refusals:
    """Why binary COPY cannot serve some destinations (format=None falls back to text)."""

    binary: list[str] = field(default_factory=list)
    versions: list[str] = field(default_factory=list)
    difference: str | None = None

    @property
    def binary_ok(self) -> bool:
        return not self.binary and not self.versions


def plan(run: Run, src: psycopg.Connection[Any], sessions: list[Session]) -> Plan | None:
    """The plan, or None if the source failed transiently (every destination failed).

    :raises ConfigError: bad input (the load fails before anything moves)."""
    described = _describe_source(run, src)
    if described is None:
        return None
    source_columns, select, source_tables, estimate = described
    errors = _same_tables(run, sessions, source_tables)
    refusals = _Refusals()
    planned: dict[str, DestinationPlan] = {}
    for session in sessions:
        if session.target.pending:
            found = _plan_destination(run, src, session, source_columns, refusals, errors)
            if found is not None:
                planned[session.label] = found
    by_text = [_where(run, s.target) for s in sessions
               if s.label in planned and run.verify == "checksum"
               and not planned[s.label].by_stream]
    if by_text and not _source_comparable(run, src, by_text, errors):
        return None
    fmt = _choose_format(run, refusals, errors)
    return Plan(fmt, tuple(source_columns), select, estimate, planned)


def _describe_source(
    run: Run, src: psycopg.Connection[Any]
) -> tuple[list[Column], sql.Composable, identity.Tables, estimates.SizeEstimate | None] | None:
    """The source's columns, its SELECT, the tables it reads, its size: in the source's
    one read-only transaction (its snapshot is the copy's too: no rollback until the
    copy is over). None if it failed transiently."""
    source, parameters = run.source, run.options.parameters
    try:
        source_columns = source.describe(src, parameters)
        select: sql.Composable = source.select(source_columns)
        if parameters and source.query is not None:
            select = sql.SQL(  # type: ignore[misc]
                psycopg.ClientCursor(src).mogrify(source.query, parameters)
            )
        readonly.refuse_writes(src, select)
        source_tables = identity.source(src, f"source {run.origin.name}")
        estimate = estimates.estimate_source(src, source, parameters, run.log)
    except tables.PlanError as exc:
        raise ConfigError(run.redact(f"source {run.origin.describe()}: {exc}")) from None
    except psycopg.Error as exc:
        if classify.is_permanent(exc):
            raise ConfigError(
                run.redact(f"source {run.origin.describe()}: {classify.describe(exc)}")
            ) from exc
        run.source_failed(exc, "describing the source")
        return None
    return source_columns, select, source_tables, estimate


def _where(run: Run, target: Target) -> str:
    i = run.targets.index(target)
    return f"destination #{i + 1} ({target.spec.conn_id}, table {target.spec.table})"


def _plan_destination(
    run: Run,
    src: psycopg.Connection[Any],
    session: Session,
    source_columns: list[Column],
    refusals: _Refusals,
    errors: list[str],
) -> DestinationPlan | None:
    """One destination's plan; None where it cannot load (the reason is in ``errors``
    when permanent, else the destination failed)."""
    conn, target = session.conn, session.target
    where = _where(run, target)
    try:
        found = _plan_target(run, session, source_columns, where)
        if isinstance(found, str):
            errors.append(f"{where}: {found}")
            return None
        if run.verify == "checksum":
            found = replace(found, by_stream=tables.same_types(source_columns, found.columns))
            if not found.by_stream:
                # Compared by the rows' UTF-8 text (the COPY stream needs nothing).
                checksum.require_comparable(conn, where)
        conn.rollback()
    except tables.PlanError as exc:
        errors.append(f"{where}: {exc}")
        return None
    except psycopg.Error as exc:
        _sort_error(run, target, exc, where, "checking the table", errors)
        return None
    columns = list(found.columns)
    if not tables.binary_safe(source_columns, columns):
        here = tables.first_type_difference(source_columns, columns)
        refusals.difference = refusals.difference or here
        refusals.binary.append(f"{where}: column {here}")
    across = _across_versions(source_columns, columns, src, conn)
    if across is not None:
        refusals.difference = refusals.difference or across
        refusals.versions.append(f"{where}: column {across}")
    return found


def _source_comparable(
    run: Run, src: psycopg.Connection[Any], by_text: list[str], errors: list[str]
) -> bool:
    """The text checksum needs a source that renders and hashes as the destinations do;
    False if it failed transiently (every destination failed)."""
    try:
        checksum.require_comparable(src, f"source {run.origin.name}")
    except psycopg.Error as exc:
        if not classify.is_permanent(exc):
            run.source_failed(exc, "checking it for the checksum")
            return False
        errors.append(f"{exc} (for {', '.join(by_text)}: a column's type differs)")
    return True


def _choose_format(run: Run, refusals: _Refusals, errors: list[str]) -> tables.Format:
    """The format asked for, else binary where every destination allows it, else text.

    :raises ConfigError: ``errors``, or binary asked for where it is not exact."""
    requested = run.requested_format
    if requested == "binary" and refusals.binary:
        # Binary COPY carries each type's own binary form: another type reads it as
        # something else (int8 1 as numeric 0.0) or not at all, and no server checks.
        errors.append(
            "format='binary' needs the same types on both sides: "
            + "; ".join(refusals.binary)
            + " (leave format unset to copy such columns in text)"
        )
    if requested == "binary" and refusals.versions:
        errors.append(
            "format='binary' is not exact between these servers' versions: "
            + "; ".join(refusals.versions)
            + " (leave format unset to copy in text, which the receiver checks)"
        )
    if errors:
        raise ConfigError(run.redact("; ".join(errors)))
    if requested is not None:
        return requested
    if refusals.binary_ok:
        return "binary"
    run.log.info(
        "Column types or their binary forms differ (%s): copying in text format",
        refusals.difference,
    )
    return "text"


def _sort_error(
    run: Run, target: Target, exc: psycopg.Error, where: str, doing: str, errors: list[str]
) -> None:
    """A permanent error joins the plan's errors (the load fails before anything moves);
    a transient one fails only this destination (a retry may load it)."""
    if classify.is_permanent(exc):
        errors.append(f"{where}: {classify.describe(exc)}")
    else:
        run.fail(target, exc, doing)


def _plan_target(
    run: Run, session: Session, source_columns: list[Column], where: str
) -> DestinationPlan | str:
    """Describe the destination's columns for the source's, or say why it cannot load
    them."""
    conn, target = session.conn, session.target
    table, mode = target.table, target.mode
    found = tables.table_names(conn, table)
    if found is None:
        if target.spec.create != "if_missing":
            return hints.missing_table(conn, table)
        return _plan_creation(session, source_columns)
    names = target.columns
    if names is None:
        names, by_position = tables.match_by_name(source_columns, table, found)
        if by_position:
            run.log.warning(
                "%s: no column of the source is named like a column of the table: "
                "pairing them by position: %s (alias the query's columns, or give "
                "'columns', to pair them by name)",
                where, tables.by_position(source_columns, names),
            )
    columns = tables.table_columns(conn, table, names)
    if columns is None:
        return hints.missing_table(conn, table)
    mismatch = tables.column_mismatch(source_columns, columns)
    if mismatch:
        return f"column count mismatch: {mismatch}"
    # The names as the table spells them: what the mode's statements name.
    planned = DestinationPlan(tuple(columns))
    return mode.check(conn, planned.names) or planned


def _plan_creation(session: Session, source_columns: list[Column]) -> DestinationPlan | str:
    """The table is missing and may be created: its columns are the source's (named
    as ``columns`` says, where given), with their exact types."""
    conn, target = session.conn, session.target
    table, mode = target.table, target.mode
    problem = create.check(conn, table)
    if problem is not None:
        return problem
    names = target.columns or [c.name for c in source_columns]
    if len(names) != len(source_columns):
        return (
            f"create='if_missing': 'columns' names {len(names)} columns, the source has "
            f"{len(source_columns)}"
        )
    problem = create.unnamed(names) if target.columns is None else None
    if problem is not None:
        return problem
    missing = [k for k in mode.key if k not in names]
    if missing:
        return (
            f"the merge key column {hints.with_hint(missing[0], names)} is not a column "
            "of the source"
        )
    planned = [replace(c, name=n) for c, n in zip(source_columns, names, strict=True)]
    problem = create.missing_collation(conn, planned) or keytypes.refusal(
        conn, [(c.name, c.type_name) for c in planned if c.name in mode.key], created=True
    )
    if problem is not None:
        return problem
    return DestinationPlan(tuple(planned), create=True)


def _same_tables(
    run: Run, sessions: list[Session], source_tables: identity.Tables
) -> list[str]:
    """Refuse destinations that are one table, or a table the source reads, whatever
    their spelling (identified by their servers, before anything is written)."""
    errors: list[str] = []
    found = []
    for session in sessions:
        conn, target = session.conn, session.target
        if conn.closed:
            continue
        label = _where(run, target)
        try:
            # Left in the transaction planning goes on with (it rolls back after).
            # A table create="if_missing" would make is identified by where it goes.
            new_name = None
            if target.spec.create == "if_missing":
                new_name = (target.table.schema, target.table.name)
            found_tables = identity.destination(
                conn, target.table.regclass_text, label, new_name
            )
        except psycopg.Error as exc:
            _sort_error(run, target, exc, label, "identifying the table", errors)
            continue
        if found_tables is not None:
            found.append(found_tables)
    return errors + identity.conflicts(source_tables, found)


def _across_versions(
    source: list[Column],
    dest: list[Column],
    src: psycopg.Connection[Any],
    conn: psycopg.Connection[Any],
) -> str | None:
    """The first column whose type's binary form or meaning differs between the source's
    and this destination's major versions (see :mod:`airflow_copyman.copyman._versions`),
    described with both versions, or None."""
    source_version = src.info.server_version
    dest_version = conn.info.server_version
    a, b = _versions.major(source_version), _versions.major(dest_version)
    for s, d in zip(source, dest, strict=False):
        change = _versions.binary_change(s.type_name, a, b) or _versions.binary_change(
            d.type_name, a, b
        )
        if change is not None:
            return (
                f"{s.name} {s.type_name}: its binary form differs between the source's "
                f"PostgreSQL {_versions.describe(source_version)} and the destination's "
                f"{_versions.describe(dest_version)} ({change.why}, since {change.since}: "
                f"{change.source})"
            )
    return None
