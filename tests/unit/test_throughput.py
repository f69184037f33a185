"""throughput.Throughput: requests finished a second while work waited, at the pool's size."""

from __future__ import annotations

import pytest

from fcgipool.throughput import MEMORY, Throughput


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def ticks(meter: Throughput, clock: Clock, seconds: float, per_second: float, waiting: bool,
          size: object = (2, 0), finished: list[int] | None = None) -> None:  # fmt: skip
    """Ticks of 0.1 s in which the children finish ``per_second`` requests a second."""
    done = finished if finished is not None else [0]
    for _ in range(round(seconds * 10)):
        clock.now += 0.1
        done[0] += round(per_second / 10)
        meter.sample(done[0], waiting, size)


def test_only_the_intervals_in_which_work_waited_count():
    clock = Clock()
    meter = Throughput(clock)
    done = [0]
    assert meter.rate() is None
    ticks(meter, clock, 5, 20, True, finished=done)
    ticks(meter, clock, 5, 3, False, finished=done)  # nothing waits: the load, not capacity
    assert meter.rate() == pytest.approx(20)
    assert meter.span == pytest.approx(4.9), "the first sample only begins an interval"


def test_an_interval_counts_only_when_work_waited_at_both_ends():
    clock = Clock()
    meter = Throughput(clock)
    done = [0]
    ticks(meter, clock, 1, 10, True, finished=done)
    ticks(meter, clock, 0.1, 100, False, finished=done)  # waiting ended within it
    ticks(meter, clock, 0.1, 100, True, finished=done)  # began within it
    assert meter.rate() == pytest.approx(10)


def test_a_change_of_size_starts_the_rate_over():
    clock = Clock()
    meter = Throughput(clock)
    done = [0]
    ticks(meter, clock, 5, 20, True, (2, 0), done)
    ticks(meter, clock, 1, 10, True, (2, 1), done)  # a child starting takes CPU
    assert meter.rate() == pytest.approx(10) and meter.span == pytest.approx(0.9)
    ticks(meter, clock, 5, 30, True, (3, 0), done)
    assert meter.rate() == pytest.approx(30) and meter.size == (3, 0)


def test_the_rate_follows_a_change_of_load_within_a_few_memories():
    clock = Clock()
    meter = Throughput(clock)
    done = [0]
    ticks(meter, clock, 3 * MEMORY, 20, True, finished=done)
    ticks(meter, clock, 3 * MEMORY, 10, True, finished=done)  # heavier requests now
    assert meter.rate() == pytest.approx(10, rel=0.1)
    assert meter.span == pytest.approx(6 * MEMORY - 0.1)
