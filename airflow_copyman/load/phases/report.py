"""The end of a load: its report and its summary in the log."""

from __future__ import annotations

from airflow_copyman.load.phases.copy import CopyOutcome
from airflow_copyman.load.phases.state import State, size
from airflow_copyman.load.spec import TransferReport


class Reporting(State):
    """The report and the summary."""

    def _report(
        self, seconds: float, fmt: str | None, outcome: CopyOutcome
    ) -> TransferReport:
        results = [t.result for t in self.targets]
        rows = outcome.source_rows
        nbytes = outcome.bytes
        if rows is None:
            done = [r for r in results if r.rows is not None]
            rows = max((r.rows or 0 for r in done), default=0)
            nbytes = max((r.bytes or 0 for r in done), default=0)
        return TransferReport(rows, nbytes, fmt, seconds, results, self.endpoints)

    def _log_summary(self, report: TransferReport) -> None:
        self.log.info(
            "CopyMan transfer finished in %.1f s: %d rows, %s from %s (%s format)",
            report.seconds,
            report.rows,
            size(report.bytes),
            self.origin.name,
            report.format or "n/a",
        )
        for result in report.destinations:
            rate = ""
            if result.seconds and result.bytes:
                rate = f", {size(result.bytes / result.seconds)}/s"
            self.log.info(
                "  %s: %s, %s rows, %s%s%s",
                result.label,
                result.status,
                "-" if result.rows is None else result.rows,
                "-" if result.bytes is None else size(result.bytes),
                rate,
                f" ({result.error})" if result.error else "",
            )
