"""What a transfer with failed destinations raises: transient (retry) or permanent.

Shared by the operator (which raises after its bookkeeping) and
:meth:`airflow_copyman.hooks.copyman.CopyManHook.transfer` (which raises unless the caller
asks for the report instead), so a ``@task`` calling the hook fails like the operator does.
"""

from __future__ import annotations

from airflow.sdk.exceptions import AirflowFailException

from airflow_copyman._destinations import CopyManError, TransferReport


class CopyManDestinationsFailed(CopyManError):
    """Some destinations failed with errors a retry may fix: the task retries, and the
    next try loads only them. ``report`` is the transfer's report."""

    def __init__(self, message: str, report: TransferReport | None = None) -> None:
        super().__init__(message)
        self.report = report


class CopyManPermanentFailure(CopyManDestinationsFailed, AirflowFailException):
    """Every failure is one that no retry can fix: the task fails without retrying."""


def failure_of(report: TransferReport) -> CopyManDestinationsFailed:
    """The exception saying which destinations failed and which were loaded."""
    failed = report.failed
    permanent = all(r.permanent for r in failed)
    lines = [
        f"{len(failed)} of {len(report.destinations)} destination(s) failed"
        + (" with errors no retry can fix" if permanent else
           "; the next try loads only the failed ones")
        + ":"
    ]
    lines += [
        f"  {r.label}: {r.error} ({'permanent' if r.permanent else 'transient'})"
        for r in failed
    ]
    done = [r for r in report.destinations if r.status != "failed"]
    if done:
        lines.append(
            "Loaded: "
            + ", ".join(
                f"{r.label} ({r.rows} rows"
                + (", by an earlier try)" if r.status == "already_loaded" else ")")
                for r in done
            )
        )
    message = "\n".join(lines)
    if permanent:
        return CopyManPermanentFailure(message, report)
    return CopyManDestinationsFailed(message, report)
