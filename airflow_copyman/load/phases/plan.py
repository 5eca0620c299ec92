"""Phase 2 of a load: describe the source and every destination, pick the format, refuse
bad input before anything is written (in the source's one snapshot)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import psycopg

from airflow_copyman.copyman import _versions
from airflow_copyman.load.catalog import estimates, hints, identity, keytypes, readonly, tables
from airflow_copyman.load.catalog.tables import Column
from airflow_copyman.load.connection import classify
from airflow_copyman.load.modes import create
from airflow_copyman.load.phases.state import State, Target
from airflow_copyman.load.spec import ConfigError
from airflow_copyman.load.verify import checksum


class Planning(State):
    """Describing both sides and choosing the format."""

    def _plan(self) -> None:
        assert self.src is not None
        src = self.src
        try:
            # Everything below runs in the source's one read-only transaction (its snapshot
            # is the copy's too): no rollback until the copy is over.
            source_columns = self.source.describe(src, self.parameters)
            select = self.source.select(source_columns)
            if self.parameters and self.source.query is not None:
                select = psycopg.sql.SQL(  # type: ignore[assignment]
                    psycopg.ClientCursor(src).mogrify(self.source.query, self.parameters)
                )
            readonly.refuse_writes(src, select)
            source_tables = identity.source(src, f"source {self.origin.name}")
            self.estimate = estimates.estimate_source(src, self.source, self.parameters, self.log)
        except tables.PlanError as exc:
            raise ConfigError(
                self._redact(f"source {self.origin.describe()}: {exc}")
            ) from None
        except psycopg.Error as exc:
            if classify.is_permanent(exc):
                raise ConfigError(
                    self._redact(f"source {self.origin.describe()}: {classify.describe(exc)}")
                ) from exc
            self._source_failed(exc, "describing the source")
            return
        self.source_columns = source_columns
        self.select = select
        errors = self._same_tables(source_tables)
        binary_ok = True
        difference = None
        binary_refusals = []
        version_refusals = []
        by_text: list[str] = []  # destinations verified by the rows' text
        for i, target in enumerate(self.targets):
            if not target.pending:
                continue
            assert target.conn is not None and target.table is not None
            where = f"destination #{i + 1} ({target.spec.conn_id}, table {target.spec.table})"
            try:
                problem = self._plan_target(target, source_columns, where)
                if problem is not None:
                    errors.append(f"{where}: {problem}")
                    continue
                columns = target.planned
                if self.verify == "checksum":
                    target.by_stream = tables.same_types(source_columns, columns)
                    if not target.by_stream:
                        # Compared by the rows' UTF-8 text (the COPY stream needs nothing).
                        checksum.require_comparable(target.conn, where)
                        by_text.append(where)
                target.conn.rollback()
            except tables.PlanError as exc:
                errors.append(f"{where}: {exc}")
                continue
            except psycopg.Error as exc:
                self._sort_error(target, exc, where, "checking the table", errors)
                continue
            if not tables.binary_safe(source_columns, columns):
                binary_ok = False
                here = tables.first_type_difference(source_columns, columns)
                difference = difference or here
                binary_refusals.append(f"{where}: column {here}")
            across = _across_versions(source_columns, columns, src, target.conn)
            if across is not None:
                binary_ok = False
                difference = difference or across
                version_refusals.append(f"{where}: column {across}")
        if by_text:
            try:
                checksum.require_comparable(src, f"source {self.origin.name}")
            except psycopg.Error as exc:
                if not classify.is_permanent(exc):
                    self._source_failed(exc, "checking it for the checksum")
                    return
                errors.append(f"{exc} (for {', '.join(by_text)}: a column's type differs)")
        if self.requested_format == "binary" and binary_refusals:
            # Binary COPY carries each type's own binary form: another type reads it as
            # something else (int8 1 as numeric 0.0) or not at all, and no server checks.
            errors.append(
                "format='binary' needs the same types on both sides: "
                + "; ".join(binary_refusals)
                + " (leave format unset to copy such columns in text)"
            )
        if self.requested_format == "binary" and version_refusals:
            errors.append(
                "format='binary' is not exact between these servers' versions: "
                + "; ".join(version_refusals)
                + " (leave format unset to copy in text, which the receiver checks)"
            )
        if errors:
            raise ConfigError(self._redact("; ".join(errors)))
        if self.requested_format is not None:
            self.format = self.requested_format
        elif binary_ok:
            self.format = "binary"
        else:
            self.format = "text"
            self.log.info(
                "Column types or their binary forms differ (%s): copying in text format",
                difference,
            )

    def _sort_error(
        self, target: Target, exc: psycopg.Error, where: str, doing: str, errors: list[str]
    ) -> None:
        """A permanent error joins the plan's errors (the load fails before anything moves);
        a transient one fails only this destination (a retry may load it)."""
        if classify.is_permanent(exc):
            errors.append(f"{where}: {classify.describe(exc)}")
        else:
            self._fail(target, exc, doing)

    def _plan_target(
        self, target: Target, source_columns: list[Column], where: str
    ) -> str | None:
        """Describe the destination's columns for the source's (``target.planned``), or
        say why it cannot load them."""
        conn, table, mode = target.conn, target.table, target.mode
        assert conn is not None and table is not None and mode is not None
        found = tables.table_names(conn, table)
        if found is None:
            if target.spec.create != "if_missing":
                return hints.missing_table(conn, table)
            return self._plan_creation(target, source_columns)
        names = target.columns
        if names is None:
            names, by_position = tables.match_by_name(source_columns, table, found)
            if by_position:
                self.log.warning(
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
        # The names as the table spells them.
        target.columns = mode.columns = [c.name for c in columns]
        target.planned = columns
        return mode.check(conn, target.columns)

    def _plan_creation(self, target: Target, source_columns: list[Column]) -> str | None:
        """The table is missing and may be created: its columns are the source's (named
        as ``columns`` says, where given), with their exact types."""
        conn, table, mode = target.conn, target.table, target.mode
        assert conn is not None and table is not None and mode is not None
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
        target.create = mode.created = True
        target.planned = planned
        target.columns = mode.columns = list(names)
        return None

    def _same_tables(self, source_tables: identity.Tables) -> list[str]:
        """Refuse destinations that are one table, or a table the source reads, whatever
        their spelling (identified by their servers, before anything is written)."""
        errors: list[str] = []
        found = []
        for i, target in enumerate(self.targets):
            conn = target.conn
            if conn is None or conn.closed or target.table is None:
                continue
            label = f"destination #{i + 1} ({target.spec.conn_id}, table {target.spec.table})"
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
                self._sort_error(target, exc, label, "identifying the table", errors)
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
