"""The pool: one asyncio loop that owns the sockets, the children and their life cycle.

Spawn, probe until ready, hand out, recover after an abandoned request, reap (one reaper:
SIGCHLD + waitpid(-1), which also collects orphans we adopted as a subreaper), respawn with
backoff, stop gracefully. Modelled on gunicorn's arbiter: one method per signal.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import shutil
import signal
import socket
import tempfile
import time

from . import logs, systemd
from .child import Child, State, child_environment
from .config import Config
from .dispatch import Dispatcher
from .frontend import FrontConnection, bind

log = logs.get("fcgipool.supervisor")

_PR_SET_CHILD_SUBREAPER = 36
_MAX_BACKOFF = 30.0
_STOP_WAIT = 10.0


def _become_subreaper() -> None:
    """Orphans of our children are re-parented to us, so the one reaper collects them."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1)


def describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit code {os.waitstatus_to_exitcode(status)}"


class Pool:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.dispatcher = Dispatcher(config.limits)
        self.connections: set[FrontConnection] = set()
        self.slots: dict[int, Child] = {}
        self.by_pid: dict[int, Child] = {}
        self.failures_in_a_row: dict[int, int] = {}
        self.generation = 0
        self.stopping = False
        self.ready_announced = False
        self.runtime_dir = ""
        self.servers: list[asyncio.AbstractServer] = []
        self.listen_sockets: list[socket.socket] = []
        self.unix_paths: list[str] = []
        self.child_env = child_environment(config.child, os.environ)
        self.exit_code = 0
        self._stopped: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # ------------------------------------------------------------------ running

    async def run(self) -> int:
        self._loop = loop = asyncio.get_running_loop()
        self._stopped = loop.create_future()
        self._install_signals(loop)
        _become_subreaper()
        self.runtime_dir = tempfile.mkdtemp(prefix="fcgipool-", dir=self._runtime_base())
        try:
            await self._listen(loop)
            for slot in range(self.config.pool.workers):
                self._spawn(slot)
            sweeper = loop.create_task(self._sweep())
            await self._stopped
            sweeper.cancel()
        finally:
            self._unlink_sockets()
            shutil.rmtree(self.runtime_dir, ignore_errors=True)
        log.info("pool_stopped", exit_code=self.exit_code)
        return self.exit_code

    def _runtime_base(self) -> str:
        base = self.config.pool.runtime_dir or os.environ.get("RUNTIME_DIRECTORY", "")
        return base.split(":")[0] or tempfile.gettempdir()

    async def _listen(self, loop: asyncio.AbstractEventLoop) -> None:
        sockets = systemd.inherited_sockets()
        if sockets:
            log.info("sockets_inherited", count=len(sockets))
        else:
            pool = self.config.pool
            sockets = [
                bind(address, self.config.socket_mode(), pool.socket_owner, pool.socket_group)
                for address in self.config.addresses
            ]
            self.unix_paths = [a.path for a in self.config.addresses if a.kind == "unix"]
        for sock in sockets:
            sock.setblocking(False)
            if sock.family == socket.AF_UNIX:
                server = await loop.create_unix_server(lambda: FrontConnection(self), sock=sock)
            else:
                server = await loop.create_server(lambda: FrontConnection(self), sock=sock)
            self.servers.append(server)
            log.info("listening", address=_sockname(sock))
        self.listen_sockets = sockets

    def _install_signals(self, loop: asyncio.AbstractEventLoop) -> None:
        handlers = {
            signal.SIGCHLD: self.handle_chld,
            signal.SIGTERM: self.handle_term,
            signal.SIGINT: self.handle_term,
            signal.SIGQUIT: self.handle_quit,
            signal.SIGTTIN: self.handle_ttin,
            signal.SIGTTOU: self.handle_ttou,
        }
        for signum, handler in handlers.items():
            loop.add_signal_handler(signum, handler)
        for signum in (signal.SIGHUP, signal.SIGUSR1):  # reload / reopen come with supervision
            loop.add_signal_handler(signum, lambda s=signum: log.info("signal_ignored", signal=s))

    async def _sweep(self) -> None:
        """Once a second: close connections that stall mid-request."""
        read_timeout = self.config.limits.read_timeout
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            for connection in list(self.connections):
                if connection.stalled_since(now) > read_timeout:
                    connection.abort(f"read timeout: no data for {read_timeout:g} s mid-request")

    # ------------------------------------------------------------------ children

    def _spawn(self, slot: int) -> None:
        if self.stopping:
            return
        self.generation += 1
        child = Child(slot, self.generation, self.config.child, self.runtime_dir)
        self.slots[slot] = child
        try:
            child.spawn(self.child_env, self.config.log.child_output)
        except OSError as error:
            log.error("child_spawn_failed", slot=slot, error=str(error))
            child.state = State.DEAD
            self._respawn_later(slot, failed=True)
            return
        self.by_pid[child.pid] = child
        log.info("child_started", pid=child.pid, slot=slot)
        child.start_probe(self.config.child.start_timeout, self._probe_done)

    def _probe_done(self, child: Child, ok: bool) -> None:
        if child.state not in (State.STARTING, State.RECOVERING):
            return
        if not ok:
            log.warning("child_probe_failed", pid=child.pid, state=child.state.value)
            child.kill(failure=True)
            return
        if child.state is State.STARTING:
            elapsed = time.monotonic() - child.started_at
            log.info("child_ready", pid=child.pid, seconds=round(elapsed, 3))
            self.failures_in_a_row[child.slot] = 0
        child.state = State.IDLE
        self.dispatcher.child_idle(child)
        self._announce_ready()

    def _announce_ready(self) -> None:
        if self.ready_announced:
            return
        ready = sum(child.state in (State.IDLE, State.BUSY) for child in self.slots.values())
        if ready >= self.config.pool.workers:
            self.ready_announced = True
            log.info("pool_ready", workers=ready)
            systemd.notify(f"READY=1\nSTATUS=serving with {ready} children")

    def child_done(self, child: Child, served: bool) -> None:
        """A request on ``child`` ended cleanly: the child is free for the next one."""
        if served:
            child.requests_served += 1
        if child.state is not State.BUSY:
            return
        if not self.config.child.keep_conn and child.connection is not None:
            child.connection.close()
        child.state = State.IDLE
        self.dispatcher.child_idle(child)
        if self.stopping:
            self._maybe_finish_drain()

    def recover(self, child: Child) -> None:
        """A request was abandoned on ``child``: it is free again once a probe is answered."""
        if child.state in (State.DEAD, State.STOPPING, State.RECOVERING):
            return
        self.dispatcher.forget(child)
        child.abandon()
        log.info("child_recovering", pid=child.pid)
        child.start_probe(self.config.child.start_timeout, self._probe_done)

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
        expected = child.stop_requested and not child.failure
        child.reaped(status)
        self.dispatcher.forget(child)
        level = log.info if expected else log.warning
        level("child_exited", pid=child.pid, status=describe_status(status), expected=expected)
        if self.slots.get(child.slot) is child:
            del self.slots[child.slot]
            if child.slot < self.config.pool.workers:
                self._respawn_later(child.slot, failed=not expected)
        if self.stopping and not self.by_pid:
            self._finish_stop()

    def _respawn_later(self, slot: int, failed: bool) -> None:
        if self.stopping or self._loop is None:
            return
        if not failed:
            self._loop.call_soon(self._spawn, slot)
            return
        count = self.failures_in_a_row.get(slot, 0)
        self.failures_in_a_row[slot] = count + 1
        delay = min(_MAX_BACKOFF, self.config.child.respawn_delay * 2**count)
        log.info("child_respawn_scheduled", slot=slot, delay=delay)
        self._loop.call_later(delay, self._respawn_if_empty, slot)

    def _respawn_if_empty(self, slot: int) -> None:
        if slot not in self.slots and slot < self.config.pool.workers:
            self._spawn(slot)

    # ------------------------------------------------------------------ signals

    def handle_ttin(self) -> None:
        self.config.pool.workers += 1
        slot = next(s for s in range(self.config.pool.workers) if s not in self.slots)
        log.info("scale_up", workers=self.config.pool.workers)
        self._spawn(slot)

    def handle_ttou(self) -> None:
        if self.config.pool.workers <= 1:
            return
        self.config.pool.workers -= 1
        log.info("scale_down", workers=self.config.pool.workers)
        for slot, child in list(self.slots.items()):
            if slot >= self.config.pool.workers and child.state is State.IDLE:
                self.dispatcher.forget(child)
                child.stop()

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
        self.stopping = True
        systemd.notify("STOPPING=1")
        for server in self.servers:
            server.close()
        self._unlink_sockets()

    def _unlink_sockets(self) -> None:
        """Remove the socket files we made (not those systemd owns)."""
        for path in self.unix_paths:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        self.unix_paths = []

    def _busy(self) -> bool:
        return bool(self.dispatcher.waiting) or any(
            connection.requests for connection in self.connections
        )

    def _maybe_finish_drain(self) -> None:
        for connection in list(self.connections):
            if not connection.requests:
                connection.close_idle()
        if not self._busy():
            self._end_drain()

    def _end_drain(self) -> None:
        """Stop every child; what is still waiting or running gets an answer or a close."""
        if self._stopped is None or self._stopped.done():
            return
        self.dispatcher.fail_waiting(b"The pool is shutting down\n")
        for connection in list(self.connections):
            if connection.requests:
                connection.abort("pool stopped before the request finished")
            else:
                connection.close_idle()
        for child in list(self.slots.values()):
            if child.state is not State.DEAD:
                child.stop()
        if not self.by_pid:
            self._finish_stop()
            return
        assert self._loop is not None
        self._loop.call_later(_STOP_WAIT, self._kill_remaining)

    def _kill_remaining(self) -> None:
        for child in list(self.by_pid.values()):
            log.warning("child_kill", pid=child.pid, reason="did not stop in time")
            child.kill(failure=False)

    def _finish_stop(self) -> None:
        if self._stopped is not None and not self._stopped.done():
            self._stopped.set_result(None)

    # ------------------------------------------------------------------ protocol helpers

    def get_values(self, names: list[bytes]) -> dict[bytes, bytes]:
        limit = str(self.config.limits.max_connections).encode()
        known = {b"FCGI_MAX_CONNS": limit, b"FCGI_MAX_REQS": limit, b"FCGI_MPXS_CONNS": b"1"}
        return {name: known[name] for name in names if name in known}


def _sockname(sock: socket.socket) -> str:
    name = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        return f"unix:{name}"
    return f"tcp:{name[0]}:{name[1]}"
