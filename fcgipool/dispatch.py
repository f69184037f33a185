"""Admission and picking: per-class queues, priorities, limits, reservations, affinity.

A request goes to an idle child only (a child's socket accepts connections into its backlog
even while it is busy, so a connect proves nothing). It may start when its class is under
``max_children``, its client under ``limits.max_per_client``, and enough idle children stay
for the classes whose ``reserved`` children are not in use. Otherwise it waits in its class's
FIFO queue, bounded by ``max_waiting`` and ``queue_timeout`` (past either: 503 at once). When
a child frees up, the waiting request of the highest priority that may start takes it: when
every child is busy on heavy maps, a GetCapabilities goes first.

Among idle children the one that served the request's project recently is preferred (its
project cache is warm), else the one whose remembered projects are least in demand.
"""

from __future__ import annotations

import itertools
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from . import logs

if TYPE_CHECKING:
    from .child import Child
    from .classify import Rule
    from .config import Config
    from .request import Request

log = logs.get("fcgipool.dispatch")

AFFINITY_LOOKAHEAD = 8  # waiting requests looked at for one whose project a child holds
AFFINITY_MAX_WAIT = 2.0  # seconds; a head that waited longer is never passed over


class ClassQueue:
    """The waiting requests and the running count of one request class."""

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
        self.waiting: deque[Request] = deque()
        self.running = 0


class Dispatcher:
    def __init__(self, config: Config, rules: list[Rule], clock: Callable[[], float]) -> None:
        self.clock = clock
        self.idle: list[Child] = []  # a stack: the child used last is warmest
        self.classes: dict[str, ClassQueue] = {}
        self.by_priority: list[ClassQueue] = []
        self.clients: Counter[bytes] = Counter()
        self.popularity: Counter[str] = Counter()
        self.configure(config, rules)

    def configure(self, config: Config, rules: list[Rule]) -> None:
        """(Re)build the classes; waiting requests and counts of kept classes stay."""
        self.limits = config.limits
        self.memory = config.projects.memory
        self.pinned = config.projects.pinned
        self.max_per_client = config.limits.max_per_client
        self.client_param = config.limits.client_param.encode("latin-1")
        old = self.classes
        self.classes = {}
        for rule in rules:
            queue = ClassQueue(rule, config)
            if rule.name in old:
                queue.waiting, queue.running = old[rule.name].waiting, old[rule.name].running
            self.classes[rule.name] = queue
        for name, queue in old.items():  # a removed class: its requests move to default
            if name not in self.classes:
                self.classes["default"].waiting.extend(queue.waiting)
                self.classes["default"].running += queue.running
        self.by_priority = sorted(self.classes.values(), key=lambda q: -q.priority)
        # No class limit, reservation or client limit: any idle child may take any request.
        self.unlimited = not self.max_per_client and not any(
            queue.max_children or queue.reserved for queue in self.classes.values()
        )

    @property
    def waiting(self) -> int:
        return sum(len(queue.waiting) for queue in self.classes.values())

    def backlog(self) -> float:
        return self.waiting * 0.1  # placeholder: replaced by the cost model

    # ------------------------------------------------------------------ requests

    def submit(self, request: Request, first: bool = False) -> None:
        """Start ``request`` on an idle child, else queue it. ``first`` puts a request that
        is being retried at the head of its queue, past the bound: it was admitted before."""
        queue = self.classes[request.request_class]
        if self.idle and (self.unlimited or self._may_start(queue, request)):
            self._start(queue, request)
            return
        if not first and len(queue.waiting) >= queue.max_waiting:
            log.warning("queue_full", request_class=queue.name, uri=request.uri)
            self._unavailable(request, b"All children are busy and the queue is full\n")
            return
        request.queued_at = self.clock()
        if first:
            queue.waiting.appendleft(request)
        else:
            queue.waiting.append(request)

    def released(self, request: Request) -> None:
        """A started request ended (or goes back to the queue): its class and client have
        room again, which may let a waiting request start on an idle child."""
        if not request.counted:
            return
        request.counted = False
        self.classes[request.request_class].running -= 1
        if self.max_per_client:
            client = request.params.get(self.client_param, b"")
            self.clients[client] -= 1
            if self.clients[client] <= 0:
                del self.clients[client]
        if self.idle:
            self._dispatch()

    def withdraw(self, request: Request) -> None:
        queue = self.classes.get(request.request_class)
        if queue is not None and request in queue.waiting:
            queue.waiting.remove(request)

    # ------------------------------------------------------------------ children

    def child_ready(self, child: Child) -> None:
        """A new child is ready: it holds the pinned projects (its warm-up loaded them)."""
        for project in self.pinned:
            remember(child.projects, project, max(1, self.memory))

    def child_idle(self, child: Child) -> None:
        """A child is free: give it the best waiting request that may start, else keep it."""
        self.idle.append(child)
        self._dispatch()

    def forget(self, child: Child) -> None:
        if child in self.idle:
            self.idle.remove(child)

    # ------------------------------------------------------------------ internals

    def _may_start(self, queue: ClassQueue, request: Request) -> bool:
        if queue.max_children and queue.running >= queue.max_children:
            return False
        if self.max_per_client and (
            self.clients[request.params.get(self.client_param, b"")] >= self.max_per_client
        ):
            return False
        owed = 0
        for other in self.by_priority:
            if other is not queue and other.reserved > other.running:
                owed += other.reserved - other.running
        return len(self.idle) > owed

    def _dispatch(self) -> None:
        while self.idle:
            for queue in self.by_priority:
                if not queue.waiting:
                    continue
                request = self._next_startable(queue)
                if request is not None:
                    queue.waiting.remove(request)
                    self._start(queue, request)
                    break
            else:
                return

    def _next_startable(self, queue: ClassQueue) -> Request | None:
        head = queue.waiting[0]
        if not self._may_start(queue, head):
            if not self.max_per_client:
                return None
            # Only the client limit can hold the head back: look past it.
            for request in queue.waiting:
                if self._may_start(queue, request):
                    return request
            return None
        if self.memory and len(self.idle) == 1 and head.project:
            # At saturation one child frees up at a time: give it a request for a project
            # it holds, if one waits near the head and the head has not waited long.
            remembered = self.idle[0].projects
            if head.project not in remembered and (
                self.clock() - head.queued_at < AFFINITY_MAX_WAIT
            ):
                for request in itertools.islice(queue.waiting, 1, AFFINITY_LOOKAHEAD):
                    if request.project in remembered and self._may_start(queue, request):
                        return request
        return head

    def _start(self, queue: ClassQueue, request: Request) -> None:
        queue.running += 1
        request.counted = True
        if self.max_per_client:
            self.clients[request.params.get(self.client_param, b"")] += 1
        request.start(self._pick(request.project))

    def _pick(self, project: str) -> Child:
        """The idle child for a request of ``project``: one that served it recently, else
        the one whose remembered projects are least in demand; the warmest otherwise."""
        idle = self.idle
        if not project or not self.memory:
            return idle.pop()
        self.popularity[project] += 1
        if len(self.popularity) > 4 * 4096:  # bounded: forget the rarely asked
            self.popularity = Counter(dict(self.popularity.most_common(4096)))
        chosen = None
        if len(idle) > 1:
            for child in reversed(idle):
                if project in child.projects:
                    chosen = child
                    break
            else:
                chosen = min(
                    reversed(idle),
                    key=lambda c: sum(self.popularity[p] for p in c.projects),
                )
            idle.remove(chosen)
        else:
            chosen = idle.pop()
        remember(chosen.projects, project, self.memory)
        return chosen

    def expire(self, now: float) -> None:
        """503 for requests that waited past their class's queue_timeout. Each queue is in
        arrival order, so only its head needs looking at (a few times a second, instead of
        a timer per request)."""
        for queue in self.by_priority:
            limit = now - queue.queue_timeout
            while queue.waiting and queue.waiting[0].queued_at < limit:
                request = queue.waiting.popleft()
                log.warning("queue_timeout", request_class=queue.name, uri=request.uri)
                self._unavailable(request, b"No child became free in time\n")

    def fail_waiting(self, body: bytes) -> None:
        """Answer every waiting request with a 503 (the pool is stopping)."""
        for queue in self.by_priority:
            while queue.waiting:
                queue.waiting.popleft().respond(503, body)

    def _unavailable(self, request: Request, body: bytes) -> None:
        request.respond(503, body, (("Retry-After", str(self.limits.retry_after)),))


def remember(projects: OrderedDict[str, None], project: str, size: int) -> None:
    """Keep ``project`` as the most recent of at most ``size`` remembered projects."""
    projects[project] = None
    projects.move_to_end(project)
    while len(projects) > size:
        projects.popitem(last=False)
