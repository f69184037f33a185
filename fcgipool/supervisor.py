"""The pool: one asyncio loop that owns the sockets, the children and their life cycle.

Spawn, probe and warm up until ready, hand out, recover after an abandoned request, reap
(one reaper: SIGCHLD + waitpid(-1), which also collects orphans adopted as a subreaper),
respawn with backoff, recycle, reload, stop. Failures (crashes, kills after a timeout,
failed starts) within a window, over the number of workers, make the failure pressure;
above its limit the pool exits with code 3 so that systemd or Kubernetes replaces it.
Modelled on gunicorn's arbiter: one ``handle_*`` method per signal.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import os
import random
import resource
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.parse
from collections.abc import Mapping
from typing import Any

from . import config as config_module
from . import listeners, logs, systemd
from .admin import ControlServer, HttpAdmin
from .child import Child, State, child_environment
from .classify import Classifier
from .config import Config
from .dispatch import Dispatcher, remember
from .frontend import FrontConnection
from .metrics import Metrics

log = logs.get("fcgipool.supervisor")

EXIT_PRESSURE = 3
_PR_SET_CHILD_SUBREAPER = 36
_MAX_BACKOFF = 30.0


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


_OUR_SIGNALS = (signal.SIGTERM, signal.SIGKILL)  # what the pool sends to stop a child


def describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit code {os.waitstatus_to_exitcode(status)}"


class Pool:
    def __init__(
        self,
        config: Config,
        config_path: str | None = None,
        overrides: Mapping[str, Any] | None = None,
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.overrides = dict(overrides or {})
        self.classifier = Classifier(config)
        self.dispatcher = Dispatcher(config, self.classifier.rules)
        self.connections: set[FrontConnection] = set()
        self.children: list[Child] = []
        self.by_pid: dict[int, Child] = {}
        self.stale: list[Child] = []  # children a reload has yet to replace
        self.generation = 0  # children spawned so far
        self.reloads = 0
        self.reloading = False
        self.failures: collections.deque[float] = collections.deque()
        self.failures_in_a_row = 0
        self.next_spawn_at = 0.0
        self.respawn_timer: asyncio.TimerHandle | None = None
        self.restarts: collections.Counter[str] = collections.Counter()
        self.timed_out = 0
        self.scaled = False
        self.pidfd_reaping = False
        self.stopping = False
        self.accepting = True  # new requests are taken (false once the drain has ended)
        self.ready_announced = False
        self.runtime_dir = ""
        self.servers: list[asyncio.AbstractServer] = []
        self.listen_sockets: list[socket.socket] = []
        self.admin_servers: list[asyncio.AbstractServer] = []
        self.listeners = listeners.Listeners()  # the pool sockets
        self.admin_listeners = listeners.Listeners()  # admin.http
        self.child_env = child_environment(config.child, os.environ)
        self.exit_code = 0
        self.started_at = time.monotonic()
        self.requests_served = 0
        self.metrics = Metrics(self)
        self.control: ControlServer | None = None
        self._stopped: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.loop: asyncio.AbstractEventLoop  # set by run(); used on the hot path

    # ------------------------------------------------------------------ running

    async def run(self) -> int:
        self._loop = self.loop = loop = asyncio.get_running_loop()
        self._stopped = loop.create_future()
        self._install_signals(loop)
        _become_subreaper()
        _raise_file_limit()
        base = self._runtime_base()
        try:
            self.runtime_dir = tempfile.mkdtemp(prefix="fcgipool-", dir=base)
        except OSError as error:
            why = error.strerror or str(error)
            raise OSError(f"pool.runtime_dir: cannot create a directory in {base}: {why}") from None
        tasks = []
        try:
            await self._listen(loop)
            await self._start_admin(loop)
            self.reconcile()
            tasks = [
                loop.create_task(self._sweep()),
                loop.create_task(self._watch_children()),
                loop.create_task(self._time_requests()),
            ]
            watchdog = systemd.watchdog_interval()
            if watchdog:
                tasks.append(loop.create_task(self._watchdog(watchdog)))
            await self._stopped
        finally:
            for task in tasks:
                task.cancel()
            if self.control is not None:
                self.control.close()
            for server in self.admin_servers:
                server.close()
            self._unlink_sockets()
            self.admin_listeners.unlink()
            shutil.rmtree(self.runtime_dir, ignore_errors=True)
        logs.flush_access()
        log.info("pool_stopped", exit_code=self.exit_code)
        return self.exit_code

    def _runtime_base(self) -> str:
        base = self.config.pool.runtime_dir or os.environ.get("RUNTIME_DIRECTORY", "")
        return base.split(":")[0] or tempfile.gettempdir()

    async def _listen(self, loop: asyncio.AbstractEventLoop) -> None:
        self.listeners = listeners.Listeners.open(self.config)
        sockets = self.listeners.sockets
        if self.listeners.inherited:
            log.info("sockets_inherited", count=len(sockets))
        for sock in sockets:
            server = await listeners.start_server(loop, sock, lambda: FrontConnection(self))
            self.servers.append(server)
            log.info("listening", address=listeners.describe(sock))
        self.listen_sockets = sockets

    async def _start_admin(self, loop: asyncio.AbstractEventLoop) -> None:
        self.control = ControlServer(self, self.config.control_path())
        await self.control.start()
        self.admin_listeners = listeners.Listeners.open_admin(self.config)
        for sock in self.admin_listeners.sockets:
            server = await listeners.start_server(loop, sock, lambda: HttpAdmin(self))
            self.admin_servers.append(server)  # stays up while the pool drains
            log.info("admin_http", address=listeners.describe(sock))

    async def _watchdog(self, interval: float) -> None:
        """systemd kills a pool whose loop stops: ping while the loop turns."""
        while True:
            systemd.notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    def uptime(self) -> float:
        return time.monotonic() - self.started_at

    def ready(self) -> bool:
        return self.readiness()[0]

    def readiness(self) -> tuple[bool, str]:
        """For /readyz: enough ready children, room in the queue, pressure under the limit,
        and not stopping."""
        if self.stopping:
            return False, "stopping"
        ready = self._ready_active()
        if ready < max(1, min(self.config.admin.min_ready, self.config.pool.workers)):
            return False, f"{ready} children ready"
        for queue in self.dispatcher.classes.values():
            if queue.max_waiting and len(queue.waiting) >= queue.max_waiting:
                return False, f"queue of class {queue.name} full"
        if self.failure_pressure() > self.config.pool.max_failure_pressure:
            return False, "failure pressure above the limit"
        return True, f"ready: {ready} children"

    def request_done(self, request: Any) -> None:
        """Every request ends here once: count it, time it, log it."""
        now = time.monotonic()
        started = request.started or now
        status = request.status or 502
        self.requests_served += 1
        self.dispatcher.released(request)
        duration = now - request.created
        wait = started - request.created
        self.metrics.observe(status, request.request_class, duration, wait, request.bytes_out)
        if self.config.log.access:
            params = request.params
            get = params.get
            request_id = get(b"REQUEST_ID") or get(b"HTTP_X_REQUEST_ID")
            logs.access((
                request_id.decode("latin-1") if request_id else str(self.requests_served),
                get(b"REMOTE_ADDR", b"").decode("latin-1"),
                get(b"REQUEST_METHOD", b"").decode("latin-1"),
                request.uri,
                request.project,
                request.request_class,
                request.served_by or None,
                wait * 1000,
                duration * 1000,
                status,
                request.bytes_out,
            ))  # fmt: skip

    def _install_signals(self, loop: asyncio.AbstractEventLoop) -> None:
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
            loop.add_signal_handler(signum, handler)
        try:
            loop.add_signal_handler(signal.SIGCHLD, self.handle_chld)
        except RuntimeError:
            # uvloop keeps SIGCHLD for itself: learn of each child's exit from a pidfd
            # instead, and collect adopted orphans once a second.
            self.pidfd_reaping = True
            log.info("reaping", method="pidfd")

    def _watch_exit(self, child: Child) -> None:
        if not self.pidfd_reaping:
            return
        fd = os.pidfd_open(child.pid)

        def exited() -> None:
            self.loop.remove_reader(fd)
            os.close(fd)
            self.handle_chld()

        self.loop.add_reader(fd, exited)

    async def _sweep(self) -> None:
        """Once a second: close connections that stall mid-request."""
        while True:
            await asyncio.sleep(1.0)
            read_timeout = self.config.limits.read_timeout
            now = time.monotonic()
            for connection in list(self.connections):
                if connection.stalled_since(now) > read_timeout:
                    connection.abort(f"read timeout: no data for {read_timeout:g} s mid-request")
            if self.stopping:
                self._maybe_finish_drain()
            if self.pidfd_reaping:
                self.handle_chld()  # orphans adopted as a subreaper

    async def _time_requests(self) -> None:
        """Ten times a second: requests past timeouts.request, and waits past
        limits.queue_timeout. Cheaper than a timer per request, precise to 0.1 s."""
        while True:
            await asyncio.sleep(0.1)
            logs.flush_access()
            now = time.monotonic()
            self.dispatcher.expire(now)
            for child in self.children:
                request = child.request
                if request is not None and request.started + request.timeout < now:
                    request.timed_out()

    async def _watch_children(self) -> None:
        """Every rss_interval: recycle children past max_rss or max_lifetime."""
        while True:
            await asyncio.sleep(self.config.child.rss_interval)
            section = self.config.child
            now = time.monotonic()
            for child in list(self.children):
                if child.retiring or child.state not in (State.IDLE, State.BUSY):
                    continue
                if section.max_lifetime and now - child.started_at > section.max_lifetime:
                    self.recycle(child, "max_lifetime")
                elif section.max_rss and child.rss() > section.max_rss:
                    self.recycle(child, "max_rss")

    # ------------------------------------------------------------------ children

    def _active(self) -> list[Child]:
        return [child for child in self.children if not child.retiring]

    def _ready_active(self) -> int:
        return sum(child.state in (State.IDLE, State.BUSY) for child in self._active())

    def _retiring(self) -> int:
        return sum(1 for child in self.children if child.retiring)

    def reconcile(self) -> None:
        """Start children until ``workers`` are active (not being replaced), respecting the
        respawn backoff; and let a pending reload replace its next batch."""
        if self.stopping or self._loop is None:
            return
        limit = self.config.pool.max_recycling
        while self.stale and self._retiring() < limit:
            child = self.stale.pop(0)
            if child in self.children and not child.retiring and child.state is not State.DEAD:
                child.retiring = "reload"
                log.info("child_retiring", pid=child.pid, reason="reload")
        missing = self.config.pool.workers - len(self._active())
        if missing <= 0:
            self._retire_surplus()
            return
        delay = self.next_spawn_at - time.monotonic()
        if delay > 0:
            if self.respawn_timer is None:
                log.info("respawn_delayed", seconds=round(delay, 2))
                self.respawn_timer = self._loop.call_later(delay, self._respawn_due)
            return
        for _ in range(missing):
            if self.stopping:
                return
            self._spawn()

    def _respawn_due(self) -> None:
        self.respawn_timer = None
        self.reconcile()

    def _spawn(self) -> None:
        self.generation += 1
        section = self.config.child
        child = Child(self.generation, section, self.runtime_dir)
        child.warmup += self._pinned_warmups()
        if section.max_requests:
            child.requests_limit = section.max_requests + random.randint(
                0, section.max_requests_jitter
            )
        self.children.append(child)
        try:
            log_section = self.config.log
            child.spawn(self.child_env, log_section.child_output, log_section.child_output_rate)
        except (OSError, subprocess.SubprocessError) as error:
            log.error("child_spawn_failed", error=str(error))
            child.state = State.DEAD
            self.children.remove(child)
            self._failure("spawn failed")
            self.reconcile()
            return
        self.by_pid[child.pid] = child
        self._watch_exit(child)
        log.info("child_started", pid=child.pid)
        child.start_probe(section.start_timeout, self._started)

    def _pinned_warmups(self) -> list[str]:
        projects = self.config.projects
        return [
            projects.pinned_uri.replace("{project}", urllib.parse.quote(project, safe="/"))
            for project in projects.pinned
        ]

    def _started(self, child: Child, ok: bool) -> None:
        """A probe or warm-up answer of a starting child arrived (or failed)."""
        if child.state is not State.STARTING:
            return
        if not ok:
            log.warning("child_start_failed", pid=child.pid, warmups_done=child.warmups_done)
            child.stop(self.config.timeouts.kill_grace, failure=True)
            return
        warmup = child.warmup
        if child.warmups_done < len(warmup):
            uri = warmup[child.warmups_done]
            child.warmups_done += 1
            child.start_probe(child.section.start_timeout, self._started, uri=uri)
            return
        elapsed = round(time.monotonic() - child.started_at, 3)
        log.info("child_ready", pid=child.pid, seconds=elapsed, warmups=len(warmup))
        for project in self.config.projects.pinned:
            remember(child.projects, project, max(1, self.config.projects.memory))
        self.failures_in_a_row = 0
        self._child_free(child)
        self._retire_surplus()
        self._announce_ready()

    def _announce_ready(self) -> None:
        if self.ready_announced or self._ready_active() < self.config.pool.workers:
            return
        self.ready_announced = True
        log.info("pool_ready", workers=self._ready_active())
        systemd.notify(f"READY=1\nSTATUS=serving with {self._ready_active()} children")

    def _child_free(self, child: Child) -> None:
        """``child`` can take a request: give it one, or stop it if it is being replaced
        and its replacements are ready."""
        if child.retiring and (self.stopping or self._ready_active() >= self.config.pool.workers):
            self._retire(child)
            return
        child.state = State.IDLE
        self.dispatcher.child_idle(child)

    def _retire_surplus(self) -> None:
        """Stop the children being replaced once enough replacements are ready."""
        if self._ready_active() < self.config.pool.workers:
            return
        for child in list(self.children):
            if child.retiring and child.state in (State.IDLE, State.STARTING, State.RECOVERING):
                self._retire(child)

    def _retire(self, child: Child) -> None:
        self.dispatcher.forget(child)
        log.info("child_retired", pid=child.pid, reason=child.retiring)
        child.stop(self.config.timeouts.kill_grace)

    def recycle(self, child: Child, reason: str) -> None:
        """Replace ``child``: a replacement starts now; the child serves until it is ready."""
        if child.retiring or self.stopping or self._retiring() >= self.config.pool.max_recycling:
            return
        child.retiring = reason
        self.restarts[reason] += 1
        log.info("child_recycling", pid=child.pid, reason=reason)
        self.reconcile()

    def child_done(self, child: Child, served: bool) -> None:
        """A request on ``child`` ended cleanly: the child is free for the next one."""
        if served:
            child.requests_served += 1
        if child.state is not State.BUSY:
            return
        if not self.config.child.keep_conn and child.connection is not None:
            child.connection.close()
        if child.requests_limit and child.requests_served >= child.requests_limit:
            self.recycle(child, "max_requests")
        self._child_free(child)
        if self.stopping:
            self._maybe_finish_drain()

    def recover(self, child: Child) -> None:
        """A request was abandoned on ``child``: it is free again once a probe is answered
        within the cancel timeout; else it is stopped, and that counts as a failure."""
        if child.state in (State.DEAD, State.STOPPING, State.RECOVERING):
            return
        self.dispatcher.forget(child)
        child.abandon()
        log.info("child_cancelling", pid=child.pid)
        child.start_probe(self.config.timeouts.cancel, self._recovered)

    def _recovered(self, child: Child, ok: bool) -> None:
        if child.state is not State.RECOVERING:
            return
        if ok:
            log.info("child_recovered", pid=child.pid)
            self._child_free(child)
            return
        self.handle_chld()  # a child that died is a crash, not a failed cancel
        if child.state is State.DEAD:
            return
        log.warning("child_cancel_failed", pid=child.pid, timeout=self.config.timeouts.cancel)
        child.exit_reason = "cancel_failed"
        child.stop(self.config.timeouts.kill_grace, failure=True)

    def handle_chld(self) -> None:
        """The one reaper: every exit status is collected here, children's and orphans'."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            child = self.by_pid.pop(pid, None)
            if child is None:
                log.info("orphan_reaped", pid=pid, status=describe_status(status))
                continue
            self._child_exited(child, status)

    def _child_exited(self, child: Child, status: int) -> None:
        failed = child.failure or not child.stop_requested
        child.reaped(status)
        self.dispatcher.forget(child)
        if child in self.children:
            self.children.remove(child)
        level = log.warning if failed else log.info
        level("child_exited", pid=child.pid, status=describe_status(status), failure=failed)
        if failed:
            reason = child.exit_reason or ("killed" if child.stop_requested else "crash")
            if os.WIFSIGNALED(status) and os.WTERMSIG(status) not in _OUR_SIGNALS:
                reason = "crash"  # e.g. SIGSEGV while its failed probe was being handled
            self.restarts[reason] += 1
            self._failure(describe_status(status))
        if self.stopping:
            if not self.by_pid:
                self._finish_stop()
            return
        self.reconcile()
        if self.reloading and not self.stale and not self._retiring():
            self.reloading = False
            log.info("reload_done", reloads=self.reloads)
            systemd.notify("READY=1\nSTATUS=reload done")

    def _failure(self, reason: str) -> None:
        now = time.monotonic()
        window = self.config.pool.failure_window
        self.failures.append(now)
        while self.failures and self.failures[0] < now - window:
            self.failures.popleft()
        self.failures_in_a_row += 1
        delay = min(
            _MAX_BACKOFF, self.config.child.respawn_delay * 2 ** (self.failures_in_a_row - 1)
        )
        self.next_spawn_at = now + delay
        pressure = self.failure_pressure()
        log.warning("child_failure", reason=reason, pressure=round(pressure, 3))
        if pressure > self.config.pool.max_failure_pressure and not self.stopping:
            log.error(
                "failure_pressure_exceeded",
                pressure=round(pressure, 3),
                limit=self.config.pool.max_failure_pressure,
                exit_code=EXIT_PRESSURE,
            )
            self.exit_code = EXIT_PRESSURE
            self.handle_quit()

    def failure_pressure(self) -> float:
        cutoff = time.monotonic() - self.config.pool.failure_window
        recent = sum(1 for moment in self.failures if moment >= cutoff)
        return recent / self.config.pool.workers

    # ------------------------------------------------------------------ signals

    def handle_hup(self) -> str:
        """Re-read the configuration and replace every child, a batch at a time. Returns
        why nothing was done, or an empty string."""
        if self.stopping:
            return "the pool is stopping"
        try:
            new = config_module.build(self.config_path, self.overrides)
        except config_module.ConfigError as error:
            log.error("reload_failed", problems=error.problems)
            return "; ".join(error.problems)
        if new.pool.bind != self.config.pool.bind:
            log.warning("reload_ignores", key="pool.bind", reason="sockets change on restart")
            new.pool.bind = self.config.pool.bind
        if self.scaled:
            new.pool.workers = self.config.pool.workers
        self.config = new
        self.child_env = child_environment(new.child, os.environ)
        self.classifier = Classifier(new)
        self.dispatcher.configure(new, self.classifier.rules)
        logs.configure(new.log.format, new.log.level, new.log.file)
        self.reloads += 1
        self.reloading = True
        self.stale = [child for child in self.children if not child.retiring]
        self.restarts["reload"] += len(self.stale)
        log.info("reload", children=len(self.stale), reloads=self.reloads)
        systemd.notify("RELOADING=1")
        self.reconcile()
        return ""

    def handle_usr1(self) -> None:
        logs.reopen()
        log.info("logs_reopened")

    def handle_ttin(self) -> None:
        self.scale(self.config.pool.workers + 1)

    def handle_ttou(self) -> None:
        self.scale(self.config.pool.workers - 1)

    def scale(self, workers: int) -> str:
        """Run ``workers`` children from now on; returns why not, or an empty string."""
        if self.stopping:
            return "the pool is stopping"
        reserved = sum(rule.reserved for rule in self.config.classes)
        if not 1 <= workers <= 4096 or (reserved and reserved >= workers):
            return f"{workers} children: need 1..4096 and more than the {reserved} reserved"
        self.scaled = True  # kept across reloads
        self.config.pool.workers = workers
        log.info("scale", workers=workers)
        surplus = len(self._active()) - workers
        for child in sorted(self._active(), key=lambda c: c.state is State.BUSY)[: max(0, surplus)]:
            child.retiring = "scale_down"
        self.reconcile()
        return ""

    def handle_term(self) -> None:
        if self.stopping:
            return
        grace = self.config.timeouts.shutdown_grace_period
        log.info("graceful_stop", grace_period=grace)
        self._begin_stop()
        assert self._loop is not None
        self._loop.call_later(grace, self._end_drain)
        self._maybe_finish_drain()

    def handle_quit(self) -> None:
        log.info("fast_stop")
        self._begin_stop()
        self._end_drain()

    def _begin_stop(self) -> None:
        """Stop accepting connections, but serve those already in the listen backlog: the
        web server saw their connect succeed."""
        self.stopping = True
        systemd.notify("STOPPING=1")
        self._unlink_sockets()
        assert self._loop is not None
        for sock in self.listen_sockets:
            while True:
                try:
                    connection, _ = sock.accept()
                except OSError:
                    break
                self._loop.create_task(
                    self._loop.connect_accepted_socket(lambda: FrontConnection(self), connection)
                )
        for server in self.servers:
            server.close()

    def _unlink_sockets(self) -> None:
        """Remove the socket files we made (not those systemd owns)."""
        self.listeners.unlink()

    def _maybe_finish_drain(self) -> None:
        """Close idle connections; once nothing is in flight, stop the children."""
        now = time.monotonic()
        busy = self.dispatcher.waiting > 0
        for connection in list(self.connections):
            if connection.requests or connection.fresh(now):
                busy = True
            else:
                connection.close_idle()
        if not busy:
            self._end_drain()

    def _end_drain(self) -> None:
        """Stop every child; what is still waiting or running gets an answer or a close."""
        if self._stopped is None or self._stopped.done() or not self.accepting:
            return
        self.accepting = False
        self.dispatcher.fail_waiting(b"The pool is shutting down\n")
        for connection in list(self.connections):
            if connection.requests:
                connection.abort("pool stopped before the request finished")
            else:
                connection.close_idle()
        for child in list(self.children):
            child.stop(self.config.timeouts.kill_grace)
        if not self.by_pid:
            self._finish_stop()

    def _finish_stop(self) -> None:
        if self._stopped is not None and not self._stopped.done():
            self._stopped.set_result(None)

    # ------------------------------------------------------------------ protocol helpers

    def get_values(self, names: list[bytes]) -> dict[bytes, bytes]:
        limit = str(self.config.limits.max_connections).encode()
        known = {b"FCGI_MAX_CONNS": limit, b"FCGI_MAX_REQS": limit, b"FCGI_MPXS_CONNS": b"1"}
        return {name: known[name] for name in names if name in known}

