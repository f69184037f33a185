"""hostcpu.CpuMeter: the busy fraction of the pool's CPUs from /proc/stat-shaped counters,
over at least WINDOW seconds, with the affinity's CPUs only."""

from __future__ import annotations

from pathlib import Path

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


def test_the_busy_fraction_covers_the_last_window_of_samples():
    now = [0.0]
    counters = Counters()
    meter = hostcpu.CpuMeter(lambda: now[0], counters.read, cpus={0, 1})
    assert meter.busy() is None, "one sample says nothing yet"
    for _ in range(10):  # 1 s: CPU 0 90 % busy, CPU 1 50 %
        counters.add(0, busy=9, idle=1)
        counters.add(1, busy=5, idle=5)
        now[0] += 0.1
        assert now[0] < 0.25 - 1e-9 or meter.busy() is not None
    assert meter.busy() == 0.7
    for _ in range(5):  # half a second of both idle
        counters.add(0, busy=0, idle=10)
        counters.add(1, busy=0, idle=10)
        now[0] += 0.1
        meter.busy()
    assert round(meter.busy() or 0, 3) == 0.35, "half of the last second was idle"
    for _ in range(10):
        counters.add(0, busy=10, idle=0)
        counters.add(1, busy=10, idle=0)
        now[0] += 0.1
        meter.busy()
    assert meter.busy() == 1.0, "what is older than the window no longer counts"
    assert len(meter.samples) <= 12, "bounded: one window of ticks"


def test_samples_closer_than_the_minimum_span_say_nothing():
    now = [0.0]
    counters = Counters()
    meter = hostcpu.CpuMeter(lambda: now[0], counters.read, cpus={0})
    meter.busy()
    counters.add(0, busy=1, idle=0)
    now[0] = 0.1
    assert meter.busy() is None


def test_only_the_cpus_the_pool_may_run_on_count():
    now = [0.0]
    counters = Counters()
    meter = hostcpu.CpuMeter(lambda: now[0], counters.read, cpus={1})
    meter.busy()
    counters.add(0, busy=100, idle=0)  # another process's CPU, busy
    counters.add(1, busy=10, idle=90)
    now[0] = 1.0
    assert meter.busy() == 0.1


def test_an_unreadable_stat_is_unknown_not_an_error():
    def broken() -> dict[int, tuple[int, int]]:
        raise OSError(2, "No such file or directory")

    assert hostcpu.CpuMeter(lambda: 0.0, broken, cpus={0}).busy() is None
