"""The supervisor: one asyncio loop that builds the pool's parts and turns signals and
control commands into actions.

Modelled on gunicorn's arbiter: one ``handle_*`` method per signal, each verb (reload,
scale, stop) its own method. The pool's own life is one :class:`Lifecycle`; every move
is in :data:`LIFECYCLE`. The parts, in the order a request meets them: listeners.py (the
sockets), frontend.py (the connections), request.py (one request's life), admission.py
(class, project), dispatch.py (queues, picking a child), children.py (the children's
life), scaling.py (how many children), accounting.py (counts, the access log). None of
them imports this module: each is handed what it needs (request.Context, children.Events,
status.PoolView, admin.Controls).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import resource
import shutil
import signal
import tempfile
from collections.abc import Callable, Mapping
from typing import Any

from . import config as config_module
from . import listeners, logs, peaks, systemd
from .accounting import Accounting
from .admin import ControlServer, HttpAdmin
from .admission import Admission
from .child import Child
from .children import Children, Processes
from .classify import Classifier
from .config import Config
from .costs import CostModel
from .diagnostics import Diagnostics
from .dispatch import Dispatcher
from .frontend import Frontend
from .machine import IllegalTransition, StateEnum
from .metrics import Metrics
from .processes import OsProcesses
from .projects import Projects, is_storage_uri
from .request import Context, Request
from .scaling import Autoscaler
from .status import snapshot

log = logs.get("fcgipool.supervisor")

EXIT_PRESSURE = 3
_PR_SET_CHILD_SUBREAPER = 36
TICK = 0.1  # request timeouts, queue timeouts and the access log, checked this often
SWEEP = 1.0  # stalled connections, orphans (pidfd reaping)


class Lifecycle(StateEnum):
    STARTING = "starting"  # children are starting; requests are taken and wait
    RUNNING = "running"
    RELOADING = "reloading"  # a reload is replacing the children
    DRAINING = "draining"  # stopping: no new connection; what is in flight may finish
    STOPPED = "stopped"  # no request is taken; the children are being stopped


LIFECYCLE: dict[Lifecycle, frozenset[Lifecycle]] = {
    Lifecycle.STARTING: frozenset({Lifecycle.RUNNING, Lifecycle.RELOADING, Lifecycle.DRAINING}),
    Lifecycle.RUNNING: frozenset({Lifecycle.RELOADING, Lifecycle.DRAINING}),
    Lifecycle.RELOADING: frozenset({Lifecycle.RUNNING, Lifecycle.RELOADING, Lifecycle.DRAINING}),
    Lifecycle.DRAINING: frozenset({Lifecycle.STOPPED}),
    Lifecycle.STOPPED: frozenset(),
}


def _become_subreaper() -> None:
    """Orphans of our children are re-parented to us, so the one reaper collects them."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1)


def _raise_file_limit() -> None:
    """Each front-end connection and each child costs descriptors: take the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else 65536
    if soft < wanted:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


class Pool:
    def __init__(
        self,
        config: Config,
        config_path: str | None = None,
        overrides: Mapping[str, Any] | None = None,
        *,
        loop: asyncio.AbstractEventLoop,
        processes: Processes | None = None,
        notify: Callable[[str], object] = systemd.notify,
        euid: int | None = None,
    ) -> None:
        self.loop = loop
        self.euid = os.geteuid() if euid is None else euid  # who the pool runs as
        self.config = config
        self.config_path = config_path
        self.overrides = dict(overrides or {})
        self.notify = notify
        self.lifecycle = Lifecycle.STARTING
        self.started_at = loop.time()
        self.reloads = 0
        self.scaled = False  # `scale` pinned the number of workers (see reload)
        self.exit_code = 0
        self.os_processes: OsProcesses | None = None
        if processes is None:
            processes = self.os_processes = OsProcesses(loop, "", config)
        self.processes = processes
        classifier = Classifier(config)
        self.costs = CostModel(config.tuning)
        self.projects = Projects(config, loop.time)
        self.diagnostics = Diagnostics(config, loop)
        self.dispatcher = Dispatcher(config, classifier.rules, loop.time, self.costs, self.projects)
        self.admission = Admission(config, classifier, self.costs)
        self.accounting = Accounting(loop.time, config.log.access)
        self.children = Children(
            config, processes, self.dispatcher, self.accounting, self, loop, self.projects
        )
        self.autoscaler = Autoscaler(
            config, self.children, self.dispatcher, loop.time, processes.cpu_busy,
            processes.cpu_count(),
        )
        self.context = Context(
            loop=loop,
            limits=config.limits,
            keep_conn=config.child.keep_conn,
            reconnect_after=config.child.reconnect_after,
            request_timeout=config.timeouts.request,
            admission=self.admission,
            dispatcher=self.dispatcher,
            children=self.children,
            accounting=self.accounting,
        )
        self.frontend = Frontend(config, self.context, self.status)
        self._metrics = Metrics(self)
        self.listeners = listeners.Listeners()  # the pool sockets
        self.admin_listeners = listeners.Listeners()  # admin.http
        self.servers: list[asyncio.AbstractServer] = []
        self.admin_servers: list[asyncio.AbstractServer] = []
        self.control: ControlServer | None = None
        self._stopped: asyncio.Future[None] = loop.create_future()
        self._tasks: list[asyncio.Task[None]] = []

    # ------------------------------------------------------------------ what is read

    @property
    def stopping(self) -> bool:
        return self.lifecycle in (Lifecycle.DRAINING, Lifecycle.STOPPED)

    @property
    def state(self) -> str:
        return self.lifecycle.value

    def now(self) -> float:
        return self.loop.time()

    def uptime(self) -> float:
        return self.loop.time() - self.started_at

    def status(self) -> dict[str, Any]:
        return snapshot(self)

    def metrics(self) -> bytes:
        return self._metrics.render()

    def memory_cap(self) -> dict[str, object]:
        """How child.max_memory is enforced (memcap.py)."""
        if self.os_processes is not None:
            return self.os_processes.cap.view()
        return {"mechanism": "off", "max_memory": int(self.config.child.max_memory), "cgroup": None}

    def readiness(self) -> tuple[bool, str]:
        """For /readyz: enough ready children, room in the queue, pressure under the limit,
        and not stopping."""
        if self.stopping:
            return False, "stopping"
        ready = self.children.ready()
        # Against the floor, not the target: a pool growing for a burst stays ready.
        if ready < max(1, min(self.config.admin.min_ready, self.children.minimum)):
            return False, f"{ready} children ready"
        for queue in self.dispatcher.classes.values():
            if queue.max_waiting and len(queue) >= queue.max_waiting:
                return False, f"queue of class {queue.name} full"
        if self.children.failure_pressure() > self.config.pool.max_failure_pressure:
            return False, "failure pressure above the limit"
        return True, f"ready: {ready} children"

    def _move(self, lifecycle: Lifecycle) -> None:
        if lifecycle not in LIFECYCLE[self.lifecycle]:
            raise IllegalTransition(f"pool: {self.lifecycle.value} -> {lifecycle.value}")
        self.lifecycle = lifecycle

    # ------------------------------------------------------------------ running

    def start(self) -> None:
        """Start the children and the periodic checks (no socket: run() binds those)."""
        self.children.reconcile()
        self._tasks = [
            self.loop.create_task(self._every(lambda: TICK, self._tick)),
            self.loop.create_task(self._every(lambda: SWEEP, self._sweep)),
            self.loop.create_task(
                self._every(self._rss_interval, self.children.check_age_and_memory)
            ),
            self.loop.create_task(self._every(lambda: peaks.WINDOW, self.dispatcher.roll_peaks)),
        ]

    def _rss_interval(self) -> float:
        return self.config.child.rss_interval

    async def wait_stopped(self) -> int:
        await self._stopped
        for task in self._tasks:
            task.cancel()
        logs.flush_access()
        return self.exit_code

    async def run(self) -> int:
        """The pool as a process: signals, sockets, admin, children; until stopped."""
        self._install_signals()
        _become_subreaper()
        _raise_file_limit()
        base = self._runtime_base()
        try:
            runtime_dir = tempfile.mkdtemp(prefix="fcgipool-", dir=base)
        except OSError as error:
            why = error.strerror or str(error)
            raise OSError(f"pool.runtime_dir: cannot create a directory in {base}: {why}") from None
        if self.os_processes is not None:
            self.os_processes.runtime_dir = runtime_dir
        for warning in config_module.warnings(self.config):
            log.warning("config_unsafe", problem=warning)
        try:
            await self._listen()
            await self._start_admin()
            self.start()
            watchdog = systemd.watchdog_interval()
            if watchdog:
                self._tasks.append(self.loop.create_task(self._watchdog(watchdog)))
            return await self.wait_stopped()
        finally:
            for task in self._tasks:
                task.cancel()
            if self.control is not None:
                self.control.close()
            for server in self.admin_servers:
                server.close()
            self.listeners.unlink()
            self.admin_listeners.unlink()
            shutil.rmtree(runtime_dir, ignore_errors=True)
            if self.os_processes is not None:
                self.os_processes.close()
            log.info("pool_stopped", exit_code=self.exit_code)

    def _runtime_base(self) -> str:
        base = self.config.pool.runtime_dir or os.environ.get("RUNTIME_DIRECTORY", "")
        return base.split(":")[0] or tempfile.gettempdir()

    async def _listen(self) -> None:
        self.listeners = listeners.Listeners.open(self.config)
        if self.listeners.inherited:
            log.info("sockets_inherited", count=len(self.listeners.sockets))
        for sock in self.listeners.sockets:
            server = await listeners.start_server(self.loop, sock, self.frontend.factory(sock))
            self.servers.append(server)
            log.info("listening", address=listeners.describe(sock))

    async def _start_admin(self) -> None:
        self.control = ControlServer(self, self.config.control_path())
        await self.control.start()
        self.admin_listeners = listeners.Listeners.open_admin(self.config)
        for sock in self.admin_listeners.sockets:
            server = await listeners.start_server(self.loop, sock, lambda: HttpAdmin(self))
            self.admin_servers.append(server)  # stays up while the pool drains
            log.info("admin_http", address=listeners.describe(sock))

    async def _watchdog(self, interval: float) -> None:
        """systemd kills a pool whose loop stops: ping while the loop turns."""
        while True:
            self.notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    async def _every(self, interval: Callable[[], float], action: Callable[[], None]) -> None:
        while True:
            await asyncio.sleep(interval())
            action()

    def _tick(self) -> None:
        """Requests past their timeout, waits past their queue timeout; the access log;
        a child more or fewer."""
        logs.flush_access()
        now = self.loop.time()
        self.dispatcher.expire(now)
        running = self.children.requests()
        self.diagnostics.check(running, now)
        for request in running:
            request.check_timeout(now)
        if self.lifecycle is Lifecycle.RUNNING:
            self.autoscaler.tick()
            self.children.check_projects()
            self.children.probe_idle()
        if self.lifecycle is Lifecycle.DRAINING:
            self._check_drain()

    def _sweep(self) -> None:
        self.frontend.sweep(self.loop.time())
        if self.os_processes is not None and self.os_processes.exited is not None:
            self.children.reap()  # orphans adopted as a subreaper: no pidfd tells of them

    # ------------------------------------------------------------------ children's news

    def children_ready(self) -> None:
        log.info("pool_ready", workers=self.children.ready())
        self.notify(f"READY=1\nSTATUS=serving with {self.children.ready()} children")
        if self.lifecycle is Lifecycle.STARTING:
            self._move(Lifecycle.RUNNING)

    def child_stuck(self, child: Child, request: Request | None) -> None:
        self.diagnostics.before_stop(child, request)

    def children_replaced(self) -> None:
        if self.lifecycle is Lifecycle.RELOADING:
            self._move(Lifecycle.RUNNING)
            log.info("reload_done", reloads=self.reloads)
            self.notify("READY=1\nSTATUS=reload done")

    def children_gone(self) -> None:
        if self.lifecycle is Lifecycle.STOPPED and not self._stopped.done():
            self._stopped.set_result(None)

    def failure_pressure_exceeded(self, pressure: float) -> None:
        limit = self.config.pool.max_failure_pressure
        log.error("failure_pressure_exceeded", pressure=round(pressure, 3), limit=limit,
                  exit_code=EXIT_PRESSURE)  # fmt: skip
        self.exit_code = EXIT_PRESSURE
        self.handle_quit()

    # ------------------------------------------------------------------ signals

    def _install_signals(self) -> None:
        handlers = {
            signal.SIGTERM: self.handle_term,
            signal.SIGINT: self.handle_term,
            signal.SIGQUIT: self.handle_quit,
            signal.SIGHUP: self.handle_hup,
            signal.SIGUSR1: self.handle_usr1,
            signal.SIGTTIN: self.handle_ttin,
            signal.SIGTTOU: self.handle_ttou,
        }
        for signum, handler in handlers.items():
            self.loop.add_signal_handler(signum, handler)
        try:
            self.loop.add_signal_handler(signal.SIGCHLD, self.handle_chld)
        except RuntimeError:
            # uvloop keeps SIGCHLD for itself: learn of each child's exit from a pidfd
            # instead, and collect adopted orphans once a second.
            if self.os_processes is not None:
                self.os_processes.watch_pidfds(self.handle_chld)
            log.info("reaping", method="pidfd")

    def handle_chld(self) -> None:
        self.children.reap()

    def handle_hup(self) -> None:
        self.reload()

    def handle_usr1(self) -> None:
        logs.reopen()
        log.info("logs_reopened")

    def handle_ttin(self) -> None:
        self.scale(self.children.workers + 1)

    def handle_ttou(self) -> None:
        self.scale(self.children.workers - 1)

    def handle_term(self) -> None:
        if self.stopping:
            return
        grace = self.config.timeouts.shutdown_grace_period
        log.info("graceful_stop", grace_period=grace)
        self._begin_stop()
        self.loop.call_later(grace, self._end_drain)
        self._check_drain()

    def handle_quit(self) -> None:
        log.info("fast_stop")
        self._begin_stop()
        self._end_drain()

    # ------------------------------------------------------------------ verbs

    def reload(self) -> str:
        """Re-read the configuration and replace every child, a batch at a time. Returns
        why nothing was done, or an empty string."""
        if self.stopping:
            return "the pool is stopping"
        try:
            new = config_module.build(self.config_path, self.overrides)
            problems = config_module.runtime_problems(new, self.euid)
        except config_module.ConfigError as error:
            problems = error.problems
        if problems:  # the same checks as at start: users and groups exist, no root children
            log.error("reload_failed", problems=problems)
            return "; ".join(problems)
        if new.pool.bind != self.config.pool.bind:
            log.warning("reload_ignores", key="pool.bind", reason="sockets change on restart")
            new.pool.bind = self.config.pool.bind
        self._configure(new)
        self.reloads += 1
        self._move(Lifecycle.RELOADING)
        self.notify("RELOADING=1")
        replaced = self.children.replace_all()
        log.info("reload", children=replaced, reloads=self.reloads)
        if not self.children.replacing:
            self.children_replaced()
        return ""

    def _configure(self, new: Config) -> None:
        """Every part follows the new configuration from now on. The number of children
        stays where it is, brought into the new pool.min_workers..max_workers; a number
        pinned by `scale` stays unless the reload changes workers, min_workers or
        max_workers (the newer word wins)."""
        old = self.config.pool
        if self.scaled and (old.workers, old.minimum, old.maximum) != (
            new.pool.workers, new.pool.minimum, new.pool.maximum
        ):  # fmt: skip
            self.scaled = False
            log.info("scale_unpinned", min_workers=new.pool.minimum,
                     max_workers=new.pool.maximum)  # fmt: skip
        self.config = new
        classifier = Classifier(new)
        self.projects.configure(new)
        self.diagnostics.configure(new)
        self.dispatcher.configure(new, classifier.rules)
        self.admission.configure(new, classifier)
        self.children.configure(new)
        self.autoscaler.configure(new)
        if not self.scaled:
            self.children.set_range(new.pool.minimum, new.pool.maximum)
        if self.os_processes is not None:
            self.os_processes.configure(new)
        context = self.context
        context.limits = new.limits
        context.keep_conn = new.child.keep_conn
        context.reconnect_after = new.child.reconnect_after
        context.request_timeout = new.timeouts.request
        self.frontend.configure(new)
        self.accounting.access_log = new.log.access
        logs.configure(new.log.format, new.log.level, new.log.file)

    def scale(self, workers: int) -> str:
        """Run ``workers`` children from now on, pinned (no adaptive scaling) until a reload
        changes the pool's numbers; returns why not, or an empty string."""
        if self.stopping:
            return "the pool is stopping"
        reserved = sum(rule.reserved for rule in self.config.classes)
        if not 1 <= workers <= 4096 or (reserved and reserved >= workers):
            return f"{workers} children: need 1..4096 and more than the {reserved} reserved"
        self.scaled = True
        log.info("scale", workers=workers)
        self.children.set_range(workers, workers)
        self.children.scale(workers)
        return ""

    def project_rows(self) -> list[dict[str, Any]]:
        return self.projects.rows(self.children.holders())

    def project_command(self, action: str, named: str, count: int = 0) -> tuple[str, int]:
        """`fcgipool projects warm|unpin|refresh|drop PATH`: why not (or ""), and how many
        children it concerns. The path is checked as a request's MAP would be."""
        classifier = self.admission.classifier
        check = classifier.check(named, named=True)
        if not check.allowed:
            return f"{named}: {check.reason}", 0
        path = check.path or named
        known = self.projects.by_path.get(path)
        if action == "warm":
            if known is None and not is_storage_uri(path) and not os.path.isfile(path):
                return f"{path}: no such file", 0
            self.projects.pin(path, True)
            log.info("project_pinned", project=path)
            return "", self.children.warm(path, count)
        if known is None:
            return f"{path}: not a project the pool has seen (see fcgipool projects)", 0
        if action == "unpin":
            self.projects.pin(path, False)
            log.info("project_unpinned", project=path)
            return "", 0
        if action == "refresh":
            log.info("project_refresh", project=path)
            return "", self.children.changed(path)
        if action == "drop":
            self.projects.pin(path, False)
            known.dropped = True
            log.info("project_dropped", project=path)
            return "", self.children.drop(path)
        return f"unknown action {action!r}", 0

    def stop(self, fast: bool) -> None:
        if fast:
            self.handle_quit()
        else:
            self.handle_term()

    def _begin_stop(self) -> None:
        """Stop accepting connections, but serve those already in the listen backlog: the
        web server saw their connect succeed."""
        if self.stopping:
            return
        self._move(Lifecycle.DRAINING)
        self.notify("STOPPING=1")
        self.children.hold()
        self.frontend.draining = True
        self.listeners.unlink()
        for sock in self.listeners.sockets:
            while True:
                try:
                    connection, _ = sock.accept()
                except OSError:
                    break
                self.loop.create_task(
                    self.loop.connect_accepted_socket(self.frontend.connection, connection)
                )
        for server in self.servers:
            server.close()

    def _check_drain(self) -> None:
        """Close idle connections; once nothing is in flight or waiting, stop."""
        if not self.frontend.drain(self.loop.time()) and not self.dispatcher.waiting:
            self._end_drain()

    def _end_drain(self) -> None:
        """Stop every child; what is still waiting or running gets an answer or a close."""
        if self.lifecycle is not Lifecycle.DRAINING:
            return
        self._move(Lifecycle.STOPPED)
        self.frontend.accepting = False
        self.dispatcher.fail_waiting(b"The pool is shutting down\n")
        self.frontend.close_all("pool stopped before the request finished")
        self.children.stop_all()

