"""Protocol steps and the one place that waits for them (in the engine and in the load
layer: its commits and read-backs are steps too, driven here).

A step is a generator that does one connection's non-blocking libpq work (start a COPY,
cancel it, read its end) and yields ``(fd, Wait)`` whenever it cannot go on, as psycopg's
``generators`` yield to its ``waiting`` functions. :func:`drive` runs many steps together
over one ``select()`` with one deadline, so a slow server never holds up the others and no
connection is ever waited for in turn. The copy manager's data loop advances steps in
progress (aborts of faulted receivers) the same way, between its own waits. A step may say
what its deadline turns it into (``on_expire``): a statement past its deadline is not
closed but cancelled, and goes on as a step that reads its end.
"""

from __future__ import annotations

import select
import time
from collections.abc import Callable, Generator, Hashable, Iterable, Mapping
from typing import Any, Generic, TypeVar

from ._fittings import Wait
from ._limits import MAX_WAIT

#: What a step yields: the socket it waits on and for what.
Want = tuple[int, Wait]
Steps = Generator[Want, None, Any]


K = TypeVar("K", bound=Hashable)


class Step:
    """One generator in progress: what it waits for, and how it ended.

    ``deadline``: when the driver gives up on it (``time.monotonic()``); ``idle``: instead,
    a deadline that each advance moves on by ``idle`` seconds (a step reading a stream
    stalls only when nothing comes for that long); ``on_expire``: called at the deadline,
    returns the step that carries on (see :meth:`follow`), or None to give the step up."""

    __slots__ = ("deadline", "done", "error", "gen", "idle", "on_expire", "value", "want")

    def __init__(
        self,
        gen: Steps,
        deadline: float = float("inf"),
        *,
        idle: float | None = None,
        on_expire: Callable[[Step], Step | None] | None = None,
    ) -> None:
        self.gen = gen
        self.idle = idle
        self.on_expire = on_expire
        self.deadline = deadline if idle is None else time.monotonic() + idle
        self.want: Want | None = None  # None: not started yet, advance at once
        self.done = False
        self.value: Any = None
        self.error: BaseException | None = None

    def advance(self) -> bool:
        """Run the step until it waits again; True once it has ended (value or error)."""
        try:
            self.want = next(self.gen)
            if self.idle is not None:
                self.deadline = time.monotonic() + self.idle
        except StopIteration as stop:
            self.done, self.value = True, stop.value
        except Exception as exc:
            self.done, self.error = True, exc
        return self.done

    def ready(self, readable: set[int], writable: set[int]) -> bool:
        """Whether what it waits for has come (a step never advanced is always ready)."""
        if self.want is None:
            return True
        fd, wait = self.want
        if wait is Wait.READ_WRITE:
            return fd in readable or fd in writable
        return fd in (readable if wait is Wait.READ else writable)

    def follow(
        self, deadline: float, on_expire: Callable[[Step], Step | None] | None = None
    ) -> Step:
        """The same generator carried on under a new deadline, still waiting for what it
        waited for (a statement cancelled at its deadline, whose end is still to read)."""
        step = Step(self.gen, deadline, on_expire=on_expire)
        step.want = self.want
        return step

    def expire(self) -> Step | None:
        """At its deadline: the step that carries on, if ``on_expire`` gives one;
        otherwise the step is given up (closed)."""
        follow = self.on_expire(self) if self.on_expire is not None else None
        if follow is None:
            self.stop()
        return follow

    def stop(self) -> None:
        """Give up on it (at its deadline): the caller then closes its connection."""
        self.gen.close()
        self.done = True


def select_fds(
    wants: Iterable[Want], timeout: float
) -> tuple[set[int], set[int]]:
    """Wait until one of the sockets is ready or ``timeout`` passes; the ready ones."""
    rlist = [fd for fd, wait in wants if wait in (Wait.READ, Wait.READ_WRITE)]
    wlist = [fd for fd, wait in wants if wait in (Wait.WRITE, Wait.READ_WRITE)]
    if not rlist and not wlist:
        return set(), set()
    try:
        r, w, _ = select.select(rlist, wlist, [], max(0.0, timeout))
    except (OSError, ValueError):
        # A socket closed under us (its connection was abandoned): let every step look
        # again; each one finds out for itself.
        return set(rlist), set(wlist)
    return set(r), set(w)


class Driver(Generic[K]):
    """Runs steps keyed by their fitting until each ends, its deadline passes, or ``stop``."""

    def __init__(self, steps: Mapping[K, Step]) -> None:
        self.pending: dict[K, Step] = dict(steps)
        self.finished: dict[K, Step] = {}
        self.expired: dict[K, Step] = {}

    def run(
        self,
        stop: Callable[[], bool] = lambda: False,
        *,
        stop_on_error: bool = False,
    ) -> None:
        readable: set[int] = set()
        writable: set[int] = set()
        while self.pending:
            self.advance(readable, writable)
            if not self.pending or stop():
                return
            if stop_on_error and any(s.error for s in self.finished.values()):
                return
            now = time.monotonic()
            deadline = min(s.deadline for s in self.pending.values())
            wants = [s.want for s in self.pending.values() if s.want is not None]
            readable, writable = select_fds(wants, min(MAX_WAIT, deadline - now))

    def advance(self, readable: set[int], writable: set[int]) -> None:
        """Advance the steps whose sockets are ready; expire those past their deadline
        (or carry them on as their ``on_expire`` says)."""
        now = time.monotonic()
        for key, step in list(self.pending.items()):
            if step.ready(readable, writable) and step.advance():
                self.finished[key] = self.pending.pop(key)
            elif now >= step.deadline:
                follow = step.expire()
                if follow is None:
                    self.expired[key] = self.pending.pop(key)
                else:
                    self.pending[key] = follow
