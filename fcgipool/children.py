"""The children's life cycle; the only writer of a child's state.

Spawn, probe and warm up until ready; hand to a request and take back; recover after an
abandoned request; retire, recycle (requests, memory, age), replace on reload, scale; reap
(every exit status arrives through :meth:`Children.reap`); respawn with backoff. Failures
(crashes, kills after a timeout, failed starts) within a window, each weighed by one over
the number of workers when it happened, make the failure pressure; above its limit the
supervisor is told, and exits.

``workers`` is the target, between ``minimum`` and ``maximum``: scaling.py decides when one
more child is needed or an idle one may go, and :meth:`Children.grow` and
:meth:`Children.retire_idle` carry it out. The time a child takes from spawn to ready (probe
and warm-up included) is learned here (``start_seconds``) for those decisions, from the
starts after the pool first became ready. The first children start together and cold (an
empty page cache, a new profile: 10.5 s for a QGIS child that later starts in 2 s), so their
time is at most an upper bound on the start of one more child under load: only the first of
them ready in less than START_SECONDS (the time assumed until one is measured) teaches it.
A QGIS child is ready in 0.7-1.3 s: with 2 s assumed, the first burst after a quiet start
waited 6 s for a second child while 160 tiles queued on one.

Every move of a child's state is checked against :data:`TRANSITIONS`. What a process is
(fork, exec, signals, waitpid) is behind :class:`Processes`: the real one is
processes.OsProcesses, the in-process tests use a fake.
"""

from __future__ import annotations

import asyncio
import collections
import math
import os
import random
import signal
import subprocess
import time
import urllib.parse
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Protocol

from . import logs
from .child import Child, ChildConnection, State, remember
from .client import cgi_params, response_status
from .machine import IllegalTransition
from .processes import describe_status
from .protocol import EndRequest, RecordType, encode_record, encode_request, stdout_content

if TYPE_CHECKING:
    from .accounting import Accounting
    from .config import Config
    from .projects import Projects
    from .request import Request

log = logs.get("fcgipool.children")

MAX_BACKOFF = 30.0
START_SECONDS = 2.0  # a child's start time assumed until one has been measured
START_WEIGHT = 0.3  # of the newest start in the learned start time (an EWMA)
MS_PER_TICK = 1000 // os.sysconf("SC_CLK_TCK")  # CPU time in /proc is in clock ticks
PAGE = os.sysconf("SC_PAGE_SIZE")
_OUR_SIGNALS = (signal.SIGTERM, signal.SIGKILL)  # what the pool sends to stop a child
_PROBE_HEAD = 4096
_ABORT = encode_record(RecordType.ABORT_REQUEST, 1)

TRANSITIONS: dict[State, frozenset[State]] = {
    State.STARTING: frozenset({State.IDLE, State.STOPPING, State.DEAD}),
    State.IDLE: frozenset(
        {State.BUSY, State.LOADING, State.RECOVERING, State.STOPPING, State.DEAD}
    ),
    State.BUSY: frozenset({State.IDLE, State.RECOVERING, State.STOPPING, State.DEAD}),
    State.RECOVERING: frozenset({State.IDLE, State.STOPPING, State.DEAD}),
    State.LOADING: frozenset({State.IDLE, State.STOPPING, State.DEAD}),
    State.STOPPING: frozenset({State.DEAD}),
    State.DEAD: frozenset(),
}


class Processes(Protocol):
    """What the life cycle needs of the operating system."""

    def spawn(self, child: Child) -> None: ...
    async def connect(
        self, child: Child, factory: Callable[[], ChildConnection]
    ) -> ChildConnection: ...
    def signal(self, child: Child, signum: int) -> None: ...
    def reap(self) -> list[tuple[int, int]]: ...
    def forget(self, child: Child) -> None: ...
    def rss(self, child: Child) -> int: ...
    def cpu_percent(self, child: Child) -> float: ...
    def usage(self, child: Child) -> tuple[int, int]:
        """CPU clock ticks so far and resident pages (0, 0 when unknown)."""
    def killed_for_memory(self, child: Child) -> bool:
        """Whether the kernel killed the reaped ``child`` at child.max_memory."""
    def cpu_busy(self, waiting: bool) -> float | None:
        """How busy the pool's CPUs were lately while work waited (0-1; hostcpu.CpuMeter,
        told at every call whether work waits now), None when unknown."""
    def cpu_count(self) -> int:
        """The CPUs the pool may run on (its affinity)."""


class Dispatcher(Protocol):
    """The dispatcher, as the life cycle sees it: where free children go."""

    def child_ready(self, child: Child) -> None: ...
    def child_idle(self, child: Child) -> None: ...
    def forget(self, child: Child) -> None: ...
    def take_out(self, child: Child) -> None:
        """``child`` stays a member but takes no request until it is idle again."""


class Events(Protocol):
    """The supervisor, as the life cycle sees it."""

    def children_ready(self) -> None:
        """Every worker is ready (the first time, or again after a reload)."""

    def children_replaced(self) -> None:
        """A reload replaced its last child."""

    def children_gone(self) -> None:
        """Stopping, and the last child was reaped."""

    def failure_pressure_exceeded(self, pressure: float) -> None: ...

    def child_stuck(self, child: Child, request: Request | None) -> None:
        """``child`` did not come back after ``request`` was given up: it is stopped next."""


class Probe:
    """A real request whose complete answer proves a child is free and alive.

    With ``check_status`` (warm-up requests) an answer of 500 or more is a failure too.
    """

    def __init__(
        self,
        child: Child,
        done: Callable[[Child, bool], None],
        check_status: bool,
        timer: Callable[[Callable[[bool], None], bool], asyncio.TimerHandle],
    ) -> None:
        self.child, self.done, self.check_status = child, done, check_status
        self.head = b""
        self.finished = False
        child.unanswered = False
        self.timer = timer(self._expired, True)  # no answer in time: a failure

    def _expired(self, _: bool) -> None:
        if not self.finished:
            self.child.unanswered = True
            self._finish(False)

    def _finish(self, ok: bool) -> None:
        if not self.finished:
            self.finished = True
            self.timer.cancel()
            self.done(self.child, ok)

    def on_output(
        self, records: bytes, starts: list[int], has_output: bool, end: EndRequest | None
    ) -> None:
        if self.check_status and len(self.head) < _PROBE_HEAD:
            self.head += stdout_content(records, starts)
        if end is not None:
            self._finish(not self.check_status or response_status(self.head) < 500)

    def on_lost(self) -> None:
        self._finish(False)

    def pause_sending(self) -> None:
        pass

    def resume_sending(self) -> None:
        pass


def _move(child: Child, state: State) -> None:
    if state not in TRANSITIONS[child.state]:
        raise IllegalTransition(f"child {child.number}: {child.state.value} -> {state.value}")
    child.state = state


class Children:
    """The pool's children and everything that happens to them."""

    def __init__(
        self,
        config: Config,
        processes: Processes,
        dispatcher: Dispatcher,
        accounting: Accounting,
        events: Events,
        loop: asyncio.AbstractEventLoop,
        projects: Projects,
    ) -> None:
        self.processes = processes
        self.projects = projects
        self.wall: Callable[[], float] = time.time
        self.dispatcher = dispatcher
        self.accounting = accounting
        self.events = events
        self.loop = loop
        self.all: list[Child] = []
        self.by_pid: dict[int, Child] = {}
        self.started = 0  # children spawned so far; numbers them
        self.workers = config.pool.workers  # the target
        self.minimum = config.pool.minimum
        self.maximum = config.pool.maximum
        self.start_seconds: float | None = None  # learned spawn -> ready, probe and warm-up in
        self.cpu_ms = 0  # CPU time of the requests served (log.request_cost) ...
        self.run_seconds = 0.0  # ... and their run time: a child taking each to its end
        self.finished = 0  # requests the children answered (throughput.Throughput)
        self.scaled = {"started": 0, "retired": 0}  # the autoscaler's decisions carried out
        self.last_scaling: dict[str, object] | None = None
        self.stale: list[Child] = []  # children a reload has yet to replace
        self.replacing = False  # a reload is under way
        self.stopping = False
        self.ready_announced = False
        self.failures: collections.deque[tuple[float, float]] = collections.deque()  # when, weight
        self.failures_in_a_row = 0
        self.next_spawn_at = 0.0
        self.respawn_timer: asyncio.TimerHandle | None = None
        # The projects of children that left, for the warm sets of their replacements.
        self.inherited: collections.deque[tuple[list[str], set[str]]] = collections.deque(
            maxlen=64
        )
        # Loads to carry out on running children, one at a time: (project, why), why being
        # "changed" (the file changed, or `projects refresh`), "warm" or "drop".
        self.pending: collections.deque[tuple[Child, str, str]] = collections.deque()
        self.configure(config)

    def configure(self, config: Config) -> None:
        """What the next children and the next decisions follow (a reload changes it)."""
        self.config = config
        self.measure = config.log.request_cost

    def project_uri(self, project: str) -> str:
        """The request that loads ``project`` on a child (projects.pinned_uri)."""
        quoted = urllib.parse.quote(project, safe="/")
        return self.config.projects.pinned_uri.replace("{project}", quoted)

    # ------------------------------------------------------------------ views

    def active(self) -> list[Child]:
        """Children that are not being replaced."""
        return [child for child in self.all if not child.retiring]

    def ready(self) -> int:
        serving = (State.IDLE, State.BUSY)
        return sum(child.state in serving for child in self.all if not child.retiring)

    def retiring(self) -> int:
        return sum(1 for child in self.all if child.retiring)

    def loading(self) -> int:
        return sum(1 for child in self.all if child.state is State.LOADING)

    def holders(self) -> dict[str, list[int]]:
        """For each project, the pids of the children that hold it."""
        found: dict[str, list[int]] = {}
        for child in self.all:
            if child.state in (State.IDLE, State.BUSY, State.LOADING):
                for project in child.projects:
                    found.setdefault(project, []).append(child.pid)
        return found

    def requests(self) -> list[Request]:
        """The requests children have now."""
        return [child.request for child in self.all if child.request is not None]

    def failure_pressure(self) -> float:
        """Failures within the window, each over the number of workers when it happened:
        retiring idle children does not raise the pressure of failures already counted."""
        cutoff = self.loop.time() - self.config.pool.failure_window
        return sum(weight for moment, weight in self.failures if moment >= cutoff)

    def starting(self) -> int:
        return sum(1 for child in self.all if child.state is State.STARTING)

    def missing(self) -> int:
        """Children the target asks for that are not spawned yet (a respawn backoff)."""
        return max(0, self.workers - len(self.active()))

    def serving(self) -> int:
        """Children that take requests (idle or busy), those being replaced included."""
        return sum(1 for child in self.all if child.state in (State.IDLE, State.BUSY))

    def rss(self, child: Child) -> int:
        return self.processes.rss(child)

    def cpu_percent(self, child: Child) -> float:
        return self.processes.cpu_percent(child)

    # ------------------------------------------------------------------ starting

    def reconcile(self, reason: str = "missing") -> None:
        """Start children until ``workers`` are active (not being replaced), respecting the
        respawn backoff; and let a pending reload replace its next batch. ``reason`` says
        why a child would be started (in child_started)."""
        if self.stopping:
            return
        limit = self.config.pool.max_recycling
        while self.stale and self.retiring() < limit:
            child = self.stale.pop(0)
            if child in self.all and not child.retiring and child.state is not State.DEAD:
                child.retiring = "reload"
                self._bequeath(child)
                log.info("child_retiring", pid=child.pid, reason="reload")
        missing = self.workers - len(self.active())
        if missing <= 0:
            self._retire_surplus()
            return
        delay = self.next_spawn_at - self.loop.time()
        if delay > 0:
            if self.respawn_timer is None:
                log.info("respawn_delayed", seconds=round(delay, 2))
                self.respawn_timer = self.loop.call_later(delay, self._respawn_due)
            return
        for _ in range(missing):
            if self.stopping:
                return
            self._spawn(reason)

    def _respawn_due(self) -> None:
        self.respawn_timer = None
        self.reconcile("respawn")

    def _spawn(self, reason: str) -> None:
        self.started += 1
        section = self.config.child
        child = Child(self.started, list(section.warmup), self.loop.time())
        held, stale = self.inherited.popleft() if self.inherited else ([], set())
        child.warm_set = [*self.projects.pinned(), *self.projects.warm_set(held)]
        child.stale = stale & set(child.warm_set)  # its predecessor held an older version
        if section.max_requests:
            child.requests_limit = section.max_requests + random.randint(
                0, section.max_requests_jitter
            )
        try:
            self.processes.spawn(child)
        except (OSError, subprocess.SubprocessError) as error:
            log.error("child_spawn_failed", error=str(error))
            self._failure("spawn failed")
            self.reconcile("respawn")
            return
        self.all.append(child)
        self.by_pid[child.pid] = child
        log.info("child_started", pid=child.pid, reason=reason)
        self._probe(child, section.start_timeout, section.probe_uri, False, self._on_started)

    def _on_started(self, child: Child, ok: bool) -> None:
        """A probe or warm-up answer of a starting child arrived (or failed)."""
        if child.state is not State.STARTING:
            return
        if not ok:
            log.warning("child_start_failed", pid=child.pid, warmups_done=child.warmups_done)
            self._stop(child, failure=True)
            return
        if child.warmups_done < len(child.warmup):
            uri = child.warmup[child.warmups_done]
            child.warmups_done += 1
            self._probe(child, self.config.child.start_timeout, uri, True, self._on_started)
            return
        if child.warm_set:
            project = child.warm_set.pop(0)
            child.warmups_done += 1
            required = project in self.projects.pinned()
            self._load(child, project, "pinned" if required else "inherited",
                       partial(self._on_warm_set_loaded, required))  # fmt: skip
            return
        child.ready_at = self.loop.time()
        elapsed = round(child.ready_at - child.started_at, 3)
        log.info("child_ready", pid=child.pid, seconds=elapsed, warmups=child.warmups_done)
        learned = self.start_seconds
        if self.ready_announced:
            self.start_seconds = (
                elapsed if learned is None else learned + START_WEIGHT * (elapsed - learned)
            )
        elif learned is None and elapsed < START_SECONDS:  # cold, and started with others
            self.start_seconds = elapsed
        if self.config.pool.max_memory or self.config.child.max_rss:
            child.rss = self.processes.rss(child)  # once per start, not per request
        self.failures_in_a_row = 0
        self.dispatcher.child_ready(child)
        self._free(child)
        self._retire_surplus()
        if not self.ready_announced and self.ready() >= self.workers:
            self.ready_announced = True
            self.events.children_ready()

    def _on_warm_set_loaded(self, required: bool, child: Child, ok: bool) -> None:
        """A project of the warm set is loaded. One that failed is a failed start if it is
        pinned (``required``) or got no answer at all; else the child goes on without it."""
        if child.state is not State.STARTING:
            return
        self._on_started(child, ok or not (required or child.unanswered))

    # ------------------------------------------------------------------ projects

    def _load(
        self, child: Child, project: str, why: str, then: Callable[[Child, bool], None]
    ) -> None:
        """Send the request that loads ``project``; learn how long it took; ``then``."""
        started = self.loop.time()

        def loaded(child: Child, ok: bool) -> None:
            seconds = self.loop.time() - started
            if ok:
                memory = max(1, self.config.projects.memory)
                size = max(memory, len(self.projects.configured))
                remember(child.projects, project, size, started)
                reload = why == "changed" or project in child.stale
                child.stale.discard(project)
                self.projects.loaded(project, seconds, reload=reload)
            log.info("project_loaded" if ok else "project_load_failed", pid=child.pid,
                     project=project, why=why, seconds=round(seconds, 3))  # fmt: skip
            then(child, ok)

        self._probe(child, self.config.child.start_timeout, self.project_uri(project), True,
                    loaded)  # fmt: skip

    def changed(self, project: str, gone: bool = False, since: float = math.inf) -> int:
        """``project``'s file changed (or is gone): every child holding it forgets it; each
        is brought to the new version one at a time (unless it is gone). A child whose
        request for it began ``since`` the file changed (the loop's clock) already has
        the new version: QGIS reloaded it for that request. Returns how many children
        held an older version."""
        held = 0
        for child in self.all:
            if not gone and child.projects.get(project, -math.inf) >= since:
                continue
            if project in child.projects or project in child.stale:
                held += 1
                child.projects.pop(project, None)
                if gone:
                    child.stale.discard(project)
                else:
                    child.stale.add(project)
                    self._queue(child, project, "changed")
        self.run_pending()
        return held

    def warm(self, project: str, count: int) -> int:
        """Load ``project`` on ``count`` ready children (all with 0) that lack it, one at
        a time; returns how many will load it."""
        chosen = [
            child for child in self.active()
            if child.state in (State.IDLE, State.BUSY) and project not in child.projects
        ][: count or None]  # fmt: skip
        for child in chosen:
            self._queue(child, project, "warm")
        self.run_pending()
        return len(chosen)

    def drop(self, project: str) -> int:
        """No child holds ``project`` from now on: QGIS cannot forget a project, so the
        children holding it are replaced, one at a time (their replacements do not load
        it). Returns how many."""
        holders = [child for child in self.all if project in child.projects]
        for child in holders:
            child.projects.pop(project, None)
            child.stale.discard(project)
            self._queue(child, project, "drop")
        self.pending = collections.deque(
            entry for entry in self.pending if entry[1] != project or entry[2] == "drop"
        )
        self.run_pending()
        return len(holders)

    def _queue(self, child: Child, project: str, why: str) -> None:
        if not any(c is child and p == project for c, p, _ in self.pending):
            self.pending.append((child, project, why))

    def run_pending(self) -> None:
        """Carry out the next pending load, one child at a time. A child is taken out of
        rotation to load a project only while the pool keeps more ready children than
        its minimum; otherwise (a fixed pool: the minimum is every child) a warmed
        replacement takes its place, as for a recycle: it loads what the child held, the
        changed project included, before it takes traffic, and the child serves until
        then. A project to drop always means a replacement."""
        if self.stopping or self.loading():
            return
        for entry in list(self.pending):
            child, project, why = entry
            if self._done_with(child, project, why):
                self.pending.remove(entry)
                continue
            if child.state is State.STARTING:
                continue  # it was loading its warm set when the file changed
            in_place = why != "drop" and (
                self.ready() - 1 >= self.minimum or (why == "warm" and self.ready() > 1)
            )
            if in_place:
                if child.state is not State.IDLE:
                    continue  # its turn comes when it is free (see _free)
                self.pending.remove(entry)
                _move(child, State.LOADING)
                self.dispatcher.take_out(child)
                self._load(child, project, why, self._on_loaded)
                return
            if self.retiring() >= self.config.pool.max_recycling:
                return  # the next one when this replacement is ready
            self.pending.remove(entry)
            self.recycle(child, "project_" + ("dropped" if why == "drop" else why))
            return

    def _done_with(self, child: Child, project: str, why: str) -> bool:
        """Is a pending load moot: the child gone or being replaced, a request loaded the
        new version meanwhile, or it holds the project to warm already?"""
        if child not in self.all or child.retiring or child.state in (
            State.STOPPING, State.DEAD
        ):  # fmt: skip
            return True
        if why == "changed":
            return project not in child.stale
        return why == "warm" and project in child.projects

    def _on_loaded(self, child: Child, ok: bool) -> None:
        if child.state is not State.LOADING:
            return
        if child.unanswered:
            log.warning("child_load_timeout", pid=child.pid)
            child.exit_reason = "load_timeout"
            self._stop(child, failure=True)
        else:
            self._free(child)
        self.run_pending()

    def probe_idle(self) -> None:
        """Probe one child idle for child.probe_interval, out of rotation (a child wedged
        while idle is found before a visitor reaches it); one at a time."""
        interval = self.config.child.probe_interval
        if not interval or self.stopping or any(c.probing for c in self.all):
            return
        now = self.loop.time()
        for child in self.all:
            if child.state is State.IDLE and not child.retiring and (
                now - max(child.idle_since, child.probed_at) >= interval
            ):
                child.probing = True
                child.probed_at = now
                _move(child, State.RECOVERING)
                self.dispatcher.take_out(child)
                self._probe(child, self.config.timeouts.cancel, self.config.child.probe_uri,
                            False, self._on_idle_probed)  # fmt: skip
                return

    def _on_idle_probed(self, child: Child, ok: bool) -> None:
        if child.state is not State.RECOVERING or not child.probing:
            return
        child.probing = False
        if ok:
            self._free(child)
            return
        self.reap()  # a child that died is a crash
        if child.pid not in self.by_pid:
            return
        log.warning("child_probe_failed", pid=child.pid, timeout=self.config.timeouts.cancel)
        child.exit_reason = "probe_failed"
        self._stop(child, failure=True)

    def check_projects(self) -> None:
        """Stat the files of the projects children hold, when due; act on changes."""
        if not self.projects.due():
            return
        held = {project for child in self.all for project in (*child.projects, *child.stale)}
        changed, gone = self.projects.check(held)
        lag = self.wall() - self.loop.time()  # file times are on the wall clock
        for project in changed:
            version = self.projects.by_path[project].version
            count = self.changed(project, since=version[0] / 1e9 - lag if version else math.inf)
            log.info("project_changed", project=project, children=count)
        for project in gone:
            count = self.changed(project, gone=True)
            log.warning("project_gone", project=project, children=count)
        if self.pending:
            self.run_pending()

    def _probe(
        self,
        child: Child,
        timeout: float,
        uri: str,
        check_status: bool,
        done: Callable[[Child, bool], None],
    ) -> None:
        """Send a probe (or a warm-up request) on a fresh connection; ``done(child, ok)``
        follows within ``timeout``."""
        probe = Probe(child, done, check_status, partial(self.loop.call_later, timeout))
        params = cgi_params(uri, extra={"HTTP_USER_AGENT": "fcgipool-probe"})
        self.loop.create_task(self._send_probe(probe, encode_request(1, params, keep_conn=True)))

    async def _send_probe(self, probe: Probe, data: bytes) -> None:
        connection = await self.connect(probe.child)
        if connection is None:
            probe.on_lost()
            return
        connection.handler = probe
        connection.write(data)

    async def connect(self, child: Child) -> ChildConnection | None:
        """A new connection to ``child``, replacing any previous one; None if it is gone."""
        old = child.drop_connection()
        if old is not None:
            old.close()
        factory = partial(ChildConnection, child, self._misbehaved, self.loop.time)
        try:
            connection = await self.processes.connect(child, factory)
        except OSError as error:
            log.warning("child_connect_failed", pid=child.pid, error=str(error))
            return None
        if child.state in (State.DEAD, State.STOPPING):
            connection.close()
            return None
        child.connection = connection
        return connection

    # ------------------------------------------------------------------ serving

    def assign(self, child: Child, request: Request) -> None:
        _move(child, State.BUSY)
        child.request = request

    def release(self, child: Child, served: bool) -> None:
        """The request on ``child`` ended cleanly: the child is free for the next one."""
        request = child.request
        if self.measure and request is not None:
            ticks, pages = self.processes.usage(child)
            if ticks or pages:  # one read a request: the last one ended at ticks_at_start
                cpu_ms = request.cpu_ms = (ticks - child.ticks_at_start) * MS_PER_TICK
                child.ticks_at_start = ticks
                request.rss_mib = pages * PAGE // 2**20
                child.last_cost = (cpu_ms, request.rss_mib)
                if served:  # for the children's CPU share (hostcpu.CpuShare)
                    self.cpu_ms += cpu_ms
                    self.run_seconds += self.loop.time() - request.started
        child.request = None
        if served:
            child.requests_served += 1
            self.finished += 1
        if child.state is not State.BUSY:
            return
        if not self.config.child.keep_conn:
            self._close_connection(child)
        if child.requests_limit and child.requests_served >= child.requests_limit:
            self.recycle(child, "max_requests")
        self._free(child, measure=False)

    def abandon(self, child: Child) -> None:
        """A request was given up on ``child`` (timeout, client gone, connection lost): it
        is told to stop, and it is free again once a probe is answered within the cancel
        timeout; else it is stopped, and that counts as a failure."""
        child.abandoned, child.request = child.request, None
        if child.state is not State.BUSY:
            return
        connection = child.drop_connection()
        if connection is not None and not connection.closed:
            connection.write(_ABORT)
            connection.close()
        _move(child, State.RECOVERING)
        log.info("child_cancelling", pid=child.pid)
        self._probe(child, self.config.timeouts.cancel, self.config.child.probe_uri, False,
                    self._on_recovered)  # fmt: skip

    def _on_recovered(self, child: Child, ok: bool) -> None:
        if child.state is not State.RECOVERING:
            return
        if ok:
            log.info("child_recovered", pid=child.pid)
            self._free(child)
            return
        self.reap()  # a child that died is a crash, not a failed cancel
        if child.pid not in self.by_pid:
            return
        log.warning("child_cancel_failed", pid=child.pid, timeout=self.config.timeouts.cancel)
        self.events.child_stuck(child, child.abandoned)
        child.exit_reason = "cancel_failed"
        self._stop(child, failure=True)

    def _free(self, child: Child, measure: bool = True) -> None:
        """``child`` can take a request: give it one, or stop it if it is being replaced
        and its replacements are ready. Unless it comes from a request (``measure``
        false: release read it already), its CPU so far is where its next request's
        begins (log.request_cost): a start, a load or a probe is not a request's."""
        if measure and self.measure:
            child.ticks_at_start = self.processes.usage(child)[0]
        if child.retiring and (self.stopping or self.ready() >= self.workers):
            self._retire(child)
            return
        _move(child, State.IDLE)
        child.idle_since = self.loop.time()
        if self.pending and any(entry[0] is child for entry in self.pending):
            self.run_pending()  # its turn to load a project, before another request
            if child.state is State.LOADING:
                return
        self.dispatcher.child_idle(child)

    def _misbehaved(self, child: Child) -> None:
        """The child wrote something that is not FastCGI: it cannot be trusted again."""
        log.warning("child_misbehaved", pid=child.pid)
        self._kill(child, failure=True)

    # ------------------------------------------------------------------ replacing

    def recycle(self, child: Child, reason: str) -> None:
        """Replace ``child``: a replacement starts now; the child serves until it is ready."""
        if child.retiring or self.stopping or self.retiring() >= self.config.pool.max_recycling:
            return
        child.retiring = reason
        self._bequeath(child)
        self.accounting.restarted(reason)
        log.info("child_recycling", pid=child.pid, reason=reason)
        self.reconcile("recycle")

    def _bequeath(self, child: Child) -> None:
        """What ``child`` held goes to the warm set of the next child started."""
        self.inherited.append(([*reversed(child.projects), *child.stale], set(child.stale)))

    def check_age_and_memory(self) -> None:
        """Recycle children past child.max_lifetime or child.max_rss (every rss_interval)."""
        section = self.config.child
        now = self.loop.time()
        sample = bool(section.max_rss or self.config.pool.max_memory)
        for child in list(self.all):
            if sample and child.state is not State.DEAD:
                child.rss = self.processes.rss(child)  # what the memory bound reads
            if child.retiring or child.state not in (State.IDLE, State.BUSY):
                continue
            if section.max_lifetime and now - child.started_at > section.max_lifetime:
                self.recycle(child, "max_lifetime")
            elif section.max_rss and child.rss > section.max_rss:
                self.recycle(child, "max_rss")

    def replace_all(self) -> int:
        """Replace every child, a batch at a time (a reload); returns how many."""
        self.stale = self.active()
        self.replacing = bool(self.stale)
        self.accounting.restarted("reload", len(self.stale))
        self.reconcile("reload")
        return len(self.stale)

    def scale(self, workers: int) -> None:
        """Run ``workers`` children from now on; the idle ones go first."""
        self.workers = workers
        active = self.active()
        surplus = len(active) - workers
        for child in sorted(active, key=lambda c: c.state is State.BUSY)[: max(0, surplus)]:
            child.retiring = "scale_down"
        self.reconcile("scale")

    def set_range(self, minimum: int, maximum: int) -> None:
        """The target may move between ``minimum`` and ``maximum`` from now on; it is
        brought into the range (what that starts or retires is up to the caller: a reload
        replaces every child anyway, a scale calls :meth:`scale`)."""
        self.minimum, self.maximum = minimum, maximum
        self.workers = max(minimum, min(maximum, self.workers))

    def grow(self, reason: str, numbers: dict[str, float]) -> None:
        """One child more than now (the autoscaler decided so): started and warmed like
        every other, it takes requests once ready."""
        if self.stopping or self.workers >= self.maximum:
            return
        self.workers += 1
        self.scaled["started"] += 1
        self.last_scaling = self._decision("started", reason, numbers)
        self.reconcile(reason)

    def retire_idle(self, child: Child, reason: str, numbers: dict[str, float]) -> None:
        """One child fewer: ``child``, which must be idle (never one with a request), goes
        now and is not replaced."""
        if child.state is State.IDLE:
            self.shrink(child, reason, numbers)

    def shrink(self, child: Child, reason: str, numbers: dict[str, float]) -> None:
        """One child fewer, ``child`` (the autoscaler's decision): it goes now if idle, else
        once its request ends; it is not replaced."""
        if self.stopping or child.retiring or self.workers <= self.minimum:
            return
        if child.state not in (State.IDLE, State.BUSY):
            return
        self.workers -= 1
        self.scaled["retired"] += 1
        self.last_scaling = self._decision("retired", reason, numbers)
        child.retiring = reason
        if child.state is State.IDLE:
            self._retire(child)

    def _decision(self, action: str, reason: str, numbers: dict[str, float]) -> dict[str, object]:
        return {"action": action, "reason": reason, "at": self.loop.time(), **numbers,
                "workers": self.workers}  # fmt: skip

    def _retire_surplus(self) -> None:
        """Stop the children being replaced once enough replacements are ready."""
        if self.ready() < self.workers:
            return
        for child in list(self.all):
            if child.retiring and child.state in (State.IDLE, State.STARTING, State.RECOVERING):
                self._retire(child)

    def _retire(self, child: Child) -> None:
        log.info("child_retired", pid=child.pid, reason=child.retiring)
        self._stop(child)

    # ------------------------------------------------------------------ stopping

    def hold(self) -> None:
        """No child is started from now on (the pool is stopping)."""
        self.stopping = True
        if self.respawn_timer is not None:
            self.respawn_timer.cancel()
            self.respawn_timer = None

    def stop_all(self) -> None:
        """Every child is asked to stop; none is started again."""
        self.hold()
        for child in list(self.all):
            self._stop(child)
        if not self.by_pid:
            self.events.children_gone()

    def _stop(self, child: Child, failure: bool = False) -> None:
        """SIGTERM, then SIGKILL after kill_grace if it still lives. A death by any signal
        after this is a normal stop unless ``failure``."""
        if child.state in (State.DEAD, State.STOPPING):
            child.failure = child.failure or failure
            return
        self._stopping(child, failure)
        self.processes.signal(child, signal.SIGTERM)
        self.loop.call_later(self.config.timeouts.kill_grace, self._kill_if_alive, child)

    def _kill(self, child: Child, failure: bool) -> None:
        if child.state is State.DEAD:
            return
        if child.state is not State.STOPPING:
            self._stopping(child, failure)
        child.failure = child.failure or failure
        self.processes.signal(child, signal.SIGKILL)

    def _stopping(self, child: Child, failure: bool) -> None:
        child.stop_requested = True
        child.failure = child.failure or failure
        _move(child, State.STOPPING)
        self.dispatcher.forget(child)
        self._close_connection(child)

    def _kill_if_alive(self, child: Child) -> None:
        if child.state is not State.DEAD:
            log.warning("child_kill", pid=child.pid, reason="still alive after SIGTERM")
            self.processes.signal(child, signal.SIGKILL)

    def _close_connection(self, child: Child) -> None:
        """Close the child's connection; whoever was using it learns it is lost."""
        connection = child.drop_connection()
        if connection is not None:
            handler, connection.handler = connection.handler, None
            connection.close()
            if handler is not None:
                handler.on_lost()

    # ------------------------------------------------------------------ exits

    def reap(self) -> None:
        """The one reaper: every exit status is collected here, children's and orphans'."""
        for pid, status in self.processes.reap():
            child = self.by_pid.pop(pid, None)
            if child is None:
                log.info("orphan_reaped", pid=pid, status=describe_status(status))
            else:
                self._exited(child, status)

    def _exited(self, child: Child, status: int) -> None:
        memory = self.processes.killed_for_memory(child)
        failed = memory or child.failure or not child.stop_requested
        request = child.request
        _move(child, State.DEAD)
        self.dispatcher.forget(child)
        self._close_connection(child)
        self.processes.forget(child)
        self.all.remove(child)
        level = log.warning if failed else log.info
        details = {"reason": "max_memory"} if memory else {}
        if memory and request is not None:
            details.update(request=request.id, uri=request.uri)
        level("child_exited", pid=child.pid, status=describe_status(status), failure=failed,
              **details)  # fmt: skip
        if failed:
            if child.ready_at:  # one that never got ready may have failed on its warm set
                self._bequeath(child)
            reason = child.exit_reason or ("killed" if child.stop_requested else "crash")
            if os.WIFSIGNALED(status) and os.WTERMSIG(status) not in _OUR_SIGNALS:
                reason = "crash"  # e.g. SIGSEGV while its failed probe was being handled
            if memory:
                reason = "max_memory"  # the kernel's OOM kill at the cap: SIGKILL
            self.accounting.restarted(reason)
            self._failure(describe_status(status))
        if self.stopping:
            if not self.by_pid:
                self.events.children_gone()
            return
        self.reconcile("respawn" if failed else "missing")
        if self.replacing and not self.stale and not self.retiring():
            self.replacing = False
            self.events.children_replaced()

    def _failure(self, reason: str) -> None:
        now = self.loop.time()
        self.failures.append((now, 1 / max(1, self.workers)))
        while self.failures and self.failures[0][0] < now - self.config.pool.failure_window:
            self.failures.popleft()
        self.failures_in_a_row += 1
        delay = self.config.child.respawn_delay * 2 ** (self.failures_in_a_row - 1)
        delay = min(MAX_BACKOFF, delay)
        self.next_spawn_at = now + delay
        pressure = self.failure_pressure()
        log.warning("child_failure", reason=reason, pressure=round(pressure, 3))
        if pressure > self.config.pool.max_failure_pressure and not self.stopping:
            self.events.failure_pressure_exceeded(pressure)
