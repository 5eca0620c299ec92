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
from airflow_copyman.load.phases.state import State, Target
from airflow_copyman.load.verify import checksum, readback
from airflow_copyman.load.verify.checksum import Checksum

if TYPE_CHECKING:
    from airflow_copyman.load.phases.copy import CopyOutcome
    from airflow_copyman.load.phases.plan import DestinationPlan, Plan


class Verifying(State):
    """The checksum step of ``verify="checksum"``."""

    def _verify(
        self, targets: list[Target], plan: Plan, copied: CopyOutcome
    ) -> list[Target]:
        """Verify ``targets`` (each with a complete COPY) at once; returns those that pass
        (the others failed and were rolled back)."""
        if self.verify != "checksum" or not targets:
            return targets
        outcomes: dict[int, Checksum | BaseException] = {}
        by_text = [t for t in targets if not streams(self, t, plan)]
        if by_text:
            outcomes.update(
                zip(map(id, by_text), self._verify_by_text(by_text, plan), strict=True)
            )
        by_stream = [t for t in targets if streams(self, t, plan)]
        if by_stream:
            checked = self._verify_by_stream(by_stream, plan, copied)
            outcomes.update(zip(map(id, by_stream), checked, strict=True))
        passed = []
        for target in targets:
            outcome = outcomes[id(target)]
            if isinstance(outcome, Checksum):
                target.result.checksum = outcome.text
                self.log.info("%s: checksum verified (%s)", target.label, outcome)
                passed.append(target)
            else:
                self._fail(target, outcome, "verifying the checksum")
                self._rollback(target)
        return passed

    def _verify_by_text(
        self, targets: list[Target], plan: Plan
    ) -> list[Checksum | BaseException]:
        assert self.src is not None
        written = []
        for target in targets:
            conn, mode = target.conn, target.mode
            assert conn is not None and target.renderings is not None
            relation, where = mode.written(conn)
            written.append(
                checksum.Written(
                    str(target.table), conn, relation, target.renderings, where, target.baseline
                )
            )
        # The source is still in its REPEATABLE READ transaction: the COPY's snapshot.
        return checksum.verify_all(self.src, plan.select, written)

    def _verify_by_stream(
        self, targets: list[Target], plan: Plan, copied: CopyOutcome
    ) -> list[Checksum | BaseException]:
        digest = copied.digest
        assert digest is not None, "the producer digests its rows under verify='checksum'"
        fmt = plan.format
        sent = _checksum_of(digest, fmt)
        outcomes: dict[int, Digest | BaseException] = {}
        reads = []
        for target in targets:
            try:
                reads.append((target, _read(target, fmt, plan.of(target).names)))
            except Exception as exc:  # a server error, a stop, a time-out (its bounds)
                outcomes[id(target)] = exc
        try:
            settings = rendering(self, fmt)
        except Exception as exc:  # the source's settings could not be read
            outcomes.update((id(target), exc) for target, _ in reads)
            reads = []
        if reads:
            got = readback.digests([read for _, read in reads], settings, self.bounds)
            outcomes.update((id(target), g) for (target, _), g in zip(reads, got, strict=True))
        out: list[Checksum | BaseException] = []
        for target in targets:
            outcome = outcomes[id(target)]
            if isinstance(outcome, BaseException):
                out.append(outcome)
                continue
            written = _checksum_of(outcome, fmt)
            if target.baseline is not None:
                written = written - target.baseline
            if written != sent:
                out.append(checksum.ChecksumMismatch(str(target.table), sent, written))
            else:
                out.append(written)
        return out


def streams(state: State, target: Target, plan: Plan) -> bool:
    """Whether ``target`` is verified by its COPY stream: every column the COPY fills has
    the source column's type (base type of a domain, modifier included) on both sides
    (decided while planning)."""
    return plan.of(target).by_stream


def rendering(state: State, fmt: str) -> dict[str, str] | None:
    """The source session's rendering settings for a text or CSV read-back (read once);
    None for binary, whose send functions depend on no setting."""
    if fmt == "binary":
        return None
    if state.rendering is None:
        assert state.src is not None
        state.rendering = readback.render_settings(state.src)
    return state.rendering


def _read(
    target: Target, fmt: str, names: list[str]
) -> tuple[psycopg.Connection[Any], sql.Composed]:
    conn, mode = target.conn, target.mode
    assert conn is not None
    relation, where = mode.written(conn)
    return conn, readback.query(conn, relation, names, where, fmt)


def _checksum_of(digest: Digest, fmt: str) -> Checksum:
    return Checksum(digest.rows, digest.total, f"copy-{fmt}")


def take_renderings(target: Target, planned: DestinationPlan) -> None:
    """In the load transaction, once the table exists (create="if_missing" created it):
    how each column the COPY fills is rendered for the checksum."""
    conn, table = target.conn, target.table
    assert conn is not None
    target.renderings = checksum.destination_renderings(conn, table.identifier, planned.names)


def take_baseline(state: State, target: Target, plan: Plan) -> None:
    """After a preoperator, before the COPY: the checksum of the rows the mode's scope holds
    already (rows the preoperator wrote), subtracted from the one taken after the COPY,
    the same way. A merge's scope is the target's rows whose key was staged, read after the
    merge applied them: nothing to subtract."""
    conn, mode = target.conn, target.mode
    assert conn is not None
    if mode.name == "merge":
        return
    names, fmt = plan.of(target).names, plan.format
    if streams(state, target, plan):
        (outcome,) = readback.digests(
            [_read(target, fmt, names)], rendering(state, fmt), state.bounds
        )
        if isinstance(outcome, BaseException):
            raise outcome
        target.baseline = _checksum_of(outcome, fmt)
        return
    relation, where = mode.written(conn)
    target.baseline = checksum.destination_checksum(conn, relation, names, where)
