"""Drain on TERM, fast stop, reload batches, scaling (the default configuration unless a
test is about a setting)."""

from __future__ import annotations

import signal

from fcgipool.child import State
from fcgipool.config import Config
from fcgipool.supervisor import Lifecycle

DEFAULTS = Config()
GRACE = DEFAULTS.timeouts.shutdown_grace_period


# ---------------------------------------------------------------- stopping


def test_term_lets_requests_in_flight_finish_then_stops_the_children(harness):
    h = harness()
    idle = h.connect()
    served = idle.request("/first")
    h.until(lambda: served.end is not None)
    busy = h.connect()
    running = busy.request("/?sleep=5")
    fresh = h.connect()  # connected, its first request on its way
    h.busy()
    h.pool.handle_term()
    assert h.pool.lifecycle is Lifecycle.DRAINING and "STOPPING=1" in h.notes
    h.settle()
    assert idle.closed, "an idle kept connection is closed at once"
    assert not fresh.closed, "a connection made a moment ago gets its first request served"
    late = fresh.request("/late")
    h.until(lambda: late.end is not None)
    assert late.status == 200 and fresh.closed
    assert h.wait_stopped(within=6) == 0
    assert running.status == 200
    assert h.pool.lifecycle is Lifecycle.STOPPED
    assert h.processes.alive() == []
    assert all(p.signals == [signal.SIGTERM] for p in h.processes.started)


def test_term_answers_requests_still_running_after_the_grace_period(harness):
    h = harness()
    web = h.connect()
    running = web.request("/?sleep=1000", request_id=1)
    h.busy()
    waiting = []
    web2 = h.connect()
    web3 = h.connect()
    waiting = [web2.request("/?sleep=1000", request_id=1), web3.request("/w", request_id=1)]
    h.settle()
    started = h.now()
    h.pool.handle_term()
    assert h.wait_stopped(within=GRACE + 5) == 0
    assert GRACE <= h.now() - started < GRACE + 5
    assert running.end is None and web.closed, "cut: the connection closes"
    assert waiting[1].status == 503 and b"shutting down" in waiting[1].body


def test_a_request_arriving_on_a_kept_connection_while_draining_is_served(harness):
    h = harness()
    web = h.connect()
    first = web.request("/?sleep=2", request_id=1)
    h.busy()
    h.pool.handle_term()
    second = web.request("/second", request_id=2)
    h.until(lambda: second.end is not None)
    assert second.status == 200
    assert h.wait_stopped() == 0 and first.status == 200


def test_quit_stops_at_once(harness):
    h = harness()
    web = h.connect()
    running = web.request("/?sleep=1000")
    h.busy()
    started = h.now()
    h.pool.handle_quit()
    assert h.wait_stopped() == 0
    assert h.now() - started < DEFAULTS.timeouts.kill_grace + 1
    assert running.end is None and web.closed


def test_a_stopping_pool_refuses_reload_and_scale(harness):
    h = harness()
    h.pool.handle_term()
    assert h.pool.reload() == "the pool is stopping"
    assert h.pool.scale(4) == "the pool is stopping"


# ---------------------------------------------------------------- reload


def test_reload_replaces_every_child_a_batch_at_a_time_without_a_failed_request(harness):
    h = harness({"pool": {"workers": 4}})
    old = {p.pid for p in h.programs()}
    web = h.connect()
    answers = []
    most_starting = 0

    def watch() -> bool:
        nonlocal most_starting
        starting = sum(c.state is State.STARTING for c in h.pool.children.all)
        most_starting = max(most_starting, starting)
        return h.pool.lifecycle is Lifecycle.RUNNING and not h.pool.children.replacing

    for program in h.programs():  # replacements take 0.5 s to answer their probe
        program.probe.after = 0.5
    h.processes.on_spawn = lambda program: setattr(program.probe, "after", 0.5)
    assert h.pool.reload() == ""
    assert h.pool.lifecycle is Lifecycle.RELOADING and h.notes[-1] == "RELOADING=1"
    assert h.pool.status()["pool"]["state"] == "reloading"
    request_id = 0
    while not watch():
        request_id += 1
        answers.append(web.request(f"/?n={request_id}&sleep=0.05", request_id=request_id))
        h.loop.run_until_true(watch, 0.1)
    h.until(lambda: all(response.end for response in answers))
    assert {response.status for response in answers} == {200} and len(answers) > 10
    assert not old & {p.pid for p in h.programs()} and len(h.programs()) == 4
    assert most_starting == DEFAULTS.pool.max_recycling
    assert h.notes[-1].startswith("READY=1") and h.pool.reloads == 1
    assert h.pool.accounting.restarts["reload"] == 4


def test_reload_applies_the_new_file_and_a_bad_file_changes_nothing(harness, tmp_path):
    path = tmp_path / "pool.toml"
    path.write_text("[limits]\nmax_waiting = 7\n")
    h = harness(config_path=str(path))
    assert h.pool.config.limits.max_waiting == 7
    path.write_text("[limits]\nmax_waiting = 9\n")
    assert h.pool.reload() == ""
    assert h.pool.dispatcher.classes["default"].max_waiting == 9
    h.until(lambda: h.pool.lifecycle is Lifecycle.RUNNING)
    pids = {p.pid for p in h.programs()}
    path.write_text("[limits]\nmax_waiting = -1\n")
    problem = h.pool.reload()
    assert problem.startswith("limits.max_waiting:")
    assert h.pool.config.limits.max_waiting == 9 and h.pool.lifecycle is Lifecycle.RUNNING
    path.write_text('[child]\nuser = "no-such-user-here"\n')
    problem = h.pool.reload()
    assert "child.user: no such user or group 'no-such-user-here'" in problem
    assert "child.user: switching user needs the pool to start as root" in problem
    h.run(5)
    assert {p.pid for p in h.programs()} == pids and h.pool.lifecycle is Lifecycle.RUNNING
    assert h.notes.count("RELOADING=1") == 1


# ---------------------------------------------------------------- scaling


def test_scale_up_and_down_and_the_count_survives_a_reload(harness):
    h = harness()
    h.pool.handle_ttin()
    h.until(lambda: h.pool.children.ready() == 3)
    assert h.pool.scale(1) == ""
    h.until(lambda: len(h.programs()) == 1, what="two retired")
    assert h.pool.scale(0).startswith("0 children")
    h.pool.reload()
    h.until(lambda: h.pool.lifecycle is Lifecycle.RUNNING)
    assert h.pool.children.workers == 1 and len(h.programs()) == 1


def test_scale_down_retires_idle_children_first(harness):
    h = harness({"pool": {"workers": 3}})
    web = h.connect()
    running = web.request("/?sleep=10")
    (busy,) = h.busy()
    h.pool.scale(1)
    h.until(lambda: len(h.programs()) == 1)
    assert h.programs() == [busy]
    h.until(lambda: running.end is not None)
    assert running.status == 200
