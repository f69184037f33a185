"""What every scenario of the suite hands back, and how runs are interleaved.

A scenario runs its set-ups side by side and returns ``Row``s: one measured value of one
metric, for one case of the scenario, one peer and one repeat. The suite (bench/suite.py)
writes every row to CSV, takes medians over the repeats and plots them.
"""

from __future__ import annotations

import csv
import statistics
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Row:
    scenario: str  # the letter and a short name: "a-trivial"
    case: str  # what varies inside the scenario: "GetCapabilities", "light", "children=2"
    peer: str  # "fcgipool", "spawn-fcgi+multiwatch", "nginx-rr", "apache-mod_fcgid"
    repeat: int
    metric: str  # "req_per_s", "p99_ms", "goodput", "errors", "cpu_us_per_request", ...
    value: float


@dataclass
class Context:
    """What the suite tells a scenario."""

    root: Path  # a scratch directory of its own (mode 0755), removed afterwards
    repeats: int
    quick: bool  # a smoke run: shortest durations, fewest cases; the numbers mean nothing
    peers: Sequence[str] = ()  # only these peers when not empty

    def duration(self, normal: float) -> float:
        return 2.0 if self.quick else normal


def interleaved(setups: Sequence[T], repeats: int) -> Iterator[tuple[int, T]]:
    """(repeat, setup) in an order that moves every repeat (rotated, then reversed), so
    that drift on the machine and the order itself hit every set-up alike."""
    count = len(setups)
    for repeat in range(repeats):
        shift = repeat % count if count else 0
        order = list(setups[shift:]) + list(setups[:shift])
        if repeat % 2:
            order.reverse()
        for setup in order:
            yield repeat, setup


def write_csv(rows: Iterable[Row], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as out:
        writer = csv.DictWriter(out, [field.name for field in fields(Row)])
        writer.writeheader()
        for row in rows:
            writer.writerow(asdict(row))


def read_csv(path: Path) -> list[Row]:
    with path.open(newline="") as source:
        return [
            Row(r["scenario"], r["case"], r["peer"], int(r["repeat"]), r["metric"],
                float(r["value"]))  # fmt: skip
            for r in csv.DictReader(source)
        ]


def medians(rows: Iterable[Row]) -> dict[tuple[str, str, str, str], float]:
    """(scenario, case, peer, metric) → the median over the repeats."""
    groups: dict[tuple[str, str, str, str], list[float]] = {}
    for row in rows:
        groups.setdefault((row.scenario, row.case, row.peer, row.metric), []).append(row.value)
    return {key: statistics.median(values) for key, values in groups.items()}
