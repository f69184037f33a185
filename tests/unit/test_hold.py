"""Holding a request for the busy child that holds its project (dispatch.py,
``tuning.hold_for_holder``): instead of loading a slow project on an idle child that does
not hold it, wait for a holder that will be free sooner than half a load; past half a load,
any child. Fake children that cache projects as QGIS does (FakeProcesses.project_loads)."""

from __future__ import annotations

from test_projects import LOAD, holders, projects, query, visitor_loads


def one_holder(h, tmp_path) -> tuple[str, object]:
    """The slow project loaded on one of the two children (out of rotation), and that
    child's program."""
    (slow,) = projects(tmp_path, "slow")
    h.processes.project_loads = {slow: LOAD}
    assert h.pool.project_command("warm", slow, 1) == ("", 1)
    h.until(lambda: len(holders(h, slow)) == 1, 10, "one child loaded it")
    (pid,) = holders(h, slow)
    (program,) = [p for p in h.processes.started if p.pid == pid]
    program.requests.clear()  # its warm-up
    return slow, program


def held_behind(h, tmp_path, sleep: float):
    """One child holds the slow project and is busy for ``sleep`` s on it; a second request
    for it arrives at once. (slow, the holder's program, the web server, the second)."""
    slow, holder = one_holder(h, tmp_path)
    web = h.connect()
    web.request(query(slow) + f"&sleep={sleep}", request_id=1)
    h.settle()
    second = web.request(query(slow) + "&tile=2", request_id=2)
    h.settle()
    return slow, holder, web, second


def test_a_request_waits_for_the_busy_holder_instead_of_loading_on_an_idle_child(
    harness, tmp_path
):
    h = harness()
    slow, holder, _, second = held_behind(h, tmp_path, 0.2)
    assert holder.busy, "the holder took the first"
    assert h.pool.dispatcher.held_count == 1 and len(h.pool.dispatcher.idle) == 1
    pool = h.pool.status()["pool"]
    assert pool["queue_length"] == 1 and pool["held"] == {"now": 1, "since_start": 1}
    assert b"fcgipool_requests_held 1.0" in h.pool.metrics()
    started = h.now()
    h.until(lambda: second.end is not None, within=1.0, what="the second answered")
    assert second.status == 200
    assert h.now() - started < LOAD / 2, "it waited for the holder, not for a load"
    assert visitor_loads(h, slow) == 0, "no visitor paid a load"
    assert len(holder.served) == 2
    assert h.pool.dispatcher.held_count == 0 and h.pool.dispatcher.holds == 1


def test_a_holder_that_will_be_busy_longer_than_half_a_load_is_not_waited_for(
    harness, tmp_path
):
    h = harness()
    slow, _ = one_holder(h, tmp_path)
    web = h.connect()
    web.request(query(slow) + "&sleep=10", request_id=1)
    h.run(LOAD)  # running for longer than half a load: it may run as long again
    second = web.request(query(slow) + "&tile=2", request_id=2)
    h.settle()
    assert h.pool.dispatcher.held_count == 0
    h.until(lambda: second.end is not None, within=LOAD + 1, what="the second answered")
    assert visitor_loads(h, slow) == 1, "the idle child loaded it"


def test_a_held_request_goes_to_any_child_after_half_a_load(harness, tmp_path):
    h = harness()
    slow, holder, _, second = held_behind(h, tmp_path, 10)
    assert h.pool.dispatcher.held_count == 1, "the holder has just started: worth a wait"
    held_at = h.now()
    h.until(lambda: second.end is not None, within=LOAD * 2, what="the second answered")
    assert second.status == 200
    assert h.now() - held_at < LOAD / 2 + LOAD + 0.5, "half a load held, then a load"
    assert holder.busy, "not by the holder, still on the first"
    assert visitor_loads(h, slow) == 1


def test_a_held_request_whose_client_goes_is_forgotten(harness, tmp_path):
    h = harness()
    _, holder, web, _ = held_behind(h, tmp_path, 0.5)
    assert h.pool.dispatcher.held_count == 1
    web.abort(2)
    h.settle()
    assert h.pool.dispatcher.held_count == 0 and not h.pool.dispatcher.held
    h.run(1.0)
    assert len(holder.served) == 1, "the holder never got the abandoned request"


def test_with_hold_for_holder_off_the_idle_child_loads_the_project(harness, tmp_path):
    h = harness({"tuning": {"hold_for_holder": False}})
    slow, _, _, second = held_behind(h, tmp_path, 0.2)
    assert h.pool.dispatcher.held_count == 0
    h.until(lambda: second.end is not None, within=LOAD + 1, what="the second answered")
    assert visitor_loads(h, slow) == 1
