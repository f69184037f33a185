"""Adaptive children: when one more is worth starting, when an idle one may go.

The :class:`Autoscaler` decides; children.py, the only writer of a child's state, carries
the decisions out (:meth:`Children.grow`, :meth:`Children.retire_idle`). It is asked every
tick of the supervisor (0.1 s), so a decision reads only what is in memory: the children's
states, their last RSS samples, the dispatcher's waiting work. O(children), no I/O.

Up: work waits, and a new child would still find work waiting once it is ready (its start
time is learned: spawn to ready, probe and warm-up included). Either the waiting work,
spread over the children that serve it, would wait longer than a start::

    dispatcher.backlog() / max(1, serving) > children.start_seconds

or the work arriving (``dispatcher.demand()``, in children: predicted seconds admitted per
second) outpaces the serving children so that some is still waiting after a start, more
than the serving children do in a tick (LEFT_MARGIN each)::

    backlog + (demand - serving) * start_seconds > serving * LEFT_MARGIN

and the pool is under ``pool.max_workers``, fewer than ``pool.max_starting`` children are
starting (those a respawn backoff holds back count as starting), no idle child could take
the waiting work (an idle child with work waiting is held back by a class or client limit,
which one more child does not lift, unless it is kept free: a class's ``reserved``, or
the children kept for short requests), the CPUs the pool may run on were not busier than
``pool.max_cpu`` while work waited lately, and left at least MIN_FREE_CPUS (half a CPU)
free meanwhile, each child starting counted as a CPU taken (hostcpu.py). Nor may the
serving children take so much CPU that less than that is left: ``serving x share`` CPUs,
the share being that of their run time they spent on CPU (hostcpu.CpuShare, from the
request costs). When either says so the children are CPU-bound: one more would serve no
sooner, and its start would slow those serving. Measured on 2 cores: 2 QGIS children
serve a map viewer's burst of tiles as fast as 4 (3 serve it worse), and one serving with
one starting fill both; 0.3 s into a start the CPUs read only 0.66 busy, and a second
start then made both take 1.1-1.3 s, not 0.8. And ``pool.max_memory`` leaves room for
one more child as large as the largest.

The tick's margin: a forecast that close to none is noise, and a start is not. On 2 cores,
a map viewer's view waiting (0.45 s of tiles over 2 children keeping up, 1.5 children of
work arriving) forecast 0.04 s left; the third child it started ran the rest of a 300 s
burst at a p99 of 603 ms, where 2 children had 490 and a fixed 4 478.

Down, while nothing waits and the pool is above ``pool.min_workers``: the child idle longest
(the bottom of the dispatcher's idle stack: the one used last is at the top) is retired
when it has been idle for ``pool.idle_timeout``, or when the pool has more children than
the arriving work needs with one to spare::

    workers > ceil(dispatcher.demand()) + SPARE

while the children served the arrivals as they came (no more than WAITED_SHARE of the work
admitted lately waited for a child: a map viewer's bursts of tiles queue, and keep the
children they use) and no child was started or retired by the autoscaler for
``idle_timeout`` (the demand and the share are averaged over 10-20 s: they must see the
pool at its new size). The second is for a steady load: requests arriving at random
overlap now and then, and the idle stack hands the overlapping ones to the lower children,
so a child that a load of half a child's time never needs still takes a request every few
seconds and is never idle for ``idle_timeout`` (measured: 20 tiles a second, half a core of
QGIS, kept 2.7 children of 4, though 2 serve it with the same p99 as 4). Growth does not
undo it: with a spare child the arriving work is below what the serving ones do, so only
a backlog of a start's worth adds one. At most one decision a tick.

Not while a reload replaces the children or the pool stops (the supervisor only asks while
it runs). Each decision logs one debug line on ``fcgipool.dispatch``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from . import logs
from .child import State
from .children import START_SECONDS
from .hostcpu import CpuShare

if TYPE_CHECKING:
    from .child import Child
    from .children import Children
    from .config import Config

log = logs.get("fcgipool.dispatch")
SPARE = 1  # children kept beyond what the arriving work needs (a surplus above is retired)
WAITED_SHARE = 0.05  # ... while no more than this share of the work waited for a child
LEFT_MARGIN = 0.1  # seconds of work per serving child (a tick's) the forecast must leave
MIN_FREE_CPUS = 0.5  # CPUs left free while work waited: less, and a child more would get
# less than half a CPU (on 2 CPUs: busier than 0.75; pool.max_cpu decides on 5 or more)


class Waiting(Protocol):
    """The dispatcher, as the autoscaler sees it."""

    @property
    def waiting(self) -> int: ...
    @property
    def idle(self) -> list[Child]: ...
    def kept_free(self) -> int:
        """Idle children kept for requests that are not waiting (reservations)."""
    def backlog(self) -> float:
        """Predicted seconds of work of every waiting request."""
    def demand(self) -> float:
        """Children the arriving work needs (predicted seconds admitted per second)."""
    def waited_share(self) -> float:
        """The share of the work admitted lately that waited for a child."""


class Autoscaler:
    def __init__(
        self,
        config: Config,
        children: Children,
        dispatcher: Waiting,
        clock: Callable[[], float],
        cpu_busy: Callable[[bool], float | None],
        cpus: int,
    ) -> None:
        self.children = children
        self.dispatcher = dispatcher
        self.clock = clock
        self.cpu_busy = cpu_busy
        self.cpus = cpus
        self.held_by_cpu = False  # growth is held back by busy CPUs (logged once a spell)
        self.cpu_share = CpuShare()  # of the children's run time, from the request costs
        self.share: float | None = None  # its last value (None: unknown)
        self.changed_at = clock()  # the last child started or retired by a decision here
        self.configure(config)

    def configure(self, config: Config) -> None:
        pool = config.pool
        self.idle_timeout = pool.idle_timeout
        self.max_starting = pool.max_starting
        self.max_cpu = pool.max_cpu
        self.max_memory = int(pool.max_memory)

    def start_seconds(self) -> float:
        learned = self.children.start_seconds
        return START_SECONDS if learned is None else learned

    def tick(self) -> None:
        """At most one decision: a child more, or an idle one fewer."""
        children = self.children
        if children.stopping or children.replacing or children.minimum == children.maximum:
            return
        waiting = self.dispatcher.waiting > 0
        cpu = self.cpu_busy(waiting) if self.max_cpu < 1 else None  # sampled every tick
        self.share = self.cpu_share.update(children.cpu_ms / 1000, children.run_seconds)
        if waiting:
            self._maybe_grow(cpu)
            return
        self.held_by_cpu = False
        if children.workers > children.minimum:
            self._maybe_retire()

    def _maybe_grow(self, cpu: float | None) -> None:
        children, dispatcher = self.children, self.dispatcher
        if children.workers >= children.maximum:
            return
        starting = children.starting() + children.missing()  # a backoff holds some back
        if starting >= self.max_starting:
            return
        if len(dispatcher.idle) > dispatcher.kept_free():
            return  # an idle child could start the work: limits hold it, not capacity
        serving = children.serving()
        backlog = dispatcher.backlog()
        predicted_wait = backlog / max(1, serving)
        start_seconds = self.start_seconds()
        demand = dispatcher.demand()
        # The work still waiting when a new child would be ready: what waits now, plus
        # what arrives meanwhile, less what the serving children do meanwhile.
        left = backlog + (demand - serving) * start_seconds
        if predicted_wait <= start_seconds and left <= serving * LEFT_MARGIN:
            return
        if self.max_cpu < 1:
            # A start is CPU-bound (QGIS: 0.7-1 s of a CPU), and the meter has seen little
            # of one begun a moment ago: each child starting counts as a CPU taken.
            in_start = children.starting()
            held = None
            if cpu is not None:
                free = (1 - cpu) * self.cpus - in_start
                if cpu > self.max_cpu or free < MIN_FREE_CPUS:
                    held = {"reason": "cpu_busy", "cpu_busy": round(cpu, 3),
                            "max_cpu": self.max_cpu}  # fmt: skip
            if held is None and self.share is not None:
                free = self.cpus - serving * self.share - in_start
                if free < MIN_FREE_CPUS:
                    held = {"reason": "children_cpu_bound", "cpu_share": round(self.share, 3)}
            if held is not None:
                if not self.held_by_cpu:
                    self.held_by_cpu = True
                    log.debug("scale_up_held", **held, cpus=self.cpus, cpus_free=round(free, 3),
                              starting=in_start, backlog=round(backlog, 3), serving=serving,
                              predicted_wait=round(predicted_wait, 3))  # fmt: skip
                return
        self.held_by_cpu = False
        if self.max_memory and not self._memory_allows(starting):
            return
        numbers = {
            "backlog": round(backlog, 3),
            "serving": serving,
            "predicted_wait": round(predicted_wait, 3),
            "start_seconds": round(start_seconds, 3),
            "demand": round(demand, 3),
            "left_at_ready": round(left, 3),
        }
        if cpu is not None:
            numbers["cpu_busy"] = round(cpu, 3)
        if self.share is not None and self.max_cpu < 1:
            numbers["cpu_share"] = round(self.share, 3)
        log.debug("scale_up", **numbers, workers=children.workers + 1)
        self.changed_at = self.clock()
        children.grow("predicted_wait", numbers)

    def _memory_allows(self, starting: int) -> bool:
        """The sampled RSS of the living children, with each starting one (not sampled yet)
        and the one to start counted as large as the largest, stays within the budget."""
        total = largest = 0
        for child in self.children.all:
            if child.state is not State.STARTING and child.state is not State.DEAD:
                total += child.rss
                largest = max(largest, child.rss)
        return total + largest * (starting + 1) <= self.max_memory

    def _maybe_retire(self) -> None:
        now = self.clock()
        coldest = None
        for child in self.dispatcher.idle:  # the bottom of the stack: idle longest
            if child.state is State.IDLE and not child.retiring:
                coldest = child
                break
        if coldest is None:
            return
        idle = now - coldest.idle_since
        if idle >= self.idle_timeout:
            self._retire(coldest, "idle_timeout", {"idle_seconds": round(idle, 3)})
            return
        if now - self.changed_at < self.idle_timeout:
            return
        demand = self.dispatcher.demand()
        needed = math.ceil(demand) + SPARE
        if self.children.workers <= needed:
            return
        waited = self.dispatcher.waited_share()
        if waited <= WAITED_SHARE:
            self._retire(coldest, "surplus", {"demand": round(demand, 3), "needed": needed,
                                              "waited_share": round(waited, 3),
                                              "idle_seconds": round(idle, 3)})  # fmt: skip

    def _retire(self, child: Child, reason: str, numbers: dict[str, float]) -> None:
        log.debug("scale_down", reason=reason, pid=child.pid, **numbers,
                  workers=self.children.workers - 1)  # fmt: skip
        self.changed_at = self.clock()
        self.children.retire_idle(child, reason, numbers)
