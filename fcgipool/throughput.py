"""How many requests the children finish a second while work waits: what one child more
added, measured, where the CPU meters can only guess (the autoscaler's trial, scaling.py).

While requests wait for a child every child is busy, so the requests finished a second are
the pool's capacity at its size. The CPU meters (hostcpu.py) say when the CPUs look full,
but not whether a child more would win the children a larger part of CPUs shared with the
web server, the pool and everything else on the host: measured on 2 cores, both read full
with 2 QGIS children serving a map viewer's burst (0.97 busy, the children's share 0.87),
yet 4 children served 6.5 % more tiles.

The rate covers only the intervals between two ticks at both ends of which work waited,
decaying over :data:`MEMORY` seconds of them, and starts over whenever the number of
children serving or starting changes: it is the rate of the pool as it is now. One
sample a tick, two integers and a float: no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable

MEMORY = 20.0  # seconds of waiting the rate mostly follows (a load that changes shows)


class Throughput:
    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.size: Hashable = None  # what the rate is of (the children serving and starting)
        self.last: tuple[float, int, bool] | None = None  # (time, finished, waiting)
        self.span = 0.0  # seconds of waiting seen at this size, not decayed ...
        self.count = 0  # ... and the requests finished in them
        self.seconds = self.finished = 0.0  # decayed sums

    def sample(self, finished: int, waiting: bool, size: Hashable) -> None:
        """At every tick: the running total of requests the children finished, whether work
        waits now, and the pool's size now (another than the last starts the rate over)."""
        now = self.clock()
        if size != self.size:
            self.size, self.last = size, None
            self.span = self.seconds = self.finished = 0.0
            self.count = 0
        if self.last is not None:
            then, before, waited = self.last
            seconds = now - then
            if waited and waiting and seconds > 0:
                keep = math.exp(-seconds / MEMORY)
                self.seconds = self.seconds * keep + seconds
                self.finished = self.finished * keep + (finished - before)
                self.span += seconds
                self.count += finished - before
        self.last = (now, finished, waiting)

    def rate(self) -> float | None:
        """Requests finished a second while work waited, at this size; None before any."""
        return self.finished / self.seconds if self.seconds > 0 else None
