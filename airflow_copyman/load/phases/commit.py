"""Phase 4 of a load: finish each destination in its transaction (the mode's end, the
postoperator, the ledger row), then commit them all at once."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

import psycopg

from airflow_copyman import copyman
from airflow_copyman.load.connection import bounded, classify
from airflow_copyman.load.ledger.table import Extras
from airflow_copyman.load.phases.copy import CopyOutcome
from airflow_copyman.load.phases.ledger import slot
from airflow_copyman.load.phases.locks import TableLocking
from airflow_copyman.load.phases.plan import Plan
from airflow_copyman.load.phases.state import Target
from airflow_copyman.load.phases.verify import Verifying
from airflow_copyman.load.spec import (
    DestinationResult,
    LoadError,
    TooFewRowsError,
    Verification,
)


class Committing(Verifying, TableLocking):
    """min_rows, the checksums, the finish, the ledger rows, the commits."""

    def _commit(self, loading: list[Target], plan: Plan, copied: CopyOutcome) -> None:
        """Record each complete destination in its ledger, then COMMIT them all at once:
        the COMMITs go out together and their replies are waited for together, so one
        destination slow to answer never holds the others (nor their locks)."""
        if not self._enough_rows(loading, copied):
            return
        complete = self._complete(loading, copied)
        # The mode's end first (the merge applies, taking its table's load lock: in key
        # order, so two loads of the same tables never wait on each other in a circle);
        # verify="checksum" then reads what it wrote.
        in_order = sorted(complete, key=lambda t: t.lock_key or 0)
        finished = [t for t in in_order if self._finish(t, plan, copied)]
        # verify="checksum": before the postoperator runs, before the ledger row.
        verified = self._verify(finished, plan, copied)
        ready = [t for t in verified if self._postoperate(t) and self._record(t, copied)]
        if self.cancelled:
            for target in ready:
                self._fail(target, copyman.Cancelled("the task was killed"), "committing")
                self._rollback(target)
            return
        self._commit_all(ready, copied)

    def _enough_rows(self, loading: list[Target], copied: CopyOutcome) -> bool:
        """``min_rows``: checked before any destination commits (late data may still
        arrive: transient). False (all rolled back) where the source yielded fewer."""
        found = copied.server_rows
        if found is None or found >= self.min_rows:
            return True
        short = TooFewRowsError(
            f"the source yielded {found} row(s), fewer than min_rows={self.min_rows}: "
            "nothing was committed"
        )
        for target in loading:
            self._fail(target, short, "checking min_rows")
            self._rollback(target)
        return False

    def _complete(self, loading: list[Target], copied: CopyOutcome) -> list[Target]:
        """The destinations whose COPY count is the source's (the others fail)."""
        complete: list[Target] = []
        for target in loading:
            if self.cancelled:
                self._fail(target, copyman.Cancelled("the task was killed"), "committing")
                self._rollback(target)
                continue
            rows = copied.received[target.label][0]
            if rows is None or rows != copied.server_rows:
                # The engine checked this already; checking again costs nothing, and a
                # destination is committed only on the servers' own word.
                self._fail(target, _count_error(target, rows, copied.server_rows), "checking")
                self._rollback(target)
                continue
            complete.append(target)
        return complete

    def _record(self, target: Target, copied: CopyOutcome) -> bool:
        """The ledger row, in the load transaction: False (rolled back) if it fails, or if
        another try of this task loaded the destination meanwhile."""
        conn = target.conn
        assert conn is not None
        if self.ledger is None:
            return True
        # Known by now: the checksum (_verify), the merge's counts (_finish).
        extras = Extras(target.mode.inserted, target.mode.updated, target.result.checksum)
        try:
            entry = self.ledger.record_load(
                conn, slot(target), copied.rows_of(target), copied.received[target.label][1],
                extras,
            )
        except (copyman.Cancelled, psycopg.Error) as exc:
            self._fail(target, exc, "committing")
            self._rollback(target)
            return False
        if entry is None:
            return True
        self.log.warning(
            "%s: another try of this task loaded it meanwhile; rolled back this copy",
            target.label,
        )
        self._rollback(target)
        self._already_loaded(target, entry)
        return False

    def _commit_all(self, ready: list[Target], copied: CopyOutcome) -> None:
        """The COMMITs, sent together and waited for together."""
        conns = [t.conn for t in ready]
        outcomes = bounded.commit_all(
            conns, self.receiver_timeout, self.bounds.stop  # type: ignore[arg-type]
        )
        for target, error in zip(ready, outcomes, strict=True):
            if error is None:
                self._committed(target, copied)
                continue
            self._fail(target, error, "committing")
            if isinstance(error, psycopg.OperationalError):
                target.result.error = (target.result.error or "") + (
                    " (the commit's outcome is unknown; the next try reads the ledger)"
                    if self.ledger is not None and self.ledger.atomic
                    else " (the commit's outcome is unknown)"
                )
            self._rollback(target)

    def _finish(self, target: Target, plan: Plan, copied: CopyOutcome) -> bool:
        """After the COPY, in the load transaction: the mode's end (the merge). False
        (rolled back) if it fails."""
        conn, mode = target.conn, target.mode
        assert conn is not None
        doing = f"applying the {mode.name}"
        try:
            if mode.lock_before_finish and not target.locked:
                doing = "taking the table's load lock"
                self._lock_table(target, plan.of(target).create)
                doing = f"applying the {mode.name}"
            mode.finish(conn, copied.rows_of(target))
        except psycopg.Error as exc:
            self._fail(target, self._lock_failed(target, exc), doing)
            self._rollback(target)
            return False
        except (copyman.Cancelled, LoadError) as exc:
            self._fail(target, exc, doing)
            self._rollback(target)
            return False
        return True

    def _postoperate(self, target: Target) -> bool:
        """After the mode's end and the checksum: the postoperator. False (rolled back) if
        it fails."""
        conn = target.conn
        assert conn is not None
        try:
            for statement in target.spec.post_statements:
                conn.execute(statement)  # type: ignore[call-overload]
        except psycopg.Error as exc:
            self._fail(target, self._lock_failed(target, exc), "running the postoperator")
            self._rollback(target)
            return False
        except copyman.Cancelled as exc:
            self._fail(target, exc, "running the postoperator")
            self._rollback(target)
            return False
        return True

    def _committed(self, target: Target, copied: CopyOutcome) -> None:
        result = target.result
        result.status = "loaded"
        result.rows, result.bytes = copied.rows_of(target), copied.received[target.label][1]
        result.try_number = self.ledger.try_number if self.ledger else None
        result.seconds = time.monotonic() - target.started
        if target.mode.name == "merge":
            result.inserted, result.updated = target.mode.inserted, target.mode.updated
        # Committed only once its count (and checksum) matched the source's.
        result.verification = Verification(
            True, copied.server_rows, copied.received[target.label][0],
            result.checksum, result.checksum,
        )
        self.log.info("%s: committed %d rows", target.label, result.rows)
        for record in self._after_commit():
            try:
                record(result)
            except Exception as exc:
                # The ledger (if any) holds the truth; the callback only mirrors it.
                self.log.warning(
                    "%s: recording the load failed: %s",
                    target.label,
                    classify.describe(exc, self.secrets),
                )


    def _after_commit(self) -> list[Callable[[DestinationResult], None]]:
        """Who hears of a commit: the ledger (one that records after the commit), then
        ``on_commit``."""
        found = [self.ledger.committed] if self.ledger is not None else []
        return found + ([self.on_commit] if self.on_commit is not None else [])


def _count_error(target: Target, rows: int | None, source_rows: int | None) -> BaseException:
    if rows is not None:
        return copyman.RowCountMismatch(
            f"{target.label}: the destination's COPY reports {rows} rows, the source's "
            f"{source_rows}",
            rows=rows, source_rows=source_rows,
        )
    # No COPY result at all: say what the server last said, if anything.
    conn = target.conn
    said = ""
    if conn is not None:
        with contextlib.suppress(Exception):
            said = conn.pgconn.error_message.decode(errors="replace").strip()
    text = f"{target.label}: the destination's COPY ended without a row count"
    if said:
        text += f"; the server said: {' '.join(said.split())}"
    if conn is None or conn.closed or conn.broken:
        return psycopg.OperationalError(text)
    return copyman.RowCountMismatch(text)
