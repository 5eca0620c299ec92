"""Running a load in a worker thread, so that SIGINT and SIGTERM can stop it cleanly.

Python runs signal handlers in the main thread, between two bytecodes: a handler that
raised there (KeyboardInterrupt) could leave a COPY running on its server, or land between
two COMMITs. So the load runs in a thread of its own, and the main thread only waits: a
signal calls :meth:`load.Transfer.cancel`, which stops every COPY and statement on its
server; the load then rolls every destination back and returns, and the command exits
128 + the signal's number. A second signal ends the process at once (the servers roll
back what a closed connection left).
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType

from airflow_copyman import load
from airflow_copyman.cli import exits

#: Seconds the main thread sleeps between two looks at the load (and the bars).
TICK = 0.1
SIGNALS = (signal.SIGINT, signal.SIGTERM)


@dataclass
class Ran:
    """How a load ended: a report, a refusal (bad input, nothing written), another error,
    and the signal that stopped it, if one did."""

    report: load.TransferReport | None = None
    refused: load.ConfigError | None = None
    error: BaseException | None = None
    signum: int | None = None


def run_stoppably(transfer: load.Transfer, tick: Callable[[], None] = lambda: None) -> Ran:
    ran = Ran()

    def work() -> None:
        try:
            ran.report = transfer.run()
        except load.ConfigError as exc:
            ran.refused = exc
        except BaseException as exc:
            ran.error = exc

    def stop(signum: int, frame: FrameType | None) -> None:
        if ran.signum is not None:
            os._exit(exits.for_signal(signum))
        ran.signum = signum
        transfer.cancel()

    worker = threading.Thread(target=work, name="copyman-load", daemon=True)
    # Only the main thread may set signal handlers (main() called from another thread, say
    # by an embedding program, leaves its signals alone).
    in_main = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, stop) for s in SIGNALS} if in_main else {}
    try:
        worker.start()
        while worker.is_alive():
            worker.join(TICK)
            tick()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return ran
