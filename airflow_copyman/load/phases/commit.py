"""Phase 4 of a load: finish each destination in its transaction (the mode's end, the
checksum, the postoperator, the ledger row), then commit them all at once."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import psycopg

from airflow_copyman import copyman
from airflow_copyman.load.connection import bounded, classify
from airflow_copyman.load.ledger.table import Extras
from airflow_copyman.load.modes.base import MergeCounts
from airflow_copyman.load.phases import verify
from airflow_copyman.load.phases.begin import Loading
from airflow_copyman.load.phases.copy import CopyOutcome
from airflow_copyman.load.phases.ledger import slot
from airflow_copyman.load.phases.locks import lock_failed, lock_table
from airflow_copyman.load.phases.plan import Plan
from airflow_copyman.load.phases.run import Run, rollback
from airflow_copyman.load.spec import (
    DestinationResult,
    LoadError,
    TooFewRowsError,
    Verification,
)


@dataclass(frozen=True)
class Finished:
    """A destination whose transaction holds the mode's end: what the mode did (a merge's
    counts, else None) and, once verified, the checksum it matched."""

    one: Loading
    counts: MergeCounts | None
    checksum: str | None = None


def commit(
    run: Run,
    rendering: verify.Rendering,
    plan: Plan,
    loading: list[Loading],
    copied: CopyOutcome,
) -> list[DestinationResult]:
    """Record each complete destination in its ledger, then COMMIT them all at once:
    the COMMITs go out together and their replies are waited for together, so one
    destination slow to answer never holds the others (nor their locks). Returns the
    results of those committed."""
    if not _enough_rows(run, loading, copied):
        return []
    complete = _complete(run, loading, copied)
    # The mode's end first (the merge applies, taking its table's load lock: in key
    # order, so two loads of the same tables never wait on each other in a circle);
    # verify="checksum" then reads what it wrote.
    in_order = sorted(complete, key=lambda one: one.lock.key)
    finished = [f for one in in_order if (f := _finish(run, plan, one, copied)) is not None]
    # verify="checksum": before the postoperator runs, before the ledger row.
    passed = verify.verify(run, rendering, plan, [f.one for f in finished], copied)
    verified = [replace(f, checksum=passed[f.one.label]) for f in finished if f.one.label in passed]
    ready = [f for f in verified if _postoperate(run, f.one) and _record(run, f, copied)]
    if run.stopped:
        for f in ready:
            run.drop(f.one.session, copyman.Cancelled("the task was killed"), "committing")
        return []
    return _commit_all(run, ready, copied)


def _enough_rows(run: Run, loading: list[Loading], copied: CopyOutcome) -> bool:
    """``min_rows``: checked before any destination commits (late data may still
    arrive: transient). False (all rolled back) where the source yielded fewer."""
    found, min_rows = copied.server_rows, run.options.min_rows
    if found is None or found >= min_rows:
        return True
    short = TooFewRowsError(
        f"the source yielded {found} row(s), fewer than min_rows={min_rows}: "
        "nothing was committed"
    )
    for one in loading:
        run.drop(one.session, short, "checking min_rows")
    return False


def _complete(run: Run, loading: list[Loading], copied: CopyOutcome) -> list[Loading]:
    """The destinations whose COPY count is the source's (the others fail)."""
    complete: list[Loading] = []
    for one in loading:
        if run.stopped:
            run.drop(one.session, copyman.Cancelled("the task was killed"), "committing")
            continue
        rows = copied.received[one.label][0]
        if rows is None or rows != copied.server_rows:
            # The engine checked this already; checking again costs nothing, and a
            # destination is committed only on the servers' own word.
            run.drop(one.session, _count_error(one, rows, copied.server_rows), "checking")
            continue
        complete.append(one)
    return complete


def _finish(run: Run, plan: Plan, one: Loading, copied: CopyOutcome) -> Finished | None:
    """After the COPY, in the load transaction: the mode's end (the merge), and what it
    did. None (rolled back) if it fails."""
    mode = one.target.mode
    doing = f"applying the {mode.name}"
    try:
        if mode.lock_before_finish and not one.locked:
            doing = "taking the table's load lock"
            lock_table(run, one.session, one.lock, plan.of(one.target).create)
            doing = f"applying the {mode.name}"
        counts = mode.finish(one.conn, copied.rows_of(one.target), plan.of(one.target).names)
    except psycopg.Error as exc:
        run.drop(one.session, lock_failed(run, one.session, one.lock, exc), doing)
        return None
    except (copyman.Cancelled, LoadError) as exc:
        run.drop(one.session, exc, doing)
        return None
    return Finished(one, counts)


def _postoperate(run: Run, one: Loading) -> bool:
    """After the mode's end and the checksum: the postoperator. False (rolled back) if
    it fails."""
    doing = "running the postoperator"
    try:
        for statement in one.target.spec.post_statements:
            one.conn.execute(statement)  # type: ignore[call-overload]
    except psycopg.Error as exc:
        run.drop(one.session, lock_failed(run, one.session, one.lock, exc), doing)
        return False
    except copyman.Cancelled as exc:
        run.drop(one.session, exc, doing)
        return False
    return True


def _record(run: Run, finished: Finished, copied: CopyOutcome) -> bool:
    """The ledger row, in the load transaction: False (rolled back) if it fails, or if
    another try of this task loaded the destination meanwhile."""
    if run.ledger is None:
        return True
    one, counts, target = finished.one, finished.counts, finished.one.target
    extras = Extras(
        counts.inserted if counts else None, counts.updated if counts else None,
        finished.checksum,
    )
    try:
        entry = run.ledger.record_load(
            one.conn, slot(target), copied.rows_of(target), copied.received[one.label][1],
            extras,
        )
    except (copyman.Cancelled, psycopg.Error) as exc:
        run.drop(one.session, exc, "committing")
        return False
    if entry is None:
        return True
    run.log.warning(
        "%s: another try of this task loaded it meanwhile; rolled back this copy", one.label
    )
    rollback(one.conn)
    run.already_loaded(target, entry)
    return False


def _commit_all(
    run: Run, ready: list[Finished], copied: CopyOutcome
) -> list[DestinationResult]:
    """The COMMITs, sent together and waited for together."""
    outcomes = bounded.commit_all(
        [f.one.conn for f in ready], run.options.receiver_timeout, run.bounds.stop
    )
    committed = []
    for finished, error in zip(ready, outcomes, strict=True):
        one = finished.one
        if error is None:
            committed.append(_committed(run, finished, copied))
            continue
        run.fail(one.target, error, "committing")
        if isinstance(error, psycopg.OperationalError):
            one.target.result.error = (one.target.result.error or "") + (
                " (the commit's outcome is unknown; the next try reads the ledger)"
                if run.ledger is not None and run.ledger.atomic
                else " (the commit's outcome is unknown)"
            )
        rollback(one.conn)
    return committed


def _committed(run: Run, finished: Finished, copied: CopyOutcome) -> DestinationResult:
    one, counts, target = finished.one, finished.counts, finished.one.target
    result = target.result
    result.status = "loaded"
    result.rows, result.bytes = copied.rows_of(target), copied.received[one.label][1]
    result.try_number = run.ledger.try_number if run.ledger else None
    result.seconds = time.monotonic() - one.started
    if counts is not None:
        result.inserted, result.updated = counts.inserted, counts.updated
    result.checksum = finished.checksum
    # Committed only once its count (and checksum) matched the source's.
    result.verification = Verification(
        True, copied.server_rows, copied.received[one.label][0],
        result.checksum, result.checksum,
    )
    run.log.info("%s: committed %d rows", one.label, result.rows)
    for record in _after_commit(run):
        try:
            record(result)
        except Exception as exc:
            # The ledger (if any) holds the truth; the callback only mirrors it.
            run.log.warning(
                "%s: recording the load failed: %s",
                one.label,
                classify.describe(exc, run.secrets),
            )
    return result


def _after_commit(run: Run) -> list[Callable[[DestinationResult], None]]:
    """Who hears of a commit: the ledger (one that records after the commit), then
    ``on_commit``."""
    found = [run.ledger.committed] if run.ledger is not None else []
    return found + ([run.on_commit] if run.on_commit is not None else [])


def _count_error(one: Loading, rows: int | None, source_rows: int | None) -> BaseException:
    if rows is not None:
        return copyman.RowCountMismatch(
            f"{one.label}: the destination's COPY reports {rows} rows, the source's "
            f"{source_rows}",
            rows=rows, source_rows=source_rows,
        )
    # No COPY result at all: say what the server last said, if anything.
    conn = one.conn
    said = ""
    with contextlib.suppress(Exception):
        said = conn.pgconn.error_message.decode(errors="replace").strip()
    text = f"{one.label}: the destination's COPY ended without a row count"
    if said:
        text += f"; the server said: {' '.join(said.split())}"
    if conn.closed or conn.broken:
        return psycopg.OperationalError(text)
    return copyman.RowCountMismatch(text)
