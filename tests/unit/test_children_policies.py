"""The children's life: failure pressure, respawn backoff, recycling, start-up, misbehaviour
(the default configuration unless a test is about a setting)."""

from __future__ import annotations

import itertools
import signal

from fakes import Answer, Drop, Garbage

from fcgipool.child import State
from fcgipool.children import MAX_BACKOFF
from fcgipool.config import Config
from fcgipool.supervisor import EXIT_PRESSURE

DEFAULTS = Config()
WINDOW = DEFAULTS.pool.failure_window
DELAY = DEFAULTS.child.respawn_delay


def crash(h, program):
    program.exit(signal.SIGSEGV)
    h.settle()


# ---------------------------------------------------------------- failure pressure


def test_failures_within_the_window_over_the_limit_stop_the_pool_with_exit_3(harness):
    h = harness()
    workers, limit = DEFAULTS.pool.workers, DEFAULTS.pool.max_failure_pressure
    crashes = int(limit * workers)  # at the limit: not above it
    for _ in range(crashes):
        h.until(lambda: h.programs(), what="a child")
        crash(h, h.programs()[0])
        h.run(DELAY * 2)
    assert h.pool.children.failure_pressure() == limit
    assert not h.pool.stopping
    h.until(lambda: h.programs())
    crash(h, h.programs()[0])
    assert h.pool.stopping
    assert h.wait_stopped() == EXIT_PRESSURE
    assert h.processes.alive() == []


def test_failures_older_than_the_window_do_not_count(harness):
    h = harness()
    for _ in range(4):
        h.until(lambda: h.pool.children.ready() == 2, what="both ready")
        crash(h, h.programs()[0])
        h.run(WINDOW / 4 + 1)  # 4 crashes spread over more than the window
    assert h.pool.children.failure_pressure() <= 1.5
    assert not h.pool.stopping


def test_readyz_fails_while_the_pressure_is_above_the_limit(harness):
    h = harness({"pool": {"max_failure_pressure": 100}})
    for _ in range(3):
        crash(h, h.programs()[0])
        h.until(lambda: h.pool.children.ready() == 2)
    assert h.pool.readiness()[0]
    h.pool.config.pool.max_failure_pressure = 1.0
    assert h.pool.readiness() == (False, "failure pressure above the limit")


# ---------------------------------------------------------------- respawn backoff


def test_respawn_backoff_doubles_on_each_failure_in_a_row_and_resets_on_success(harness):
    h = harness({"pool": {"max_failure_pressure": 1000}})
    h.processes.on_spawn = lambda program: setattr(program, "probe", Drop())  # start fails
    crash(h, h.programs()[0])
    h.run(200)
    spawned = h.processes.spawned_at[2:]
    gaps = [round(b - a, 3) for a, b in itertools.pairwise(spawned)]
    expected = [min(MAX_BACKOFF, DELAY * 2**n) for n in range(1, len(gaps) + 1)]
    assert gaps[:8] == expected[:8], "0.5 s after the crash, then 1, 2, 4 ... up to 30 s"
    assert max(gaps) == MAX_BACKOFF
    h.processes.on_spawn = lambda program: None  # the next start succeeds
    h.until(lambda: h.pool.children.ready() == 2, within=MAX_BACKOFF + 1)
    assert h.pool.children.failures_in_a_row == 0
    crash(h, h.programs()[0])
    before = h.processes.spawned_at[-1]
    h.until(lambda: h.processes.spawned_at[-1] > before)
    assert round(h.processes.spawned_at[-1] - before, 3) == DELAY


def test_a_spawn_that_fails_counts_as_a_failure_and_is_retried_with_backoff(harness):
    h = harness({"pool": {"max_failure_pressure": 1000}})
    h.processes.spawn_error = OSError(2, "No such file or directory")
    crash(h, h.programs()[0])
    h.run(10)
    assert h.pool.children.ready() == 1
    assert h.pool.children.failures_in_a_row >= 3
    h.processes.spawn_error = None
    h.until(lambda: h.pool.children.ready() == 2, within=MAX_BACKOFF + 1)


def test_a_child_that_never_answers_its_probe_is_a_failed_start(harness):
    h = harness({"pool": {"max_failure_pressure": 1000}}, start=False)
    h.processes.on_spawn = lambda program: setattr(program, "probe", Drop())
    h.pool.start()
    h.run(1)
    assert h.pool.children.ready() == 0
    assert all(program.signals == [signal.SIGTERM] for program in h.processes.started[:2])
    assert h.notes == [], "no READY=1 before the children are ready"


# ---------------------------------------------------------------- warm-up


def test_warmup_requests_run_before_a_child_takes_traffic(harness):
    h = harness({"child": {"warmup": ["/?w=1", "/?w=2"]},
              "projects": {"pinned": ["/srv/a.qgs"]}})  # fmt: skip
    for program in h.programs():
        uris = [params[b"REQUEST_URI"] for params in program.requests]
        assert uris == [b"/", b"/?w=1", b"/?w=2",
                        b"/?MAP=/srv/a.qgs&SERVICE=WMS&REQUEST=GetCapabilities"]  # fmt: skip
        assert list(program.child.projects) == ["/srv/a.qgs"]
    assert h.notes[0].startswith("READY=1")


def test_a_warmup_answer_of_500_is_a_failed_start(harness):
    h = harness({"child": {"warmup": ["/?status=500"]}, "pool": {"max_failure_pressure": 1000}},
             start=False)  # fmt: skip
    h.pool.start()
    h.run(0.5)
    assert h.pool.children.ready() == 0
    assert h.pool.children.failures_in_a_row == 2


# ---------------------------------------------------------------- recycling


def serving(h) -> int:
    """Children that can take a request now, those being replaced included."""
    return sum(child.state in (State.IDLE, State.BUSY) for child in h.pool.children.all)


def ready_never_below(h, minimum: int):
    """Check at every idle turn of the loop that ``minimum`` children can serve."""
    low = []

    def check() -> bool:
        if serving(h) < minimum:
            low.append(h.now())
        return False

    return check, low


def test_recycling_after_max_requests_keeps_every_worker_ready(harness):
    h = harness({"child": {"max_requests": 3}})
    first = {program.pid for program in h.programs()}
    check, low = ready_never_below(h, 2)
    web = h.connect()
    for n in range(8):  # two at a time, so that both children serve
        pair = [web.request(f"/?n={n}&sleep=0.1", request_id=k) for k in (1, 2)]
        h.until(lambda pair=pair: [check(), all(response.end for response in pair)][1])
        assert [response.status for response in pair] == [200, 200]
        h.loop.run_until_true(check, 0.2)
    assert low == []
    assert not first & {program.pid for program in h.programs()}, "every child replaced"
    assert h.pool.accounting.restarts["max_requests"] >= 4


def test_recycling_by_memory_replaces_a_child_past_max_rss(harness):
    h = harness({"child": {"max_rss": "200MiB"}})
    big = h.programs()[0]
    big.rss = 300 * 2**20
    h.run(DEFAULTS.child.rss_interval + 0.5)
    h.until(lambda: not big.alive, what="the big child gone")
    assert h.pool.children.ready() == 2 and h.pool.accounting.restarts["max_rss"] == 1
    assert big.signals == [signal.SIGTERM], "stopped as a normal retirement"
    assert h.pool.children.failure_pressure() == 0


def test_recycling_by_lifetime(harness):
    h = harness({"child": {"max_lifetime": 100}})
    first = h.programs()
    h.run(100 + DEFAULTS.child.rss_interval + 1)
    h.until(lambda: not any(p.alive for p in first), what="both replaced")
    assert h.pool.children.ready() == 2
    assert h.pool.accounting.restarts["max_lifetime"] == 2


def test_a_busy_child_is_recycled_only_after_its_request(harness):
    h = harness({"child": {"max_rss": "200MiB"}})
    web = h.connect()
    response = web.request("/?sleep=20")
    (busy,) = h.busy()
    busy.rss = 300 * 2**20
    h.run(DEFAULTS.child.rss_interval + 1)
    assert busy.alive and busy.child.retiring == "max_rss"
    h.until(lambda: response.end is not None)
    assert response.status == 200
    h.until(lambda: not busy.alive)


# ---------------------------------------------------------------- misbehaviour


def test_a_child_that_writes_garbage_is_killed_and_its_get_retried(harness):
    h = harness()
    garbage = [Garbage()]
    h.processes.behaviour = lambda params: garbage.pop() if garbage else Answer()
    response = h.get("/x")
    assert response.status == 200
    (bad,) = [p for p in h.processes.started if not p.alive]
    assert bad.signals == [signal.SIGKILL]
    assert h.pool.accounting.restarts["killed"] == 1


def test_a_dead_child_is_replaced(harness):
    h = harness()
    program = h.programs()[0]
    crash(h, program)
    assert program.child.state is State.DEAD
    h.until(lambda: h.pool.children.ready() == 2, within=DELAY + 0.1)
    assert h.pool.accounting.restarts["crash"] == 1
