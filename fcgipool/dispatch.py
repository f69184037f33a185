"""Admission and picking: idle children, one bounded FIFO of waiting requests.

A request goes to an idle child only (a child's socket accepts connections into its backlog
even while it is busy, so a connect proves nothing). When none is idle it waits, up to
``max_waiting`` requests and ``queue_timeout`` seconds; past either it gets a 503 at once.
"""

from __future__ import annotations

import time
from collections import deque
from typing import TYPE_CHECKING

from . import logs

if TYPE_CHECKING:
    from .child import Child
    from .config import LimitsSection
    from .request import Request

log = logs.get("fcgipool.dispatch")


class Dispatcher:
    def __init__(self, limits: LimitsSection) -> None:
        self.limits = limits
        self.idle: list[Child] = []  # a stack: the child used last is warmest
        self.waiting: deque[Request] = deque()
        self.rejected = 0
        self.expired = 0

    def submit(self, request: Request, first: bool = False) -> None:
        """Start ``request`` on an idle child, else queue it. ``first`` puts a request that
        is being retried at the head of the queue, past the bound: it was admitted before."""
        if self.idle:
            request.start(self.idle.pop())
            return
        if first:
            request.queued_at = time.monotonic()
            self.waiting.appendleft(request)
            return
        if len(self.waiting) >= self.limits.max_waiting:
            self.rejected += 1
            log.warning("queue_full", waiting=len(self.waiting), uri=request.uri)
            self._unavailable(request, b"All children are busy and the queue is full\n")
            return
        request.queued_at = time.monotonic()
        self.waiting.append(request)

    def child_idle(self, child: Child) -> None:
        """A child is free: give it the oldest waiting request, else keep it."""
        if self.waiting:
            self.waiting.popleft().start(child)
        else:
            self.idle.append(child)

    def forget(self, child: Child) -> None:
        if child in self.idle:
            self.idle.remove(child)

    def withdraw(self, request: Request) -> None:
        if request in self.waiting:
            self.waiting.remove(request)

    def fail_waiting(self, body: bytes) -> None:
        """Answer every waiting request with a 503 (the pool is stopping)."""
        while self.waiting:
            request = self.waiting.popleft()
            request.respond(503, body)

    def expire(self, now: float) -> None:
        """Answer 503 to the requests that waited longer than queue_timeout. The queue is
        in arrival order, so only its head needs looking at (called a few times a second,
        instead of a timer per request)."""
        limit = now - self.limits.queue_timeout
        while self.waiting and self.waiting[0].queued_at < limit:
            request = self.waiting.popleft()
            self.expired += 1
            log.warning("queue_timeout", uri=request.uri, seconds=self.limits.queue_timeout)
            self._unavailable(request, b"No child became free in time\n")

    def _unavailable(self, request: Request, body: bytes) -> None:
        request.respond(503, body, (("Retry-After", str(self.limits.retry_after)),))
