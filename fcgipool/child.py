"""One child: what the pool knows of one FastCGI process, and its connection.

The life cycle (spawn, probe, serve, recover, stop) is children.py's, the only writer of a
child's state; how a process is started, signalled and reaped is processes.py's. Here are
the facts both share, and the protocol that reads what a child sends.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, cast

from . import logs
from .machine import StateEnum
from .protocol import EndRequest, ProtocolError, ResponseScanner

if TYPE_CHECKING:
    from .request import Request

log = logs.get("fcgipool.child")


class State(StateEnum):
    STARTING = "starting"  # spawned, readiness probe or warm-up not answered yet
    IDLE = "idle"  # ready, no request
    BUSY = "busy"  # serving a request
    RECOVERING = "recovering"  # a request was abandoned; waiting for a probe answer
    LOADING = "loading"  # ready, but out of rotation while it loads a project
    STOPPING = "stopping"  # asked to exit
    DEAD = "dead"  # reaped


class Handler(Protocol):
    """Who receives what a child sends on its current connection: a request or a probe."""

    def on_output(
        self, records: bytes, starts: list[int], has_output: bool, end: EndRequest | None
    ) -> None:
        """Whole STDOUT/STDERR records as the child sent them, and END_REQUEST if it came."""

    def on_lost(self) -> None: ...
    def pause_sending(self) -> None: ...
    def resume_sending(self) -> None: ...


class Child:
    """One FastCGI child. ``number`` counts the children this pool has started."""

    def __init__(self, number: int, warmup: list[str], now: float) -> None:
        self.number = number
        self.socket_path = ""  # its private listening socket (processes.py makes it)
        self.state = State.STARTING  # written by children.py only
        self.pid = 0
        self.connection: ChildConnection | None = None
        self.request: Request | None = None  # the one being served
        self.abandoned: Request | None = None  # the last one given up on it (a timeout...)
        self.requests_served = 0
        self.requests_limit = 0  # recycle after this many; 0 is never
        self.started_at = now
        self.ready_at = 0.0  # when it first took traffic; 0 while it never has
        self.stop_requested = False
        self.failure = False  # its death counts as a failure even though it was asked to go
        self.exit_reason = ""  # why the pool ended it, for the restart counts
        self.retiring = ""  # why this child is being replaced; empty while it is not
        self.warmup = warmup  # URIs it must answer before it takes traffic
        self.warmups_done = 0
        # Projects served lately, newest last, with when a request for each last began.
        self.projects: OrderedDict[str, float] = OrderedDict()
        self.warm_set: list[str] = []  # projects it loads after its warm-up, before traffic
        self.stale: set[str] = set()  # projects it held whose file has changed since
        self.unanswered = False  # its last probe got no answer in time (children.py's)
        self.probing = False  # idle, out of rotation, answering child.probe_interval's probe
        self.probed_at = 0.0
        self.ticks_at_start = 0  # its CPU clock ticks when its request began (request_cost)
        self.last_cost: tuple[int, int] | None = None  # cpu_ms, rss_mib of its last request
        self.idle_since = now  # when it last became idle (meaningful while it is IDLE)
        self.rss = 0  # resident bytes when last sampled (ready, then every rss_interval)

    def __repr__(self) -> str:
        return f"<Child {self.number} pid={self.pid} {self.state.value}>"

    def usable_connection(self, now: float, reconnect_after: float) -> ChildConnection | None:
        """The kept connection when it can carry the next request without a reconnect:
        libfcgi drops a connection that stayed silent for about 2 s."""
        connection = self.connection
        if connection is None or connection.closed or now - connection.last_used > reconnect_after:
            return None
        return connection

    def connection_lost(self, connection: ChildConnection) -> None:
        if connection is self.connection:
            self.connection = None

    def drop_connection(self) -> ChildConnection | None:
        """Forget the connection (the caller closes it)."""
        connection, self.connection = self.connection, None
        return connection


class ChildConnection(asyncio.Protocol):
    """The pool's connection to one child; forwards what the child sends to a handler.

    A child that writes something that is not FastCGI is reported to ``misbehaved``: it
    cannot be trusted with another request.
    """

    __slots__ = (
        "_clock",
        "_misbehaved",
        "_scanner",
        "child",
        "closed",
        "handler",
        "last_used",
        "paused",
        "transport",
    )

    def __init__(
        self,
        child: Child,
        misbehaved: Callable[[Child], None],
        clock: Callable[[], float],
    ) -> None:
        self.child = child
        self._misbehaved = misbehaved
        self._clock = clock
        self._scanner = ResponseScanner()
        self.transport: asyncio.Transport | None = None
        self.handler: Handler | None = None
        self.closed = False
        self.paused = False  # reading held back: the web server reads the answer slowly
        self.last_used = clock()

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
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def write(self, data: bytes) -> None:
        if not self.closed and self.transport is not None:
            self.transport.write(data)

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
            self._misbehaved(self.child)
            return
        handler = self.handler
        if not starts or handler is None:
            return
        if end is not None:
            self.handler = None
            self.last_used = self._clock()
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


def remember(projects: OrderedDict[str, float], project: str, size: int, at: float) -> None:
    """Keep ``project`` as the most recent of at most ``size`` remembered projects, loaded
    or last requested ``at`` (the loop's clock)."""
    projects[project] = at
    projects.move_to_end(project)
    while len(projects) > size:
        projects.popitem(last=False)
