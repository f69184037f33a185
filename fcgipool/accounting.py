"""What the pool has done, counted: requests by status and class, durations, queue waits,
bytes, child restarts by reason; and the access log, one line per request.

Per request the pool only adds to plain counters (well under a microsecond); metrics.py
turns them into Prometheus families when scraped, and the status document reads them.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING

from . import logs
from .metrics import BUCKETS, Histogram

if TYPE_CHECKING:
    from .request import Request


class Accounting:
    def __init__(self, clock: Callable[[], float], access_log: bool = True) -> None:
        self.clock = clock
        self.access_log = access_log
        self.requests_served = 0
        self.requests: dict[tuple[int, str], int] = {}  # (status, class) -> answered
        self.duration: dict[str, Histogram] = {}
        self.queue_wait: dict[str, Histogram] = {}
        self.cpu: dict[str, Histogram] = {}  # children's CPU seconds per request (request_cost)
        self.response_bytes = 0
        self.restarts: Counter[str] = Counter()  # children replaced, by reason

    def restarted(self, reason: str, count: int = 1) -> None:
        self.restarts[reason] += count

    def request_done(self, request: Request) -> None:
        """Every request ends here once: count it, time it, log it."""
        now = self.clock()
        self.requests_served += 1
        duration = now - request.created
        wait = (request.started or now) - request.created
        self.observe(request.status, request.request_class, duration, wait, request.bytes_out)
        if request.cpu_ms is not None:
            self.observe_cpu(request.request_class, request.cpu_ms / 1000)
        if self.access_log:
            get = request.params.get
            logs.access((
                request.id,
                get(b"REMOTE_ADDR", b"").decode("latin-1"),
                get(b"REQUEST_METHOD", b"").decode("latin-1"),
                request.uri,
                request.project,
                request.request_class,
                request.served_by or None,
                wait * 1000,
                duration * 1000,
                request.status,
                request.bytes_out,
                request.cpu_ms,
                request.rss_mib,
            ))  # fmt: skip

    def observe_cpu(self, klass: str, seconds: float) -> None:
        histogram = self.cpu.get(klass)
        if histogram is None:
            histogram = self.cpu[klass] = Histogram()
        histogram.observe(seconds)

    def observe(self, status: int, klass: str, duration: float, wait: float, size: int) -> None:
        key = (status, klass)
        self.requests[key] = self.requests.get(key, 0) + 1
        histogram = self.duration.get(klass)
        if histogram is None:
            histogram = self.duration[klass] = Histogram()
            self.queue_wait[klass] = Histogram()
        histogram.counts[bisect_left(BUCKETS, duration)] += 1  # Histogram.observe, inlined
        histogram.total += duration
        waits = self.queue_wait[klass]
        waits.counts[bisect_left(BUCKETS, wait)] += 1
        waits.total += wait
        self.response_bytes += size
