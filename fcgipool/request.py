"""One request's life: received from the web server, admitted, queued, relayed to a child,
answered. Every state and every allowed move is in :data:`MACHINE` (h11's ``_state.py`` is
the model); a move the table does not allow raises :class:`IllegalTransition`. Every
ending goes through :meth:`Request._end`, which says how the web server learns of it
(:class:`Reply`) and hands back what the request held: its queue place or its child.

The request relays in both directions with flow control: body bytes wait in a bounded
buffer until a child takes the request, then stream as they arrive; response bytes stream
back while the front-end connection keeps up, and the child is read more slowly when not.

Until the first response byte, what was sent to the child is kept (up to ``body_buffer``
bytes) so the request can be sent again:

- on the same child, once, when it closed a *kept* connection without answering: libfcgi
  reads ahead while it drains the previous request and throws the new one away with its
  buffer, so that request never started (a dead child refuses the new connection);
- on another child, once, when the child failed before answering and the method is GET or
  HEAD, which are safe to repeat.

Past the request timeout the web server gets a 504 at once and the child is cancelled.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import logs
from .child import State as ChildState
from .client import response_status
from .machine import IllegalTransition, StateEnum
from .protocol import (
    EndRequest,
    RecordType,
    encode_begin_request,
    encode_params,
    encode_record,
    encode_stream,
    stdout_content,
)

if TYPE_CHECKING:
    from .accounting import Accounting
    from .admission import Admission
    from .child import Child, ChildConnection
    from .children import Children
    from .config import LimitsSection
    from .costs import Kind
    from .dispatch import Dispatcher
    from .frontend import FrontConnection

log = logs.get("fcgipool.request")

CHILD_REQUEST_ID = 1
_STDIN_END = encode_record(RecordType.STDIN, CHILD_REQUEST_ID)
_BEGIN = {  # the BEGIN_REQUEST record sent to a child, by FCGI_KEEP_CONN
    keep: encode_begin_request(CHILD_REQUEST_ID, keep_conn=keep) for keep in (False, True)
}
_REPEATABLE = (b"GET", b"HEAD")
ABORTED = 499  # nginx's code for a request whose client went away
_HEAD_LIMIT = 8192  # the CGI headers are read from this much of the first output, not all
_STDOUT = int(RecordType.STDOUT)
_NO_KIND: Kind = ("", "", 0, "")


class State(StateEnum):
    RECEIVING = "receiving"  # PARAMS (and the head of a small POST body) still arriving
    QUEUED = "queued"  # admitted, waiting for a free child
    CONNECTING = "connecting"  # a child is chosen, a connection to it is being made
    RUNNING = "running"  # the child has the request; no answer byte yet
    RESPONDING = "responding"  # answer bytes are going to the web server
    DONE = "done"  # ended, one way or another


class Event(StateEnum):
    ADMIT = "admit"  # classified and allowed: it waits for a child
    ASSIGN = "assign"  # the dispatcher gave it a child
    CONNECT = "connect"  # its bytes go out on a connection to the child
    ANSWER = "answer"  # the child's first answer byte arrived
    REPLAY = "replay"  # a kept connection was closed under it: again, same child
    REQUEUE = "requeue"  # the child failed before answering: again, another child
    END = "end"


class _Moves(dict[Event, State]):
    """The moves out of one state; any other raises (a missing key is a bug, not a miss)."""

    state: State

    def __missing__(self, event: Event) -> State:
        raise IllegalTransition(f"{event.value} in state {self.state.value}")


def _table(moves: dict[State, dict[Event, State]]) -> dict[State, _Moves]:
    table = {}
    for state, out in moves.items():
        table[state] = _Moves(out)
        table[state].state = state
    return table


# Every state and every allowed move: ``self.state = MACHINE[self.state][event]``.
MACHINE: dict[State, _Moves] = _table({
    State.RECEIVING: {Event.ADMIT: State.QUEUED, Event.END: State.DONE},
    State.QUEUED: {Event.ASSIGN: State.CONNECTING, Event.END: State.DONE},
    State.CONNECTING: {
        Event.CONNECT: State.RUNNING,
        Event.REQUEUE: State.QUEUED,
        Event.END: State.DONE,
    },
    State.RUNNING: {
        Event.ANSWER: State.RESPONDING,
        Event.REPLAY: State.CONNECTING,
        Event.REQUEUE: State.QUEUED,
        Event.END: State.DONE,
    },
    State.RESPONDING: {Event.END: State.DONE},
    State.DONE: {},
})  # fmt: skip


class Reply(StateEnum):
    """How the web server learns that a request ended."""

    CHILD = "child"  # the child's END_REQUEST was relayed
    POOL = "pool"  # the pool answers it itself (403, 413, 502, 503, 504)
    CLOSE = "close"  # the answer had begun: only a closed connection says it is cut short
    END = "end"  # END_REQUEST alone: the web server aborted the request
    NONE = "none"  # the web server's connection is gone


@dataclass(slots=True)
class Context:
    """What a request needs of the pool (uvicorn's ServerState is the model): made by the
    supervisor, refreshed on reload, shared by every request."""

    loop: asyncio.AbstractEventLoop
    limits: LimitsSection
    keep_conn: bool
    reconnect_after: float
    request_timeout: float
    admission: Admission
    dispatcher: Dispatcher
    children: Children
    accounting: Accounting
    buffered: int = 0  # request bytes held by every request until a child takes them
    numbered: int = 0  # requests received so far: each one's number


class Request:
    __slots__ = (
        "_body_head",
        "_pending",
        "_pending_size",
        "_replayed",
        "_retried",
        "_reused",
        "_sent",
        "_sent_size",
        "body_done",
        "body_size",
        "bytes_out",
        "child",
        "cold",
        "connection",
        "cost",
        "counted",
        "cpu_ms",
        "created",
        "ctx",
        "finished_by_child",
        "front",
        "keep_conn",
        "kind",
        "lane",
        "long",
        "number",
        "params",
        "project",
        "queued_at",
        "raw_params",
        "request_class",
        "request_id",
        "rss_mib",
        "served_by",
        "slow_reported",
        "started",
        "state",
        "status",
        "timeout",
    )

    def __init__(self, front: FrontConnection, request_id: int, keep_conn: bool, ctx: Context):
        self.ctx = ctx
        ctx.numbered += 1
        self.number = ctx.numbered
        self.front = front
        self.request_id = request_id
        self.keep_conn = keep_conn
        self.state = State.RECEIVING
        self.params: dict[bytes, bytes] = {}
        self.raw_params = b""
        self._pending: list[bytes] = []  # for the child, until it takes the request
        self._pending_size = 0
        self._body_head: bytearray | None = None  # a small POST body, read to classify it
        self._sent: list[bytes] | None = None  # what the child got, while it may be resent
        self._sent_size = 0
        self._reused = False  # sent on a kept connection
        self._replayed = False
        self._retried = False
        self.body_size = 0
        self.body_done = False
        self.child: Child | None = None
        self.connection: ChildConnection | None = None
        self.created = ctx.loop.time()
        self.queued_at = 0.0
        self.started = 0.0  # when a child took it
        self.status = 0
        self.bytes_out = 0
        self.request_class = "default"
        self.project = ""
        self.timeout = ctx.request_timeout
        self.counted = False  # holds a place in its class's running count (dispatch.py)
        self.kind: Kind = _NO_KIND  # what it is, for the cost model (costs.py)
        self.cost = 0.0  # predicted seconds on a child
        self.lane = 0  # its queue lane, by cost
        self.long = False  # predicted long (tuning.long_request)
        self.finished_by_child = False  # its child's time is its kind's cost
        self.cold = False  # its child did not hold its project: it loaded it first
        self.cpu_ms: int | None = None  # its child's CPU time on it (log.request_cost)
        self.rss_mib: int | None = None  # its child's resident memory after it
        self.served_by = 0  # pid of the (last) child that had it
        self.slow_reported = False  # its slow_request line is written (diagnostics.py)

    @property
    def id(self) -> str:
        """The web server's request id (fastcgi_param REQUEST_ID $request_id, or an
        X-Request-Id header), else the pool's number for it: in the access log and in the
        lines a child writes while it serves it."""
        get = self.params.get
        named = get(b"REQUEST_ID") or get(b"HTTP_X_REQUEST_ID")
        return named.decode("latin-1") if named else str(self.number)

    def __repr__(self) -> str:
        return f"<Request {self.request_id} {self.state.value} {self.uri}>"

    @property
    def uri(self) -> str:
        return self.params.get(b"REQUEST_URI", b"").decode("latin-1")

    # ------------------------------------------------------------ from the web server

    def on_params(self, params: dict[bytes, bytes], raw: bytes, body_ended: bool) -> None:
        """PARAMS are in; with ``body_ended`` the (empty) body too."""
        self.params, self.raw_params = params, raw
        ctx = self.ctx
        declared = params.get(b"CONTENT_LENGTH", b"")
        length = int(declared) if declared.isdigit() else 0
        if length > ctx.limits.max_body_size:
            self.respond(413, b"Request body too large\n")
            return
        if body_ended:
            self.body_done = True
            self._pending.append(_STDIN_END)
            self._pending_size += len(_STDIN_END)
            ctx.buffered += len(_STDIN_END)
        elif ctx.admission.wants_body(params, length):
            self._body_head = bytearray()  # the OGC request may be in the body: wait for it
            return
        self._admit(None)

    def _admit(self, body: bytes | None) -> None:
        ctx = self.ctx
        refusal = ctx.admission.admit(self, body)
        if refusal is not None:
            self.respond(*refusal)
            return
        self.state = MACHINE[self.state][Event.ADMIT]
        head = _BEGIN[ctx.keep_conn] + encode_params(CHILD_REQUEST_ID, self.raw_params)
        self._pending.insert(0, head)
        self._pending_size += len(head)
        ctx.buffered += len(head)
        ctx.dispatcher.submit(self)

    def on_stdin(self, data: bytes) -> None:
        if self.body_done:  # nothing may follow the end of the body
            return
        if data:
            self.body_size += len(data)
            if self.body_size > self.ctx.limits.max_body_size:
                self._fail(413, b"Request body too large\n")
                return
            record = encode_stream(RecordType.STDIN, CHILD_REQUEST_ID, data)
            if self._body_head is not None:
                self._body_head += data
        else:
            self.body_done = True
            record = _STDIN_END
        if self.connection is not None:
            self.connection.write(record)
            self._keep_sent(record)
            return
        self._pending.append(record)
        self._pending_size += len(record)
        ctx = self.ctx
        ctx.buffered += len(record)
        if self._body_head is not None and (
            self.body_done or len(self._body_head) > self.ctx.admission.body_limit
        ):
            body, self._body_head = bytes(self._body_head), None
            self._admit(body)
        elif self._pending_size > ctx.limits.body_buffer or (
            ctx.buffered > ctx.limits.max_buffered and self.state is State.QUEUED
        ):
            self.front.hold_reading(self)  # its child, or the others' children, free it

    def abort(self) -> None:
        """The web server sent FCGI_ABORT_REQUEST: END_REQUEST, and the child is freed."""
        self._end(ABORTED, Reply.END)

    def connection_gone(self) -> None:
        """The web server's connection closed: nobody is left to answer."""
        self._end(ABORTED, Reply.NONE)

    # ------------------------------------------------------------ to and from a child

    def start(self, child: Child) -> None:
        """The dispatcher gives this request a free child."""
        self.state = MACHINE[self.state][Event.ASSIGN]
        ctx = self.ctx
        self.child = child
        ctx.children.assign(child, self)
        self.served_by = child.pid
        now = ctx.loop.time()
        if not self.started:
            self.started = now
        connection = child.usable_connection(now, ctx.reconnect_after) if ctx.keep_conn else None
        if connection is not None:
            self._attach(connection, reused=True)
        else:
            ctx.loop.create_task(self._connect(child))

    async def _connect(self, child: Child) -> None:
        """In state CONNECTING the connect is in flight, and only its end frees the child."""
        children = self.ctx.children
        connection = await children.connect(child)
        if self.child is not child or self.state is not State.CONNECTING:
            # Ended while connecting: the child never saw the request.
            if connection is not None:
                children.release(child, served=False)
            else:
                children.abandon(child)
        elif connection is not None:
            self._attach(connection, reused=False)
        else:  # the child is gone or broken; the request never reached it
            self.child = None
            children.abandon(child)
            self._retry_or_fail()

    def _attach(self, connection: ChildConnection, reused: bool) -> None:
        self.state = MACHINE[self.state][Event.CONNECT]
        self.connection = connection
        self._reused = reused
        connection.handler = self
        front = self.front
        if connection.paused is not front.write_paused:
            connection.hold(front.write_paused)
        pending = self._pending
        data = pending[0] if len(pending) == 1 else b"".join(pending)
        connection.write(data)
        self._pending = []
        self.ctx.buffered -= self._pending_size
        self._pending_size = 0
        self._sent, self._sent_size = [data], len(data)
        if self._sent_size > self.ctx.limits.body_buffer:
            self._sent = None
        if front.reading_held_by:
            front.release_reading(self)

    def _keep_sent(self, data: bytes) -> None:
        if self._sent is not None:
            self._sent.append(data)
            self._sent_size += len(data)
            if self._sent_size > self.ctx.limits.body_buffer:
                self._sent = None

    def on_output(
        self, records: bytes, starts: list[int], has_output: bool, end: EndRequest | None
    ) -> None:
        if has_output and self.state is State.RUNNING:
            self.state = MACHINE[self.state][Event.ANSWER]
            self._sent = None
            self.status = _answer_status(records, starts)
        self.front.relay(self.request_id, records, starts, end is not None)
        self.bytes_out += len(records)
        if end is not None:
            if self.connection is not None:
                self.connection.hold(False)  # the answer is complete: free for the next one
            self._end(self.status or 502, Reply.CHILD)

    def on_lost(self) -> None:
        """The child's connection ended before END_REQUEST."""
        state = self.state
        if state is State.RESPONDING:
            self._end(502, Reply.CLOSE, b"child connection lost mid-response")
            return
        if state is not State.RUNNING:
            return
        child = self.child
        sent, self._sent = self._sent, None
        self.connection = None
        if sent is None:  # too much was sent to keep it for a second try
            self._fail(502, b"The FastCGI child failed before answering\n")
            return
        self._pending[:0] = sent
        size = sum(map(len, sent))
        self._pending_size += size
        self.ctx.buffered += size
        if (
            self._reused
            and not self._replayed
            and child is not None
            and child.state is ChildState.BUSY  # still ours: again on the same child
        ):
            self._replayed = True
            self.state = MACHINE[self.state][Event.REPLAY]
            self.ctx.loop.create_task(self._connect(child))
            return
        self.child = None
        if child is not None:
            self.ctx.children.abandon(child)
        self._retry_or_fail()

    def _retry_or_fail(self) -> None:
        """The child failed before answering (and is no longer this request's): a GET or
        HEAD is sent once more, to another child; anything else gets a 502."""
        if self._retried or not self._repeatable():
            self._fail(502, b"The FastCGI child failed before answering\n")
            return
        self._retried = True
        log.info("request_retried", uri=self.uri, pid=self.served_by)
        self.ctx.dispatcher.released(self)
        self.state = MACHINE[self.state][Event.REQUEUE]
        self.ctx.dispatcher.submit(self, first=True)

    def _repeatable(self) -> bool:
        return self.params.get(b"REQUEST_METHOD", b"GET") in _REPEATABLE

    def check_timeout(self, now: float) -> None:
        """Past its timeout (the pool checks a few times a second): 504 at once, and the
        child is cancelled."""
        if self.state is State.DONE or not self.started or now <= self.started + self.timeout:
            return
        seconds = self.timeout
        child = self.child
        log.warning("request_timeout", uri=self.uri, pid=child.pid if child else 0, seconds=seconds)
        self._fail(504, f"The request took longer than {seconds:g} s\n".encode())

    def pause_sending(self) -> None:
        self.front.hold_reading(self)

    def resume_sending(self) -> None:
        self.front.release_reading(self)

    def pause_response(self) -> None:
        """The front-end connection's buffer is full: read the child more slowly."""
        if self.connection is not None:
            self.connection.hold(True)

    def resume_response(self) -> None:
        if self.connection is not None:
            self.connection.hold(False)

    # ------------------------------------------------------------ endings

    def respond(
        self,
        status: int,
        body: bytes,
        headers: Iterable[tuple[str, str]] = (),
        content_type: str = "text/plain; charset=utf-8",
    ) -> None:
        """The pool answers before any child has it (a 403, 413 or 503; a ping)."""
        self._end(status, Reply.POOL, body, headers, content_type)

    def _fail(self, status: int, body: bytes) -> None:
        """A failure after admission: a clean answer while none has begun, else a close."""
        self._end(status, Reply.CLOSE if self.state is State.RESPONDING else Reply.POOL, body)

    def _end(
        self,
        status: int,
        reply: Reply,
        body: bytes = b"",
        headers: Iterable[tuple[str, str]] = (),
        content_type: str = "text/plain; charset=utf-8",
    ) -> None:
        """Every ending, once: give back the queue place or the child, tell the web
        server as ``reply`` says, count it."""
        state = self.state
        self.state = MACHINE[self.state][Event.END]
        ctx = self.ctx
        self.status = status
        if state is State.QUEUED:
            ctx.dispatcher.withdraw(self)
        child, self.child = self.child, None
        connection, self.connection = self.connection, None
        if connection is not None and connection.handler is self:
            connection.handler = None
        self._pending.clear()
        ctx.buffered -= self._pending_size
        self._pending_size = 0
        self._sent = None
        front = self.front
        if reply is Reply.POOL:
            self.bytes_out = front.respond(self.request_id, status, body, headers, content_type)
        elif reply is Reply.CLOSE:
            front.abort(body.decode() if body else "request ended mid-response")
        elif reply is Reply.END:
            front.end(self.request_id)
        front.request_finished(self)
        # The child answered, or took the whole timeout: either way the kind costs that.
        self.finished_by_child = reply is Reply.CHILD or status == 504
        ctx.dispatcher.released(self)
        if child is not None and state is not State.CONNECTING:  # a connect frees its child
            if reply is Reply.CHILD:
                ctx.children.release(child, served=True)
            else:
                ctx.children.abandon(child)
        ctx.accounting.request_done(self)


def _answer_status(records: bytes, starts: list[int]) -> int:
    """The status of an answer, from its first records: from the first STDOUT record when
    the whole CGI head is in it (the common case), else from the first 8 KiB of output."""
    for start in starts:
        if records[start + 1] == _STDOUT:
            length = (records[start + 4] << 8) | records[start + 5]
            first = records[start + 8 : start + 8 + length]
            if b"\r\n\r\n" in first or b"\n\n" in first:
                return response_status(first)
            break
    return response_status(stdout_content(records, starts, _HEAD_LIMIT))
