"""The end of a load: its report and its summary in the log."""

from __future__ import annotations

from airflow_copyman.load.phases.copy import CopyOutcome
from airflow_copyman.load.phases.run import Run, size
from airflow_copyman.load.spec import TransferReport


def report(
    run: Run,
    seconds: float,
    fmt: str | None,
    outcome: CopyOutcome,
    locations: dict[str, tuple[str, str]],
) -> TransferReport:
    """The load's report: every destination's result; the rows and bytes the source
    sent (where no copy ran: the most any destination holds, loaded by an earlier try)."""
    results = [t.result for t in run.targets]
    rows = outcome.source_rows
    nbytes = outcome.bytes
    if rows is None:
        done = [r for r in results if r.rows is not None]
        rows = max((r.rows or 0 for r in done), default=0)
        nbytes = max((r.bytes or 0 for r in done), default=0)
    return TransferReport(rows, nbytes, fmt, seconds, results, locations)


def log_summary(run: Run, report: TransferReport) -> None:
    run.log.info(
        "CopyMan transfer finished in %.1f s: %d rows, %s from %s (%s format)",
        report.seconds,
        report.rows,
        size(report.bytes),
        run.origin.name,
        report.format or "n/a",
    )
    for result in report.destinations:
        rate = ""
        if result.seconds and result.bytes:
            rate = f", {size(result.bytes / result.seconds)}/s"
        run.log.info(
            "  %s: %s, %s rows, %s%s%s",
            result.label,
            result.status,
            "-" if result.rows is None else result.rows,
            "-" if result.bytes is None else size(result.bytes),
            rate,
            f" ({result.error})" if result.error else "",
        )
