"""One request's life: received from the web server, queued, relayed to a child, answered.

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

import enum
import time
from typing import TYPE_CHECKING

from . import logs
from .child import State as ChildState
from .classify import ogc_from_body
from .client import response_status
from .protocol import (
    EndRequest,
    RecordType,
    encode_begin_request,
    encode_pairs,
    encode_params,
    encode_record,
    encode_response,
    encode_stream,
    retag,
    stdout_content,
)

if TYPE_CHECKING:
    from .child import Child, ChildConnection
    from .frontend import FrontConnection
    from .supervisor import Pool

log = logs.get("fcgipool.request")

CHILD_REQUEST_ID = 1
_STDIN_END = encode_record(RecordType.STDIN, CHILD_REQUEST_ID)
_BEGIN = {  # the BEGIN_REQUEST record sent to a child, by FCGI_KEEP_CONN
    keep: encode_begin_request(CHILD_REQUEST_ID, keep_conn=keep) for keep in (False, True)
}
_REPEATABLE = (b"GET", b"HEAD")
_CLASSIFY_BODY_LIMIT = 65536  # POST bodies up to this size are read to classify them
ABORTED = 499  # nginx's code for a request whose client went away
_HEAD_LIMIT = 8192  # the CGI headers are read from this much of the first output, not all


class Phase(enum.Enum):
    RECEIVING = "receiving"  # PARAMS not complete
    QUEUED = "queued"  # waiting for a free child
    CONNECTING = "connecting"  # a child is chosen, its connection is being made
    RUNNING = "running"  # the child has the request
    DONE = "done"  # answered or given up


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
        "connection",
        "counted",
        "created",
        "front",
        "keep_conn",
        "params",
        "phase",
        "pool",
        "project",
        "queued_at",
        "raw_params",
        "request_class",
        "request_id",
        "response_started",
        "served_by",
        "started",
        "status",
        "timeout",
    )

    def __init__(self, front: FrontConnection, request_id: int, keep_conn: bool, pool: Pool):
        self.front = front
        self.request_id = request_id
        self.keep_conn = keep_conn
        self.pool = pool
        self.params: dict[bytes, bytes] = {}
        self.raw_params = b""
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._body_head: bytearray | None = None
        self._sent: list[bytes] | None = None
        self._sent_size = 0
        self._reused = False
        self._replayed = False
        self._retried = False
        self.body_size = 0
        self.body_done = False
        self.child: Child | None = None
        self.connection: ChildConnection | None = None
        self.phase = Phase.RECEIVING
        self.queued_at = 0.0
        self.response_started = False
        self.created = time.monotonic()
        self.started = 0.0  # when a child took it
        self.status = 0
        self.bytes_out = 0
        self.request_class = "default"
        self.project = ""
        self.timeout = pool.config.timeouts.request
        self.counted = False  # holds a place in its class's running count
        self.served_by = 0  # pid of the (last) child that had it

    def __repr__(self) -> str:
        return f"<Request {self.request_id} {self.phase.value} {self.uri}>"

    @property
    def uri(self) -> str:
        return self.params.get(b"REQUEST_URI", b"").decode("latin-1")

    # ------------------------------------------------------------ from the web server

    def on_params(self, params: dict[bytes, bytes], raw: bytes) -> None:
        self.params, self.raw_params = params, raw
        declared = params.get(b"CONTENT_LENGTH", b"")
        length = int(declared) if declared.isdigit() else 0
        if length > self.pool.config.limits.max_body_size:
            self.respond(413, b"Request body too large\n")
            return
        if (
            params.get(b"REQUEST_METHOD") == b"POST"
            and 0 < length <= _CLASSIFY_BODY_LIMIT
            and not self.body_done
        ):
            self._body_head = bytearray()  # an OGC request may be in the body: wait for it
            return
        self._admit(None)

    def _admit(self, body: bytes | None) -> None:
        """Classify, check the project, then queue or start."""
        classifier = self.pool.classifier
        params = self.params
        ogc, rule = classifier.of_query(params)
        if body and not ("SERVICE" in ogc and "REQUEST" in ogc):
            content_type = params.get(b"CONTENT_TYPE", b"").decode("latin-1").lower()
            from_body = ogc_from_body(body, content_type, classifier.wanted)
            ogc = {**from_body, **ogc}
            rule = classifier.classify(ogc, params)
        self.request_class = name = rule.name
        self.timeout = self.pool.dispatcher.classes[name].request_timeout
        project = classifier.project(ogc, params)
        if project:
            check = classifier.check(project)
            if not check.allowed:
                log.warning("project_refused", project=project, uri=self.uri)
                self.project = project
                self.respond(403, b"This project is not served here\n")
                return
            if check.path:
                self.params = classifier.rewrite(params, ogc, check.path)
                self.raw_params = encode_pairs(self.params.items())
                project = check.path
        self.project = project
        head = _BEGIN[self.pool.config.child.keep_conn] + encode_params(
            CHILD_REQUEST_ID, self.raw_params
        )
        self._pending.insert(0, head)
        self._pending_size += len(head)
        self.phase = Phase.QUEUED
        self.pool.dispatcher.submit(self)

    def on_stdin(self, data: bytes) -> None:
        if self.phase is Phase.DONE:  # answered early: the rest of the body is discarded
            if not data:
                self.body_done = True
                self.front.request_finished(self)
            return
        if self.body_done:  # nothing may follow the end of the body
            return
        if data:
            self.body_size += len(data)
            if self.body_size > self.pool.config.limits.max_body_size:
                self.give_up()
                self.respond(413, b"Request body too large\n")
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
        if self._body_head is not None and (
            self.body_done or len(self._body_head) > _CLASSIFY_BODY_LIMIT
        ):
            body, self._body_head = bytes(self._body_head), None
            self._admit(body)
        elif self._pending_size > self.pool.config.limits.body_buffer:
            self.front.hold_reading(self)

    def cancel(self) -> None:
        """The web server aborted the request or went away: stop all work for it."""
        if self.phase is not Phase.DONE:
            self.give_up()
            self.status = ABORTED
            self._finish()

    # ------------------------------------------------------------ to and from a child

    def start(self, child: Child) -> None:
        """The dispatcher gives this request a free child."""
        self.child = child
        child.state = ChildState.BUSY
        child.request = self
        self.served_by = child.pid
        if not self.started:
            self.started = time.monotonic()
        connection = child.usable_connection()
        if connection is not None:
            self._attach(connection, reused=True)
        else:
            self._connect_later(child)

    def _connect_later(self, child: Child) -> None:
        self.phase = Phase.CONNECTING
        self.pool.loop.create_task(self._connect(child))

    async def _connect(self, child: Child) -> None:
        connection = await child.connect()
        if self.phase is not Phase.CONNECTING or self.child is not child:
            if connection is not None:  # given up while connecting: the child is free
                self.pool.child_done(child, served=False)
            return
        if connection is None:
            self.on_lost()
        else:
            self._attach(connection, reused=False)

    def _attach(self, connection: ChildConnection, reused: bool) -> None:
        self.connection = connection
        self.phase = Phase.RUNNING
        self._reused = reused
        connection.handler = self
        connection.hold(self.front.write_paused)
        data = b"".join(self._pending)
        connection.write(data)
        self._pending.clear()
        self._pending_size = 0
        self._sent, self._sent_size = None, 0
        if not self.response_started:
            self._sent = []
            self._keep_sent(data)
        self.front.release_reading(self)

    def _keep_sent(self, data: bytes) -> None:
        if self._sent is not None:
            self._sent.append(data)
            self._sent_size += len(data)
            if self._sent_size > self.pool.config.limits.body_buffer:
                self._sent = None

    def on_output(
        self, records: bytes, starts: list[int], has_output: bool, end: EndRequest | None
    ) -> None:
        if has_output and not self.response_started:
            self.response_started = True
            self._sent = None
            self.status = response_status(stdout_content(records, starts, _HEAD_LIMIT))
        if self.request_id != CHILD_REQUEST_ID:
            records = retag(records, starts, self.request_id)
        self.front.write(records)
        self.bytes_out += len(records)
        if end is not None:
            if self.connection is not None:
                self.connection.hold(False)  # the answer is complete: free for the next one
            child = self.child
            self._finish()
            if child is not None:
                self.pool.child_done(child, served=True)

    def on_lost(self) -> None:
        """The child's connection ended (or could not be made) before END_REQUEST."""
        if self.phase is Phase.DONE:
            return
        child = self.child
        if self.phase is Phase.RUNNING:
            sent, self._sent = self._sent, None
            if sent is not None:
                self._resend(sent)
            resendable = sent is not None
        else:  # never attached: the whole request is still pending
            resendable = not self.response_started
        if (
            resendable
            and self._reused
            and not self._replayed
            and child is not None
            and child.state is ChildState.BUSY  # still ours: replay on the same child
        ):
            self._replayed = True
            self._connect_later(child)
            return
        if resendable and not self._retried and self._repeatable():
            self._retried = True
            log.info("request_retried", uri=self.uri, pid=child.pid if child else 0)
            self.child = None
            if child is not None:
                child.request = None
                self.pool.recover(child)
            self.pool.dispatcher.released(self)
            self.phase = Phase.QUEUED
            self.pool.dispatcher.submit(self, first=True)
            return
        if self.response_started:
            self.front.abort("child connection lost mid-response")
            self.status = 502
            self._finish()
        else:
            self.respond(502, b"The FastCGI child failed before answering\n")
        if child is not None:
            self.pool.recover(child)

    def _resend(self, sent: list[bytes]) -> None:
        self._pending[:0] = sent
        self._pending_size += sum(map(len, sent))
        self.connection = None

    def _repeatable(self) -> bool:
        return self.params.get(b"REQUEST_METHOD", b"GET") in _REPEATABLE

    def timed_out(self) -> None:
        """Past timeouts.request (the pool checks a few times a second): 504 at once, and
        the child is cancelled."""
        if self.phase is Phase.DONE:
            return
        seconds = self.timeout
        child = self.child
        log.warning("request_timeout", uri=self.uri, pid=child.pid if child else 0, seconds=seconds)
        self.pool.timed_out += 1
        self.give_up()
        if self.response_started:
            self.front.abort("request timeout in the middle of the response")
            self.status = 504
            self._finish()
        else:
            self.respond(504, f"The request took longer than {seconds:g} s\n".encode())

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
        headers: tuple[tuple[str, str], ...] = (),
        content_type: str = "text/plain; charset=utf-8",
    ) -> None:
        """Answer from the pool itself and end the request."""
        if self.phase is Phase.DONE:
            return
        data = encode_response(self.request_id, status, body, headers, content_type)
        self.front.write(data)
        self.status, self.bytes_out = status, len(data)
        self._finish()

    def give_up(self) -> None:
        """Withdraw the request from the queue or from its child, which must then recover."""
        if self.phase is Phase.QUEUED:
            self.pool.dispatcher.withdraw(self)
        elif self.phase in (Phase.CONNECTING, Phase.RUNNING) and self.child is not None:
            child, self.child = self.child, None
            child.request = None
            if self.connection is not None:
                self.connection.handler = None
                self.connection = None
            if self.phase is Phase.RUNNING:
                self.pool.recover(child)
            self.phase = Phase.QUEUED  # so a connect in progress sees the change

    def _finish(self) -> None:
        was_done = self.phase is Phase.DONE
        self.phase = Phase.DONE
        self.connection = None
        self._pending.clear()
        self._sent = None
        if self.child is not None and self.child.request is self:
            self.child.request = None
        self.front.request_finished(self)
        if not was_done:
            self.pool.request_done(self)
