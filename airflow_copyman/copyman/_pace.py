"""The bandwidth cap: when the copy may read its producer, and how much.

Two rules, both at the cap's rate: a token bucket that starts empty and holds at most one
read's worth (``step``, an eighth of a second's worth at most) spreads the reads evenly
instead of in bursts, and keeps the average since the start at most the cap; and a log of
the last second's reads refuses any read that could take that second over the cap (after a
pause the bucket alone would allow a second's worth plus a read). So the copy moves at most
the cap in every one-second window and on average since it started, as long as no read
returns more than it was asked for (statement producers never do, unless one record alone
is larger than a read's share). A batch larger than asked for is still paid in full: the
copy then waits longer, and the average holds.
"""

from __future__ import annotations

import math
from collections import deque

#: A read takes at most this fraction of a second's worth of the cap.
SLICES = 8
#: The window the cap holds for, in seconds.
WINDOW = 1.0


class Pace:
    """Reads of at most ``step`` bytes, never more than ``rate`` bytes in any second."""

    def __init__(self, rate: float, batch_bytes: int) -> None:
        self.rate = float(rate)
        self.step = max(1, min(batch_bytes, math.floor(self.rate / SLICES)))
        self._tokens = 0.0  # the first read waits for its share too
        self._at: float | None = None
        self._reads: deque[tuple[float, int]] = deque()  # (when, bytes) in the window
        self._in_window = 0

    def delay(self, now: float) -> float:
        """Seconds until a read of ``step`` bytes may start (0: now)."""
        reads = self._reads
        while reads and reads[0][0] <= now - WINDOW:
            self._in_window -= reads.popleft()[1]
        if self._at is not None:
            self._tokens = min(float(self.step), self._tokens + (now - self._at) * self.rate)
        self._at = now
        wait = max(0.0, (self.step - self._tokens) / self.rate)
        excess = self._in_window + self.step - self.rate
        if reads and excess > 0:
            # Wait until enough of the window's reads have left it.
            freed = 0
            for when, nbytes in reads:  # noqa: B007 - the last one looked at is wanted
                freed += nbytes
                if freed >= excess:
                    break
            wait = max(wait, when + WINDOW - now)
        return wait

    def spent(self, now: float, nbytes: int) -> None:
        """A read that started at ``now`` (after ``delay(now)`` said 0) moved ``nbytes``."""
        self._tokens -= nbytes
        self._reads.append((now, nbytes))
        self._in_window += nbytes
