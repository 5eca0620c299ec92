"""The exit statuses of ``copyman``, so a scheduler can tell a retry from a fix."""

from __future__ import annotations

import signal

#: Every destination loaded, or was loaded before (``--load-id``).
OK = 0
#: A destination failed permanently, or the load was refused before anything moved.
FAILED = 1
#: Bad arguments or load file (argparse uses 2 too).
USAGE = 2
#: Every failure may pass by itself (a server unreachable, a lock wait timed out):
#: ``EX_TEMPFAIL`` of sysexits.h, which cron wrappers and systemd know as "retry later".
TEMPFAIL = 75


def for_signal(signum: int) -> int:
    """128 + the signal's number, as a shell reports a process a signal ended:
    130 for SIGINT, 143 for SIGTERM."""
    return 128 + int(signal.Signals(signum))
