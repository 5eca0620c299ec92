"""``verify="checksum"``: after a complete COPY, before the mode's end, the postoperator, the
ledger row and the commit, compare what the source sent with what each destination wrote
(:mod:`._checksum`, both summarised by their servers). A destination whose rows differ fails
(permanently) and rolls back; the others go on to commit."""

from __future__ import annotations

from airflow_copyman.load import _checksum
from airflow_copyman.load._state import State, Target


class Verifying(State):
    """The checksum step of ``verify="checksum"``."""

    def _verify(self, targets: list[Target]) -> list[Target]:
        """Verify ``targets`` (each with a complete COPY) at once; returns those that pass
        (the others failed and were rolled back)."""
        if self.verify != "checksum" or not targets:
            return targets
        assert self.src is not None and self.select is not None
        written = []
        for target in targets:
            conn, mode = target.conn, target.mode
            assert conn is not None and mode is not None and target.renderings is not None
            relation, where = mode.written(conn)
            written.append(
                _checksum.Written(
                    str(target.table), conn, relation, target.renderings, where, target.baseline
                )
            )
        # The source is still in its REPEATABLE READ transaction: the COPY's snapshot.
        outcomes = _checksum.verify_all(self.src, self.select, written)
        passed = []
        for target, outcome in zip(targets, outcomes, strict=True):
            if isinstance(outcome, _checksum.Checksum):
                target.result.checksum = outcome.text
                self.log.info("%s: checksum verified (%s)", target.label, outcome)
                passed.append(target)
            else:
                self._fail(target, outcome, "verifying the checksum")
                self._rollback(target)
        return passed


def take_renderings(target: Target) -> None:
    """In the load transaction, once the table exists (create="if_missing" created it):
    how each column the COPY fills is rendered for the checksum."""
    conn, table = target.conn, target.table
    assert conn is not None and table is not None and target.columns is not None
    target.renderings = _checksum.destination_renderings(conn, table.identifier, target.columns)


def take_baseline(target: Target) -> None:
    """After a preoperator, before the COPY: the checksum of the rows the mode's scope holds
    already (rows the preoperator wrote), subtracted from the one taken after the COPY. A
    merge's scope is its own staging table: nothing to subtract."""
    conn, mode = target.conn, target.mode
    assert conn is not None and mode is not None and target.columns is not None
    if mode.name == "merge":
        return
    relation, where = mode.written(conn)
    target.baseline = _checksum.destination_checksum(conn, relation, target.columns, where)
