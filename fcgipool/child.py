"""One child process: its private socket, its spawn, its connection, its states.

The child gets a *listening* unix socket as fd 0 (FCGI_LISTENSOCK_FILENO): libfcgi falls back
to CGI on anything else. The pool connects to that socket's path for each connection; only
the pool can reach it, because it lies in a private directory of mode 0700.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import enum
import os
import pwd
import signal
import socket
import subprocess
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Protocol

import psutil

from . import logs
from .client import cgi_params, response_status
from .config import ChildSection
from .protocol import (
    EndRequest,
    ProtocolError,
    RecordType,
    ResponseScanner,
    encode_record,
    encode_request,
    stdout_content,
)

log = logs.get("fcgipool.child")

SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"
_PR_SET_PDEATHSIG = 1
_MAX_LINE = 4096


class State(enum.Enum):
    STARTING = "starting"  # spawned, readiness probe not answered yet
    IDLE = "idle"  # ready, no request
    BUSY = "busy"  # serving a request
    RECOVERING = "recovering"  # a request was abandoned; waiting for a probe answer
    STOPPING = "stopping"  # asked to exit
    DEAD = "dead"  # reaped


class Handler(Protocol):
    """Who receives what a child sends on its current connection."""

    def on_output(
        self, records: bytes, starts: list[int], has_output: bool, end: EndRequest | None
    ) -> None:
        """Whole STDOUT/STDERR records as the child sent them, and END_REQUEST if it came."""

    def on_lost(self) -> None: ...
    def pause_sending(self) -> None: ...
    def resume_sending(self) -> None: ...


def child_environment(section: ChildSection, pool_env: Mapping[str, str]) -> dict[str, str]:
    """Built from config alone (like php-fpm's clear_env): an inherited PATH can break a
    child's embedded interpreter, so nothing passes unless named."""
    env = {"PATH": SAFE_PATH, "HOME": "/nonexistent", "LANG": "C.UTF-8"}
    env.update({name: pool_env[name] for name in section.pass_env if name in pool_env})
    env.update(section.env)
    return env


def probe_params(uri: str) -> dict[bytes, bytes]:
    return cgi_params(uri, extra={"HTTP_USER_AGENT": "fcgipool-probe"})


def _set_parent_death_signal() -> None:
    """Runs in the child between fork and exec: die with the pool, even by SIGKILL."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class ChildConnection(asyncio.Protocol):
    """The pool's connection to one child; forwards what the child sends to a handler."""

    __slots__ = ("_scanner", "child", "closed", "handler", "last_used", "paused", "transport")

    def __init__(self, child: Child) -> None:
        self.child = child
        self._scanner = ResponseScanner()
        self.transport: asyncio.Transport | None = None
        self.handler: Handler | None = None
        self.closed = False
        self.paused = False  # reading held back: the web server reads the answer slowly
        self.last_used = time.monotonic()

    def hold(self, paused: bool) -> None:
        """Read the child only while the front end keeps up. The state belongs to the
        connection, which outlives its request: the next one must find it reading."""
        if paused != self.paused and not self.closed and self.transport is not None:
            self.paused = paused
            if paused:
                self.transport.pause_reading()
            else:
                self.transport.resume_reading()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def write(self, data: bytes) -> None:
        if not self.closed:
            self.transport.write(data)  # type: ignore[union-attr]

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.handler = None
            if self.transport is not None:
                self.transport.close()

    def data_received(self, data: bytes) -> None:
        try:
            records, starts, has_output, end = self._scanner.feed(data)
        except ProtocolError as error:
            log.warning("child_protocol_error", pid=self.child.pid, error=str(error))
            handler, self.handler = self.handler, None
            self.close()
            if handler is not None:
                handler.on_lost()
            self.child.misbehaved()
            return
        handler = self.handler
        if not starts or handler is None:
            return
        if end is not None:
            self.handler = None
            self.last_used = time.monotonic()
        handler.on_output(records, starts, has_output, end)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        handler, self.handler = self.handler, None
        if handler is not None:
            handler.on_lost()
        self.child.connection_lost(self)

    def pause_writing(self) -> None:
        if self.handler is not None:
            self.handler.pause_sending()

    def resume_writing(self) -> None:
        if self.handler is not None:
            self.handler.resume_sending()


class _OutputLines(asyncio.Protocol):
    """Reads a child's stdout or stderr and logs it line by line, each line bounded, at most
    ``rate`` lines a second on average (a token bucket holding 10 s worth): a child that
    floods its stderr must not flood the pool's log or its loop."""

    def __init__(self, pid: int, stream: str, enabled: bool, rate: float) -> None:
        self.pid, self.stream, self.enabled = pid, stream, enabled
        self.partial = b""
        self.rate = rate
        self.tokens = self.burst = rate * 10
        self.refilled = time.monotonic()
        self.suppressed = 0

    def data_received(self, data: bytes) -> None:
        if not self.enabled:
            return
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()[-_MAX_LINE:]
        for line in lines:
            self._emit(line)

    def _emit(self, line: bytes) -> None:
        text = line[:_MAX_LINE].decode("utf-8", "replace").rstrip()
        if not text:
            return
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.refilled) * self.rate)
        self.refilled = now
        if self.tokens < 1:
            self.suppressed += 1
            return
        self.tokens -= 1
        if self.suppressed:
            log.warning("child_output_suppressed", pid=self.pid, lines=self.suppressed)
            self.suppressed = 0
        log.info("child_output", pid=self.pid, stream=self.stream, line=text)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.partial:
            self._emit(self.partial)
        if self.suppressed:
            log.warning("child_output_suppressed", pid=self.pid, lines=self.suppressed)


class Probe:
    """A real request whose complete answer proves a child is free and alive.

    With ``check_status`` (warm-up requests) an answer of 500 or more is a failure too.
    """

    def __init__(
        self, child: Child, timeout: float, done: Callable[[Child, bool], None], check_status: bool
    ) -> None:
        self.child, self.done, self.check_status = child, done, check_status
        self.head = b""
        self.finished = False
        self.timer = asyncio.get_running_loop().call_later(timeout, self._finish, False)

    def _finish(self, ok: bool) -> None:
        if not self.finished:
            self.finished = True
            self.timer.cancel()
            self.done(self.child, ok)

    def on_output(
        self, records: bytes, starts: list[int], has_output: bool, end: EndRequest | None
    ) -> None:
        if self.check_status and len(self.head) < _MAX_LINE:
            self.head += stdout_content(records, starts)
        if end is not None:
            self._finish(not self.check_status or response_status(self.head) < 500)

    def on_lost(self) -> None:
        self._finish(False)

    def pause_sending(self) -> None:
        pass

    def resume_sending(self) -> None:
        pass


class Child:
    """One FastCGI child: spawn it, connect to it, hand it requests, stop it."""

    def __init__(self, generation: int, section: ChildSection, runtime_dir: str):
        self.generation = generation
        self.section = section
        self.socket_path = os.path.join(runtime_dir, f"child-{generation}.sock")
        self.state = State.STARTING
        self.pid = 0
        self.popen: subprocess.Popen[bytes] | None = None
        self.connection: ChildConnection | None = None
        self.requests_served = 0
        self.requests_limit = 0
        self.started_at = time.monotonic()
        self.stop_requested = False
        self.failure = False
        self.exit_reason = ""  # why the pool ended it, for the restart counts
        self.retiring = ""  # why this child is being replaced; empty while it is not
        self.warmups_done = 0
        self.request: object | None = None  # the Request being served, for status
        self.projects: OrderedDict[str, None] = OrderedDict()  # served lately, newest last
        self.warmup: list[str] = list(section.warmup)
        self._process: psutil.Process | None = None
        self._readers: list[asyncio.Task[object]] = []

    def __repr__(self) -> str:
        return f"<Child {self.generation} pid={self.pid} {self.state.value}>"

    # ------------------------------------------------------------------ life cycle

    def spawn(self, env: dict[str, str], log_output: bool, output_rate: float = 50.0) -> None:
        """Fork and exec the command with its private listening socket as fd 0."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        identity = {}
        if self.section.user:
            identity = {"user": self.section.user, "extra_groups": []}
            identity["group"] = self.section.group or pwd.getpwnam(self.section.user).pw_gid
        elif self.section.group:
            identity = {"group": self.section.group}
        try:
            listener.bind(self.socket_path)
            listener.listen(self.section.backlog)
            self.popen = subprocess.Popen(
                self.section.command,
                stdin=listener.fileno(),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=self.section.cwd,
                env=env,
                close_fds=True,
                preexec_fn=_set_parent_death_signal,
                **identity,
            )
        finally:
            listener.close()
        self.pid = self.popen.pid
        self.started_at = time.monotonic()
        with contextlib.suppress(psutil.Error):
            self._process = psutil.Process(self.pid)
        loop = asyncio.get_running_loop()
        for stream, pipe in (("stdout", self.popen.stdout), ("stderr", self.popen.stderr)):
            protocol = _OutputLines(self.pid, stream, log_output, output_rate)
            self._readers.append(
                loop.create_task(loop.connect_read_pipe(lambda p=protocol: p, pipe))
            )

    def start_probe(
        self,
        timeout: float,
        done: Callable[[Child, bool], None],
        uri: str | None = None,
    ) -> None:
        """Send a probe (or, with ``uri``, a warm-up request) on a fresh connection;
        ``done(child, ok)`` follows."""
        probe = Probe(self, timeout, done, check_status=uri is not None)
        params = probe_params(uri if uri is not None else self.section.probe_uri)
        request = encode_request(1, params, keep_conn=True)
        asyncio.get_running_loop().create_task(self._connect_then(probe, request))

    async def _connect_then(self, handler: Handler, data: bytes) -> None:
        connection = await self.connect()
        if connection is None:
            handler.on_lost()
            return
        connection.handler = handler
        connection.write(data)

    async def connect(self) -> ChildConnection | None:
        """A new connection, replacing any previous one; None if the child is gone."""
        if self.connection is not None:
            self.connection.close()
        loop = asyncio.get_running_loop()
        try:
            _, connection = await loop.create_unix_connection(
                lambda: ChildConnection(self), self.socket_path
            )
        except OSError as error:
            log.warning("child_connect_failed", pid=self.pid, error=str(error))
            return None
        if self.state in (State.DEAD, State.STOPPING):
            connection.close()
            return None
        self.connection = connection
        return connection

    def usable_connection(self) -> ChildConnection | None:
        """The kept connection when it can carry the next request without a reconnect."""
        connection = self.connection
        if (
            connection is None
            or connection.closed
            or not self.section.keep_conn
            or time.monotonic() - connection.last_used > self.section.reconnect_after
        ):
            return None
        return connection

    def connection_lost(self, connection: ChildConnection) -> None:
        if connection is self.connection:
            self.connection = None

    def misbehaved(self) -> None:
        """The child wrote something that is not FastCGI: it cannot be trusted again."""
        log.warning("child_misbehaved", pid=self.pid)
        self.kill(failure=True)

    def send_signal(self, signum: int) -> None:
        if self.pid and self.state is not State.DEAD:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signum)

    def stop(self, grace: float, failure: bool = False) -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds if it still lives. A death by any
        signal after this is a normal stop unless ``failure``."""
        if self.state is State.DEAD:
            return
        self.stop_requested = True
        self.failure = self.failure or failure
        self.state = State.STOPPING
        if self.connection is not None:
            self.connection.close()
        self.send_signal(signal.SIGTERM)
        asyncio.get_running_loop().call_later(grace, self._kill_if_alive)

    def _kill_if_alive(self) -> None:
        if self.state is not State.DEAD:
            log.warning("child_kill", pid=self.pid, reason="still alive after SIGTERM")
            self.send_signal(signal.SIGKILL)

    def kill(self, failure: bool) -> None:
        """SIGKILL; with ``failure`` the death counts as a failure, not a normal stop."""
        self.stop_requested = True
        self.failure = self.failure or failure
        if self.state is not State.DEAD:
            self.state = State.STOPPING
        if self.connection is not None:
            self.connection.close()
        self.send_signal(signal.SIGKILL)

    def reaped(self, status: int) -> None:
        """The one reaper found this child's exit status."""
        self.state = State.DEAD
        if self.popen is not None:
            self.popen.returncode = os.waitstatus_to_exitcode(status)
        connection, self.connection = self.connection, None
        if connection is not None:
            handler, connection.handler = connection.handler, None
            connection.close()
            if handler is not None:
                handler.on_lost()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)

    def abandon(self) -> None:
        """The current request is given up (timeout, client gone): tell the child, drop the
        connection; the child is free again only once a probe is answered."""
        connection, self.connection = self.connection, None
        if connection is not None and not connection.closed:
            connection.write(encode_record(RecordType.ABORT_REQUEST, 1))
            connection.close()
        self.state = State.RECOVERING

    def rss(self) -> int:
        """Resident memory in bytes (0 when it cannot be read)."""
        try:
            return self._process.memory_info().rss if self._process else 0
        except psutil.Error:
            return 0

    def cpu_percent(self) -> float:
        """CPU use since the previous call (psutil's way; the first call says 0)."""
        try:
            return self._process.cpu_percent(interval=None) if self._process else 0.0
        except psutil.Error:
            return 0.0
