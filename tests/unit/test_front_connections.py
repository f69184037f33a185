"""The web server's side: ABORT_REQUEST at every stage, kept connections and request ids,
malformed input, limits, answers the pool gives itself (default configuration unless a
test is about a setting)."""

from __future__ import annotations

from fakes import Hang

from fcgipool import protocol
from fcgipool.child import State
from fcgipool.client import cgi_params
from fcgipool.config import Config
from fcgipool.protocol import RecordType, encode_begin_request, encode_params, encode_record

DEFAULTS = Config()


def begin_post(web, request_id: int, uri: str, length: int) -> None:
    """BEGIN_REQUEST and PARAMS of a POST whose body has not come yet."""
    params = cgi_params(uri, "POST", b"x" * length)
    web.send(encode_begin_request(request_id, keep_conn=True) + encode_params(request_id, params))


# ---------------------------------------------------------------- FCGI_ABORT_REQUEST


def test_abort_before_a_child_ends_the_request_once_and_frees_its_id(harness):
    """A POST whose body is still arriving (classified from its body, so it waits in
    RECEIVING): ABORT gets one END_REQUEST, and the same id serves the next request on the
    same kept connection."""
    h = harness()
    web = h.connect()
    begin_post(web, 1, "/upload", 100)
    web.send(encode_record(RecordType.STDIN, 1, b"x" * 10))
    h.settle()
    web.abort(1)
    h.settle()
    aborted = web.responses[1]
    assert aborted.ends == 1 and aborted.stdout == b""
    assert all(not p.served for p in h.programs()), "no child saw it"
    again = web.request("/again", request_id=1)
    h.until(lambda: again.end is not None)
    assert again.status == 200 and not web.closed
    assert h.pool.accounting.requests[(499, "default")] == 1


def test_abort_while_queued_withdraws_the_request(harness):
    h = harness()
    web = h.connect()
    for request_id in (1, 2):
        web.request("/?sleep=1000", request_id=request_id)
    waiting = web.request("/waiting", request_id=3)
    h.until(lambda: h.pool.dispatcher.waiting == 1)
    web.abort(3)
    h.settle()
    assert waiting.ends == 1 and h.pool.dispatcher.waiting == 0
    again = web.request("/?sleep=0", request_id=3)
    h.settle()
    assert h.pool.dispatcher.waiting == 1 and again.end is None, "queued again, same id"


def test_abort_while_a_child_runs_cancels_the_child(harness):
    h = harness()
    web = h.connect()
    running = web.request("/?sleep=3")
    (program,) = h.busy()
    web.abort(1)
    h.settle()
    assert running.ends == 1
    assert program.child.state is State.RECOVERING, "ABORT sent, connection closed, probe"
    assert b"\x01\x02\x00\x01" in program.received, "the child got FCGI_ABORT_REQUEST"
    again = web.request("/again", request_id=1)
    h.until(lambda: again.end is not None)
    assert again.status == 200
    h.until(lambda: program.child.state is State.IDLE, what="the child recovered")
    assert running.ends == 1


def test_abort_after_the_answer_gets_no_second_end_request(harness):
    h = harness()
    web = h.connect()
    answered = web.request("/done")
    h.until(lambda: answered.end is not None)
    web.abort(1)
    h.settle()
    assert answered.ends == 1 and not web.closed
    again = web.request("/again", request_id=1)
    h.until(lambda: again.end is not None)
    assert again.status == 200 and again.ends == 1


def test_a_request_answered_before_its_body_ended_frees_its_id_at_once(harness):
    """413 on the declared length: the rest of the body is dropped; the id is free."""
    h = harness()
    web = h.connect()
    begin_post(web, 1, "/big", DEFAULTS.limits.max_body_size + 1)
    h.settle()
    refused = web.responses.get(1)
    assert refused is not None and refused.status == 413 and refused.ends == 1
    web.send(encode_record(RecordType.STDIN, 1, b"x" * 1000) + encode_record(RecordType.STDIN, 1))
    again = web.request("/again", request_id=1)
    h.until(lambda: again.end is not None)
    assert again.status == 200 and not web.closed


def test_a_connection_without_keep_conn_closes_once_the_refused_body_has_arrived(harness):
    h = harness()
    web = h.connect()
    params = cgi_params("/big", "POST", b"x" * (DEFAULTS.limits.max_body_size + 1))
    web.send(encode_begin_request(1, keep_conn=False) + encode_params(1, params))
    h.settle()
    assert web.responses[1].status == 413
    assert not web.closed, "the web server is still sending the body"
    web.send(encode_record(RecordType.STDIN, 1, b"rest") + encode_record(RecordType.STDIN, 1))
    h.settle()
    assert web.closed


def test_the_web_server_going_away_cancels_the_child(harness):
    h = harness()
    web = h.connect()
    web.request("/?hang")
    (program,) = h.busy()
    web.close()
    h.settle()
    assert program.child.state is State.RECOVERING
    assert h.pool.accounting.requests[(499, "default")] == 1


# ---------------------------------------------------------------- input and limits


def test_a_malformed_record_closes_that_connection_only(harness):
    h = harness()
    bad, good = h.connect(), h.connect()
    bad.send(b"\x02" + b"\x00" * 15)  # FastCGI version 2
    h.settle()
    assert bad.closed and not good.closed
    response = good.request("/ok")
    h.until(lambda: response.end is not None)
    assert response.status == 200


def test_connections_over_max_connections_are_refused(harness):
    h = harness({"limits": {"max_connections": 2}})
    first, second, third = h.connect(), h.connect(), h.connect()
    h.settle()
    assert not first.closed and not second.closed and third.closed


def test_a_request_stalled_mid_params_is_closed_after_read_timeout(harness):
    h = harness()
    web = h.connect()
    web.send(encode_begin_request(1, keep_conn=True))
    h.run(DEFAULTS.limits.read_timeout - 1)
    assert not web.closed
    h.until(lambda: web.closed, within=2.5)


def test_an_idle_kept_connection_is_not_a_stall(harness):
    h = harness()
    web = h.connect()
    response = web.request("/x")
    h.until(lambda: response.end is not None)
    h.run(DEFAULTS.limits.read_timeout * 3)
    assert not web.closed


def test_get_values_and_unknown_role_are_answered_by_the_pool(harness):
    h = harness()
    web = h.connect()
    names = protocol.encode_pairs([(b"FCGI_MPXS_CONNS", b""), (b"FCGI_MAX_CONNS", b"")])
    web.send(encode_record(RecordType.GET_VALUES, 0, names))
    web.send(encode_begin_request(5, role=protocol.Role.AUTHORIZER, keep_conn=True))
    h.settle()
    assert web.responses[5].end.protocol_status == protocol.ProtocolStatus.UNKNOWN_ROLE
    again = web.request("/x", request_id=5)
    h.until(lambda: again.end is not None)
    assert again.status == 200


def test_a_body_over_max_body_size_while_running_cuts_the_request(harness):
    h = harness({"limits": {"max_body_size": 100_000}})
    web = h.connect()
    params = cgi_params("/upload", "POST", b"")
    params[b"CONTENT_LENGTH"] = b"1000"  # it lies
    web.send(encode_begin_request(1, keep_conn=True) + encode_params(1, params))
    web.send(encode_record(RecordType.STDIN, 1, b"x" * 1000))
    h.settle()
    web.send(protocol.encode_stream(RecordType.STDIN, 1, b"y" * 120_000))
    h.until(lambda: 1 in web.responses and web.responses[1].end is not None)
    assert web.responses[1].status == 413


def test_ping_and_status_paths_are_answered_even_when_every_child_is_busy(harness):
    h = harness({"admin": {"ping_path": "/ping", "status_path": "/status"}})
    for program in h.programs():
        program.script = [Hang()]
    web = h.connect()
    for request_id in (1, 2):
        web.request("/x", request_id=request_id)
    h.until(lambda: all(p.busy for p in h.programs()))
    pong = h.get("/ping")
    assert pong.status == 200 and pong.body == b"pong\n"
    status = h.get("/status")
    assert status.headers["Content-Type"] == "application/json"
    assert b'"busy": 2' in status.body


def test_a_slow_web_server_holds_the_child_back(harness):
    """Flow control: while the front connection's buffer is full, the child is not read."""
    h = harness()
    web = h.connect()
    response = web.request("/?sleep=1")
    h.busy()
    (connection,) = h.pool.frontend.connections
    connection.pause_writing()
    (request,) = connection.requests.values()
    child_connection = request.connection
    assert child_connection.paused and not child_connection.transport.reading
    connection.resume_writing()
    assert not child_connection.paused
    h.until(lambda: response.end is not None)
    assert response.status == 200
