"""The pool socket's side: the web server's connections, decoded, within limits.

A malformed record, a PARAMS stream that is too large or a connection that stalls in the
middle of a request closes that one connection, with a log line; everyone else is served.
FCGI_GET_VALUES is answered here, and so are admin.ping_path and admin.status_path (like
php-fpm's ping.path and pm.status_path), even when every child is busy.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
from collections.abc import Callable, Iterable
from typing import Any, cast

from . import logs
from .config import Config
from .protocol import (
    AbortRequest,
    BeginRequest,
    GetValues,
    Params,
    ProtocolError,
    ProtocolStatus,
    Role,
    ServerConnection,
    Stdin,
    UnknownManagementType,
    encode_get_values_result,
    encode_unknown_type,
)
from .request import Context, Request

_LOOPBACK = [ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")]
log = logs.get("fcgipool.frontend")

FRESH = 1.0  # seconds a new connection counts as about to send its first request


class Frontend:
    """Every front-end connection, and what they share: the limits, whether requests are
    still taken, what requests need of the pool."""

    def __init__(
        self,
        config: Config,
        context: Context,
        status_document: Callable[[], dict[str, Any]],
    ) -> None:
        self.context = context
        self.status_document = status_document
        self.connections: set[FrontConnection] = set()
        self.accepting = True  # new requests are taken (false once a stop's drain ended)
        self.draining = False  # stopping: connections close once they are idle
        self.configure(config)

    def configure(self, config: Config) -> None:
        self.limits = config.limits
        self.ping_path = config.admin.ping_path
        self.status_path = config.admin.status_path
        self.allowed = [ipaddress.ip_network(n, strict=False) for n in config.pool.allowed_clients]
        limit = str(config.limits.max_connections).encode()
        self.values = {b"FCGI_MAX_CONNS": limit, b"FCGI_MAX_REQS": limit, b"FCGI_MPXS_CONNS": b"1"}

    def connection(self) -> FrontConnection:
        """The protocol factory of a listening socket whose clients are not checked."""
        return FrontConnection(self)

    def factory(self, sock: socket.socket) -> Callable[[], FrontConnection]:
        """The protocol factory of ``sock``: a TCP socket checks its clients."""
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            return self.connection
        wildcard = ipaddress.ip_address(sock.getsockname()[0]).is_unspecified
        return lambda: FrontConnection(self, wildcard)

    def admits(self, host: str, wildcard: bool) -> bool:
        """May a client at ``host`` connect (pool.allowed_clients)?"""
        networks = self.allowed or (_LOOPBACK if wildcard else None)
        if networks is None:
            return True
        try:
            address = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        return any(address in network for network in networks)

    def get_values(self, names: Iterable[bytes]) -> dict[bytes, bytes]:
        return {name: self.values[name] for name in names if name in self.values}

    def sweep(self, now: float) -> None:
        """Close connections that stall in the middle of sending a request."""
        read_timeout = self.limits.read_timeout
        for connection in list(self.connections):
            if connection.stalled_since(now) > read_timeout:
                connection.abort(f"read timeout: no data for {read_timeout:g} s mid-request")

    def drain(self, now: float) -> bool:
        """Close the idle connections; True while some still have work (a request in
        flight, or a first request on its way)."""
        self.draining = True
        busy = False
        for connection in list(self.connections):
            if connection.requests or connection.fresh(now):
                busy = True
            else:
                connection.close_idle()
        return busy

    def close_all(self, reason: str) -> None:
        """Abort the connections with requests in flight, close the others."""
        for connection in list(self.connections):
            if connection.requests:
                connection.abort(reason)
            else:
                connection.close_idle()


class FrontConnection(asyncio.Protocol):
    """One connection from the web server; may carry several requests (keep-conn, mux)."""

    def __init__(self, frontend: Frontend, wildcard: bool | None = None) -> None:
        self.frontend = frontend
        self.wildcard = wildcard  # a TCP bind's clients are checked; None: not TCP
        self.clock = frontend.context.loop.time
        self.codec = ServerConnection(frontend.limits.max_params_size)
        self.transport: asyncio.Transport | None = None
        self.requests: dict[int, Request] = {}
        self.reading_held_by: set[Request] = set()
        self.write_paused = False
        self.closed = False
        self.closing = False  # close once no request is left and nothing is half-sent
        self.last_data = self.connected_at = self.clock()
        self.started = 0  # requests begun on this connection
        self.peer = ""

    # ------------------------------------------------------------ asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "unix"
        frontend = self.frontend
        limits = frontend.limits
        wildcard = self.wildcard
        if wildcard is not None and isinstance(peer, tuple) and not frontend.admits(
            peer[0], wildcard
        ):
            log.warning("connection_refused", reason="allowed_clients", peer=self.peer)
            self.closed = True
            self.transport.abort()
            return
        if len(frontend.connections) >= limits.max_connections:
            log.warning("connection_refused", reason="max_connections", peer=self.peer)
            self.closed = True
            self.transport.abort()
            return
        high = limits.write_buffer
        self.transport.set_write_buffer_limits(high=high, low=high // 4)
        frontend.connections.add(self)

    def data_received(self, data: bytes) -> None:
        self.last_data = self.clock()
        try:
            events = self.codec.feed(data)
        except ProtocolError as error:
            self.abort(f"protocol error: {error}")
            return
        requests = self.requests
        count = len(events)
        index = 0
        while index < count:
            event = events[index]
            index += 1
            if isinstance(event, Stdin):
                request = requests.get(event.request_id)
                if request is not None:
                    request.on_stdin(event.data)
            elif isinstance(event, BeginRequest):
                self._begin(event)
            elif isinstance(event, Params):
                # A body that ends in the same read (a GET's empty one) comes with them, so
                # that the child gets the whole request in one write.
                following = events[index] if index < count else None
                ended = (
                    isinstance(following, Stdin)
                    and not following.data
                    and following.request_id == event.request_id
                )
                index += ended
                request = requests.get(event.request_id)
                if request is not None and not self._answer_locally(request, event.params):
                    request.on_params(event.params, event.raw, ended)
            elif isinstance(event, AbortRequest):
                request = requests.get(event.request_id)
                if request is not None:
                    request.abort()
            elif isinstance(event, GetValues):
                self.write(encode_get_values_result(self.frontend.get_values(event.names)))
            elif isinstance(event, UnknownManagementType):
                self.write(encode_unknown_type(event.rtype))
            if self.closed:
                return
        if self.closing:
            self._close_if_quiet()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.frontend.connections.discard(self)
        for request in list(self.requests.values()):
            request.connection_gone()
        self.requests.clear()
        self.reading_held_by.clear()

    def pause_writing(self) -> None:
        self.write_paused = True
        for request in self.requests.values():
            request.pause_response()

    def resume_writing(self) -> None:
        self.write_paused = False
        for request in self.requests.values():
            request.resume_response()

    # ------------------------------------------------------------ used by requests

    def write(self, data: bytes) -> None:
        if data and not self.closed and self.transport is not None:
            self.transport.write(data)

    def relay(self, request_id: int, records: bytes, starts: list[int], ended: bool) -> None:
        """A child's records for the request ``request_id`` (the last one ends it)."""
        data = self.codec.relay(request_id, records, starts, ended)
        if data and not self.closed and self.transport is not None:
            self.transport.write(data)

    def respond(
        self,
        request_id: int,
        status: int,
        body: bytes,
        headers: Iterable[tuple[str, str]] = (),
        content_type: str = "text/plain; charset=utf-8",
    ) -> int:
        """The pool's own whole answer; returns its size."""
        data = self.codec.respond(request_id, status, body, headers, content_type)
        self.write(data)
        return len(data)

    def end(self, request_id: int) -> None:
        self.write(self.codec.end(request_id))

    def abort(self, reason: str) -> None:
        """Close this connection at once, losing what is buffered; log why."""
        if self.closed:
            return
        log.warning("connection_closed", peer=self.peer, reason=reason)
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def request_finished(self, request: Request) -> None:
        """Forget an ended request. A connection without keep-conn (or one of a pool that
        is stopping) closes once nothing is left on it, a body still arriving included."""
        self.release_reading(request)
        if self.requests.get(request.request_id) is request:
            del self.requests[request.request_id]
        if not request.keep_conn or self.frontend.draining:
            self.closing = True
            self._close_if_quiet()

    def close_idle(self) -> None:
        """Close after what is buffered has been written (no request is in flight)."""
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.close()

    def hold_reading(self, request: Request) -> None:
        """Stop reading this connection until every request that asked releases it."""
        if not self.reading_held_by and not self.closed and self.transport is not None:
            self.transport.pause_reading()
        self.reading_held_by.add(request)

    def release_reading(self, request: Request) -> None:
        if request in self.reading_held_by:
            self.reading_held_by.discard(request)
            if not self.reading_held_by and not self.closed and self.transport is not None:
                self.transport.resume_reading()

    def fresh(self, now: float) -> bool:
        """Connected moments ago and no request yet: its first request is on its way."""
        return not self.closed and not self.started and now - self.connected_at < FRESH

    def stalled_since(self, now: float) -> float:
        """Seconds this connection has kept a request half-sent, 0 when it has not."""
        if self.reading_held_by or not self.codec.receiving:
            return 0.0
        return now - self.last_data

    # ------------------------------------------------------------ internals

    def _close_if_quiet(self) -> None:
        if not self.requests and not self.codec.receiving:
            self.close_idle()

    def _answer_locally(self, request: Request, params: dict[bytes, bytes]) -> bool:
        frontend = self.frontend
        if not (frontend.ping_path or frontend.status_path):
            return False
        path = (params.get(b"DOCUMENT_URI") or params.get(b"SCRIPT_NAME") or b"").decode("latin-1")
        if not path:
            return False
        if path == frontend.ping_path:
            request.params = params
            request.respond(200, b"pong\n")
            return True
        if path == frontend.status_path:
            request.params = params
            body = json.dumps(frontend.status_document()).encode()
            request.respond(200, body, content_type="application/json")
            return True
        return False

    def _begin(self, event: BeginRequest) -> None:
        if event.role != Role.RESPONDER:
            self.write(self.codec.end(event.request_id, 0, ProtocolStatus.UNKNOWN_ROLE))
            if not event.keep_conn:
                self.closing = True
            return
        self.started += 1
        request = Request(self, event.request_id, event.keep_conn, self.frontend.context)
        self.requests[event.request_id] = request
        if not self.frontend.accepting:
            request.respond(503, b"The pool is shutting down\n")
