"""Request timeout, queue timeout and overflow, retry and replay: on the real pool with fake
children and a clock the test moves (the default configuration unless a test is about a
setting)."""

from __future__ import annotations

import signal

from fakes import Answer, Crash, Drop, Hang

from fcgipool.child import State
from fcgipool.config import Config

DEFAULTS = Config()
TIMEOUT = DEFAULTS.timeouts.request
CANCEL = DEFAULTS.timeouts.cancel
GRACE = DEFAULTS.timeouts.kill_grace


def program_of(h, response_pid: int):
    return h.processes.programs[response_pid]


# ---------------------------------------------------------------- request timeout


def test_request_timeout_answers_504_at_once_then_the_child_is_cancelled(harness):
    h = harness()
    web = h.connect()
    started = h.now()
    response = web.request("/?hang")
    h.until(lambda: response.end is not None, within=TIMEOUT + 1)
    assert TIMEOUT < h.now() - started <= TIMEOUT + 0.2, "504 within a tick of the timeout"
    assert response.status == 504 and response.ends == 1
    (program,) = [p for p in h.programs() if p.served]
    assert all(row["request"] is None for row in h.pool.status()["children"])
    # The child was told (FCGI_ABORT_REQUEST, connection closed) and probed...
    assert program.child.state is State.RECOVERING
    h.run(CANCEL - 0.2)
    assert program.alive, "it has cancel_timeout to answer the probe"
    h.run(0.3)
    # ...it hangs, so: SIGTERM, which ends it.
    assert program.signals == [signal.SIGTERM] and not program.alive
    h.until(lambda: h.pool.children.ready() == 2, what="a replacement")
    assert h.pool.accounting.restarts["cancel_failed"] == 1
    assert h.pool.children.failure_pressure() == 0.5


def test_a_child_that_ignores_sigterm_is_killed_after_kill_grace(harness):
    h = harness()
    for program in h.programs():
        program.ignore_term = True
    response = h.get("/?hang", within=TIMEOUT + 1)
    assert response.status == 504
    (program,) = [p for p in h.programs() if p.served]
    h.run(CANCEL + 0.1)
    assert program.signals == [signal.SIGTERM] and program.alive
    h.run(GRACE)
    assert program.signals == [signal.SIGTERM, signal.SIGKILL] and not program.alive


def test_a_child_that_finishes_within_the_cancel_timeout_serves_again(harness):
    h = harness()
    response = h.get(f"/?sleep={TIMEOUT + CANCEL / 2}", within=TIMEOUT + 1)
    assert response.status == 504
    (program,) = [p for p in h.programs() if p.served]
    h.until(lambda: program.child.state is State.IDLE, within=CANCEL, what="recovered")
    assert program.alive and program.signals == []
    assert h.pool.children.failure_pressure() == 0


def test_a_class_request_timeout_overrides_the_default(harness):
    h = harness({"classes": [{"name": "quick", "match": {"REQUEST": "GetLegendGraphic"},
                           "request_timeout": 2.0}]})  # fmt: skip
    started = h.now()
    response = h.get("/?REQUEST=GetLegendGraphic&hang", within=5)
    assert response.status == 504 and 2 < h.now() - started <= 2.2


# ---------------------------------------------------------------- queue


def occupy_all(h):
    """Both children busy for a long time."""
    web = h.connect()
    for request_id in (1, 2):
        web.request("/?sleep=1000", request_id=request_id)
    h.until(lambda: h.pool.children.ready() == 2
            and all(p.busy for p in h.programs()), what="both busy")  # fmt: skip
    rows = h.pool.status()["children"]
    assert [row["request"]["state"] for row in rows] == ["running", "running"]
    return web


def test_queue_timeout_gets_503_with_retry_after(harness):
    h = harness()
    occupy_all(h)
    started = h.now()
    response = h.get("/waits", within=DEFAULTS.limits.queue_timeout + 1)
    assert response.status == 503
    assert response.headers["Retry-After"] == str(DEFAULTS.limits.retry_after)
    waited = h.now() - started
    assert DEFAULTS.limits.queue_timeout < waited <= DEFAULTS.limits.queue_timeout + 0.2


def test_a_full_queue_refuses_at_once_and_loses_no_admitted_request(harness):
    h = harness({"limits": {"max_waiting": 3}})
    occupy_all(h)
    web = h.connect()
    waiting = [web.request("/w", request_id=10 + n) for n in range(3)]
    refused = web.request("/over", request_id=20)
    h.settle()
    assert refused.end is not None and refused.status == 503
    assert b"queue is full" in refused.body
    assert all(response.end is None for response in waiting)
    assert h.pool.dispatcher.waiting == 3


def test_a_waiting_request_takes_the_first_child_that_frees_up(harness):
    h = harness()
    web = h.connect()
    first = web.request("/?sleep=5", request_id=1)
    web.request("/?sleep=1000", request_id=2)
    third = web.request("/third", request_id=3)
    h.until(lambda: third.end is not None, within=6)
    assert first.status == 200 and third.status == 200
    assert h.pool.dispatcher.waiting == 0


# ---------------------------------------------------------------- retry and replay


def crash_once(h):
    crashes = [Crash()]
    h.processes.behaviour = lambda params: crashes.pop() if crashes else Answer()


def test_a_get_whose_child_dies_before_answering_is_retried_once_elsewhere(harness):
    h = harness()
    crash_once(h)
    response = h.get("/x")
    assert response.status == 200, "the second child answered"
    served = [p for p in h.processes.started if p.served]
    assert len(served) == 2 and sorted(p.alive for p in served) == [False, True]


def test_a_post_whose_child_dies_is_not_retried(harness):
    h = harness()
    crash_once(h)
    response = h.get("/x", method="POST", body=b"x=1")
    assert response.status == 502
    assert sum(len(p.served) for p in h.processes.started) == 1


def test_a_get_is_retried_only_once(harness):
    h = harness()
    h.processes.behaviour = lambda params: Crash()
    response = h.get("/x")
    assert response.status == 502
    assert sum(len(p.served) for p in h.processes.started) == 2


def test_a_child_that_dies_mid_answer_closes_the_connection(harness):
    h = harness()
    web = h.connect()
    response = web.request("/?sleep=1000")
    (program,) = h.busy()
    end = next(iter(program.connections))
    end.transport.write(b"\x01\x06\x00\x01\x00\x10\x00\x00Status: 200\r\n\r\nhal")
    h.settle()
    assert bytes(response.stdout).startswith(b"Status: 200")
    program.exit(signal.SIGSEGV)
    h.until(lambda: web.closed, what="the connection closed")
    assert response.end is None, "no END_REQUEST: the web server sees a cut answer"
    assert h.pool.accounting.requests[(502, "default")] == 1


def test_a_kept_connection_closed_under_a_request_is_replayed_on_the_same_child(harness):
    """libfcgi may drop a kept connection as the next request arrives: the request never
    started, so it is sent again, once, on a new connection to the same child."""
    h = harness()
    web = h.connect()
    first = web.request("/one", request_id=1)
    h.until(lambda: first.end is not None)
    (program,) = [p for p in h.programs() if p.served]
    program.script = [Drop()]
    second = web.request("/two", request_id=2)
    h.until(lambda: second.end is not None)
    assert second.status == 200
    assert [p[b"REQUEST_URI"] for p in program.served] == [b"/one", b"/two", b"/two"]
    assert sum(len(p.served) for p in h.programs()) == 3


def test_a_replay_happens_once_then_the_get_goes_elsewhere(harness):
    h = harness()
    web = h.connect()
    first = web.request("/one", request_id=1)
    h.until(lambda: first.end is not None)
    (program,) = [p for p in h.programs() if p.served]
    program.script = [Drop(), Drop()]
    second = web.request("/two", request_id=2)
    h.until(lambda: second.end is not None)
    assert second.status == 200
    (other,) = [p for p in h.programs() if p is not program]
    assert [p[b"REQUEST_URI"] for p in other.served] == [b"/two"]


def test_a_hanging_child_does_not_hold_the_others(harness):
    h = harness()
    web = h.connect()
    web.request("/?hang", request_id=1)
    h.busy()
    answers = [h.get(f"/n{n}") for n in range(5)]
    assert [response.status for response in answers] == [200] * 5


def test_an_answer_of_the_child_is_relayed_as_it_is(harness):
    h = harness()
    (first, second) = h.programs()
    for program in (first, second):
        program.script = [Answer(418, b"teapot body\n")]
    response = h.get("/tea")
    assert response.status == 418 and response.body == b"teapot body\n"
    assert h.pool.accounting.requests[(418, "default")] == 1
    assert isinstance(first.probe, Answer) and not isinstance(first.probe, Hang)
