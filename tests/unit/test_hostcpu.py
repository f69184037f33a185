"""hostcpu.CpuMeter: the busy fraction of the pool's CPUs from /proc/stat-shaped counters,
over the intervals of the last WINDOW seconds in which work waited, with the affinity's
CPUs only."""

from __future__ import annotations

from pathlib import Path

import pytest

from fcgipool import hostcpu

STAT = """cpu  300 0 100 500 100 0 0 0 0 0
cpu0 200 0 50 200 50 0 0 0 0 0
cpu1 100 0 50 300 50 0 0 0 0 0
intr 12345 0 0
ctxt 999
"""


def test_read_stat_gives_busy_and_total_ticks_per_cpu_without_the_sum_line(tmp_path: Path):
    path = tmp_path / "stat"
    path.write_text(STAT)
    # busy: all but idle and iowait (a CPU waiting on I/O could run a child)
    assert hostcpu.read_stat(str(path)) == {0: (250, 500), 1: (150, 500)}


def test_the_real_proc_stat_has_this_process_cpus():
    ticks = hostcpu.read_stat()
    assert set(hostcpu.CpuMeter(lambda: 0.0).cpus) <= set(ticks)
    assert all(0 <= busy <= total for busy, total in ticks.values())


class Counters:
    def __init__(self) -> None:
        self.ticks = {0: (0, 0), 1: (0, 0)}
        self.reads = 0

    def add(self, cpu: int, busy: int, idle: int) -> None:
        old_busy, old_total = self.ticks[cpu]
        self.ticks[cpu] = (old_busy + busy, old_total + busy + idle)

    def read(self) -> dict[int, tuple[int, int]]:
        self.reads += 1
        return dict(self.ticks)


def tick(now: list[float], counters: Counters, meter: hostcpu.CpuMeter, waiting: bool,
         busy: tuple[int, int], seconds: float = 0.1) -> float | None:  # fmt: skip
    """One tick of the autoscaler: 10 clock ticks a CPU go by, ``busy`` of them busy."""
    for cpu, ticks in enumerate(busy):
        counters.add(cpu, busy=ticks, idle=10 - ticks)
    now[0] += seconds
    return meter.busy(waiting)


def test_only_the_intervals_in_which_work_waited_count():
    """A map viewer's burst: its tiles wait while both CPUs are busy, then its think time
    leaves them idle. The idle spell says nothing about whether a child more would help."""
    now = [0.0]
    counters = Counters()
    meter = hostcpu.CpuMeter(lambda: now[0], counters.read, cpus={0, 1})
    assert meter.busy(False) is None, "one sample says nothing yet"
    for _ in range(5):  # think time: idle, nothing waits
        assert tick(now, counters, meter, False, (0, 0)) is None
    assert tick(now, counters, meter, True, (9, 9)) is None, "work waits from now on"
    assert tick(now, counters, meter, True, (10, 10)) == 1.0, "one waiting tick: saturated"
    assert tick(now, counters, meter, True, (10, 8)) == 0.95
    for _ in range(3):  # a pause: nothing waits, the CPUs idle
        assert tick(now, counters, meter, False, (0, 0)) == 0.95, "not counted"
    assert tick(now, counters, meter, True, (0, 0)) == 0.95, "waiting began mid-interval"
    assert tick(now, counters, meter, True, (6, 6)) == pytest.approx(50 / 60)


def test_waiting_intervals_older_than_the_window_no_longer_count():
    now = [0.0]
    counters = Counters()
    meter = hostcpu.CpuMeter(lambda: now[0], counters.read, cpus={0, 1})
    meter.busy(True)
    for _ in range(10):  # a second of waiting on saturated CPUs
        assert tick(now, counters, meter, True, (10, 10)) == 1.0
    for _ in range(10):  # then a second of nothing waiting
        tick(now, counters, meter, False, (0, 0))
    assert tick(now, counters, meter, True, (5, 5)) is None, "an old burst says nothing now"
    assert tick(now, counters, meter, True, (5, 5)) == 0.5, "the new burst's CPUs are free"
    for _ in range(30):
        tick(now, counters, meter, True, (5, 5))
    assert len(meter.intervals) <= 11, "bounded: one window of ticks"


def test_samples_shorter_than_the_minimum_span_say_nothing():
    now = [0.0]
    counters = Counters()
    meter = hostcpu.CpuMeter(lambda: now[0], counters.read, cpus={0})
    meter.busy(True)
    counters.add(0, busy=1, idle=0)
    now[0] = 0.05
    assert meter.busy(True) is None


def test_only_the_cpus_the_pool_may_run_on_count():
    now = [0.0]
    counters = Counters()
    meter = hostcpu.CpuMeter(lambda: now[0], counters.read, cpus={1})
    meter.busy(True)
    counters.add(0, busy=100, idle=0)  # another process's CPU, busy
    counters.add(1, busy=10, idle=90)
    now[0] = 1.0
    assert meter.busy(True) == 0.1


def test_an_unreadable_stat_is_unknown_not_an_error():
    def broken() -> dict[int, tuple[int, int]]:
        raise OSError(2, "No such file or directory")

    assert hostcpu.CpuMeter(lambda: 0.0, broken, cpus={0}).busy(True) is None


# ---------------------------------------------------------------- the children's CPU share


def test_the_share_is_unknown_until_a_second_of_run_time_then_cpu_over_run():
    share = hostcpu.CpuShare()
    assert share.update(0.0, 0.0) is None
    assert share.update(0.45, 0.5) is None, "half a second of run time says too little"
    value = share.update(1.08, 1.2)  # the sums decay as they grow: 1.09 s of it weighed
    assert value is not None and value == pytest.approx(0.9)


def test_the_share_keeps_what_it_learned_while_nothing_runs():
    """It decays over the children's run time, not the wall's: a quiet hour keeps what the
    last burst taught, for the next one."""
    share = hostcpu.CpuShare()
    share.update(1.8, 2.0)
    for _ in range(100):
        assert share.update(1.8, 2.0) == pytest.approx(0.9)


def test_the_share_follows_a_change_within_a_few_memories_of_run_time():
    share = hostcpu.CpuShare()
    cpu = run = 0.0
    for _ in range(50):  # CPU-bound children, then ones that wait on a database
        cpu, run = cpu + 0.09, run + 0.1
        share.update(cpu, run)
    assert share.update(cpu, run) == pytest.approx(0.9)
    for _ in range(int(3 * hostcpu.SHARE_MEMORY / 0.1)):
        cpu, run = cpu + 0.01, run + 0.1
        last = share.update(cpu, run)
    assert last is not None and 0.1 < last < 0.15, "0.9 weighs e^-3 after three memories"


def test_children_on_several_threads_have_a_share_above_one():
    share = hostcpu.CpuShare()
    assert share.update(3.0, 2.0) == pytest.approx(1.5)
