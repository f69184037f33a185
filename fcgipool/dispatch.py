"""Admission and picking: per-class queues, predicted waits, cost order, limits,
reservations, affinity.

A request goes to an idle child only (a child's socket accepts connections into its backlog
even while it is busy, so a connect proves nothing). It may start when its class is under
``max_children``, its client under ``limits.max_per_client``, and enough idle children stay
for those kept free: the classes' ``reserved`` children, or, by default, the children that
short requests have needed lately (a long request never takes the last ones while short
requests keep arriving). Otherwise it waits in its class's queue.

Whether it may wait is decided by its predicted wait (costs.py learns what each kind of
request costs): the work queued ahead of it divided by the children that may serve it. A
request whose predicted wait is above its queue_timeout is refused at once (503 and
Retry-After), however few wait; otherwise it waits, however many wait, up to
``max_waiting``, the bound on memory. What it admitted still gets a 503 past queue_timeout.

Each queue is ordered by predicted cost, cheapest first, where that starves no one: the
oldest waiting request goes first once it has waited ``tuning.max_reorder_wait``. Between
classes, the highest priority first: when every child is busy on heavy maps, a
GetCapabilities goes first.

Among idle children the one that served the request's project recently is preferred (its
project cache is warm), else the one whose remembered projects are least in demand. When no
idle child holds the project but a busy one does and will be free, with the requests held
for it before, in less than half the project's learned load time, the request is *held*
for that child instead of loading the project on a cold one (``tuning.hold_for_holder``):
a burst of tiles of one slow project waits a few tile times for its warm children instead
of paying a load on twenty cold ones. A held request goes to its class's queue, first,
once it has waited half a load.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter, deque
from collections.abc import Callable, Iterator
from math import frexp
from typing import TYPE_CHECKING

from . import logs
from .child import State, remember
from .costs import CostModel
from .peaks import Peak
from .projects import Projects

if TYPE_CHECKING:
    from .child import Child
    from .classify import Rule
    from .config import Config
    from .request import Request

log = logs.get("fcgipool.dispatch")

PICK_SAMPLE = 4  # idle children weighed against each other for a project none holds
AFFINITY_LOOKAHEAD = 8  # waiting requests looked at for one whose project a child holds
AFFINITY_MAX_WAIT = 2.0  # seconds; a head that waited longer is never passed over
LANES = 16  # cost lanes of a queue: lane n holds predicted costs of 2**(n-1) to 2**n ms
UNKNOWN_COST = 0.1  # seconds a request is assumed to take before anything is learned
SHORT_WINDOW = 10.0  # seconds over which the children used by short requests are averaged
HOLD_SHARE = 0.5  # a request waits for a busy holder only if that beats half a load


def lane(cost: float) -> int:
    """The queue lane of a predicted cost: 0 below 1 ms, then one lane per doubling."""
    return min(LANES - 1, max(0, math.frexp(cost * 1000.0)[1]))


class ClassQueue:
    """The waiting requests and the running count of one request class.

    Waiting requests are kept in lanes by predicted cost, each lane in arrival order, with
    the predicted work of each lane, so that the next request, the oldest and the work
    ahead of a new one are found by looking at the lanes, not at every request.
    """

    def __init__(self, rule: Rule, config: Config) -> None:
        spec = rule.spec
        self.name = rule.name
        self.priority = spec.priority
        self.max_children = spec.max_children
        self.reserved = spec.reserved
        self.max_waiting = (
            spec.max_waiting if spec.max_waiting is not None else config.limits.max_waiting
        )
        self.queue_timeout = spec.queue_timeout or config.limits.queue_timeout
        self.request_timeout = spec.request_timeout or config.timeouts.request
        self.lanes: list[deque[Request]] = [deque() for _ in range(LANES)]
        self.work = [0.0] * LANES  # predicted seconds waiting, per lane
        self.length = 0
        self.unknown = 0  # waiting requests of a kind whose cost nothing predicted (0)
        self.running = 0

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[Request]:
        """The waiting requests, cheapest lane first."""
        return itertools.chain.from_iterable(self.lanes)

    def push(self, request: Request, first: bool = False) -> None:
        n = request.lane
        if first:
            self.lanes[n].appendleft(request)
        else:
            self.lanes[n].append(request)
        self.work[n] += request.cost
        self.length += 1
        if not request.cost:
            self.unknown += 1

    def remove(self, request: Request) -> bool:
        n = request.lane
        try:
            self.lanes[n].remove(request)
        except ValueError:
            return False
        self._removed(n, request)
        return True

    def pop(self, n: int) -> Request:
        request = self.lanes[n].popleft()
        self._removed(n, request)
        return request

    def _removed(self, n: int, request: Request) -> None:
        self.length -= 1
        if not request.cost:
            self.unknown -= 1
        self.work[n] = self.work[n] - request.cost if self.lanes[n] else 0.0

    def take(self, other: ClassQueue) -> None:
        """Take over the waiting requests of ``other`` (a class a reload removed)."""
        for n, waiting in enumerate(other.lanes):
            self.lanes[n].extend(waiting)
            self.work[n] += other.work[n]
        self.length += other.length
        self.unknown += other.unknown
        self.running += other.running

    def oldest(self) -> int:
        """The lane whose head has waited longest; -1 when nothing waits."""
        best, since = -1, math.inf
        for n, waiting in enumerate(self.lanes):
            if waiting and waiting[0].queued_at < since:
                best, since = n, waiting[0].queued_at
        return best

    def cheapest(self) -> int:
        for n, waiting in enumerate(self.lanes):
            if waiting:
                return n
        return -1

    def work_through(self, n: int) -> float:
        """Predicted seconds of the requests that go before a new one in lane ``n``."""
        return sum(self.work[: n + 1])

    @property
    def total_work(self) -> float:
        return sum(self.work)


class Dispatcher:
    def __init__(
        self,
        config: Config,
        rules: list[Rule],
        clock: Callable[[], float],
        costs: CostModel | None = None,
        projects: Projects | None = None,
    ) -> None:
        self.clock = clock
        self.costs = costs if costs is not None else CostModel(config.tuning)
        self.projects = projects if projects is not None else Projects(config, clock)
        self.idle: list[Child] = []  # a stack: the child used last is warmest
        self.parked: Child | None = None  # a ready child kept out of it (park)
        self.members: set[Child] = set()  # ready children, busy or idle, until they stop
        self.classes: dict[str, ClassQueue] = {}
        self.by_priority: list[ClassQueue] = []
        self.clients: Counter[bytes] = Counter()
        self.long_running = 0
        self.short_running = 0
        # Predicted seconds of the short requests started, of every request admitted, and
        # of those admitted that had to wait for a child, in this window and the last one.
        self.short_work = self.short_work_before = 0.0
        self.arriving = self.arriving_before = 0.0
        self.waited = self.waited_before = 0.0
        self.window_ends = 0.0
        self.refused = 0  # refused on predicted wait
        self.queue_full = 0  # refused on the count bound (max_waiting)
        self.peak_waiting = Peak()
        self.peak_busy = Peak()
        self.all_busy = 0  # times a request took the last idle child
        # Requests held for a busy child that holds their project: per project, in order,
        # (deadline, request) and their predicted seconds.
        self.held: dict[str, deque[tuple[float, Request]]] = {}
        self.held_work: dict[str, float] = {}
        self.held_count = 0
        self.holds = 0  # requests held since start
        self.configure(config, rules)

    def configure(self, config: Config, rules: list[Rule]) -> None:
        """(Re)build the classes; waiting requests and counts of kept classes stay."""
        self.limits = config.limits
        tuning = self.tuning = config.tuning
        self.costs.configure(tuning)
        self.by_wait = tuning.admission == "predicted"
        self.ordered = tuning.order_by_cost
        self.long_request = tuning.long_request
        self.debug = config.log.level == "debug"
        self.memory = config.projects.memory
        self.hold = tuning.hold_for_holder and bool(self.memory)
        self.max_per_client = config.limits.max_per_client
        self.client_param = config.limits.client_param.encode("latin-1")
        old = self.classes
        self.classes = {}
        for rule in rules:
            queue = ClassQueue(rule, config)
            if rule.name in old:
                queue.take(old[rule.name])
            self.classes[rule.name] = queue
        for name, queue in old.items():  # a removed class: its requests move to default
            if name not in self.classes:
                self.classes["default"].take(queue)
        self.by_priority = sorted(self.classes.values(), key=lambda q: -q.priority)
        explicit = any(queue.reserved for queue in self.classes.values())
        self.protect = tuning.protect_short and not explicit
        # No class limit, reservation or client limit: any idle child may take any request.
        self.unlimited = not self.max_per_client and not any(
            queue.max_children or queue.reserved for queue in self.classes.values()
        )

    @property
    def waiting(self) -> int:
        return sum(queue.length for queue in self.classes.values()) + self.held_count

    def backlog(self) -> float:
        """Predicted seconds of work of every waiting request. A request queued before
        anything predicted its cost counts as what its class costs now (a burst at start),
        else as the mean of every class, else UNKNOWN_COST."""
        total = 0.0
        for queue in self.classes.values():
            total += queue.total_work
            if queue.unknown:
                total += queue.unknown * self._guess(queue.name)
        return total + sum(self.held_work.values())

    def _guess(self, name: str) -> float:
        learned = self.costs.by_class.get(name)
        if learned is not None and learned.mean > 0:
            return learned.mean
        means = [cost.mean for cost in self.costs.by_class.values() if cost.mean > 0]
        return sum(means) / len(means) if means else UNKNOWN_COST

    # ------------------------------------------------------------------ requests

    def submit(self, request: Request, first: bool = False) -> None:
        """Start ``request`` on an idle child, else queue it, or refuse it when its
        predicted wait is above its queue timeout. ``first`` puts a request that is being
        retried at the head of its lane, past every bound: it was admitted before."""
        queue = self.classes[request.request_class]
        if not first:
            cost = request.cost = self.costs.predict(request.kind, queue.name)
            if cost and self.ordered:  # lane(), inline
                n = frexp(cost * 1000.0)[1]
                request.lane = n if 0 < n < LANES else (0 if n <= 0 else LANES - 1)
            else:
                request.lane = 0
            request.long = cost >= self.long_request
            if request.created >= self.window_ends:
                self._roll(self.clock())
            work = cost or self._guess(queue.name)  # a kind not learned yet counts too
            self.arriving += work
        if self.idle and (
            (self.unlimited and not (request.long and self.protect))
            or self._may_start(queue, request)
        ):
            if self.hold and request.project and not first and self._held(request):
                return
            self._start(queue, request)
            return
        if not first:
            if queue.length >= queue.max_waiting:
                self.queue_full += 1
                log.warning("queue_full", request_class=queue.name, uri=request.uri)
                self._unavailable(request, b"All children are busy and the queue is full\n")
                return
            if self.by_wait and self.members:
                wait = self.predicted_wait(queue, request.lane, request.long)
                if wait > queue.queue_timeout:
                    self.refused += 1
                    log.debug("refused", request_class=queue.name, uri=request.uri,
                              predicted_wait=round(wait, 3), cost=round(request.cost, 4),
                              queue_timeout=queue.queue_timeout, waiting=queue.length,
                              servers=self.servers(queue, request.long))  # fmt: skip
                    self._unavailable(request, b"The predicted wait is above the queue timeout\n")
                    return
            self.waited += work
        request.queued_at = self.clock()
        queue.push(request, first)
        self.peak_waiting.see(self.waiting)

    def predicted_wait(self, queue: ClassQueue, n: int, long: bool) -> float:
        """The learned cost of the work that would go before a request in lane ``n`` of
        ``queue`` (classes of higher priority, its class's cheaper lanes and its own lane),
        over the children that may serve it."""
        ahead = queue.work_through(n)
        for other in self.by_priority:
            if other.priority <= queue.priority:
                break
            ahead += other.total_work
        return ahead / self.servers(queue, long)

    def servers(self, queue: ClassQueue, long: bool) -> int:
        """Children that may serve a request of ``queue``: all, less those kept for
        others (the classes' reserved children; for a long one, those kept for short)."""
        count = len(self.members)
        if queue.max_children:
            count = min(count, queue.max_children)
        count -= sum(q.reserved for q in self.by_priority if q is not queue)
        if long and self.protect:
            count -= self.reserve()
        return max(1, count)

    def released(self, request: Request) -> None:
        """A started request ended (or goes back to the queue): its class and client have
        room again, which may let a waiting request start on an idle child. A request that
        a child answered teaches the cost model what its kind costs."""
        if not request.counted:
            return
        request.counted = False
        self.classes[request.request_class].running -= 1
        if request.long:
            self.long_running -= 1
        else:
            self.short_running -= 1
        if request.finished_by_child:
            seconds = self.clock() - request.started
            self.costs.learn(request.kind, request.request_class, seconds)
            if request.project:
                self.projects.finished(request.project, seconds, request.cold, request.cost)
        if self.max_per_client:
            client = request.params.get(self.client_param, b"")
            self.clients[client] -= 1
            if self.clients[client] <= 0:
                del self.clients[client]
        if self.idle:
            self._dispatch()

    def withdraw(self, request: Request) -> None:
        queue = self.classes.get(request.request_class)
        if queue is not None and queue.remove(request):
            return
        held = self.held.get(request.project)
        if held is not None:
            for entry in held:
                if entry[1] is request:
                    held.remove(entry)
                    self._unheld(request)
                    break

    # ------------------------------------------------------------------ holding

    def _held(self, request: Request) -> bool:
        """Hold ``request`` for a busy child that holds its project, when one will be free
        (after what is held for it already) sooner than half a load on an idle child that
        does not hold it; no idle child holds it."""
        project = request.project
        for child in self.idle:
            if project in child.projects:
                return False
        now = self.clock()
        load = self.projects.load_estimate(project)
        holders, soonest = 0, math.inf
        for child in self.members:
            running = child.request
            if running is not None and project in child.projects:
                holders += 1
                elapsed = now - running.started
                # a cold one loads the project first; past its prediction, a request may
                # run as long again
                cost = running.cost + load if running.cold else running.cost
                left = cost - elapsed if cost > elapsed else elapsed
                if left < soonest:
                    soonest = left
        if not holders:
            return False
        wait = soonest + self.held_work.get(project, 0.0) / holders
        if wait >= HOLD_SHARE * load:
            return False
        held = self.held.get(project)
        if held is None:
            held = self.held[project] = deque()
        queue = self.classes[request.request_class]
        held.append((now + min(HOLD_SHARE * load, queue.queue_timeout / 2), request))
        self.held_work[project] = self.held_work.get(project, 0.0) + request.cost
        self.held_count += 1
        self.holds += 1
        request.queued_at = now
        self.peak_waiting.see(self.waiting)
        if self.debug:
            log.debug("held", uri=request.uri, project=project, holders=holders,
                      predicted_wait=round(wait, 3), load=round(load, 3))  # fmt: skip
        return True

    def _queue_of(self, request: Request) -> ClassQueue:
        """Its class's queue; default's when a reload removed its class while it was held
        (a ClassQueue with nothing waiting is falsy: no ``or``)."""
        queue = self.classes.get(request.request_class)
        return queue if queue is not None else self.classes["default"]

    def _unheld(self, request: Request) -> None:
        project = request.project
        self.held_count -= 1
        if self.held[project]:
            self.held_work[project] -= request.cost
        else:
            del self.held[project], self.held_work[project]

    def _give_held(self, child: Child) -> bool:
        """A child became idle: a request held for its projects starts on it, unless a
        class of higher priority has requests waiting."""
        for project, held in self.held.items():
            if project in child.projects:
                request = held[0][1]
                queue = self._queue_of(request)
                if not self._may_start(queue, request) or any(
                    other.length and other.priority > queue.priority for other in self.by_priority
                ):
                    continue
                held.popleft()
                self._unheld(request)
                self._start(queue, request)  # _pick: the idle holder used last, this one
                return True
        return False

    def _release_held(self, now: float) -> None:
        """Requests held past their deadline go first in their class's queue."""
        for project in list(self.held):
            held = self.held[project]
            while held and held[0][0] <= now:
                _, request = held.popleft()
                self._unheld(request)
                queue = self._queue_of(request)
                queue.push(request, first=True)
        if self.idle:
            self._dispatch()

    # ------------------------------------------------------------------ children

    def child_ready(self, child: Child) -> None:
        """A new child is ready (what its warm-up loaded is in ``child.projects``)."""
        self.members.add(child)

    def child_idle(self, child: Child) -> None:
        """A child is free: give it the best waiting request that may start, else keep it."""
        self.members.add(child)
        if child is self.parked:
            return
        self.idle.append(child)
        if self.held and self._give_held(child):
            return
        self._dispatch()

    def take_out(self, child: Child) -> None:
        """``child`` takes no request for now (it loads a project) but stays a member."""
        if child in self.idle:
            self.idle.remove(child)

    def park(self, child: Child) -> None:
        """``child`` takes no request until :meth:`unpark` (a trial's turn without it,
        scaling.py): it finishes the one it has, then waits out of the idle stack."""
        self.parked = child
        self.take_out(child)

    def unpark(self, serve: bool = True) -> None:
        """The parked child takes requests again (``serve``), or is left to be retired."""
        child, self.parked = self.parked, None
        if serve and child is not None and child.state is State.IDLE and not child.retiring:
            self.child_idle(child)

    def forget(self, child: Child) -> None:
        if child is self.parked:
            self.parked = None
        self.members.discard(child)
        if child in self.idle:
            self.idle.remove(child)

    # ------------------------------------------------------------------ protection

    def reserve(self) -> int:
        """Children kept free for short requests: as many as they have used lately
        (rounded up), at least one while they keep coming, never all."""
        demand = self.short_demand()
        if demand < 0.01:
            return 0
        return max(0, min(len(self.members) - 1, math.ceil(demand)))

    def kept_free(self) -> int:
        """Idle children that waiting requests may not take: what the classes' reserved
        children and the reservation for short requests still owe."""
        return self._owed(None) + (self._kept_for_short() if self.protect else 0)

    def _owed(self, queue: ClassQueue | None) -> int:
        """What the reserved children of the classes other than ``queue`` still owe."""
        owed = 0
        for other in self.by_priority:
            if other is not queue and other.reserved > other.running:
                owed += other.reserved - other.running
        return owed

    def _kept_for_short(self) -> int:
        return max(0, self.reserve() - self.short_running)

    def short_demand(self) -> float:
        """The children short requests have used lately (Little's law: arrivals per second
        times seconds each), over the last whole SHORT_WINDOW and the current one."""
        seconds = self._window()
        return (self.short_work_before + self.short_work) / seconds

    def demand(self) -> float:
        """The children the requests arriving lately need: the predicted seconds of work
        admitted per second, over the last whole SHORT_WINDOW and the current one, or over
        the current one alone once it is a second old, when that is more (a load that
        begins after a quiet window shows at once)."""
        seconds = self._window()
        current = seconds - SHORT_WINDOW
        recent = self.arriving / current if current >= 1.0 else 0.0
        return max(recent, (self.arriving_before + self.arriving) / seconds)

    def waited_share(self) -> float:
        """The share of the work admitted lately (the windows of :meth:`demand`) that had to
        wait for a child: near 0 while the children serve the arrivals as they come."""
        self._window()
        arriving = self.arriving_before + self.arriving
        return (self.waited_before + self.waited) / arriving if arriving > 0 else 0.0

    def _window(self) -> float:
        """Bring the windows up to date; the seconds the two of them cover."""
        now = self.clock()
        self._roll(now)
        return 2 * SHORT_WINDOW - (self.window_ends - now)

    def _roll(self, now: float) -> None:
        if now >= self.window_ends:
            whole = now >= self.window_ends + SHORT_WINDOW  # a window went by with none
            self.short_work_before = 0.0 if whole else self.short_work
            self.arriving_before = 0.0 if whole else self.arriving
            self.waited_before = 0.0 if whole else self.waited
            self.short_work = self.arriving = self.waited = 0.0
            self.window_ends = now + SHORT_WINDOW

    # ------------------------------------------------------------------ internals

    def _may_start(self, queue: ClassQueue, request: Request) -> bool:
        protect = self.protect and request.long
        if self.unlimited and not protect:
            return True
        if queue.max_children and queue.running >= queue.max_children:
            return False
        if self.max_per_client and (
            self.clients[request.params.get(self.client_param, b"")] >= self.max_per_client
        ):
            return False
        owed = self._owed(queue)
        if protect:
            kept = self._kept_for_short()
            owed += kept
            if kept and len(self.idle) <= owed and self.debug:
                log.debug("reserved", uri=request.uri, cost=round(request.cost, 4),
                          reserve=kept + self.short_running, idle=len(self.idle),
                          short_running=self.short_running)  # fmt: skip
        return len(self.idle) > owed

    def _dispatch(self) -> None:
        while self.idle:
            for queue in self.by_priority:
                if not queue.length:
                    continue
                request = self._next_startable(queue)
                if request is not None:
                    queue.remove(request)
                    self._start(queue, request)
                    break
            else:
                return

    def _next_startable(self, queue: ClassQueue) -> Request | None:
        """The next request of ``queue`` that may start, if one may: the oldest when it has
        waited max_reorder_wait, else the cheapest (a short one when a long one may not
        take the last children), or one near it whose project the child holds."""
        oldest = queue.oldest()
        aged = self.clock() - queue.lanes[oldest][0].queued_at >= self.tuning.max_reorder_wait
        cheapest = queue.cheapest()
        for n in (oldest, cheapest) if aged else (cheapest,):
            head = queue.lanes[n][0]
            if self._may_start(queue, head):
                break
        else:
            if self.max_per_client:  # only the client limit holds them back: look past
                for request in queue:
                    if self._may_start(queue, request):
                        return request
            return None
        if n != oldest and self.debug:
            passed = queue.lanes[oldest][0]
            log.debug("reordered", uri=head.uri, cost=round(head.cost, 4),
                      passed=passed.uri, passed_cost=round(passed.cost, 4))  # fmt: skip
        if self.memory and len(self.idle) == 1 and head.project:
            # At saturation one child frees up at a time: give it a request for a project
            # it holds, if one waits near the head and the head has not waited long.
            remembered = self.idle[0].projects
            if head.project not in remembered and (
                self.clock() - head.queued_at < AFFINITY_MAX_WAIT
            ):
                for request in itertools.islice(queue.lanes[n], 1, AFFINITY_LOOKAHEAD):
                    if request.project in remembered and self._may_start(queue, request):
                        return request
        return head

    def _start(self, queue: ClassQueue, request: Request) -> None:
        queue.running += 1
        request.counted = True
        if request.long:
            self.long_running += 1
        else:
            self.short_running += 1
            if self.protect:
                if request.created >= self.window_ends:  # arrival time: close enough
                    self._roll(self.clock())
                self.short_work += request.cost if request.cost > 0.001 else 0.001
        if self.max_per_client:
            self.clients[request.params.get(self.client_param, b"")] += 1
        request.start(self._pick(request))
        idle = len(self.idle)
        self.peak_busy.see(len(self.members) - idle)  # a loading child counts as busy
        if not idle:
            self.all_busy += 1

    def _pick(self, request: Request) -> Child:
        """The idle child for ``request``: one that served its project recently, else the
        one whose remembered projects are least in demand (of the PICK_SAMPLE least
        recently used: a bound on the work); the warmest otherwise."""
        idle = self.idle
        project = request.project
        if not project:
            return idle.pop()
        if not self.memory:
            self.projects.requested(project)
            return idle.pop()
        chosen = None
        if len(idle) > 1:
            for child in reversed(idle):
                if project in child.projects:
                    chosen = child
                    break
            else:
                demand = self.projects.demand
                sample = idle[:PICK_SAMPLE]
                fresh = [c for c in sample if project not in c.stale]  # see projects.md
                chosen = min(fresh or sample, key=lambda c: sum(map(demand, c.projects)))
            idle.remove(chosen)
        else:
            chosen = idle.pop()
        projects = chosen.projects
        if project not in projects:
            request.cold = True
            self.projects.loaded_by_request(project)
        remember(projects, project, self.memory, self.clock())
        chosen.stale.discard(project)  # it loads the file as it is now
        self.projects.requested(project)
        return chosen

    def expire(self, now: float) -> None:
        """503 for requests that waited past their class's queue_timeout. Each lane is in
        arrival order, so only its head needs looking at (a few times a second, instead of
        a timer per request). Held requests past their deadline join their queue first."""
        if self.held:
            self._release_held(now)
        for queue in self.by_priority:
            if not queue.length:
                continue
            limit = now - queue.queue_timeout
            for n, waiting in enumerate(queue.lanes):
                while waiting and waiting[0].queued_at < limit:
                    request = queue.pop(n)
                    log.warning("queue_timeout", request_class=queue.name, uri=request.uri)
                    self._unavailable(request, b"No child became free in time\n")

    def fail_waiting(self, body: bytes) -> None:
        """Answer every waiting request with a 503 (the pool is stopping)."""
        held = [request for waiting in self.held.values() for _, request in waiting]
        self.held.clear()
        self.held_work.clear()
        self.held_count = 0
        for request in held:
            request.respond(503, body)
        for queue in self.by_priority:
            for n in range(LANES):
                while queue.lanes[n]:
                    queue.pop(n).respond(503, body)

    def roll_peaks(self) -> None:
        """A new window of the high-water marks (every peaks.WINDOW seconds)."""
        self.peak_waiting.roll(self.waiting)
        self.peak_busy.roll(len(self.members) - len(self.idle))

    def peaks(self) -> dict[str, object]:
        return {
            "waiting": self.peak_waiting.view(),
            "busy": self.peak_busy.view(),
            "all_busy": self.all_busy,
            "refused": {"predicted_wait": self.refused, "queue_full": self.queue_full},
        }

    def predictions(self) -> dict[str, float]:
        """Per class, the predicted wait of a new request of the class's mean cost."""
        waits = {}
        for queue in self.by_priority:
            learned = self.costs.by_class.get(queue.name)
            cost = learned.mean if learned is not None else 0.0
            n = lane(cost) if self.ordered else 0
            waits[queue.name] = (
                self.predicted_wait(queue, n, cost >= self.long_request) if self.members else 0.0
            )
        return waits

    def _unavailable(self, request: Request, body: bytes) -> None:
        request.respond(503, body, (("Retry-After", str(self.limits.retry_after)),))
