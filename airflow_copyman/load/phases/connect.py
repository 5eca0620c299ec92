"""Phase 1 of a load: resolve every endpoint, connect everywhere at once; and closing."""

from __future__ import annotations

import contextlib

import psycopg

from airflow_copyman import copyman
from airflow_copyman.copyman import _versions
from airflow_copyman.load.catalog import readonly, relation, tables
from airflow_copyman.load.connection import bounded, classify
from airflow_copyman.load.connection.endpoint import Endpoint
from airflow_copyman.load.modes import choose
from airflow_copyman.load.phases.state import State, Target
from airflow_copyman.load.spec import ConfigError


class Connecting(State):
    """Resolving and connecting (and closing at the end)."""

    def _resolve(self) -> None:
        """Look every connection up before connecting anywhere: bad input fails first."""
        seen: dict[tuple[str, str], int] = {}
        errors = []
        if self.origin.problem is not None:
            errors.append(f"source: {self.origin.problem}")
        self._endpoint(self.origin)
        endpoints: dict[str, Endpoint] = {}
        for i, spec in enumerate(self.specs):
            where = f"destination #{i + 1} ({spec.conn_id}, table {spec.table})"
            if spec.conn_id not in endpoints:
                endpoints[spec.conn_id] = self.endpoint_of(spec.conn_id)
            endpoint = endpoints[spec.conn_id]
            try:
                table = tables.parse_table(spec.table)
                columns = tables.parse_columns(spec.columns, f"table {spec.table}")
                mode = choose.mode_for(spec, table, self.log)
                if endpoint.problem is not None:
                    raise ConfigError(endpoint.problem)
            except (ConfigError, tables.PlanError) as exc:
                errors.append(f"{where}: {exc}")
                continue
            # Any error above fails the whole load below: the targets are all complete.
            target = Target(spec, endpoint, table, mode, columns)
            self.targets.append(target)
            self._endpoint(target.endpoint)
            key = (spec.conn_id, str(target.table))
            if key in seen:
                errors.append(f"{where}: the same table is destination #{seen[key] + 1} too")
            seen.setdefault(key, i)
        if errors:
            raise ConfigError(self._redact("; ".join(errors)))

    def _endpoint(self, endpoint: Endpoint) -> None:
        """Keep its secrets, and where it points (for lineage: no second look-up later)."""
        self.secrets.extend(endpoint.secrets)
        if endpoint.location is not None:
            self.endpoints[endpoint.name] = endpoint.location

    def _connect(self) -> None:
        """Connect everywhere at once (each bounded by its connect_timeout); a connection
        refused for good (bad password, no such database, SSL refused, invalid option) is
        bad input, one that may come back fails its side."""
        errors = []
        source_error: BaseException | None = None
        # Not those an earlier try's record showed loaded before connecting.
        targets = self._pending()
        ends = [self.origin, *(t.endpoint for t in targets)]
        results = bounded.connect_all([e.connect for e in ends], self.bounds.stop)
        src_result, *target_results = results
        if not isinstance(src_result, BaseException):
            self.src = self._bind(src_result)
            readonly.begin(self.src)
        for target, result in zip(targets, target_results, strict=True):
            if not isinstance(result, BaseException):
                target.conn = self._bind(result)
        for result in results:
            # Not a connection failure (an IAM token that cannot be had, say): raised as
            # is, after the connections made were kept for _close.
            if isinstance(result, BaseException) and not isinstance(
                result, psycopg.Error | copyman.Cancelled
            ):
                raise result
        if isinstance(src_result, BaseException):
            if classify.is_permanent(src_result):
                errors.append(f"source {self.origin.describe()}: {classify.describe(src_result)}")
            source_error = src_result
        for target, result in zip(targets, target_results, strict=True):
            i = self.targets.index(target)
            if isinstance(result, BaseException):
                if classify.is_permanent(result):
                    errors.append(
                        f"destination #{i + 1} ({target.endpoint.describe()}): "
                        f"{classify.describe(result)}"
                    )
                else:
                    self._fail(target, result, "connecting")
        errors.extend(self._too_old())
        if errors:
            raise ConfigError(self._redact("; ".join(errors)))
        self._log_connections()
        if source_error is not None:
            self._source_failed(source_error, "connecting")

    def _too_old(self) -> list[str]:
        """Servers older than the oldest supported version, refused before anything is
        read or written (version-dependent SQL is chosen for 15 and later only)."""
        ends = [(f"source {self.origin.describe()}", self.src)] + [
            (f"destination #{i + 1} ({t.endpoint.describe()})", t.conn)
            for i, t in enumerate(self.targets)
        ]
        found = []
        for where, conn in ends:
            if conn is not None and not conn.closed:
                problem = _versions.too_old(conn.info.server_version)
                if problem is not None:
                    found.append(f"{where}: {problem}")
        return found

    def _locate(self) -> None:
        """Name each destination's table as its server does (for the asset events): an
        unqualified name is resolved through the session's search_path, not guessed."""
        for target in self.targets:
            conn, table = target.conn, target.table
            if conn is None or conn.closed:
                continue
            try:
                target.result.relation = relation.locate(conn, table)
            except psycopg.Error as exc:
                # Naming is not loading: what is wrong with the connection, the load says.
                self.log.debug(
                    "%s: could not name the table: %s",
                    target.label,
                    classify.describe(exc, self.secrets),
                )
            self._rollback(target)

    def _log_connections(self) -> None:
        """How many sessions this task holds: a DBA sizing ``max_connections`` (or an
        Airflow pool) multiplies it by the tasks that may run at once."""
        held = [t.spec.conn_id for t in self.targets if t.conn is not None]
        self.log.info(
            "Holding %d PostgreSQL connection(s) until the transfer ends: %s to the source "
            "(%s), %d to destinations (%s)",
            len(held) + (self.src is not None),
            "1" if self.src is not None else "0",
            self.origin.name,
            len(held),
            ", ".join(held) or "-",
        )

    def _close(self) -> None:
        for conn in [self.src, *(t.conn for t in self.targets)]:
            if conn is None or conn.closed:
                continue
            if isinstance(conn, bounded.BoundedConnection):
                # Cleaning up must not wait long: a rollback is quick where the server is
                # there, and a connection that cannot roll back is closed anyway.
                conn.bounds = bounded.Bounds(min(self.receiver_timeout, bounded.CANCEL_WAIT))
            with contextlib.suppress(Exception):
                conn.rollback()
            with contextlib.suppress(Exception):
                conn.close()
