"""The pool socket: accept the web server's connections, decode them, enforce limits.

A malformed record, a PARAMS stream that is too large or a connection that stalls in the
middle of a request closes that one connection, with a log line; everyone else is served.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import TYPE_CHECKING

from . import logs
from .admin import snapshot
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
    encode_end_request,
    encode_get_values_result,
    encode_unknown_type,
)
from .request import Request

if TYPE_CHECKING:
    from .supervisor import Pool

log = logs.get("fcgipool.frontend")


class FrontConnection(asyncio.Protocol):
    """One connection from the web server; may carry several requests (keep-conn, mux)."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.codec = ServerConnection(pool.config.limits.max_params_size)
        self.transport: asyncio.Transport | None = None
        self.requests: dict[int, Request] = {}
        self.reading_held_by: set[Request] = set()
        self.write_paused = False
        self.closed = False
        self.last_data = self.connected_at = time.monotonic()
        self.started = 0  # requests begun on this connection
        self.peer = ""

    # ------------------------------------------------------------ asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "unix"
        limits = self.pool.config.limits
        if len(self.pool.connections) >= limits.max_connections:
            log.warning("connection_refused", reason="max_connections", peer=self.peer)
            self.closed = True
            transport.abort()
            return
        high = limits.write_buffer
        self.transport.set_write_buffer_limits(high=high, low=high // 4)
        self.pool.connections.add(self)

    def data_received(self, data: bytes) -> None:
        self.last_data = time.monotonic()
        try:
            events = self.codec.feed(data)
        except ProtocolError as error:
            self.abort(f"protocol error: {error}")
            return
        for event in events:
            kind = type(event)
            if kind is Stdin:
                request = self.requests.get(event.request_id)
                if request is not None:
                    request.on_stdin(event.data)
            elif kind is BeginRequest:
                self._begin(event)
            elif kind is Params:
                request = self.requests.get(event.request_id)
                if request is not None and not self._answer_locally(request, event.params):
                    request.on_params(event.params, event.raw)
            elif kind is AbortRequest:
                request = self.requests.get(event.request_id)
                if request is not None:
                    self.write(encode_end_request(event.request_id, 1))
                    request.cancel()
            elif kind is GetValues:
                self.write(encode_get_values_result(self.pool.get_values(event.names)))
            elif kind is UnknownManagementType:
                self.write(encode_unknown_type(event.rtype))
            if self.closed:
                return

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.connections.discard(self)
        for request in list(self.requests.values()):
            request.cancel()
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
        if not self.closed:
            self.transport.write(data)  # type: ignore[union-attr]

    def abort(self, reason: str) -> None:
        """Close this connection at once, losing what is buffered; log why."""
        if self.closed:
            return
        log.warning("connection_closed", peer=self.peer, reason=reason)
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def request_finished(self, request: Request) -> None:
        """Forget an answered request. One answered before its body ended (413, 503) is kept
        until the body's end arrives, so the web server can finish sending it."""
        self.release_reading(request)
        if not request.body_done and not self.closed:
            return
        self.codec.end_request(request.request_id)
        if self.requests.get(request.request_id) is request:
            del self.requests[request.request_id]
        if not self.requests and (not request.keep_conn or self.pool.stopping):
            self.close_idle()

    def close_idle(self) -> None:
        """Close after what is buffered has been written (no request is in flight)."""
        if not self.closed:
            self.closed = True
            self.transport.close()  # type: ignore[union-attr]

    def hold_reading(self, request: Request) -> None:
        """Stop reading this connection until every request that asked releases it."""
        if not self.reading_held_by and not self.closed:
            self.transport.pause_reading()  # type: ignore[union-attr]
        self.reading_held_by.add(request)

    def release_reading(self, request: Request) -> None:
        if request in self.reading_held_by:
            self.reading_held_by.discard(request)
            if not self.reading_held_by and not self.closed:
                self.transport.resume_reading()  # type: ignore[union-attr]

    def fresh(self, now: float, grace: float = 1.0) -> bool:
        """Connected moments ago and no request yet: its first request is on its way."""
        return not self.closed and not self.started and now - self.connected_at < grace

    def stalled_since(self, now: float) -> float:
        """Seconds this connection has kept a request half-sent, 0 when it has not."""
        if self.reading_held_by or all(request.body_done for request in self.requests.values()):
            return 0.0
        return now - self.last_data

    # ------------------------------------------------------------ internals

    def _answer_locally(self, request: Request, params: dict[bytes, bytes]) -> bool:
        """admin.ping_path and admin.status_path are answered by the pool itself, even when
        every child is busy (php-fpm's ping.path and pm.status_path)."""
        admin = self.pool.config.admin
        if not (admin.ping_path or admin.status_path):
            return False
        path = (params.get(b"DOCUMENT_URI") or params.get(b"SCRIPT_NAME") or b"").decode("latin-1")
        if path and path == admin.ping_path:
            request.params = params
            request.respond(200, b"pong\n")
            return True
        if path and path == admin.status_path:
            request.params = params
            body = json.dumps(snapshot(self.pool)).encode()
            request.respond(200, body, content_type="application/json")
            return True
        return False

    def _begin(self, event: BeginRequest) -> None:
        if event.role != Role.RESPONDER:
            self.write(encode_end_request(event.request_id, 0, ProtocolStatus.UNKNOWN_ROLE))
            self.codec.end_request(event.request_id)
            return
        self.started += 1
        if not self.pool.accepting:
            request = Request(self, event.request_id, event.keep_conn, self.pool)
            self.requests[event.request_id] = request
            request.respond(503, b"The pool is shutting down\n")
            return
        self.requests[event.request_id] = Request(
            self, event.request_id, event.keep_conn, self.pool
        )

