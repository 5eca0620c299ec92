"""``verify="checksum"``: after a complete COPY and the mode's end (a merge has applied), before
the postoperator, the ledger row and the commit, compare what the source sent with what each
destination wrote (for a merge: the target's rows whose key was staged).
A destination whose rows differ fails (permanently) and rolls back; the others go on.

Two ways, per destination:

* **the COPY stream** (:mod:`.readback`), where every column has the same type on both
  sides (always for a table the load created): the engine digested the source's rows as
  it forwarded them, the destination's rows are read back as the same ``COPY`` and
  digested the same way. The source is read once, by the load's own COPY: a checksum adds
  no work on it, and a query whose rows change at each run (``random()``) verifies too;
* **the rows' text** (:mod:`.checksum`), where types differ (``numeric`` into
  ``numeric(12,2)``, ``text`` into ``int``): both servers render each row as the
  destination's types do; the source runs its query a second time for that, in the
  COPY's snapshot.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import sql

from airflow_copyman.copyman import Digest
from airflow_copyman.load.connection import bounded
from airflow_copyman.load.phases.run import Run, Session
from airflow_copyman.load.verify import checksum, readback
from airflow_copyman.load.verify.checksum import Checksum, ColumnRendering

if TYPE_CHECKING:
    from airflow_copyman.load.phases.begin import Loading
    from airflow_copyman.load.phases.copy import CopyOutcome
    from airflow_copyman.load.phases.plan import DestinationPlan, Plan


class Rendering:
    """The source session's rendering settings for a text or CSV read-back, read once
    when first needed (a baseline before the COPY, or the read-backs after it); None for
    binary, whose send functions depend on no setting."""

    def __init__(self, src: psycopg.Connection[Any], bounds: bounded.Bounds) -> None:
        self.src, self.bounds = src, bounds
        self._settings: dict[str, str] | None = None

    def settings(self, fmt: str) -> dict[str, str] | None:
        if fmt == "binary":
            return None
        if self._settings is None:
            self._settings = readback.render_settings(self.src)
        return self._settings


def verify(
    run: Run, rendering: Rendering, plan: Plan, loading: list[Loading], copied: CopyOutcome
) -> dict[str, str | None]:
    """Verify ``loading`` (each with a complete COPY) at once; returns those that pass, by
    label, with the checksum they matched (None: ``verify`` is not "checksum"). The others
    failed and were rolled back."""
    if run.verify != "checksum" or not loading:
        return {one.label: None for one in loading}
    outcomes: dict[int, Checksum | BaseException] = {}
    by_text = [t for t in loading if not plan.of(t.target).by_stream]
    if by_text:
        checked = _verify_by_text(rendering.src, by_text, plan)
        outcomes.update(zip(map(id, by_text), checked, strict=True))
    by_stream = [t for t in loading if plan.of(t.target).by_stream]
    if by_stream:
        checked = _verify_by_stream(rendering, by_stream, plan, copied)
        outcomes.update(zip(map(id, by_stream), checked, strict=True))
    passed: dict[str, str | None] = {}
    for one in loading:
        outcome = outcomes[id(one)]
        if isinstance(outcome, Checksum):
            run.log.info("%s: checksum verified (%s)", one.label, outcome)
            passed[one.label] = outcome.text
        else:
            run.drop(one.session, outcome, "verifying the checksum")
    return passed


def _verify_by_text(
    src: psycopg.Connection[Any], loading: list[Loading], plan: Plan
) -> list[Checksum | BaseException]:
    written = []
    for one in loading:
        relation, where = one.target.mode.written(one.conn)
        written.append(checksum.Written(
            str(one.target.table), one.conn, relation, one.renderings or [], where,
            one.baseline,
        ))
    # The source is still in its REPEATABLE READ transaction: the COPY's snapshot.
    return checksum.verify_all(src, plan.select, written)


def _verify_by_stream(
    rendering: Rendering, loading: list[Loading], plan: Plan, copied: CopyOutcome
) -> list[Checksum | BaseException]:
    digest = copied.digest
    if digest is None:  # pragma: no cover - the producer digests under verify="checksum"
        raise ValueError("verify='checksum' without the source's digest")
    fmt = plan.format
    sent = _checksum_of(digest, fmt)
    outcomes: dict[int, Digest | BaseException] = {}
    reads = []
    for one in loading:
        try:
            reads.append((one, _read(one.session, fmt, plan.of(one.target).names)))
        except Exception as exc:  # a server error, a stop, a time-out (its bounds)
            outcomes[id(one)] = exc
    try:
        settings = rendering.settings(fmt)
    except Exception as exc:  # the source's settings could not be read
        outcomes.update((id(one), exc) for one, _ in reads)
        reads = []
    if reads:
        got = readback.digests([read for _, read in reads], settings, rendering.bounds)
        outcomes.update((id(one), g) for (one, _), g in zip(reads, got, strict=True))
    out: list[Checksum | BaseException] = []
    for one in loading:
        outcome = outcomes[id(one)]
        if isinstance(outcome, BaseException):
            out.append(outcome)
            continue
        written = _checksum_of(outcome, fmt)
        if one.baseline is not None:
            written = written - one.baseline
        if written != sent:
            out.append(checksum.ChecksumMismatch(str(one.target.table), sent, written))
        else:
            out.append(written)
    return out


def _read(
    session: Session, fmt: str, names: list[str]
) -> tuple[psycopg.Connection[Any], sql.Composed]:
    relation, where = session.target.mode.written(session.conn)
    return session.conn, readback.query(session.conn, relation, names, where, fmt)


def _checksum_of(digest: Digest, fmt: str) -> Checksum:
    return Checksum(digest.rows, digest.total, f"copy-{fmt}")


def take_renderings(session: Session, planned: DestinationPlan) -> list[ColumnRendering]:
    """In the load transaction, once the table exists (create="if_missing" created it):
    how each column the COPY fills is rendered for the checksum."""
    table = session.target.table
    return checksum.destination_renderings(session.conn, table.identifier, planned.names)


def take_baseline(rendering: Rendering, session: Session, plan: Plan) -> Checksum | None:
    """After a preoperator, before the COPY: the checksum of the rows the mode's scope holds
    already (rows the preoperator wrote), subtracted from the one taken after the COPY,
    the same way. A merge's scope is the target's rows whose key was staged, read after the
    merge applied them: nothing to subtract."""
    conn, mode = session.conn, session.target.mode
    if mode.name == "merge":
        return None
    planned, fmt = plan.of(session.target), plan.format
    if planned.by_stream:
        (outcome,) = readback.digests(
            [_read(session, fmt, planned.names)], rendering.settings(fmt), rendering.bounds
        )
        if isinstance(outcome, BaseException):
            raise outcome
        return _checksum_of(outcome, fmt)
    relation, where = mode.written(conn)
    return checksum.destination_checksum(conn, relation, planned.names, where)
