"""The adaptive number of children (scaling.py deciding, children.py carrying out): growth
by predicted wait within max_workers, max_starting and max_memory; retirement after
idle_timeout down to min_workers; no request lost; scale, TTIN and reload."""

from __future__ import annotations

import re
import signal

import pytest
from fakes import Answer, Hang

from fcgipool.child import State
from fcgipool.children import START_SECONDS
from fcgipool.config import Config
from fcgipool.scaling import (
    TRIAL_GAIN,
    TRIAL_HOLD,
    TRIAL_QUIET,
    TRIAL_READY,
    TRIAL_SPAN,
    Autoscaler,
)
from fcgipool.supervisor import Lifecycle

START = 1.0  # seconds each fake child takes to answer its readiness probe
MiB = 2**20


def adaptive(harness, start: float = START, config_path: str | None = None, **pool):
    """A pool of fake children that take ``start`` seconds to be ready, min 1 / max 4 /
    idle_timeout 10 s unless ``pool`` says otherwise; started and ready."""
    settings = {"min_workers": 1, "max_workers": 4, "workers": 1, "idle_timeout": 10.0, **pool}
    h = harness(None if config_path else {"pool": settings}, start=False, config_path=config_path)
    h.processes.on_spawn = lambda program: setattr(program, "probe", Answer(200, b"p\n", start))
    h.pool.start()
    h.until(lambda: h.pool.lifecycle is Lifecycle.RUNNING, what="the pool running")
    return h


def living(h) -> list:
    return [child for child in h.pool.children.all if child.state is not State.DEAD]


def burst(h, count: int, uri: str = "/?sleep=1"):
    """``count`` requests at once, each on its own connection."""
    return [h.connect().request(f"{uri}&n={n}") for n in range(count)]


def answered(responses) -> bool:
    return all(response.end is not None for response in responses)


class Watch:
    """Checked at every idle turn of the loop: the most children alive, the most starting
    at once, and any retiring child that had a request."""

    def __init__(self, h) -> None:
        self.h = h
        self.most_alive = self.most_starting = self.most_workers = 0
        self.retired_busy: list[int] = []

    def __call__(self, condition=lambda: False):
        def check() -> bool:
            children = self.h.pool.children
            self.most_alive = max(self.most_alive, len(living(self.h)))
            self.most_starting = max(self.most_starting, children.starting())
            self.most_workers = max(self.most_workers, children.workers)
            for child in children.all:
                if child.retiring == "idle_timeout" and (
                    child.request or child.state is State.BUSY
                ):
                    self.retired_busy.append(child.pid)
            return bool(condition())

        return check


# ---------------------------------------------------------------- growing


def test_a_burst_grows_the_pool_to_max_workers_never_more_than_max_starting_at_once(harness):
    h = adaptive(harness, max_starting=2)
    assert len(living(h)) == 1 and h.pool.children.start_seconds == START
    watch = Watch(h)
    responses = burst(h, 40)
    h.until(watch(lambda: answered(responses)), within=60, what="every answer")
    assert {response.status for response in responses} == {200}
    assert watch.most_alive == 4 and watch.most_workers == 4, "max_workers reached, not passed"
    assert watch.most_starting == 2, "max_starting bounds the children starting at once"
    assert h.pool.children.scaled == {"started": 3, "retired": 0}
    assert sum(len(program.served) for program in h.processes.started) == 40
    last = h.pool.children.last_scaling
    assert last is not None and last["action"] == "started" and last["reason"] == "predicted_wait"
    assert last["predicted_wait"] > last["start_seconds"]
    assert h.pool.children.start_seconds == START, "learned from the children it added"


def relearn(h, start: float) -> None:
    """Replace the one child by one that takes ``start`` seconds: a start after the pool's
    first, so it is learned."""
    h.processes.on_spawn = lambda program: setattr(program, "probe", Answer(200, b"p\n", start))
    (old,) = living(h)
    h.programs()[0].exit(0)
    h.until(lambda: [child.state for child in living(h) if child is not old] == [State.IDLE],
            within=30, what="the replacement ready")  # fmt: skip


def test_no_child_is_added_while_the_predicted_wait_is_below_a_start(harness):
    h = adaptive(harness)
    watch = Watch(h)
    responses = burst(h, 6, "/?sleep=0.1")  # 5 waiting x 0.1 s over 1 child < a 1 s start
    h.until(watch(lambda: answered(responses)), within=60)
    assert {response.status for response in responses} == {200}
    assert watch.most_alive == 1 and h.pool.children.scaled["started"] == 0


def test_the_first_children_teach_the_start_time_only_when_faster_than_assumed(harness):
    """The pool's first children start cold and together (10.5 s for a QGIS child that
    later starts in 2 s): a start time learned from a slow one would hold growth back, but
    one faster than the time assumed is faster still later (the first burst should not wait
    for growth as if a child took START_SECONDS)."""
    h = adaptive(harness, start=10.0)
    assert h.pool.children.start_seconds is None
    assert h.pool.status()["pool"]["scaling"]["start_seconds"] == START_SECONDS
    relearn(h, 0.5)  # its replacement starts as one more child would
    assert h.pool.children.start_seconds == 0.5
    fast = adaptive(harness, start=0.8)
    assert fast.pool.children.start_seconds == 0.8
    assert fast.pool.status()["pool"]["scaling"]["start_seconds"] == 0.8


def test_a_faster_start_learned_lets_a_smaller_backlog_grow_the_pool(harness):
    h = adaptive(harness, start=0.2)  # learned from the first child: below START_SECONDS
    assert round(h.pool.children.start_seconds, 3) == 0.2
    responses = burst(h, 6, "/?sleep=0.1")  # 0.5 s of backlog over 1 child > 0.2 s
    h.until(lambda: answered(responses), within=60)
    assert h.pool.children.scaled["started"] >= 1


def test_the_learned_start_time_is_an_average_of_the_starts(harness):
    h = adaptive(harness)
    relearn(h, 1.0)
    h.processes.on_spawn = lambda program: setattr(program, "probe", Answer(200, b"p\n", 3.0))
    responses = burst(h, 40)
    h.until(lambda: answered(responses), within=120)
    learned = h.pool.children.start_seconds
    assert learned is not None and 1.0 < learned < 3.0


class Views:
    """The dispatcher as the autoscaler sees it, with the numbers a test sets."""

    def __init__(self, backlog: float, demand: float) -> None:
        self.waiting, self.idle = 3, []
        self._backlog, self._demand = backlog, demand

    def kept_free(self) -> int:
        return 0

    def backlog(self) -> float:
        return self._backlog

    def demand(self) -> float:
        return self._demand

    def waited_share(self) -> float:
        return 0.5


class TwoServing:
    """Two children serving, none starting, one second to start one more: what the
    autoscaler reads of children.py, and the starts it asks for."""

    stopping = replacing = False
    minimum, maximum, workers, start_seconds = 1, 4, 2, 1.0
    cpu_ms, run_seconds = 0, 0.0  # nothing served yet: the children's CPU share unknown
    finished = 0

    def __init__(self) -> None:
        self.all: list = []
        self.grown: list[dict] = []

    def starting(self) -> int:
        return 0

    def missing(self) -> int:
        return 0

    def serving(self) -> int:
        return 2

    def grow(self, reason: str, numbers: dict) -> None:
        self.grown.append(numbers)


@pytest.mark.parametrize(
    ("backlog", "demand", "grows"),
    [
        (0.3, 1.8, False),  # 0.1 s forecast left: less than the 2 children do in a tick
        (0.5, 1.8, True),  # 0.3 s left: more
        (2.2, 0.0, True),  # predicted wait 1.1 s > a 1 s start, whatever arrives
    ],
)
def test_a_forecast_of_less_than_a_tick_of_work_left_starts_no_child(backlog, demand, grows):
    """A map viewer's views on 2 children keeping up (1.8 children of work arriving), 0.3 s
    of tiles waiting after a view: 0.1 s is forecast to wait still when one more child would
    be ready, less than the 2 serving do in a tick (LEFT_MARGIN each). Noise; a start is not.
    """
    children = TwoServing()
    scaler = Autoscaler(Config(), children, Views(backlog, demand), lambda: 0.0,
                        lambda waiting: None, cpus=4)  # fmt: skip
    scaler.tick()
    assert bool(children.grown) is grows
    if grows:
        assert children.grown[0]["left_at_ready"] == round(backlog + (demand - 2) * 1.0, 3)


def test_children_held_back_by_a_respawn_backoff_count_as_starting(harness):
    h = adaptive(harness, max_starting=2, max_failure_pressure=1000)
    h.processes.spawn_error = OSError(2, "No such file or directory")
    responses = burst(h, 40, "/?sleep=2")
    h.run(10)
    children = h.pool.children
    assert children.workers <= 1 + 2, "not one more each tick while none can be spawned"
    h.processes.spawn_error = None
    h.until(lambda: answered(responses), within=120)
    assert {response.status for response in responses} == {200}


def test_the_memory_bound_stops_growth(harness):
    h = adaptive(harness, max_memory="350MiB", max_starting=4)
    watch = Watch(h)
    responses = burst(h, 60, "/?sleep=2")
    # 100 MiB a child: 3 sampled + 1 more = 400 MiB > 350 MiB, so the third is the last.
    h.until(watch(lambda: len(h.pool.dispatcher.idle) + h.pool.children.ready() >= 3), 30)
    h.run(3)
    assert watch.most_alive == 3 and len(living(h)) == 3
    assert h.pool.dispatcher.waiting > 0, "work still waits: only the budget holds growth"
    for program in h.programs():
        program.rss = 50 * MiB  # smaller children: sampled at the next rss_interval
    h.until(watch(lambda: len(living(h)) == 4), within=h.pool.config.child.rss_interval + 1)
    h.until(lambda: answered(responses), within=120)
    assert watch.most_alive == 4


def test_busy_cpus_hold_growth_back_and_idle_ones_let_it_go_on(harness):
    """CPU-bound children on busy CPUs: one more would serve no sooner, and its start would
    take CPU from them (pool.max_cpu, 0.9 by default)."""
    h = adaptive(harness, max_starting=4)
    h.processes.host_cpu = 0.95
    watch = Watch(h)
    responses = burst(h, 40, "/?sleep=2")
    h.run(5)
    assert len(living(h)) == 1 and h.pool.children.scaled["started"] == 0
    assert h.pool.dispatcher.waiting > 0, "work waits: only the CPUs hold growth back"
    assert h.pool.status()["pool"]["scaling"]["held_by_cpu"] is True
    h.processes.host_cpu = 0.5  # the work waits on I/O, or the CPUs were freed
    h.until(watch(lambda: len(living(h)) == 4), within=5)
    last = h.pool.children.last_scaling
    assert last is not None and last["cpu_busy"] == 0.5
    assert h.pool.status()["pool"]["scaling"]["held_by_cpu"] is False
    h.until(lambda: answered(responses), within=120)
    assert {response.status for response in responses} == {200}


def test_the_cpu_meter_is_told_at_every_tick_whether_work_waits(harness):
    """hostcpu counts only the moments work waited: a burst's pauses are not free CPU."""
    h = adaptive(harness)
    h.run(1)
    assert h.processes.cpu_asked and not any(h.processes.cpu_asked), "nothing waits"
    h.processes.cpu_asked.clear()
    responses = burst(h, 20, "/?sleep=1")
    h.run(0.5)
    assert h.processes.cpu_asked and all(h.processes.cpu_asked), "the burst waits"
    h.until(lambda: answered(responses), within=60)
    h.processes.cpu_asked.clear()
    h.run(1)
    assert h.processes.cpu_asked and not any(h.processes.cpu_asked)


def test_on_few_cpus_growth_needs_half_a_cpu_free_while_work_waits(harness):
    """0.8 busy is 0.4 CPUs free on 2 CPUs: a QGIS child more would get less than half a
    CPU, and its start would slow the ones serving. On 16 CPUs it is 3.2 free."""
    h = adaptive(harness, max_starting=4)
    h.pool.autoscaler.cpus, h.processes.host_cpu = 2, 0.8  # the pool's CPUs: read at its start
    watch = Watch(h)
    responses = burst(h, 40, "/?sleep=2")
    h.run(5)
    assert len(living(h)) == 1 and h.pool.status()["pool"]["scaling"]["held_by_cpu"] is True
    h.pool.autoscaler.cpus = 16
    h.until(watch(lambda: len(living(h)) == 4), within=5)
    h.until(lambda: answered(responses), within=120)
    assert {response.status for response in responses} == {200}


def test_on_few_cpus_a_child_starting_counts_as_a_cpu_taken(harness):
    """0.3 busy leaves 1.4 of 2 CPUs free: room for one start, not two at once (a QGIS start
    is CPU-bound, and the meter has seen little of one begun a moment ago)."""
    h = adaptive(harness, max_starting=4)
    h.pool.autoscaler.cpus, h.processes.host_cpu = 2, 0.3
    responses = burst(h, 40, "/?sleep=2")
    most_starting = 0
    for _ in range(100):
        h.run(0.1)
        most_starting = max(most_starting, h.pool.children.starting())
    assert most_starting == 1 and len(living(h)) == 4, "one start at a time, up to the most"
    h.until(lambda: answered(responses), within=120)
    assert {response.status for response in responses} == {200}


def teach_cpu_share(h, share: float) -> None:
    """The fake children spend ``share`` of each answer's time on CPU; a request of 2 s
    teaches it (the trickle before a burst)."""
    h.processes.cpu_share = share
    assert h.get("/?sleep=2&n=teach").status == 200
    h.run(0.2)  # a tick or two read the children's totals


def most_alive_within(h, seconds: float) -> int:
    most = 0
    for _ in range(int(seconds * 10)):
        h.run(0.1)
        most = max(most, len(living(h)))
    return most


def test_cpu_bound_children_hold_growth_where_the_host_looks_free(harness):
    """2 children spending 0.9 of their run time on CPU take 1.8 of 2 CPUs: a third would
    find 0.2, however free the host's meter reads between a burst's requests (measured on 2
    cores: 3 QGIS children served a tile burst at p99 560 ms where 2 gave 490)."""
    h = adaptive(harness, max_starting=4)
    h.pool.autoscaler.cpus, h.processes.host_cpu = 2, 0.3
    teach_cpu_share(h, 0.9)
    responses = burst(h, 16, "/?sleep=2")  # 32 s of work, all admitted (2 s learned)
    assert most_alive_within(h, 6) == 2, "the second child had 1.1 CPUs, a third 0.2"
    assert h.pool.dispatcher.waiting > 0, "work waits: only the children's CPU holds growth"
    scaling = h.pool.status()["pool"]["scaling"]
    assert scaling["held_by_cpu"] is True
    assert scaling["cpu_share"] == pytest.approx(0.9, abs=0.01)
    last = h.pool.children.last_scaling
    assert last is not None and last["cpu_share"] == pytest.approx(0.9, abs=0.01)
    h.pool.autoscaler.cpus = 16  # the same children on more CPUs leave room
    h.until(lambda: len(living(h)) == 4, within=5)
    h.until(lambda: answered(responses), within=120)
    assert {response.status for response in responses} == {200}


def test_children_waiting_on_io_grow_past_the_cpus(harness):
    """A tenth of their run time on CPU (a cascaded WMS, a database): 4 children take 0.4
    of 2 CPUs, and each one more serves the waiting work sooner."""
    h = adaptive(harness, max_starting=4)
    h.pool.autoscaler.cpus, h.processes.host_cpu = 2, 0.3
    teach_cpu_share(h, 0.1)
    responses = burst(h, 16, "/?sleep=2")
    h.until(lambda: len(living(h)) == 4, within=10)
    assert h.pool.status()["pool"]["scaling"]["held_by_cpu"] is False
    h.until(lambda: answered(responses), within=120)
    assert {response.status for response in responses} == {200}


def test_max_cpu_1_turns_the_cpu_check_off(harness):
    h = adaptive(harness, max_starting=4, max_cpu=1)
    h.pool.autoscaler.cpus, h.processes.host_cpu = 2, 1.0
    teach_cpu_share(h, 1.0)
    responses = burst(h, 40, "/?sleep=2")
    h.until(lambda: len(living(h)) == 4, within=5)
    h.until(lambda: answered(responses), within=120)


class Flood:
    """Open-loop arrivals: ``per_second`` requests of ``uri`` a second, a tenth of a second
    at a time, while it counts the most children alive."""

    def __init__(self, h, uri: str, per_second: float) -> None:
        self.h, self.uri, self.per_second = h, uri, per_second
        self.responses: list = []
        self.owed = 0.0
        self.most_alive = 0

    def run(self, seconds: float) -> None:
        for _ in range(round(seconds * 10)):
            self.owed += self.per_second / 10
            while self.owed >= 1:
                self.owed -= 1
                n = len(self.responses)
                self.responses.append(self.h.connect().request(f"{self.uri}&n={n}"))
            self.h.run(0.1)
            self.most_alive = max(self.most_alive, len(living(self.h)))


def test_a_child_tried_past_busy_cpus_that_adds_nothing_goes_and_the_next_trial_waits(harness):
    """Both CPU meters say the CPUs are full, but only the requests finished a second tell
    whether a child more wins the children more of them: once the pool's rate is known
    (TRIAL_SPAN of waiting) one is tried, in turns serving and parked; it is retired when
    the rate with it was not TRIAL_GAIN above the rate without. The next trial waits
    TRIAL_HOLD, twice as long after a second failure."""
    h = adaptive(harness, max_starting=4, min_workers=2, workers=2)
    h.processes.host_cpu, h.processes.shared_cpus = 0.95, 2  # 3 children share 2 CPUs ...
    h.processes.switch_cost = 0.1  # ... and lose a tenth to switching between them
    flood = Flood(h, "/?sleep=0.1", 22)  # 2 children finish 20 a second, 3 about 18
    flood.run(TRIAL_SPAN - 1)
    assert len(living(h)) == 2, "no trial before the rate at 2 children is known"
    flood.run(3)
    scaler = h.pool.autoscaler
    assert scaler.trial is not None and len(living(h)) == 3
    parked, served, was_parked = [], 0, False
    for _ in range(400):  # its turns: with the child serving, then parked
        flood.run(0.1)
        if scaler.trial is None:
            break
        child = scaler.trial.child
        if child is not None:
            count = len(h.processes.programs[child.pid].served)
            if scaler.trial.parked and was_parked:  # a whole step parked
                parked.append(count - served)
            served, was_parked = count, scaler.trial.parked
    assert scaler.trials == {"kept": 0, "retired": 1} and len(living(h)) == 2
    assert len(parked) > 60 and sum(parked) == 0, "a parked child takes no request"
    last = h.pool.children.last_scaling
    assert last is not None and last["action"] == "retired" and last["reason"] == "trial_no_gain"
    assert last["rate_without"] == pytest.approx(20, rel=0.05)
    assert last["rate_with"] == pytest.approx(18, rel=0.05) and last["gain"] < TRIAL_GAIN
    scaling = h.pool.status()["pool"]["scaling"]
    assert scaling["trial"] is None and TRIAL_HOLD - 3 < scaling["next_trial_in"] <= TRIAL_HOLD
    flood.most_alive = 0
    flood.run(TRIAL_HOLD - 5)
    assert flood.most_alive == 2, "no trial while the last one's hold lasts"
    flood.run(5 + 4 * TRIAL_SPAN)
    assert scaler.trials == {"kept": 0, "retired": 2}
    assert h.pool.status()["pool"]["scaling"]["next_trial_in"] > TRIAL_HOLD, "doubled"
    h.until(lambda: answered(flood.responses), within=120)
    assert {response.status for response in flood.responses} == {200}, "none lost or refused"
    assert sum(len(program.served) for program in h.processes.started) == len(flood.responses)


def test_a_child_tried_past_busy_cpus_that_serves_more_stays_and_the_next_is_tried(harness):
    """Children waiting on something else than the CPUs the meters read (a cascaded WMS, a
    database on another host): each child tried finishes more, and stays."""
    h = adaptive(harness, max_starting=4, min_workers=2, workers=2)
    h.processes.host_cpu = 0.95
    flood = Flood(h, "/?sleep=0.1", 26)  # 2 children finish 20 a second, 3 finish 30
    scaler = h.pool.autoscaler
    for _ in range(60):
        flood.run(1)
        if scaler.trials["kept"]:
            break
    assert scaler.trials == {"kept": 1, "retired": 0} and len(living(h)) == 3
    last = h.pool.children.last_scaling
    assert last is not None and last["reason"] == "trial" and last["rate_before"] > 0
    flood.per_second = 36  # more than 3 finish: the fourth is tried
    for _ in range(60):
        flood.run(1)
        if scaler.trials["kept"] == 2:
            break
    assert scaler.trials == {"kept": 2, "retired": 0} and len(living(h)) == 4
    assert scaler.trial is None and h.pool.dispatcher.parked is None
    h.until(lambda: answered(flood.responses), within=120)
    assert {response.status for response in flood.responses} == {200}
    assert sum(len(program.served) for program in h.processes.started) == len(flood.responses)


def test_a_trial_that_the_load_leaves_is_undecided_and_its_child_serves(harness):
    """The load went before the child tried could be judged: it serves again (unparked),
    and idle_timeout retires it like any other."""
    h = adaptive(harness, max_starting=4, min_workers=2, workers=2)
    h.processes.host_cpu, h.processes.shared_cpus = 0.95, 2
    flood = Flood(h, "/?sleep=0.1", 22)
    scaler = h.pool.autoscaler
    flood.run(TRIAL_SPAN + 2)
    assert scaler.trial is not None
    for _ in range(100):  # into a turn without it
        flood.run(0.1)
        if scaler.trial.parked:
            break
    assert scaler.trial.parked
    flood.per_second = 0
    h.until(lambda: scaler.trial is None, within=2 * TRIAL_QUIET)
    assert scaler.trials == {"kept": 0, "retired": 0} and h.pool.dispatcher.parked is None
    assert len(h.pool.dispatcher.idle) == 3, "the child tried is idle and serves again"
    h.until(lambda: len(living(h)) == 2, within=30)
    assert h.pool.children.last_scaling["reason"] == "idle_timeout"
    assert {response.status for response in flood.responses} == {200}


def test_a_trial_whose_child_never_gets_ready_ends_and_decisions_go_on(harness):
    """A child tried that fails to start (its probe never answers) must not hold every
    other decision while work waits: the trial ends undecided after TRIAL_READY."""
    h = adaptive(harness, max_starting=4, min_workers=2, workers=2)
    h.processes.host_cpu = 0.95
    h.processes.on_spawn = lambda program: setattr(program, "probe", Hang())
    flood = Flood(h, "/?sleep=0.1", 21)
    scaler = h.pool.autoscaler
    flood.run(TRIAL_SPAN + 2)
    assert scaler.trial is not None and scaler.trial.child is None
    flood.run(TRIAL_READY)
    assert scaler.trials == {"kept": 0, "retired": 0}
    assert scaler.trial is None or scaler.trial.at > 15, "ended, or a new one begun"
    h.until(lambda: answered(flood.responses), within=120)
    assert {response.status for response in flood.responses} == {200}


def test_unknown_cpu_use_does_not_hold_growth_back(harness):
    h = adaptive(harness)
    h.processes.host_cpu = None  # no /proc/stat, or one sample only
    responses = burst(h, 40, "/?sleep=2")
    h.until(lambda: len(living(h)) == 4, within=10)
    h.until(lambda: answered(responses), within=120)


# ---------------------------------------------------------------- retiring


def test_idle_children_are_retired_after_idle_timeout_down_to_min_workers(harness):
    h = adaptive(harness, idle_timeout=10.0)
    watch = Watch(h)
    responses = burst(h, 40)
    h.until(watch(lambda: answered(responses)), within=60)
    assert len(living(h)) == 4
    warm = h.get("/?n=warm")  # taken by the top of the idle stack: the warmest child
    assert warm.status == 200
    (warmest,) = [
        p for p in h.programs() if p.served and p.served[-1][b"REQUEST_URI"].endswith(b"warm")
    ]
    h.run(9.5)  # nobody idle for 10 s yet (the warm child the least)
    assert len(living(h)) == 4
    h.until(watch(lambda: len(living(h)) == 1), within=10)
    assert h.programs() == [warmest], "the coldest go first, the warmest stays"
    h.run(100)
    assert len(living(h)) == 1 and h.pool.children.workers == 1, "never below min_workers"
    retired = [p for p in h.processes.started if not p.alive]
    assert len(retired) == 3 and all(p.signals == [signal.SIGTERM] for p in retired)
    assert watch.retired_busy == []
    assert h.pool.children.scaled == {"started": 3, "retired": 3}
    assert h.pool.children.failure_pressure() == 0 and h.pool.accounting.restarts == {}
    last = h.pool.children.last_scaling
    assert last is not None and last["action"] == "retired" and last["idle_seconds"] >= 10


def test_one_child_is_retired_per_tick_and_a_busy_child_never(harness):
    h = adaptive(harness, idle_timeout=5.0)
    responses = burst(h, 40)
    h.until(lambda: answered(responses), within=60)
    assert len(living(h)) == 4
    running = h.connect().request("/?sleep=60")
    (busy,) = h.busy()
    moments: list[float] = []
    before = len(living(h))

    def count() -> bool:
        nonlocal before
        now = len([c for c in living(h) if c.state is not State.STOPPING])
        if now < before:
            moments.append(h.now())
            before = now
        return False

    h.loop.run_until_true(count, 30)
    assert h.programs() == [busy] and busy.busy, "the idle ones went, the busy one serves on"
    assert len(moments) == 3 and len(set(moments)) == 3, "one retirement a tick"
    h.until(lambda: running.end is not None, within=60)
    assert running.status == 200 and busy.alive


def groups(h, size: int, every: float, seconds: float, sleep: float = 0.1) -> tuple[list, list]:
    """``size`` requests at once every ``every`` s for ``seconds``: overlapping requests, as
    random arrivals have now and then, so the lower children of the idle stack serve too.
    The responses, and each retirement seen as (time, reason)."""
    responses: list = []
    retired: list[tuple[float, str]] = []
    seen = h.pool.children.scaled["retired"]
    end = h.now() + seconds
    while h.now() < end:
        responses += burst(h, size, f"/?sleep={sleep}&group={len(responses)}")
        stop = h.now() + every
        while h.now() < stop:
            h.run(0.1)
            if h.pool.children.scaled["retired"] > seen:
                seen = h.pool.children.scaled["retired"]
                last = h.pool.children.last_scaling
                assert last is not None
                retired.append((h.now(), str(last["reason"])))
    return responses, retired


def test_a_child_a_steady_load_uses_now_and_then_but_does_not_need_is_retired(harness):
    """3 requests of 0.1 s at once every 2 s: 0.15 children of work, but the third child of
    the idle stack takes one every 2 s and is never idle for idle_timeout. The pool keeps
    what the work needs and one spare, 2, and stays there."""
    h = adaptive(harness, idle_timeout=10.0)
    responses = burst(h, 40)
    h.until(lambda: answered(responses), within=60)
    assert len(living(h)) == 4
    sent, retired = groups(h, 3, every=2.0, seconds=80)
    h.until(lambda: answered(sent), within=30)
    assert {response.status for response in sent} == {200}
    assert [reason for _, reason in retired] == ["idle_timeout", "surplus"]
    assert retired[1][0] - retired[0][0] >= 10.0, "idle_timeout between two changes"
    assert h.pool.children.workers == 2 and len(living(h)) == 2, "the work and a spare"
    last = h.pool.children.last_scaling
    assert last is not None and last["needed"] == 2 and 0.1 < last["demand"] <= 1
    assert last["waited_share"] <= 0.05
    assert h.pool.children.scaled["started"] == 3, "growth does not undo it"
    assert h.pool.children.failure_pressure() == 0 and h.pool.accounting.restarts == {}


def test_children_the_arriving_work_needs_are_kept(harness):
    """4 requests of 1 s at once every 1.6 s: 2.5 children of work, 3 needed and a spare."""
    h = adaptive(harness, idle_timeout=10.0)
    responses = burst(h, 40)
    h.until(lambda: answered(responses), within=60)
    sent, retired = groups(h, 4, every=1.6, seconds=60, sleep=1.0)
    h.until(lambda: answered(sent), within=30)
    assert {response.status for response in sent} == {200}
    assert retired == [] and h.pool.children.workers == 4


def test_bursts_that_wait_for_children_keep_them(harness):
    """8 requests of 0.1 s at once every 2 s: 0.4 children of work, but half of each
    burst waits for a child; every child is used each time, none is retired."""
    h = adaptive(harness, idle_timeout=10.0)
    responses = burst(h, 40)
    h.until(lambda: answered(responses), within=60)
    sent, retired = groups(h, 8, every=2.0, seconds=60)
    h.until(lambda: answered(sent), within=30)
    assert {response.status for response in sent} == {200}
    assert retired == [] and h.pool.children.workers == 4
    assert h.pool.dispatcher.waited_share() > 0.3


def test_retire_idle_refuses_a_busy_child_and_never_goes_below_the_minimum(harness):
    h = adaptive(harness, workers=2, min_workers=1)
    running = h.connect().request("/?sleep=5")
    (busy,) = h.busy()
    children = h.pool.children
    children.retire_idle(busy.child, "idle_timeout", {})
    assert busy.alive and not busy.child.retiring and children.workers == 2
    (idle,) = [p for p in h.programs() if p is not busy]
    children.retire_idle(idle.child, "idle_timeout", {})
    h.settle()
    assert not idle.alive and children.workers == 1
    children.retire_idle(busy.child, "idle_timeout", {})
    h.until(lambda: running.end is not None)
    assert running.status == 200 and busy.alive and children.workers == 1


def test_no_request_is_lost_while_children_come_and_go(harness):
    h = adaptive(harness, idle_timeout=2.0)
    watch = Watch(h)
    sent = []
    for wave in range(4):
        sent += burst(h, 30, f"/?sleep=0.5&wave={wave}")
        h.until(watch(lambda sent=sent: answered(sent)), within=60)
        h.until(watch(lambda: len(living(h)) == 1), within=30)  # back to the minimum
        sent += [h.connect().request(f"/?wave={wave}&gap={n}") for n in range(3)]
    h.until(watch(lambda: answered(sent)), within=60)
    assert [response.status for response in sent] == [200] * len(sent)
    assert all(response.ends == 1 for response in sent)
    served = sum(len(program.served) for program in h.processes.started)
    assert served == len(sent), "each request served once, none lost, none twice"
    assert watch.most_alive == 4 and watch.retired_busy == []
    assert h.pool.children.scaled["started"] >= 12 and h.pool.accounting.restarts == {}


# ---------------------------------------------------------------- scale, TTIN, reload


def test_scale_pins_the_number_and_turns_adaptive_scaling_off(harness):
    h = adaptive(harness)
    assert h.pool.scale(2) == ""
    h.until(lambda: h.pool.children.ready() == 2)
    assert (h.pool.children.minimum, h.pool.children.maximum) == (2, 2)
    responses = burst(h, 40)
    h.until(lambda: answered(responses), within=60)
    assert len(living(h)) == 2 and h.pool.children.scaled["started"] == 0
    h.run(60)
    assert len(living(h)) == 2, "a pinned pool does not shrink when idle"


def test_ttin_pins_one_more_than_the_current_target(harness):
    h = adaptive(harness)
    responses = burst(h, 40)
    h.until(lambda: len(living(h)) == 4, within=30)
    h.until(lambda: answered(responses), within=60)
    h.pool.handle_ttou()
    assert (h.pool.children.minimum, h.pool.children.workers, h.pool.children.maximum) == (3, 3, 3)
    h.until(lambda: len(living(h)) == 3)
    h.run(60)
    assert len(living(h)) == 3


def test_reload_keeps_the_current_number_within_the_new_range(harness, tmp_path):
    path = tmp_path / "pool.toml"
    path.write_text("[pool]\nmin_workers = 1\nmax_workers = 4\nworkers = 1\nidle_timeout = 10\n")
    h = adaptive(harness, config_path=str(path))
    responses = burst(h, 40)
    h.until(lambda: answered(responses), within=60)
    assert h.pool.children.workers == 4
    path.write_text("[pool]\nmin_workers = 1\nmax_workers = 3\nworkers = 1\nidle_timeout = 10\n")
    assert h.pool.reload() == ""
    h.until(lambda: h.pool.lifecycle is Lifecycle.RUNNING, within=60)
    assert h.pool.children.workers == 3 and len(living(h)) == 3, "brought into the new range"
    assert (h.pool.children.minimum, h.pool.children.maximum) == (1, 3)
    h.until(lambda: len(living(h)) == 1, within=60)  # the new children retire when idle too
    path.write_text("[pool]\nmin_workers = 2\nmax_workers = 3\nworkers = 2\nidle_timeout = 10\n")
    assert h.pool.reload() == ""
    h.until(lambda: h.pool.lifecycle is Lifecycle.RUNNING and h.pool.children.ready() == 2, 60)
    assert h.pool.children.workers == 2


def test_a_pin_survives_a_reload_that_leaves_the_numbers_and_ends_with_one_that_changes_them(
    harness, tmp_path
):
    path = tmp_path / "pool.toml"
    path.write_text("[pool]\nmin_workers = 1\nmax_workers = 4\nworkers = 1\n")
    h = adaptive(harness, config_path=str(path))
    assert h.pool.scale(3) == ""
    path.write_text(
        "[pool]\nmin_workers = 1\nmax_workers = 4\nworkers = 1\n[limits]\nmax_waiting = 9\n"
    )
    assert h.pool.reload() == ""
    h.until(lambda: h.pool.lifecycle is Lifecycle.RUNNING, within=60)
    assert (h.pool.children.minimum, h.pool.children.workers, h.pool.children.maximum) == (3, 3, 3)
    path.write_text("[pool]\nmin_workers = 1\nmax_workers = 6\nworkers = 1\nidle_timeout = 5\n")
    assert h.pool.reload() == ""
    h.until(lambda: h.pool.lifecycle is Lifecycle.RUNNING, within=60)
    assert (h.pool.children.minimum, h.pool.children.workers, h.pool.children.maximum) == (1, 3, 6)
    h.until(lambda: len(living(h)) == 1, within=60, what="adaptive again: idle ones retire")


# ---------------------------------------------------------------- pressure, readiness, views


def test_retiring_idle_children_does_not_raise_the_failure_pressure(harness):
    h = adaptive(harness, idle_timeout=5.0)
    responses = burst(h, 40)
    h.until(lambda: len(living(h)) == 4, within=30)
    h.until(lambda: answered(responses), within=60)
    h.programs()[0].exit(signal.SIGSEGV)  # one failure among 4 children
    h.settle()
    h.until(lambda: h.pool.children.ready() == 4, within=10)
    assert h.pool.children.failure_pressure() == 0.25
    h.until(lambda: len(living(h)) == 1, within=60)
    assert h.pool.children.failure_pressure() == 0.25, "not 1 failure over 1 child"


def test_readyz_counts_against_the_minimum_while_the_pool_grows(harness):
    h = adaptive(harness, max_starting=3)
    h.pool.config.admin.min_ready = 3
    responses = burst(h, 40)
    h.until(lambda: h.pool.children.workers == 4, within=30)
    assert h.pool.children.ready() < 4
    assert h.pool.readiness()[0], "a growing pool stays ready"
    h.until(lambda: answered(responses), within=60)


def test_status_and_metrics_show_the_range_and_the_decisions(harness):
    h = adaptive(harness, idle_timeout=5.0)
    pool = h.pool.status()["pool"]
    assert (pool["min_workers"], pool["max_workers"], pool["workers"]) == (1, 4, 1)
    assert pool["scaling"] == {
        "last": None, "started": 0, "retired": 0, "start_seconds": START,  # the first's
        "held_by_cpu": False,
        "cpu_share": None,
        "rate": None,
        "trial": None,
        "trials": {"kept": 0, "retired": 0},
        "next_trial_in": 0.0,
    }
    responses = burst(h, 40)
    h.until(lambda: answered(responses), within=60)
    h.until(lambda: len(living(h)) == 3, within=60)
    scaling = h.pool.status()["pool"]["scaling"]
    assert scaling["started"] == 3 and scaling["retired"] == 1
    last = scaling["last"]
    assert last["action"] == "retired" and last["reason"] == "idle_timeout"
    assert 0 < last["at"] <= h.pool.uptime() and last["workers"] == 3
    text = h.pool.metrics().decode()
    assert 'fcgipool_scaled_total{action="started"} 3.0' in text
    assert 'fcgipool_scaled_total{action="retired"} 1.0' in text
    assert re.search(r"^fcgipool_min_workers 1\.0$", text, re.M)
    assert re.search(r"^fcgipool_max_workers 4\.0$", text, re.M)


def test_a_fixed_pool_never_scales(harness):
    h = harness({"pool": {"workers": 2, "idle_timeout": 1.0}})
    responses = burst(h, 60)
    h.until(lambda: answered(responses), within=120)
    h.run(30)
    assert len(living(h)) == 2 and h.pool.children.scaled == {"started": 0, "retired": 0}


def test_each_decision_logs_its_numbers_and_the_status_text_shows_the_range(harness, tmp_path):
    from fcgipool import logs
    from fcgipool.cli import format_status

    h = adaptive(harness, idle_timeout=5.0)
    path = tmp_path / "pool.log"
    logs.configure("console", "debug", str(path))
    try:
        responses = burst(h, 40)
        h.until(lambda: answered(responses), within=60)
        assert "children 4 of 1..4 (4 idle)" in format_status(h.pool.status())
        h.until(lambda: len(living(h)) == 3, within=60)
    finally:
        logs.configure("console", "info", "")
    err = path.read_text()
    up = [line for line in err.splitlines() if "scale_up" in line]
    down = [line for line in err.splitlines() if "scale_down" in line]
    assert len(up) == 3 and len(down) == 1
    for field in ("backlog=", "serving=", "predicted_wait=", "start_seconds=", "workers="):
        assert field in up[0]
    assert "idle_seconds=" in down[0] and "workers=3" in down[0]
    assert err.count("reason=predicted_wait") >= 3 and "reason=idle_timeout" in err
    text = format_status(h.pool.status())
    assert "last scaling: retired (idle_timeout) at" in text.splitlines()[0]
    assert "children 3 of 1..4 (3 idle)" in text
    fixed = harness({"pool": {"workers": 2}})
    assert "children 2 (2 idle)" in format_status(fixed.pool.status())


def test_a_load_above_what_the_children_serve_grows_the_pool_before_the_backlog_does(harness):
    """1.5 children's worth of work arriving on 1 child whose start takes 3 s: the queue
    would reach a start's worth only after 6 s, yet the work still waiting when a new child
    is ready says start one now."""
    h = adaptive(harness, start=3.0)
    h.get("/?sleep=0.1")  # learn the cost
    began = h.now()
    responses = []
    while h.pool.children.scaled["started"] == 0 and h.now() - began < 6:
        responses.append(h.connect().request("/?sleep=0.1"))
        h.run(1 / 15)
    assert h.pool.children.scaled["started"] >= 1
    assert h.now() - began < 3, "grown within a start, not once the backlog was 3 s"
    last = h.pool.status()["pool"]["scaling"]["last"]
    assert last["demand"] > 1.2 and last["left_at_ready"] > 0
    h.until(lambda: answered(responses), within=60)
    assert {r.status for r in responses} == {200}
