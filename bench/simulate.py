"""fcgipool at hosting scale, by simulation: 1,500 QGIS projects on 64 to 512 children.

Why a simulation: this machine has 2 cores, a hosting site runs hundreds of QGIS processes.
What decides latency there is where each request goes (which child holds its project, what
waits behind what), and that is the pool's decision code, which runs here unchanged: the real
``Dispatcher`` (admission by predicted wait, queues in cost order, protection of short
requests, affinity by ``child.projects``), ``CostModel`` (learning from what the simulated
children take), ``Classifier`` and ``Admission`` (class and kind from the query string) and
``Projects`` (warm sets). Only the children, the clock and the arrivals are simulated: a
clock and an event heap of its own (no asyncio, no sockets, no sleep).

A simulated child keeps a QGIS-like project cache (QGIS 3.22: up to 100 projects a process,
least recently used dropped; ``--cache``): a request whose project it does not hold, or holds
in an older version, pays the project's load first. Times follow measured QGIS figures:
GetCapabilities of a loaded project 2-10 ms, a 256² tile 20-100 ms, a heavy GetMap 1-5 s
(log-normal noise, a long tail), project loads log-normal around 1 s within [0.1, 120] s,
drawn once per project. Requests: 10 % GetCapabilities, 86 % tiles, 4 % heavy, of projects
of Zipf popularity (s = 1.05), Poisson arrivals (``steady``) or tiles in map-viewer bursts
of 16-40 at once (``bursty``), at 70 % of what children serve when they share the load
blindly (``capacities``). Children recycle after max_requests (with jitter), crash now and
then, and projects change a few times an hour.

Policies, over the same arrivals (same seed): ``fcgipool`` (the default configuration;
``fcgipool:projects.memory=5`` any setting changed), and its peers, whose queues are
unbounded FIFOs where a request that waits 30 s is a timeout (nginx gave up; the child still
does the work when it gets to it): ``random-idle`` (one shared socket, any idle child takes
the next request: spawn-fcgi + multiwatch), ``round-robin`` (one socket per child, each
request to the next in turn however busy it is: nginx round-robin, roughly mod_fcgid),
``first-idle`` (the first idle child, no project knowledge: php-fpm, uWSGI).

    python bench/simulate.py [--quick] [--out docs/bench/simulate.json] [--plot FILE.svg]
    python bench/simulate.py --from docs/bench/simulate.json --plot docs/bench/simulate.svg
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import heapq
import itertools
import json
import math
import random
import sys
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from fcgipool import config as configuration
from fcgipool import logs
from fcgipool.admission import Admission
from fcgipool.child import remember
from fcgipool.classify import Classifier
from fcgipool.costs import CostModel
from fcgipool.dispatch import Dispatcher
from fcgipool.projects import Projects

KINDS = ("GetCapabilities", "tile", "heavy")
CAPS, TILE, HEAVY = 0, 1, 2
MIX = (0.10, 0.86, 0.04)  # share of requests of each kind (a hosting site: mostly tiles)
NOISE = (0.2, 0.3, 0.6)  # log-normal sigma of a request's time around its project's
CLIP = ((0.001, 0.05), (0.01, 1.0), (0.3, 60.0))  # seconds
PEER_TIMEOUT = 30.0  # nginx gives up on a request that waited this long at a peer
STARTUP = (0.5, 1.4)  # seconds from spawn to a QGIS child's first answer (measured)
TICK = 0.1  # the pool's timer: queue timeouts (supervisor.TICK)
DRAIN = 400.0  # seconds after the last arrival within which every request must end
WARM_SETS = (
    "fcgipool: a replacement (recycled, crashed, changed project) loads "
    "Projects.warm_set of what its predecessor held before it takes traffic; "
    "the peers' replacements start cold"
)
CHANGES = (
    "fcgipool: children.py's path for a fixed pool, each holder forgets the project "
    "and is replaced, one at a time, by a child that loads it first; the peers' "
    "children load it again on their next request of it"
)
POLICIES = ("fcgipool", "fcgipool:tuning.hold_for_holder=false", "fcgipool:projects.memory=5",
            "random-idle", "round-robin", "first-idle")


@dataclass
class Workload:
    """One simulated site; every figure that shapes the arrivals and the children."""

    name: str = "steady"
    children: int = 64
    projects: int = 1500
    zipf: float = 1.05
    load: float = 0.7  # arrivals as a share of the shared capacity (see capacities)
    bursty: bool = False  # tiles come in map-viewer bursts of one project
    burst: tuple[int, int] = (16, 40)
    load_median: float = 1.0  # seconds to load a project (log-normal, drawn once each)
    load_sigma: float = 1.3
    load_clip: tuple[float, float] = (0.1, 120.0)
    cache: int = 100  # projects a QGIS child keeps
    changes_per_hour: float = 12.0  # projects saved by their authors, most requested likelier
    max_requests: int = 2000  # child recycling, plus a jitter of 0..max_requests_jitter
    max_requests_jitter: int = 1000
    crash_rate: float = 2e-5  # per request: the child dies halfway through it
    warmup: float = 600.0  # seconds simulated before anything is counted (arrivals ramp up)
    duration: float = 600.0  # seconds of arrivals counted
    seed: int = 1


@dataclass
class Project:
    name: str
    load: float  # seconds to load it
    base: tuple[float, float, float]  # its typical seconds per kind, once loaded
    params: tuple[dict[bytes, bytes], ...]  # per kind: what the web server sends
    version: int = 0


def make_projects(w: Workload) -> list[Project]:
    rng = random.Random(f"{w.seed}-projects")
    low, high = w.load_clip
    projects = []
    for i in range(w.projects):
        name = f"/srv/qgis/site{i % 97:02d}/p{i:04d}.qgs"
        load = min(high, max(low, rng.lognormvariate(math.log(w.load_median), w.load_sigma)))
        base = (rng.uniform(0.002, 0.010), rng.uniform(0.020, 0.100), rng.uniform(1.0, 5.0))
        queries = (
            f"MAP={name}&SERVICE=WMS&REQUEST=GetCapabilities",
            f"MAP={name}&SERVICE=WMS&REQUEST=GetMap&LAYERS=base&WIDTH=256&HEIGHT=256",
            f"MAP={name}&SERVICE=WMS&REQUEST=GetMap&LAYERS=all&WIDTH=2048&HEIGHT=2048",
        )
        params = tuple({b"QUERY_STRING": q.encode(), b"REQUEST_METHOD": b"GET"} for q in queries)
        projects.append(Project(name, load, base, params))
    return projects


def capacities(w: Workload, projects: list[Project], weights: list[float]) -> tuple[float, float]:
    """Requests per second the children serve: warm (every project loaded), and shared
    (each child takes requests of any project and keeps the ``cache`` it used last, the
    LRU hit rate of independent requests by Che's approximation). ``Workload.load`` is a
    share of the shared capacity: what a site run by a peer is provisioned for."""
    total = sum(weights)
    share = [weight / total for weight in weights]
    low, high = 0.0, 1e12  # T: the time a project stays cached unasked (Che)
    for _ in range(100):
        t = (low + high) / 2
        if sum(1 - math.exp(-p * t) for p in share) > w.cache:
            high = t
        else:
            low = t
    warm = shared = 0.0
    for project, p in zip(projects, share, strict=True):
        seconds = sum(MIX[k] * project.base[k] * math.exp(NOISE[k] ** 2 / 2) for k in range(3))
        warm += p * seconds
        shared += p * (seconds + math.exp(-p * low) * project.load)
    return w.children / warm, w.children / shared


class SimChild:
    """A QGIS process: its own project cache (``cache``), and what the pool knows of it
    (``projects``, ``stale``, ``warm_set``: the attributes of fcgipool.child.Child that the
    dispatcher and children.py use)."""

    __slots__ = ("alive", "cache", "limit", "name", "projects", "ready", "replaced",
                 "replaces", "request", "retiring", "served", "slot", "stale",
                 "warm_set")  # fmt: skip

    def __init__(self, name: str, slot: int, limit: int) -> None:
        self.name = name
        self.slot = slot
        self.limit = limit  # max_requests plus its jitter; 0 is never
        self.served = 0
        self.cache: OrderedDict[str, int] = OrderedDict()  # QGIS's: project -> version
        self.projects: OrderedDict[str, None] = OrderedDict()  # the pool's memory of it
        self.stale: set[str] = set()
        self.warm_set: list[str] = []
        self.alive = True
        self.ready = False
        self.retiring = False  # recycled: its replacement is starting
        self.replaced = False  # and is ready: it stops when next free
        self.replaces: SimChild | None = None
        self.request: SimRequest | None = None  # the one it serves

    def __repr__(self) -> str:
        return self.name


class SimRequest:
    """A request as the dispatcher sees one (the attributes of fcgipool.request.Request it
    reads and writes), and what the simulation knows of it."""

    __slots__ = (
        "child",
        "cold",
        "cost",
        "counted",
        "crash",
        "created",
        "finished_by_child",
        "kind",
        "kind_index",
        "lane",
        "long",
        "measured",
        "outcome",
        "params",
        "proj",
        "project",
        "queued",
        "queued_at",
        "request_class",
        "retried",
        "service",
        "sim",
        "started",
        "timeout",
        "uri",
    )  # fmt: skip

    def __init__(self, sim: Simulation, proj: Project, k: int, service: float,
                 crash: bool, measured: bool) -> None:  # fmt: skip
        self.sim = sim
        self.proj = proj
        self.kind_index = k
        self.service = service  # seconds of work once the project is loaded
        self.crash = crash  # the child dies under it (first attempt)
        self.measured = measured  # arrived in the counted window
        self.params = proj.params[k]
        self.uri = "/ows"
        self.project = proj.name
        self.request_class = "default"
        self.kind: tuple[str, str, int, str] = (proj.name, KINDS[k], 0, "")
        self.timeout = 60.0
        self.counted = False
        self.cost = 0.0
        self.lane = 0
        self.long = False
        self.finished_by_child = False
        self.cold = False
        self.created = sim.now
        self.started = 0.0
        self.queued_at = 0.0
        self.queued = False
        self.retried = False
        self.child: SimChild | None = None
        self.outcome = ""

    def start(self, child: SimChild) -> None:
        self.sim.begin(self, child)

    def respond(self, status: int, body: bytes, headers: Iterable[tuple[str, str]] = ()) -> None:
        """The pool answers itself: a 503, at admission or after the queue timeout."""
        self.sim.resolve(self, "waited_out" if self.queued else "refused")


@dataclass
class Stats:
    """What one run counts: requests that arrived in the measured window, and children's
    work in it."""

    rate: float = 0.0  # arrivals per second, after the warm-up
    warm_capacity: float = 0.0
    shared_capacity: float = 0.0
    generated: int = 0
    served: int = 0
    refused: int = 0  # fcgipool: 503 at once, predicted wait above the queue timeout
    waited_out: int = 0  # fcgipool: 503 after the queue timeout; peers: nginx timed out
    lost: int = 0  # the child crashed under it and nobody retried it (502)
    unfinished: int = 0  # not ended within DRAIN after the last arrival (a bug if any)
    hits: int = 0  # requests a child started with their project loaded
    misses: int = 0
    loads: int = 0  # project loads for requests
    warm_loads: int = 0  # project loads of warm sets, before a child takes traffic
    crashes: int = 0
    recycled: int = 0  # children replaced: max_requests, or a project changed
    changes: int = 0
    max_queue: int = 0
    warmup_failed: int = 0  # requests of the warm-up refused, waited out or lost
    warmup_max_queue: int = 0
    max_class_queue: dict[str, int] = field(default_factory=dict)  # the whole run
    max_remembered: int = 0  # the most projects the pool remembered for one child
    dispatch_us: float = 0.0  # fcgipool: CPU of admission and dispatch per request
    latencies: list[list[float]] = field(default_factory=lambda: [[], [], []])


# ---------------------------------------------------------------------------- policies


class Policy:
    """Where requests go. The simulation calls these; a policy calls ``sim.begin``."""

    name = ""
    peer = True  # nginx times out requests that wait too long (fcgipool answers 503)

    def __init__(self, sim: Simulation) -> None:
        self.sim = sim

    def submit(self, request: SimRequest) -> None:
        raise NotImplementedError

    def add(self, child: SimChild) -> None:
        """A child is ready (new, respawned or a recycled one's replacement)."""
        raise NotImplementedError

    def finished(self, request: SimRequest, child: SimChild) -> None:
        raise NotImplementedError

    def crashed(self, request: SimRequest, child: SimChild) -> None:
        """``child`` died under ``request``: the web server answers 502; a fresh child
        takes its place."""
        if not request.outcome:
            self.sim.resolve(request, "lost")
        self.sim.respawn(child)

    def successor(self, child: SimChild) -> tuple[list[str], set[str]]:
        """What a child replacing ``child`` loads before it takes traffic, and which of
        those ``child`` held in an older version. The peers' start cold."""
        return [], set()

    def started(self, child: SimChild) -> None:
        """``child`` was spawned; it is not ready yet."""

    def loaded(self, child: SimChild, project: str, seconds: float) -> None:
        """A starting ``child`` loaded ``project`` of its warm set."""

    def changed(self, project: str) -> None:
        """An operator saved ``project``: children that hold it load it again when next
        asked for it (QGIS watches its files), unless the policy acts first."""

    def waiting(self) -> Iterator[SimRequest]:
        raise NotImplementedError

    def tick(self) -> None:
        pass


class Fcgipool(Policy):
    """The real dispatcher, cost model, classifier, admission and project registry, with
    the default configuration (or ``settings``: ``projects.memory=100,...``); children
    replaced as children.py does in a fixed pool: a replacement of a recycled, crashed
    or changed child loads its predecessor's warm set first, ``pool.max_recycling`` at
    once, and a recycled child serves until its replacement is ready."""

    peer = False

    def __init__(self, sim: Simulation, settings: str = "") -> None:
        super().__init__(sim)
        self.name = "fcgipool" + (f":{settings}" if settings else "")
        overrides: dict[str, Any] = {"pool": {"workers": sim.w.children}}
        for setting in filter(None, settings.split(",")):
            key, _, text = setting.partition("=")
            section, name = key.split(".")
            value: Any = text
            with contextlib.suppress(json.JSONDecodeError):
                value = json.loads(text)
            overrides.setdefault(section, {})[name] = value
        self.config = config = configuration.build(None, overrides, environ={})
        classifier = Classifier(config)
        costs = CostModel(config.tuning)
        self.projects = Projects(config, sim.clock, stat=lambda path: None)
        self.admission = Admission(config, classifier, costs)
        self.dispatcher = Dispatcher(config, classifier.rules, sim.clock, costs, self.projects)
        self.classes = list(self.dispatcher.classes.values())
        self.max_class = dict.fromkeys(self.dispatcher.classes, 0)
        self.memory = max(1, config.projects.memory)
        self.max_recycling = config.pool.max_recycling
        self.recycling = 0  # children being replaced
        self.alive: dict[SimChild, None] = {}  # started and not gone, in order
        self.pending: deque[tuple[SimChild, str]] = deque()  # holders of changed projects
        self.ticks = 0
        self.check_every = max(1, round(config.projects.check_interval / TICK))
        self.cpu = 0.0  # seconds in admission and dispatcher.submit/released/child_idle
        self.submitted = 0

    def submit(self, request: SimRequest, first: bool = False) -> None:
        began = time.perf_counter()
        if not first:
            self.submitted += 1
            refusal = self.admission.admit(request, None)  # type: ignore[arg-type]
            assert refusal is None, refusal
        self.dispatcher.submit(request, first)  # type: ignore[arg-type]
        self.cpu += time.perf_counter() - began
        if not request.outcome and request.child is None:
            request.queued = True
            total = 0
            for queue in self.classes:
                total += queue.length
                if queue.length > self.max_class[queue.name]:
                    self.max_class[queue.name] = queue.length
            self.sim.queued(total)

    def started(self, child: SimChild) -> None:
        self.alive[child] = None  # children.py's ``all``: changes reach starting ones too

    def add(self, child: SimChild) -> None:
        self.alive[child] = None
        self.dispatcher.child_ready(child)  # type: ignore[arg-type]
        self._free(child)
        old = child.replaces
        if old is not None and old.alive:
            old.replaced = True
            if old in self.dispatcher.idle:  # type: ignore[comparison-overlap]
                self._retire(old)

    def finished(self, request: SimRequest, child: SimChild) -> None:
        began = time.perf_counter()
        request.finished_by_child = True
        self.dispatcher.released(request)  # type: ignore[arg-type]
        if child.limit and child.served >= child.limit:
            self._recycle(child)
        self._free(child)
        self.cpu += time.perf_counter() - began

    def crashed(self, request: SimRequest, child: SimChild) -> None:
        """children.py forgets the dead child and starts another (its warm set from what
        the dead one held); request.py retries a GET once, first in its queue."""
        self.dispatcher.forget(child)  # type: ignore[arg-type]
        self.alive.pop(child, None)
        self.dispatcher.released(request)  # type: ignore[arg-type]
        if child.retiring:
            self.recycling -= 1  # its replacement is on its way already
        else:
            self.sim.respawn(child)
        if request.retried:
            self.sim.resolve(request, "lost")
        else:
            request.retried = True
            self.submit(request, first=True)

    def successor(self, child: SimChild) -> tuple[list[str], set[str]]:
        held = [*reversed(child.projects), *child.stale]  # children.py's _bequeath
        return [*self.projects.pinned(), *self.projects.warm_set(held)], set(child.stale)

    def loaded(self, child: SimChild, project: str, seconds: float) -> None:
        remember(child.projects, project, self.memory, 0.0)
        reload = project in child.stale
        child.stale.discard(project)
        self.projects.loaded(project, seconds, reload=reload)

    def changed(self, project: str) -> None:
        """children.py's ``changed``: every holder forgets the project and, in a fixed pool,
        is replaced by a child that loads what it held, one at a time."""
        for child in self.alive:
            if project in child.projects or project in child.stale:
                child.projects.pop(project, None)
                child.stale.add(project)
                if (child, project) not in self.pending:
                    self.pending.append((child, project))
        self._run_pending()

    def _run_pending(self) -> None:
        """children.py's ``run_pending`` in a fixed pool: the next holder that is ready is
        replaced (one starting is passed over until it is ready)."""
        for entry in list(self.pending):
            child, project = entry
            if not child.alive or child.retiring or project not in child.stale:
                self.pending.remove(entry)  # gone, being replaced, or a request loaded it
                continue
            if not child.ready:
                continue  # it was loading its warm set when the file changed
            if self.recycling >= self.max_recycling:
                return  # the next one when this replacement is ready
            self.pending.remove(entry)
            self._recycle(child)
            return

    def _recycle(self, child: SimChild) -> None:
        if child.retiring or self.recycling >= self.max_recycling:
            return  # children.py tries again at the child's next release
        child.retiring = True
        self.recycling += 1
        self.sim.stats.recycled += self.sim.counting()
        warm, stale = self.successor(child)
        self.sim.spawn(child.slot, warm, stale, replaces=child)

    def _free(self, child: SimChild) -> None:
        if child.replaced:
            self._retire(child)
            return
        if self.pending and any(entry[0] is child for entry in self.pending):
            self._run_pending()
        self.dispatcher.child_idle(child)  # type: ignore[arg-type]

    def _retire(self, child: SimChild) -> None:
        self.dispatcher.forget(child)  # type: ignore[arg-type]
        self.alive.pop(child, None)
        self.recycling -= 1
        self.sim.gone(child)

    def waiting(self) -> Iterator[SimRequest]:
        for queue in self.classes:
            yield from queue  # type: ignore[misc]
        for held in self.dispatcher.held.values():
            yield from (request for _, request in held)  # type: ignore[misc]

    def tick(self) -> None:
        """supervisor.py's tick (queue timeouts), and every check_interval the pending
        project loads."""
        self.dispatcher.expire(self.sim.now)
        self.ticks += 1
        if self.pending and self.ticks % self.check_every == 0:
            self._run_pending()


class SharedSocket(Policy):
    """One listening socket, one FIFO backlog: an idle child takes the next request. Which
    idle child takes a request that finds several: ``choose``."""

    def __init__(self, sim: Simulation) -> None:
        super().__init__(sim)
        self.queue: deque[SimRequest] = deque()

    def choose(self) -> SimChild | None:
        raise NotImplementedError

    def free(self, child: SimChild) -> None:
        raise NotImplementedError

    def submit(self, request: SimRequest) -> None:
        child = self.choose()
        if child is None:
            self.queue.append(request)
            self.sim.queued(len(self.queue))
        else:
            self.sim.begin(request, child)

    def add(self, child: SimChild) -> None:
        if self.queue:
            self.sim.begin(self.queue.popleft(), child)
        else:
            self.free(child)

    def finished(self, request: SimRequest, child: SimChild) -> None:
        if child.limit and child.served >= child.limit:  # it exits; a cold one replaces it
            self.sim.stats.recycled += self.sim.counting()
            self.sim.respawn(child)
        else:
            self.add(child)

    def waiting(self) -> Iterator[SimRequest]:
        return iter(self.queue)


class RandomIdle(SharedSocket):
    """spawn-fcgi + multiwatch: every child blocks in accept() on the one socket; the
    kernel wakes any of them."""

    name = "random-idle"

    def __init__(self, sim: Simulation) -> None:
        super().__init__(sim)
        self.idle: list[SimChild] = []
        self.rng = random.Random(f"{sim.w.seed}-random-idle")

    def choose(self) -> SimChild | None:
        idle = self.idle
        if not idle:
            return None
        i = self.rng.randrange(len(idle))
        idle[i], idle[-1] = idle[-1], idle[i]
        return idle.pop()

    def free(self, child: SimChild) -> None:
        self.idle.append(child)


class FirstIdle(SharedSocket):
    """php-fpm, uWSGI: the least busy child, here the first idle one; no project knowledge."""

    name = "first-idle"

    def __init__(self, sim: Simulation) -> None:
        super().__init__(sim)
        self.idle: list[int] = []  # a heap of slots
        self.by_slot: dict[int, SimChild] = {}

    def choose(self) -> SimChild | None:
        return self.by_slot.pop(heapq.heappop(self.idle)) if self.idle else None

    def free(self, child: SimChild) -> None:
        heapq.heappush(self.idle, child.slot)
        self.by_slot[child.slot] = child


class RoundRobin(Policy):
    """nginx round-robin over one socket per child: each request goes to the next socket in
    turn and waits in that child's backlog, however busy the child is; a dead child's
    socket keeps its backlog for the replacement."""

    name = "round-robin"

    def __init__(self, sim: Simulation) -> None:
        super().__init__(sim)
        n = sim.w.children
        self.backlogs: list[deque[SimRequest]] = [deque() for _ in range(n)]
        self.slots: list[SimChild | None] = [None] * n
        self.idle = [False] * n
        self.turn = itertools.cycle(range(n))
        self.length = 0

    def submit(self, request: SimRequest) -> None:
        slot = next(self.turn)
        child = self.slots[slot]
        if child is not None and self.idle[slot]:
            self.idle[slot] = False
            self.sim.begin(request, child)
        else:
            self.backlogs[slot].append(request)
            self.length += 1
            self.sim.queued(self.length)

    def add(self, child: SimChild) -> None:
        slot = child.slot
        self.slots[slot] = child
        backlog = self.backlogs[slot]
        if backlog:
            self.length -= 1
            self.idle[slot] = False
            self.sim.begin(backlog.popleft(), child)
        else:
            self.idle[slot] = True

    def finished(self, request: SimRequest, child: SimChild) -> None:
        if child.limit and child.served >= child.limit:
            self.sim.stats.recycled += self.sim.counting()
            self.slots[child.slot] = None
            self.sim.respawn(child)
        else:
            self.add(child)

    def crashed(self, request: SimRequest, child: SimChild) -> None:
        self.slots[child.slot] = None
        super().crashed(request, child)

    def waiting(self) -> Iterator[SimRequest]:
        return itertools.chain.from_iterable(self.backlogs)


PEERS: dict[str, Callable[[Simulation], Policy]] = {
    "random-idle": RandomIdle, "round-robin": RoundRobin, "first-idle": FirstIdle,
}  # fmt: skip


def make_policy(sim: Simulation, name: str) -> Policy:
    """``fcgipool``, ``fcgipool:section.key=value,...`` or a peer's name."""
    base, _, settings = name.partition(":")
    return Fcgipool(sim, settings) if base == "fcgipool" else PEERS[base](sim)


# ---------------------------------------------------------------------------- simulation


class Simulation:
    """One workload under one policy: a clock, an event heap, the children, the counts."""

    def __init__(self, w: Workload, policy: str) -> None:
        self.w = w
        self.now = 0.0
        self.heap: list[tuple[float, int, Callable[[Any], None], Any]] = []
        self.seq = itertools.count()
        self.projects = make_projects(w)
        self.by_name = {project.name: project for project in self.projects}
        weights = [1.0 / (i + 1) ** w.zipf for i in range(w.projects)]
        self.cumulative = list(itertools.accumulate(weights))
        self.warm_capacity, self.shared_capacity = capacities(w, self.projects, weights)
        self.rate = w.load * self.shared_capacity
        self.end = w.warmup + w.duration
        # Streams of their own, so that every policy sees the same arrivals and changes.
        self.singles = random.Random(f"{w.seed}-singles")
        self.bursts = random.Random(f"{w.seed}-bursts")
        self.changes = random.Random(f"{w.seed}-changes")
        self.children_rng = random.Random(f"{w.seed}-children")
        self.stats = Stats()
        self.open = 0  # measured requests not ended yet
        self.closed = False  # no more arrivals
        self.stopped = False
        self.names = itertools.count(1)
        self.everyone: list[SimChild] = []
        self.policy = make_policy(self, policy)

    def clock(self) -> float:
        return self.now

    def at(self, when: float, action: Callable[[Any], None], arg: Any = None) -> None:
        heapq.heappush(self.heap, (when, next(self.seq), action, arg))

    def counting(self) -> bool:
        return self.w.warmup <= self.now < self.end

    # ------------------------------------------------------------------ the run

    def run(self) -> Stats:
        w = self.w
        for slot in range(w.children):  # all ready at 0, cold: the warm-up fills them
            child = self._child(slot)
            child.served = self.children_rng.randint(0, child.limit)  # started at other times
            child.ready = True
            self.policy.add(child)
        singles = MIX if not w.bursty else (MIX[CAPS], 0.0, MIX[HEAVY])
        self.single_rate = self.rate * sum(singles)
        self.single_mix = list(itertools.accumulate(singles))
        self.at(self.singles.expovariate(self.single_rate * self.ramp()), self._single)
        if w.bursty:
            self.burst_rate = self.rate * MIX[TILE] / (sum(w.burst) / 2)
            self.at(self.bursts.expovariate(self.burst_rate * self.ramp()), self._burst)
        if w.changes_per_hour:
            self.at(self.changes.expovariate(w.changes_per_hour / 3600), self._change)
        if not self.policy.peer:
            self.at(TICK, self._tick)
        self.at(self.end, self._close)
        self.at(self.end + PEER_TIMEOUT + TICK, self._sweep)
        self.at(self.end + DRAIN, self._stop)
        heap = self.heap
        while heap and not self.stopped:
            when, _, action, arg = heapq.heappop(heap)
            self.now = when
            action(arg)
            if self.closed and not self.open:
                break
        stats = self.stats
        stats.rate, stats.warm_capacity = self.rate, self.warm_capacity
        stats.shared_capacity = self.shared_capacity
        stats.unfinished = self.open
        stats.max_remembered = max(len(child.projects) for child in self.everyone)
        if isinstance(self.policy, Fcgipool):
            stats.max_class_queue = dict(self.policy.max_class)
            stats.dispatch_us = 1e6 * self.policy.cpu / max(1, self.policy.submitted)
        return stats

    def ramp(self) -> float:
        """The share of the full arrival rate now: from a tenth to all of it over the
        warm-up, so that each policy reaches the steady state it can keep (cold children
        under the full rate from the first second would drown any of them)."""
        w = self.w
        return 1.0 if self.now >= w.warmup else 0.1 + 0.9 * self.now / w.warmup

    def _close(self, _: Any) -> None:
        self.closed = True

    def _stop(self, _: Any) -> None:
        self.stopped = True

    def _sweep(self, _: Any) -> None:
        """Requests still waiting at a peer 30 s after the last arrival all timed out."""
        if self.policy.peer:
            for request in self.policy.waiting():
                if not request.outcome:
                    self.resolve(request, "waited_out", PEER_TIMEOUT)

    def _tick(self, _: Any) -> None:
        self.policy.tick()
        if not self.closed or self.open:
            self.at(self.now + TICK, self._tick)

    # ------------------------------------------------------------------ arrivals

    def _project(self, rng: random.Random) -> Project:
        i = bisect.bisect(self.cumulative, rng.random() * self.cumulative[-1])
        return self.projects[min(i, len(self.projects) - 1)]

    def _request(self, rng: random.Random, proj: Project, k: int) -> SimRequest:
        low, high = CLIP[k]
        service = min(high, max(low, proj.base[k] * rng.lognormvariate(0.0, NOISE[k])))
        crash = rng.random() < self.w.crash_rate
        measured = self.counting()
        request = SimRequest(self, proj, k, service, crash, measured)
        if measured:
            self.stats.generated += 1
            self.open += 1
        return request

    def _single(self, _: Any) -> None:
        if self.closed:
            return
        rng = self.singles
        k = bisect.bisect(self.single_mix, rng.random() * self.single_mix[-1])
        self.policy.submit(self._request(rng, self._project(rng), min(k, 2)))
        self.at(self.now + rng.expovariate(self.single_rate * self.ramp()), self._single)

    def _burst(self, _: Any) -> None:
        """A map viewer pans: 16-40 tiles of one project at once."""
        if self.closed:
            return
        rng = self.bursts
        proj = self._project(rng)
        for _ in range(rng.randint(*self.w.burst)):
            self.policy.submit(self._request(rng, proj, TILE))
        self.at(self.now + rng.expovariate(self.burst_rate * self.ramp()), self._burst)

    def _change(self, _: Any) -> None:
        """An operator saves a project: a child that holds it loads it again when next
        asked for it, unless the policy has it reloaded first."""
        if self.closed:
            return
        proj = self._project(self.changes)
        proj.version += 1
        self.stats.changes += self.counting()
        self.policy.changed(proj.name)
        self.at(self.now + self.changes.expovariate(self.w.changes_per_hour / 3600), self._change)

    # ------------------------------------------------------------------ children

    def _child(self, slot: int) -> SimChild:
        w = self.w
        limit = w.max_requests + self.children_rng.randint(0, w.max_requests_jitter)
        child = SimChild(f"c{next(self.names)}", slot, limit if w.max_requests else 0)
        self.everyone.append(child)
        return child

    def spawn(self, slot: int, warm: list[str], stale: set[str],
              replaces: SimChild | None = None) -> None:  # fmt: skip
        """A new child for ``slot``: QGIS starts, loads ``warm`` one project at a time, then
        takes traffic."""
        child = self._child(slot)
        child.replaces = replaces
        child.warm_set = list(warm)
        child.stale = stale & set(warm)
        self.policy.started(child)
        self.at(self.now + self.children_rng.uniform(*STARTUP), self._warm, child)

    def _warm(self, child: SimChild) -> None:
        if not child.warm_set:
            child.ready = True
            self.policy.add(child)
            return
        name = child.warm_set.pop(0)
        proj = self.by_name[name]
        seconds = proj.base[CAPS]  # the warm-up request: its GetCapabilities
        if child.cache.get(name) != proj.version:
            seconds += proj.load
            self._cache(child, proj)
            self.stats.warm_loads += self.counting()
        self.at(self.now + seconds, self._warmed, (child, name, seconds))

    def _warmed(self, arg: tuple[SimChild, str, float]) -> None:
        child, name, seconds = arg
        self.policy.loaded(child, name, seconds)
        self._warm(child)

    def _cache(self, child: SimChild, proj: Project) -> None:
        cache = child.cache
        cache[proj.name] = proj.version
        cache.move_to_end(proj.name)
        if len(cache) > self.w.cache:
            cache.popitem(last=False)

    def respawn(self, child: SimChild) -> None:
        """``child`` is gone (crashed, or exited after max_requests): another starts."""
        self.gone(child)
        warm, stale = self.policy.successor(child)
        self.spawn(child.slot, warm, stale)

    def gone(self, child: SimChild) -> None:
        child.alive = False

    def queued(self, length: int) -> None:
        stats = self.stats
        if self.now < self.w.warmup:
            stats.warmup_max_queue = max(stats.warmup_max_queue, length)
        elif length > stats.max_queue and self.now < self.end:
            stats.max_queue = length

    # ------------------------------------------------------------------ requests

    def begin(self, request: SimRequest, child: SimChild) -> None:
        """``child`` takes ``request``: it loads the project if it must, then works."""
        now = self.now
        request.child = child
        child.request = request
        if not request.started:
            request.started = now
        if self.policy.peer and not request.outcome and now - request.created > PEER_TIMEOUT:
            self.resolve(request, "waited_out", PEER_TIMEOUT)  # the child works for nobody
        proj = request.proj
        seconds = request.service
        counting = self.w.warmup <= now < self.end
        if child.cache.get(proj.name) == proj.version:
            child.cache.move_to_end(proj.name)
            self.stats.hits += counting
        else:
            self._cache(child, proj)
            seconds += proj.load
            self.stats.misses += counting
            self.stats.loads += counting
        crash = request.crash if not request.retried else (
            self.children_rng.random() < self.w.crash_rate)  # fmt: skip
        if crash:
            self.at(now + seconds - request.service / 2, self._crash, request)
        else:
            self.at(now + seconds, self._finish, request)

    def _finish(self, request: SimRequest) -> None:
        child = request.child
        assert child is not None
        request.child = child.request = None
        child.served += 1
        if not request.outcome:
            self.resolve(request, "served", self.now - request.created)
        self.policy.finished(request, child)

    def _crash(self, request: SimRequest) -> None:
        child = request.child
        assert child is not None
        request.child = child.request = None
        child.alive = False
        self.stats.crashes += self.counting()
        self.policy.crashed(request, child)

    def resolve(self, request: SimRequest, outcome: str, latency: float | None = None) -> None:
        """Every request ends here, once: served, refused, waited out or lost."""
        assert not request.outcome, (request.outcome, outcome)
        request.outcome = outcome
        stats = self.stats
        if not request.measured:
            stats.warmup_failed += outcome != "served" and self.now < self.w.warmup
            return
        self.open -= 1
        setattr(stats, outcome, getattr(stats, outcome) + 1)
        if outcome == "waited_out" and latency is None:
            latency = self.now - request.created
        if latency is not None:
            stats.latencies[request.kind_index].append(latency)


# ---------------------------------------------------------------------------- reporting


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summary(w: Workload, policy: str, stats: Stats, cpu: float) -> dict[str, Any]:
    hours = w.duration / 3600
    looked = stats.hits + stats.misses
    row: dict[str, Any] = {
        "workload": w.name, "children": w.children, "policy": policy,
        "rate": round(stats.rate, 1), "warm_capacity": round(stats.warm_capacity, 1),
        "shared_capacity": round(stats.shared_capacity, 1),
        "requests": stats.generated, "served": stats.served, "refused": stats.refused,
        "waited_out": stats.waited_out, "lost": stats.lost, "unfinished": stats.unfinished,
        "hit_rate": round(stats.hits / looked, 4) if looked else None,
        "loads_per_hour": round((stats.loads + stats.warm_loads) / hours),
        "warm_loads_per_hour": round(stats.warm_loads / hours),
        "max_queue": stats.max_queue, "max_class_queue": stats.max_class_queue,
        "warmup_failed": stats.warmup_failed, "warmup_max_queue": stats.warmup_max_queue,
        "max_remembered": stats.max_remembered, "crashes": stats.crashes,
        "recycled": stats.recycled, "changes": stats.changes, "cpu_s": round(cpu, 1),
        "dispatch_us_per_request": round(stats.dispatch_us, 1) if stats.dispatch_us else None,
    }  # fmt: skip
    for k, kind in enumerate(KINDS):
        for q in (0.5, 0.99):
            value = percentile(stats.latencies[k], q)
            row[f"{kind}_p{round(q * 100)}_ms"] = None if value is None else round(value * 1000, 1)
    return row


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """The dispatcher logs every 503; a run makes thousands. Errors only, then back."""
    logs.configure("console", "error", "")
    try:
        yield
    finally:
        logs.configure("console", "info", "")


def simulate(w: Workload, policies: Iterable[str] = POLICIES) -> list[dict[str, Any]]:
    rows = []
    with quiet():
        for policy in policies:
            began = time.process_time()
            stats = Simulation(w, policy).run()
            rows.append(summary(w, policy, stats, time.process_time() - began))
    return rows


def workloads(args: argparse.Namespace) -> list[Workload]:
    """The steady and the bursty site at each child count, as the command line says."""
    names = args.workloads.split(",")
    if not set(names) <= {"steady", "bursty"}:
        raise SystemExit(f"--workloads: steady and/or bursty, not {args.workloads}")
    base = Workload(seed=args.seed, cache=args.cache, load=args.load)
    if args.quick:
        base = replace(base, warmup=60.0, duration=60.0)
    return [
        replace(base, name=name, children=int(n), bursty=name == "bursty")
        for name in names
        for n in args.children.split(",")
    ]


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value / 1000:.1f}s" if value >= 10_000 else f"{value:.0f}"


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| workload | children | policy | hit rate | loads/h | GetCapabilities p50/p99 ms "
            "| tile p50/p99 ms | heavy p50/p99 ms | served | refused 503 | waited out "
            "| lost | max queue | warm-up failed |")  # fmt: skip
    lines = [head, "|" + "---|" * 3 + "---:|" * 11]
    for r in rows:
        kinds = [f"{_ms(r[f'{k}_p50_ms'])} / {_ms(r[f'{k}_p99_ms'])}" for k in KINDS]
        hit = f"{r['hit_rate'] * 100:.1f} %" if r["hit_rate"] is not None else "-"
        lines.append(
            f"| {r['workload']} | {r['children']} | {r['policy']} | {hit} "
            f"| {r['loads_per_hour']:,} | {' | '.join(kinds)} | {r['served']:,} "
            f"| {r['refused']:,} | {r['waited_out']:,} | {r['lost']:,} | {r['max_queue']:,} "
            f"| {r['warmup_failed']:,} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------- plot

COLOURS = {
    "fcgipool": "#1f77b4",
    "fcgipool:projects.memory=5": "#17becf",
    "random-idle": "#d62728",
    "round-robin": "#ff7f0e",
    "first-idle": "#7f7f7f",
}


def svg(rows: list[dict[str, Any]]) -> str:
    """Two panels of grouped bars, by hand: the cache hit rate, and the tile p99 on a log
    scale (10 ms to 100 s), one group per workload and child count, one bar per policy."""
    groups = list(dict.fromkeys((r["workload"], r["children"]) for r in rows))
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    by = {(r["workload"], r["children"], r["policy"]): r for r in rows}
    bar, gap, left, top, height = 12, 18, 60, 40, 200
    width = left + len(groups) * (len(policies) * bar + gap) + 20
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="HEIGHT"'
           ' font-family="sans-serif" font-size="11">',
           '<rect width="100%" height="100%" fill="white"/>']  # fmt: skip

    def panel(y0: float, title: str, value: Callable[[dict[str, Any]], float | None],
              ticks: list[tuple[float, str]]) -> None:  # fmt: skip
        out.append(f'<text x="{left}" y="{y0 - 12}" font-size="13">{title}</text>')
        for fraction, label in ticks:
            y = y0 + height * (1 - fraction)
            out.append(f'<line x1="{left}" x2="{width - 20}" y1="{y:.1f}" y2="{y:.1f}" '
                       'stroke="#ddd"/>')  # fmt: skip
            out.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{label}</text>')
        for g, (workload, children) in enumerate(groups):
            x = left + g * (len(policies) * bar + gap) + gap / 2
            for p, policy in enumerate(policies):
                row = by.get((workload, children, policy))
                share = None if row is None else value(row)
                if share is None:
                    continue
                h = height * max(0.0, min(1.0, share))
                colour = COLOURS.get(policy, "#000")
                out.append(f'<rect x="{x + p * bar:.1f}" y="{y0 + height - h:.1f}" '
                           f'width="{bar - 2}" height="{h:.1f}" fill="{colour}">'
                           f'<title>{policy}</title></rect>')  # fmt: skip
            out.append(f'<text x="{x + len(policies) * bar / 2:.1f}" y="{y0 + height + 14}" '
                       f'text-anchor="middle">{workload} {children}</text>')  # fmt: skip

    def log_p99(row: dict[str, Any]) -> float | None:
        ms = row["tile_p99_ms"]
        return None if ms is None else (math.log10(max(ms, 10.0)) - 1) / 4

    panel(top, "Project cache hit rate", lambda r: r["hit_rate"],
          [(i / 4, f"{i * 25} %") for i in range(5)])  # fmt: skip
    panel(
        top + height + 70,
        "Tile p99 (log scale; 30 s = timeouts)",
        log_p99,
        [(i / 4, label) for i, label in enumerate(("10 ms", "100 ms", "1 s", "10 s", "100 s"))],
    )
    x, y = left, 2 * height + 170
    for policy in policies:  # the legend, in as many lines as it takes
        step = 30 + 6 * len(policy)
        if x > left and x + step > width:
            x, y = left, y + 18
        colour = COLOURS.get(policy, "#000")
        out.append(f'<rect x="{x}" y="{y - 9}" width="10" height="10" fill="{colour}"/>')
        out.append(f'<text x="{x + 14}" y="{y}">{policy}</text>')
        x += step
    out[0] = out[0].replace("HEIGHT", str(y + 20))
    out.append("</svg>")
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="60 s warm-up, 60 s counted")
    parser.add_argument("--out", type=Path, help="write the results as JSON")
    parser.add_argument("--plot", type=Path, help="write an SVG plot of the results")
    parser.add_argument("--from", dest="source", type=Path, help="plot this JSON, run nothing")
    parser.add_argument("--children", default="64,256,512", help="child counts, comma-separated")
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--workloads", default="steady,bursty")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--cache", type=int, default=Workload.cache, help="projects a child keeps")
    parser.add_argument("--load", type=float, default=Workload.load, help="of the shared capacity")
    args = parser.parse_args(argv)
    if args.source is not None:
        document = json.loads(args.source.read_text())
    else:
        rows: list[dict[str, Any]] = []
        began = time.process_time()
        chosen = workloads(args)
        for w in chosen:
            rows += simulate(w, args.policies.split(","))
            print(f"{w.name} {w.children}: {time.process_time() - began:.0f} s CPU so far",
                  file=sys.stderr)  # fmt: skip
        document = {
            "command": "python bench/simulate.py " + " ".join(argv or sys.argv[1:]),
            "cpu_s": round(time.process_time() - began, 1),
            "workload": asdict(chosen[0]) | {"mix": dict(zip(KINDS, MIX, strict=True))},
            "warm_sets": WARM_SETS,
            "project_changes": CHANGES,
            "rows": rows,
        }
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(document, indent=1) + "\n")
    print(table(document["rows"]))
    print(
        f"\nwarm sets: {document['warm_sets']}\nproject changes: {document['project_changes']}"
        f"\nCPU: {document['cpu_s']} s"
    )
    if args.plot:
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        args.plot.write_text(svg(document["rows"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
