"""How busy the CPUs the pool may run on are while work waits: whether one more child could
add capacity.

A child more serves CPU-bound work no sooner when every CPU is already busy, and its start
(about a CPU-second for QGIS) takes CPU from the children serving. What tells is the CPU
while requests wait for a child: a map viewer's burst saturates 2 cores with 2 QGIS
children while its tiles queue, then leaves them idle for its think time, so a fraction
over all of the last second (0.7-0.85 measured) says CPU is free that the burst never
finds; in those seconds a third and fourth child were started and their starts slowed
every tile for 1-2 s. So the fraction covers only the intervals between two samples at
both ends of which work waited, within the last :data:`WINDOW`. The autoscaler samples at
every tick of an adaptive pool (scaling.py): one read of /proc/stat (about 20 us on 2 CPUs)
ten times a second, bounded on the supervisor's loop; a fixed pool never reads it.

The host's CPUs can look free while the children cannot use them: between two of a burst's
requests a child is idle for the round trip through the pool, so 2 CPU-bound QGIS children
on 2 cores read 0.66-0.85 busy while tiles waited, and a third child added there ran a
300 s burst at a p99 of 560-600 ms where 2 gave 490. What the children themselves say is
plainer: the CPU time of each request (log.request_cost) against its run time. They spent
0.86 of it on CPU with 2 children, 0.60 with 3 and 0.46 with 4, the CPUs being shared.
:class:`CpuShare` keeps that share, so the autoscaler can count the CPUs the serving
children take (serving x share) and hold a child more that would find less than half a CPU.
"""

from __future__ import annotations

import collections
import math
import os
from collections.abc import Callable

WINDOW = 1.0  # seconds: the waiting intervals within this count; shorter than a child's start
MIN_SPAN = 0.09  # seconds of waiting intervals (one tick): less, and 10 ms ticks say too little
STAT = "/proc/stat"
SHARE_MEMORY = 5.0  # seconds of the children's run time the share mostly follows
SHARE_MIN_RUN = 1.0  # seconds of run time seen: less, and the share is unknown


def read_stat(path: str = STAT) -> dict[int, tuple[int, int]]:
    """Per CPU: (busy, total) clock ticks since boot. Busy is all but idle and iowait (a
    CPU waiting on I/O could run a child)."""
    ticks: dict[int, tuple[int, int]] = {}
    with open(path, "rb") as stat:
        for line in stat:
            if not line.startswith(b"cpu") or line[3:4] == b" ":
                continue
            name, *fields = line.split()
            values = [int(field) for field in fields[:8]]  # guest time is within user time
            idle = values[3] + (values[4] if len(values) > 4 else 0)
            total = sum(values)
            ticks[int(name[3:])] = (total - idle, total)
    return ticks


class CpuMeter:
    """The busy fraction (0-1) of this process's CPUs (its affinity) over the intervals in
    the last WINDOW seconds in which work waited, from a sample taken at each call (the
    autoscaler calls every tick, saying whether work waits)."""

    def __init__(
        self,
        clock: Callable[[], float],
        read: Callable[[], dict[int, tuple[int, int]]] = read_stat,
        cpus: set[int] | None = None,
    ) -> None:
        self.clock = clock
        self.read = read
        self.cpus = cpus if cpus is not None else os.sched_getaffinity(0)
        self.last: tuple[float, int, int, bool] | None = None  # (time, busy, total, waiting)
        # (start, seconds, busy ticks, total ticks) of each waiting interval in the window
        self.intervals: collections.deque[tuple[float, float, int, int]] = collections.deque()

    def busy(self, waiting: bool) -> float | None:
        """None while the waiting intervals in the window span less than MIN_SPAN (work did
        not wait lately, or only just began to), or when /proc/stat cannot be read."""
        now = self.clock()
        try:
            per_cpu = self.read()
        except (OSError, ValueError, IndexError):
            self.last = None
            return None
        busy_ticks = total_ticks = 0
        for cpu in self.cpus:
            cpu_busy, cpu_total = per_cpu.get(cpu, (0, 0))
            busy_ticks, total_ticks = busy_ticks + cpu_busy, total_ticks + cpu_total
        intervals = self.intervals
        if self.last is not None:
            then, old_busy, old_total, waited = self.last
            if waited and waiting and total_ticks > old_total:
                intervals.append((then, now - then, busy_ticks - old_busy, total_ticks - old_total))
        self.last = (now, busy_ticks, total_ticks, waiting)
        while intervals and intervals[0][0] < now - WINDOW:
            intervals.popleft()  # began before the window: bounded, ten a second at most
        span = busy = total = 0.0
        for _, seconds, interval_busy, interval_total in intervals:
            span, busy, total = span + seconds, busy + interval_busy, total + interval_total
        return busy / total if span >= MIN_SPAN else None


class CpuShare:
    """The share of their run time the children spent on CPU, decaying over the last
    SHARE_MEMORY seconds of run time (not of wall time: an idle hour keeps what the last
    burst taught), from the running totals that children.py adds to at each request's end."""

    def __init__(self) -> None:
        self.seen = (0.0, 0.0)  # the totals at the last update: (CPU, run) seconds
        self.cpu = self.run = 0.0  # decayed sums

    def update(self, cpu_total: float, run_total: float) -> float | None:
        """The share after the totals moved to these (above 1 for children that compute on
        several threads at once); None until SHARE_MIN_RUN."""
        cpu, run = cpu_total - self.seen[0], run_total - self.seen[1]
        if run > 0:
            self.seen = (cpu_total, run_total)
            keep = math.exp(-run / SHARE_MEMORY)
            self.cpu, self.run = self.cpu * keep + cpu, self.run * keep + run
        return self.cpu / self.run if self.run >= SHARE_MIN_RUN else None
