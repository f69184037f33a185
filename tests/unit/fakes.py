"""The in-process tier: the pool's real objects over in-memory transports, fake children,
and an event loop whose clock the test moves. No subprocess, no socket, no sleep.

``VirtualTimeLoop`` is a real asyncio loop whose ``time()`` only moves when nothing is
ready to run: then it jumps to the next timer. So a 30 s timeout takes no time at all,
and ``harness.run(30)`` is exact. ``FakeProcesses`` stands where processes.OsProcesses
stands: each child is a ``FakeProgram`` that speaks FastCGI (through the pool's own
sans-IO codec) and answers as the URI says (``/?sleep=2``, ``/?hang``, ``/?crash``...),
or as the test scripts it.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import selectors
import signal
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fcgipool import config as configuration
from fcgipool.child import Child, ChildConnection
from fcgipool.children import MS_PER_TICK
from fcgipool.client import cgi_params, parse_head, split_head
from fcgipool.protocol import (
    AbortRequest,
    BeginRequest,
    ClientConnection,
    EndRequest,
    Params,
    RecordType,
    ServerConnection,
    Stdin,
    Stdout,
    encode_record,
    encode_request,
    encode_response,
)
from fcgipool.supervisor import Pool

TICKS_PER_SECOND = 1000 / MS_PER_TICK  # of CPU time in /proc/PID/stat


class Deadlock(AssertionError):
    """Nothing can ever happen again: no callback ready, no timer pending."""


class _InstantSelector(selectors.DefaultSelector):
    """Polls; when nothing is ready, moves the loop's clock to the next timer instead of
    waiting for it; and stops the loop once what it watches for is true."""

    loop: VirtualTimeLoop

    def select(self, timeout: float | None = None) -> list[Any]:
        events = super().select(0)
        if events:
            return events
        loop = self.loop
        if loop.watch is not None and (loop.watch() or loop.now >= loop.deadline):
            loop.stop()
            return events
        if timeout is None:
            raise Deadlock("nothing is scheduled")
        if loop.watch is not None:
            timeout = min(timeout, max(0.0, loop.deadline - loop.now))
        loop.now += timeout
        return events


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    def __init__(self) -> None:
        selector = _InstantSelector()
        super().__init__(selector)
        selector.loop = self
        self.now = 1000.0
        self.watch: Callable[[], object] | None = None
        self.deadline = 0.0

    def time(self) -> float:
        return self.now

    def run_until_true(self, condition: Callable[[], object], within: float) -> bool:
        """Run until ``condition()`` holds (checked each time the loop is idle), at most
        ``within`` seconds of loop time; whether it holds."""
        self.watch, self.deadline = condition, self.now + within
        try:
            self.run_forever()
        finally:
            self.watch = None
        return bool(condition())


class MemoryTransport(asyncio.Transport):
    """One end of an in-memory stream: writes arrive at the peer on the next turn of the
    loop, in order; reading can be paused (what arrives meanwhile is held); a close
    reaches both ends."""

    def __init__(self, loop: asyncio.AbstractEventLoop, protocol: asyncio.Protocol) -> None:
        super().__init__()
        self.loop = loop
        self.protocol = protocol
        self.peer: MemoryTransport | None = None
        self.reading = True
        self.held: list[bytes] = []
        self.closed = False
        self.written = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.closed or self.peer is None:
            return
        self.written += len(data)
        self.loop.call_soon(self.peer._arrive, bytes(data))

    def _arrive(self, data: bytes) -> None:
        if self.closed:
            return
        if self.reading and not self.held:
            self.protocol.data_received(data)
        else:
            self.held.append(data)

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True
        while self.reading and self.held and not self.closed:
            self.protocol.data_received(self.held.pop(0))

    def is_reading(self) -> bool:
        return self.reading

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.loop.call_soon(self.protocol.connection_lost, None)
        if self.peer is not None:
            self.loop.call_soon(self.peer.close)

    def abort(self) -> None:
        self.close()

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0


def connect(
    loop: asyncio.AbstractEventLoop, left: asyncio.Protocol, right: asyncio.Protocol
) -> tuple[MemoryTransport, MemoryTransport]:
    """Two protocols joined by a stream; both see connection_made now."""
    a, b = MemoryTransport(loop, left), MemoryTransport(loop, right)
    a.peer, b.peer = b, a
    left.connection_made(a)
    right.connection_made(b)
    return a, b


# ---------------------------------------------------------------------------- children


@dataclass
class Answer:
    status: int = 200
    body: bytes = b"ok\n"
    after: float = 0.0  # seconds of work first


@dataclass
class Hang:
    """Never answers, ignores FCGI_ABORT_REQUEST (QGIS mid-render)."""


@dataclass
class Crash:
    after: float = 0.0
    signum: int = signal.SIGSEGV


@dataclass
class Drop:
    """Closes the connection without answering."""


@dataclass
class Garbage:
    """Writes bytes that are not FastCGI."""


Action = Answer | Hang | Crash | Drop | Garbage


def by_uri(params: dict[bytes, bytes]) -> Action:
    """The default script: the query string says what to do (like tests/apps/fault_app)."""
    query = urllib.parse.parse_qs(params.get(b"QUERY_STRING", b"").decode(), True)
    if "hang" in query:
        return Hang()
    if "crash" in query:
        return Crash(float(query["crash"][0] or 0))
    if "drop" in query:
        return Drop()
    if "garbage" in query:
        return Garbage()
    status = int(query.get("status", ["200"])[0])
    body = params.get(b"REQUEST_URI", b"").replace(b"%", b"") + b"\n"
    return Answer(status, body, float(query.get("sleep", ["0"])[0]))


class _ProgramEnd(asyncio.Protocol):
    """The child's end of one connection: a FastCGI application, one request at a time."""

    def __init__(self, program: FakeProgram) -> None:
        self.program = program
        self.codec = ServerConnection()
        self.transport: MemoryTransport | None = None
        self.params: dict[int, dict[bytes, bytes]] = {}
        self.body: dict[int, bytearray] = {}
        self.keep: dict[int, bool] = {}
        self.aborts = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, MemoryTransport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.program.received += data
        for event in self.codec.feed(data):
            if isinstance(event, BeginRequest):
                self.keep[event.request_id] = event.keep_conn
                self.body[event.request_id] = bytearray()
            elif isinstance(event, Params):
                self.params[event.request_id] = event.params
            elif isinstance(event, Stdin):
                if event.data:
                    self.body[event.request_id] += event.data
                else:
                    self.program.handle(self, event.request_id)
            elif isinstance(event, AbortRequest):
                self.aborts += 1  # ignored, as QGIS does mid-render

    def connection_lost(self, exc: Exception | None) -> None:
        self.program.connections.discard(self)

    def answer(self, request_id: int, status: int, body: bytes) -> None:
        if self.transport is None or self.transport.closed:
            return
        data = encode_response(request_id, status, body)
        self.codec.end(request_id)
        self.transport.write(data)
        if not self.keep.get(request_id, False):
            self.transport.close()


class FakeProgram:
    """One fake FastCGI child process."""

    def __init__(self, processes: FakeProcesses, child: Child, pid: int) -> None:
        self.processes = processes
        self.child = child
        self.pid = pid
        self.alive = True
        self.busy = False
        self.requests: list[dict[bytes, bytes]] = []  # what it was asked, probes included
        self.script: list[Action] = []  # actions for the next non-probe requests, in turn
        self.probe: Action = Answer(200, b"probe\n")
        self.ignore_term = False
        self.rss = 100 * 2**20
        self.cpu_ticks = 0  # CPU time so far, in clock ticks (the test moves it)
        self.signals: list[int] = []
        self.connections: set[_ProgramEnd] = set()
        self.received = b""
        self.exit_status: int | None = None
        self.backlog: list[tuple[_ProgramEnd, int]] = []
        self.cache: dict[str, int] = {}  # project -> the mtime_ns it was loaded at
        self.loads: list[tuple[str, bool]] = []  # (project, by a probe or warm-up)

    @property
    def served(self) -> list[dict[bytes, bytes]]:
        """The requests it was asked, without probes."""
        return [params for params in self.requests if not _is_probe(params)]

    def handle(self, end: _ProgramEnd, request_id: int) -> None:
        """A whole request arrived; like libfcgi, one is worked on at a time."""
        self.backlog.append((end, request_id))
        self._next()

    def _next(self) -> None:
        while self.backlog and not self.busy and self.alive:
            end, request_id = self.backlog.pop(0)
            params = end.params.get(request_id, {})
            self.requests.append(params)
            if _is_probe(params):
                action = self.probe
            elif self.script:
                action = self.script.pop(0)
            else:
                action = self.processes.behaviour(params)
            loop = self.processes.loop
            if isinstance(action, Answer):
                self.busy = True
                after = action.after * self.processes.slowdown() + self._load(params)
                loop.call_later(after, self._finish, end, request_id, action)
            elif isinstance(action, Crash):
                self.busy = True
                loop.call_later(action.after, self.exit, action.signum)
            elif isinstance(action, Drop):
                assert end.transport is not None
                end.transport.close()
            elif isinstance(action, Garbage):
                assert end.transport is not None
                end.transport.write(b"HTTP/1.0 200 OK\r\n\r\nnot fastcgi")
            else:
                self.busy = True  # Hang: until killed

    def _load(self, params: dict[bytes, bytes]) -> float:
        """Seconds to load the request's project first, if it is a known project file whose
        version this program does not hold (QGIS 3.22 notices a changed file by itself)."""
        query = urllib.parse.parse_qs(params.get(b"QUERY_STRING", b"").decode(), True)
        project = (query.get("MAP") or [params.get(b"QGIS_PROJECT_FILE", b"").decode()])[0]
        seconds = self.processes.project_loads.get(project)
        if seconds is None:
            return 0.0
        try:
            version = os.stat(project).st_mtime_ns
        except FileNotFoundError:
            self.cache.pop(project, None)
            return 0.0
        if self.cache.get(project) == version:
            return 0.0
        self.cache[project] = version
        self.loads.append((project, params.get(b"HTTP_USER_AGENT") == b"fcgipool-probe"))
        return seconds

    def _finish(self, end: _ProgramEnd, request_id: int, action: Answer) -> None:
        if self.alive:
            self.busy = False
            self.cpu_ticks += round(action.after * self.processes.cpu_share * TICKS_PER_SECOND)
            end.answer(request_id, action.status, action.body)
            self._next()

    def signal(self, signum: int) -> None:
        self.signals.append(signum)
        if signum == signal.SIGKILL or (signum == signal.SIGTERM and not self.ignore_term):
            self.exit(signum if signum == signal.SIGKILL else 0)

    def exit(self, signum: int = 0, code: int = 0) -> None:
        """Die: killed by ``signum``, else exit with ``code``."""
        if not self.alive:
            return
        self.alive = False
        self.exit_status = signum if signum else code << 8
        for end in list(self.connections):
            if end.transport is not None:
                end.transport.close()
        self.processes.died(self)


def _is_probe(params: dict[bytes, bytes]) -> bool:
    """The readiness probe (child.probe_uri); warm-ups are answered by their URI."""
    agent, uri = params.get(b"HTTP_USER_AGENT"), params.get(b"REQUEST_URI")
    return agent == b"fcgipool-probe" and uri == b"/"


class FakeProcesses:
    """children.Processes without processes: FakePrograms, and a reaper's queue."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.pids = itertools.count(1001)
        self.programs: dict[int, FakeProgram] = {}
        self.exited: list[tuple[int, int]] = []
        self.behaviour: Callable[[dict[bytes, bytes]], Action] = by_uri
        self.on_exit: Callable[[], None] = lambda: None  # SIGCHLD
        self.spawn_error: OSError | None = None
        self.started: list[FakeProgram] = []
        self.spawned_at: list[float] = []  # when each spawn was tried
        self.on_spawn: Callable[[FakeProgram], None] = lambda program: None
        # Project files and their load times: a program then caches projects as QGIS does
        # (by path, reloading one whose file changed) and takes the load time first.
        self.project_loads: dict[str, float] = {}
        self.memory_kills: set[int] = set()  # pids the "kernel" killed at child.max_memory
        self.host_cpu: float | None = None  # how busy the "host's" CPUs are (cpu_busy)
        self.cpu_asked: list[bool] = []  # cpu_busy's ``waiting`` at each call
        self.host_cpus = 4  # the CPUs the pool may run on (cpu_count)
        self.cpu_share = 0.0  # of each answer's time a program spends on CPU (cpu_ticks)
        # CPU-bound programs sharing this many CPUs: an answer begun while more are busy
        # takes longer in proportion (None: each has a CPU of its own)
        self.shared_cpus: int | None = None
        self.switch_cost = 0.0  # ... and each program more than CPUs slows all by this more

    def spawn(self, child: Child) -> None:
        self.spawned_at.append(self.loop.time())
        if self.spawn_error is not None:
            raise self.spawn_error
        child.pid = next(self.pids)
        program = self.programs[child.pid] = FakeProgram(self, child, child.pid)
        self.started.append(program)
        self.on_spawn(program)

    async def connect(
        self, child: Child, factory: Callable[[], ChildConnection]
    ) -> ChildConnection:
        program = self.programs.get(child.pid)
        if program is None or not program.alive:
            raise ConnectionRefusedError(111, "Connection refused")
        connection = factory()
        end = _ProgramEnd(program)
        program.connections.add(end)
        connect(self.loop, connection, end)
        return connection

    def signal(self, child: Child, signum: int) -> None:
        program = self.programs.get(child.pid)
        if program is not None:
            program.signal(signum)

    def died(self, program: FakeProgram) -> None:
        assert program.exit_status is not None
        self.exited.append((program.pid, program.exit_status))
        self.loop.call_soon(self.on_exit)

    def reap(self) -> list[tuple[int, int]]:
        reaped, self.exited = self.exited, []
        return reaped

    def forget(self, child: Child) -> None:
        pass

    def rss(self, child: Child) -> int:
        program = self.programs.get(child.pid)
        return program.rss if program is not None and program.alive else 0

    def cpu_percent(self, child: Child) -> float:
        return 0.0

    def usage(self, child: Child) -> tuple[int, int]:
        program = self.programs.get(child.pid)
        if program is None or not program.alive:
            return 0, 0
        return program.cpu_ticks, program.rss // 4096

    def killed_for_memory(self, child: Child) -> bool:
        return child.pid in self.memory_kills

    def cpu_busy(self, waiting: bool) -> float | None:
        self.cpu_asked.append(waiting)
        return self.host_cpu

    def slowdown(self) -> float:
        """How much longer an answer begun now takes (shared_cpus)."""
        if self.shared_cpus is None:
            return 1.0
        busy = sum(program.busy and program.alive for program in self.programs.values())
        over = max(0, busy - self.shared_cpus)
        return max(1.0, busy / self.shared_cpus) * (1 + self.switch_cost * over)

    def cpu_count(self) -> int:
        return self.host_cpus

    def alive(self) -> list[FakeProgram]:
        return [program for program in self.programs.values() if program.alive]


# ---------------------------------------------------------------------------- web server


@dataclass
class Response:
    stdout: bytearray = field(default_factory=bytearray)
    end: EndRequest | None = None
    ends: int = 0  # END_REQUEST records received for this id (must never exceed 1 per request)

    @property
    def status(self) -> int:
        parts = split_head(bytes(self.stdout))
        assert parts is not None, f"no CGI head in {bytes(self.stdout)[:200]!r}"
        return parse_head(parts[0])[0]

    @property
    def headers(self) -> dict[str, str]:
        parts = split_head(bytes(self.stdout))
        assert parts is not None
        return parse_head(parts[0])[1]

    @property
    def body(self) -> bytes:
        parts = split_head(bytes(self.stdout))
        assert parts is not None
        return parts[1]


class WebServer(asyncio.Protocol):
    """One connection of a web server to the pool socket (nginx's side of it)."""

    def __init__(self) -> None:
        self.codec = ClientConnection()
        self.transport: MemoryTransport | None = None
        self.responses: dict[int, Response] = {}
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, MemoryTransport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        for event in self.codec.feed(data):
            if isinstance(event, Stdout):
                self.responses.setdefault(event.request_id, Response()).stdout += event.data
            elif isinstance(event, EndRequest):
                response = self.responses.setdefault(event.request_id, Response())
                response.end = event
                response.ends += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True

    def send(self, data: bytes) -> None:
        assert self.transport is not None and not self.closed
        self.transport.write(data)

    def request(
        self,
        uri: str,
        request_id: int = 1,
        method: str = "GET",
        body: bytes = b"",
        keep_conn: bool = True,
        extra: dict[str, str] | None = None,
    ) -> Response:
        """Send a whole request; its Response fills in as the answer arrives."""
        self.responses[request_id] = Response()
        params = cgi_params(uri, method, body, extra)
        self.send(encode_request(request_id, params, body, keep_conn))
        return self.responses[request_id]

    def abort(self, request_id: int) -> None:
        self.send(encode_record(RecordType.ABORT_REQUEST, request_id))

    def close(self) -> None:
        assert self.transport is not None
        self.transport.close()


# ---------------------------------------------------------------------------- harness


class Harness:
    """A real Pool (supervisor and all its parts) on a VirtualTimeLoop, with fake children,
    the default configuration unless ``overrides`` say otherwise."""

    def __init__(
        self,
        overrides: dict[str, Any] | None = None,
        start: bool = True,
        config_path: str | None = None,
    ) -> None:
        self.loop = VirtualTimeLoop()
        self.config = configuration.build(config_path, overrides or {}, environ={})
        self.processes = FakeProcesses(self.loop)
        self.notes: list[str] = []
        self.pool = Pool(self.config, config_path, overrides, loop=self.loop, euid=1000,
                         processes=self.processes, notify=self.notes.append)  # fmt: skip
        self.processes.on_exit = self.pool.handle_chld
        if start:
            self.pool.start()
            self.until(lambda: self.pool.children.ready() >= self.pool.children.workers,
                       what="the children ready")  # fmt: skip

    def now(self) -> float:
        return self.loop.time()

    def run(self, seconds: float) -> None:
        """Let ``seconds`` of the pool's time pass."""
        self.loop.run_until_complete(asyncio.sleep(seconds))

    def settle(self) -> None:
        """Run what is ready now, without moving the clock much."""
        self.run(0.0001)

    def until(self, condition: Callable[[], object], within: float = 120.0,
              what: str = "the condition") -> None:  # fmt: skip
        if not self.loop.run_until_true(condition, within):
            raise AssertionError(f"{what}: not within {within} s of pool time")

    def connect(self) -> WebServer:
        web = WebServer()
        connect(self.loop, self.pool.frontend.connection(), web)
        return web

    def get(self, uri: str, within: float = 120.0, **kwargs: Any) -> Response:
        """One request on a new connection, answered (or failed) within ``within``."""
        web = self.connect()
        response = web.request(uri, **kwargs)
        self.until(lambda: response.end is not None or web.closed, within, f"an answer to {uri}")
        return response

    def programs(self) -> list[FakeProgram]:
        return self.processes.alive()

    def busy(self) -> list[FakeProgram]:
        """Wait until some child works on a request; those that do."""
        self.until(lambda: any(p.busy for p in self.programs()), what="a busy child")
        return [program for program in self.programs() if program.busy]

    def stop(self, fast: bool = False) -> int:
        """TERM (or QUIT) the pool and wait until it has stopped; its exit code."""
        self.pool.stop(fast)
        return self.wait_stopped()

    def wait_stopped(self, within: float = 120.0) -> int:
        stopped = self.loop.create_task(self.pool.wait_stopped())
        self.until(stopped.done, within, "the pool stopped")
        return stopped.result()

    def close(self) -> None:
        for task in asyncio.all_tasks(self.loop):
            task.cancel()
        self.loop.run_until_complete(asyncio.sleep(0))
        self.loop.close()
