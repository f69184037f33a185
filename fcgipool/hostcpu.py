"""How busy the CPUs the pool may run on are: whether one more child could add capacity.

A child more serves CPU-bound work no sooner when every CPU is already busy, and its start
(about a CPU-second for QGIS) takes CPU from the children serving. The autoscaler asks here
at every tick of an adaptive pool (scaling.py), so that the fraction always covers the last
:data:`WINDOW`: one read of /proc/stat (about 20 us on 2 CPUs) ten times a second, bounded
on the supervisor's loop; a fixed pool never reads it.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Callable

WINDOW = 1.0  # seconds the busy fraction covers: a map viewer's think time between views,
# so that its pauses do not read as free CPU; shorter than a child's start
MIN_SPAN = 0.25  # seconds: below this, the ticks in /proc/stat (10 ms) say too little
STAT = "/proc/stat"


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
    """The busy fraction (0-1) of this process's CPUs (its affinity) over the last WINDOW
    seconds, from a sample taken at each call (the autoscaler calls every tick)."""

    def __init__(
        self,
        clock: Callable[[], float],
        read: Callable[[], dict[int, tuple[int, int]]] = read_stat,
        cpus: set[int] | None = None,
    ) -> None:
        self.clock = clock
        self.read = read
        self.cpus = cpus if cpus is not None else os.sched_getaffinity(0)
        self.samples: collections.deque[tuple[float, int, int]] = collections.deque()

    def busy(self) -> float | None:
        """None until samples span MIN_SPAN, or when /proc/stat cannot be read."""
        now = self.clock()
        try:
            per_cpu = self.read()
        except (OSError, ValueError, IndexError):
            return None
        busy_ticks = total_ticks = 0
        for cpu in self.cpus:
            cpu_busy, cpu_total = per_cpu.get(cpu, (0, 0))
            busy_ticks, total_ticks = busy_ticks + cpu_busy, total_ticks + cpu_total
        samples = self.samples
        samples.append((now, busy_ticks, total_ticks))
        while len(samples) > 2 and samples[1][0] <= now - WINDOW:
            samples.popleft()  # the oldest left is the last at or before the window's start
        then, old_busy, old_total = samples[0]
        if now - then < MIN_SPAN or total_ticks <= old_total:
            return None
        return (busy_ticks - old_busy) / (total_ticks - old_total)
