"""Progress on stderr: live bars on a terminal, plain lines otherwise, nothing with --quiet.

Plain lines are the load's own log lines (its progress line comes every
``progress_interval`` seconds while rows flow: :data:`PLAIN_INTERVAL`). The bars are fed by
the load's progress callback (``on_progress``, a :class:`load.Progress` at most every
:data:`BARS_INTERVAL` seconds and once at the end).
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, TextIO
from urllib.parse import quote

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    TaskID,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
)

from airflow_copyman import load

#: Seconds between two plain progress lines: under the 5 s a log reader may expect.
PLAIN_INTERVAL = 4.0
#: Seconds between two updates of the bars.
BARS_INTERVAL = 0.25


class Redacting(logging.Formatter):
    """``copyman: message``, with every known password cut out (the load redacts its own
    messages; this is the second lock on the door)."""

    def __init__(self, secrets: list[str]) -> None:
        super().__init__("copyman: %(message)s")
        self.secrets = secrets

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record), self.secrets)


def redact(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***").replace(quote(secret, safe=""), "***")
    return text


class Display:
    """Where the load's news goes. ``log`` is the logger the load writes to;
    ``on_progress`` (or None) takes its progress snapshots."""

    interval = PLAIN_INTERVAL

    def __init__(self, secrets: list[str], stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.secrets = secrets
        self.log = logging.getLogger(f"copyman.{id(self)}")
        self.log.propagate = False
        self.log.setLevel(logging.INFO)

    def on_progress(self, snapshot: load.Progress) -> None:
        pass

    def wants_progress(self) -> bool:
        return False

    def start(self) -> None:
        pass

    def tick(self) -> None:
        """Called by the main thread every few tenths of a second while the load runs."""

    def stop(self) -> None:
        pass

    def line(self, text: str) -> None:
        """A line of the command's own (failures: printed even with --quiet)."""
        print(redact(text, self.secrets), file=self.stream, flush=True)


class Silent(Display):
    """``--quiet``: nothing, unless something failed (those lines come from the command)."""

    def __init__(self, secrets: list[str], stream: TextIO | None = None) -> None:
        super().__init__(secrets, stream)
        self.log.addHandler(logging.NullHandler())


class Lines(Display):
    """Not a terminal: the load's log lines (its progress every :data:`PLAIN_INTERVAL` s while
    rows flow), and a line of ours whenever the load has been silent that long (connecting,
    waiting for a lock, committing), so a reader never waits 5 s for news."""

    def __init__(self, secrets: list[str], stream: TextIO | None = None) -> None:
        super().__init__(secrets, stream)
        handler = _Stamping(self, self.stream)
        handler.setFormatter(Redacting(secrets))
        self.log.addHandler(handler)
        self.started = self.last_line = time.monotonic()
        self.latest: load.Progress | None = None

    def wants_progress(self) -> bool:
        return True

    def on_progress(self, snapshot: load.Progress) -> None:
        self.latest = snapshot

    def tick(self) -> None:
        now = time.monotonic()
        if now - self.last_line >= PLAIN_INTERVAL:
            self.line(f"copyman: still loading after {now - self.started:.0f} s: {self._news()}")

    def line(self, text: str) -> None:
        super().line(text)
        self.last_line = time.monotonic()

    def _news(self) -> str:
        latest = self.latest
        if latest is None:
            return "no rows copied yet"
        states = ", ".join(f"{label} {status}" for label, status in latest.destinations)
        return f"{latest.rows:,} rows, {size(latest.bytes)} copied; {states}"


class _Stamping(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes the load's records, and notes when (a line of ours is due only after silence)."""

    def __init__(self, display: Lines, stream: TextIO) -> None:
        super().__init__(stream)
        self.display = display

    def emit(self, record: logging.LogRecord) -> None:
        super().emit(record)
        self.display.last_line = time.monotonic()


class Bars(Display):
    """A terminal: a live bar per destination (the source's rows, bytes and rate, its
    status; % and ETA where the load estimated the size), warnings above them."""

    interval = BARS_INTERVAL

    def __init__(self, secrets: list[str], stream: TextIO | None = None) -> None:
        super().__init__(secrets, stream)
        self.console = Console(file=self.stream, stderr=stream is None)
        self.bars = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[rows]} rows, {task.fields[size]}, {task.fields[rate]}/s"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[status]}"),
            console=self.console,
        )
        self.tasks: dict[str, TaskID] = {}
        handler = _ConsoleHandler(self.console)
        handler.setFormatter(Redacting(secrets))
        handler.setLevel(logging.WARNING)
        self.log.addHandler(handler)

    def wants_progress(self) -> bool:
        return True

    def start(self) -> None:
        self.bars.start()

    def stop(self) -> None:
        self.bars.stop()

    def on_progress(self, snapshot: load.Progress) -> None:
        total = snapshot.estimated_rows
        rate = snapshot.bytes / snapshot.seconds if snapshot.seconds > 0 else 0.0
        fields: dict[str, Any] = {
            "rows": f"{snapshot.rows:,}",
            "size": size(snapshot.bytes),
            "rate": size(rate),
        }
        for label, status in snapshot.destinations:
            task = self.tasks.get(label)
            if task is None:
                task = self.tasks[label] = self.bars.add_task(
                    redact(label, self.secrets), total=total, status=status, **fields
                )
            ended = total is None and status in ("loaded", "already_loaded")
            self.bars.update(
                task, completed=snapshot.rows, total=snapshot.rows if ended else total,
                status=status, **fields,
            )

    def line(self, text: str) -> None:
        self.console.print(redact(text, self.secrets), markup=False, highlight=False)


class _ConsoleHandler(logging.Handler):
    """Log records printed above the live bars."""

    def __init__(self, console: Console) -> None:
        super().__init__()
        self.console = console

    def emit(self, record: logging.LogRecord) -> None:
        self.console.print(self.format(record), markup=False, highlight=False)


def size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def display(*, quiet: bool, secrets: list[str], stream: TextIO | None = None) -> Display:
    """Silent with --quiet; bars on a terminal; else lines."""
    out = stream or sys.stderr
    if quiet:
        return Silent(secrets, out)
    if out.isatty():
        return Bars(secrets, out)
    return Lines(secrets, out)
