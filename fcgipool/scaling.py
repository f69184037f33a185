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

The CPU meters only guess: the CPUs are shared with nginx, the pool and the rest of the
host, and the children's part of them grows with their number (on another 2-core VM 2 QGIS
children read them full, 0.97 busy and a share of 0.87, yet 4 served a map viewer's burst
4-18 % faster, at a p99 of 618-947 ms where 2 gave 1,138-1,292). So while one holds back a
child the waiting work asks for, a child is tried (:class:`Trial`): once the pool has
waited TRIAL_SPAN seconds at its size (throughput.Throughput, no child starting), one is
started; once it is ready it serves and is parked in turns of TRIAL_ARM seconds of
waiting, until each side has TRIAL_SPAN. It stays unless the requests finished a second
with it were fewer than without (TRIAL_GAIN: none more is asked, as the median rate misses
what more children are for; measured with 2 and 4 QGIS children on 2 cores, the median rate
of the half-seconds in which tiles waited was alike, 130-144 tiles a second, but 2 dipped
more when something else took the CPUs: 72-80 in the lowest 5 % against 112, and that is
the p99). The next may then be tried; else it goes (parked, so
idle: Children.shrink) and the next trial waits TRIAL_HOLD, doubling with each failure in a
row until an idle child is retired (the load changed). Nothing else is decided meanwhile.

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
from .throughput import Throughput

if TYPE_CHECKING:
    from .child import Child
    from .children import Children
    from .config import Config

log = logs.get("fcgipool.dispatch")
SPARE = 1  # children kept beyond what the arriving work needs (a surplus above is retired)
WAITED_SHARE = 0.05  # ... while no more than this share of the work waited for a child
LEFT_MARGIN = 0.1  # seconds of work per serving child (a tick's) the forecast must leave
TRIAL_SPAN = 10.0  # seconds of waiting at a size before a trial, and with and without its child
TRIAL_ARM = 2.5  # seconds of waiting each turn with or without the child tried lasts
TRIAL_GAIN = 0.0  # what a child tried must add to the requests finished a second to stay
TRIAL_HOLD = 60.0  # seconds after a tried child added nothing before the next trial ...
TRIAL_HOLD_MAX = 960.0  # ... doubling with each in a row, up to this
TRIAL_QUIET = 10.0  # seconds with nothing waiting that end a trial (the load went): undecided
TRIAL_READY = 30.0  # seconds the child tried may take to be ready (it fails to start): undecided
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
    def park(self, child: Child) -> None:
        """Keep ``child`` out of the idle stack (a trial's turn without it)."""
    def unpark(self, serve: bool = True) -> None:
        """The parked child serves again (``serve``), or is left to be retired."""


class Trial:
    """A child started past a CPU hold, being measured. In turns it serves and is parked
    (out of the idle stack: the others serve alone), so that what the load and the host do
    over seconds falls on both sides alike: on a 2-core VM the rate at one size moved from
    190 to 143 tiles a second within a minute, more than a child's gain."""

    def __init__(self, size: int, at: float, rate_before: float) -> None:
        self.size, self.at, self.waited_at = size, at, at  # children serving with it
        self.rate_before = rate_before  # the pool's rate when it was started
        self.child: Child | None = None  # the youngest once it is ready: the one parked
        self.parked = False
        self.seconds = {True: 0.0, False: 0.0}  # of waiting with the child and without
        self.finished = {True: 0, False: 0}  # requests finished meanwhile

    def rate(self, side: bool) -> float:
        return self.finished[side] / self.seconds[side] if self.seconds[side] else 0.0


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
        self.throughput = Throughput(clock)  # requests finished a second while work waits
        self.trial: Trial | None = None  # a child started past the CPU holds, measured
        self.trials = {"kept": 0, "retired": 0}
        self.failed_trials = 0  # in a row
        self.next_trial_at = 0.0
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
            if self.trial is not None:
                self._end_trial("undecided")
            return
        waiting = self.dispatcher.waiting > 0
        cpu = self.cpu_busy(waiting) if self.max_cpu < 1 else None  # sampled every tick
        self.share = self.cpu_share.update(children.cpu_ms / 1000, children.run_seconds)
        parked = self.trial is not None and self.trial.parked
        size = (children.serving() - parked, children.starting())
        self.throughput.sample(children.finished, waiting, size)
        if self.trial is not None:
            self._run_trial(waiting)  # nothing else is decided meanwhile
            return
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
                if self._may_try(serving, in_start):
                    self._try(held, backlog, serving, predicted_wait)
                    return
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

    def _may_try(self, serving: int, starting: int) -> bool:
        """A child more may be tried past the CPU holds: none is being tried or starting,
        the last one tried that added nothing was a while ago, and the pool's rate at its
        size now is known (TRIAL_SPAN seconds of waiting)."""
        return (
            self.trial is None
            and not starting
            and self.clock() >= self.next_trial_at
            and self.throughput.size == (serving, 0)
            and self.throughput.span >= TRIAL_SPAN
            and (not self.max_memory or self._memory_allows(0))
        )

    def _try(self, held: dict[str, object], backlog: float, serving: int, wait: float) -> None:
        rate = self.throughput.rate() or 0.0
        numbers = {"rate_before": round(rate, 2), "serving": serving, "backlog": round(backlog, 3),
                   "predicted_wait": round(wait, 3)}  # fmt: skip
        if isinstance(held.get("cpu_busy"), float):
            numbers["cpu_busy"] = held["cpu_busy"]  # type: ignore[assignment]
        if self.share is not None:
            numbers["cpu_share"] = round(self.share, 3)
        log.debug("scale_up", reason="trial", held=held["reason"], **numbers,
                  workers=self.children.workers + 1)  # fmt: skip
        now = self.changed_at = self.clock()
        self.trial = Trial(serving + 1, now, rate)
        self.children.grow("trial", numbers)

    def _run_trial(self, waiting: bool) -> None:
        """One tick of the trial: once the child tried is ready, turns with it serving and
        parked (TRIAL_ARM seconds of waiting each), until each side has TRIAL_SPAN; then it
        stays if the requests finished a second with it are TRIAL_GAIN more than without,
        else it goes (parked, so idle) and the next trial waits (TRIAL_HOLD, doubling)."""
        trial, children, now = self.trial, self.children, self.clock()
        assert trial is not None
        if waiting:
            trial.waited_at = now
        child = trial.child
        if now - trial.waited_at > TRIAL_QUIET or (child is not None and (
                child.state is State.DEAD or child.retiring)):  # fmt: skip
            self._end_trial("undecided")  # the load went, or the child did
            return
        if child is None:
            if now - trial.at > TRIAL_READY:
                self._end_trial("undecided")  # it does not start: the rules above go on
                return
            if children.serving() < trial.size or children.starting():
                return  # not ready yet
            ready = [c for c in children.active() if c.state in (State.IDLE, State.BUSY)]
            trial.child = max(ready, key=lambda c: c.started_at)  # the youngest is parked
            return
        # A switch changes the meter's size (the parked child is not counted), so its
        # span and count are this turn's; the first tick after a switch is the switch's.
        turn = self.throughput
        if turn.span < TRIAL_ARM:
            return
        side = not trial.parked  # True: with the child serving
        trial.seconds[side] += turn.span
        trial.finished[side] += turn.count
        if trial.parked and min(trial.seconds.values()) >= TRIAL_SPAN:
            self._judge(trial)
        elif trial.parked:
            trial.parked = False
            self.dispatcher.unpark()
        else:
            trial.parked = True
            self.dispatcher.park(child)

    def _judge(self, trial: Trial) -> None:
        with_child, without = trial.rate(True), trial.rate(False)
        gain = with_child / without - 1 if without > 0 else 1.0
        numbers = {"rate_with": round(with_child, 2), "rate_without": round(without, 2),
                   "gain": round(gain, 3), "min_gain": TRIAL_GAIN}  # fmt: skip
        if gain >= TRIAL_GAIN:
            self._end_trial("kept", numbers)
            return
        now = self.changed_at = self.clock()
        self.failed_trials += 1
        hold = min(TRIAL_HOLD_MAX, TRIAL_HOLD * 2 ** (self.failed_trials - 1))
        self.next_trial_at = now + hold
        numbers["next_trial_in"] = hold
        child = trial.child
        assert child is not None
        self._end_trial("retired", numbers)
        log.debug("scale_down", reason="trial_no_gain", pid=child.pid, **numbers,
                  workers=self.children.workers - 1)  # fmt: skip
        self.children.shrink(child, "trial_no_gain", numbers)

    def _end_trial(self, outcome: str, numbers: dict[str, float] | None = None) -> None:
        """The trial is over: its child serves again, unless it is to be retired."""
        trial = self.trial
        assert trial is not None
        self.trial = None
        if trial.parked:
            self.dispatcher.unpark(serve=outcome != "retired")
        if outcome in self.trials:
            self.trials[outcome] += 1
        if outcome == "kept":
            self.failed_trials = 0
        log.debug("scale_trial", outcome=outcome, seconds=round(self.clock() - trial.at, 3),
                  **(numbers or {}), workers=self.children.workers)  # fmt: skip

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
        self.failed_trials = 0  # the load changed: what a child more adds may have too
        log.debug("scale_down", reason=reason, pid=child.pid, **numbers,
                  workers=self.children.workers - 1)  # fmt: skip
        self.changed_at = self.clock()
        self.children.retire_idle(child, reason, numbers)
