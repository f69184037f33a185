"""What every scenario of the suite hands back, how runs are interleaved, and the few steps
every scenario takes alike.

A scenario runs its set-ups side by side and returns ``Row``s: one measured value of one
metric, for one case of the scenario, one peer and one repeat. The suite (bench/suite.py)
writes every row to CSV, takes medians over the repeats (``summarize``: with the ratios to
fcgipool and to the best other peer) and plots them. The helpers at the end start the peers
(``peer_setups``, ``running``), warm them, and keep one run's leftovers off the next
(``settle``).
"""

from __future__ import annotations

import contextlib
import csv
import math
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

import psutil

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

    def wants(self, peer: str) -> bool:
        """Whether to run this peer: all of them when none were named; a variant ("fcgipool
        reserved=1") runs when it or its base peer was named."""
        return not self.peers or peer in self.peers or peer.split()[0] in self.peers


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
        rows = list(csv.DictReader(source))
    return [Row(r["scenario"], r["case"], r["peer"], int(r["repeat"]), r["metric"],
                float(r["value"])) for r in rows]  # fmt: skip


def medians(rows: Iterable[Row]) -> dict[tuple[str, str, str, str], float]:
    """(scenario, case, peer, metric) → the median over the repeats that measured something
    (NaN: e.g. a percentile of no answers); NaN when none did."""
    groups: dict[tuple[str, str, str, str], list[float]] = {}
    for row in rows:
        values = groups.setdefault((row.scenario, row.case, row.peer, row.metric), [])
        if not math.isnan(row.value):
            values.append(row.value)
    return {key: statistics.median(v) if v else math.nan for key, v in groups.items()}


# ---------------------------------------------------------------- reading the medians

HIGHER_IS_BETTER = ("req_per_s", "goodput", "hit_rate", "kept_pct")


def lower_is_better(metric: str) -> bool:
    """Latencies, errors, CPU and memory: less is better; rates and shares: more is."""
    return not any(metric == name or metric.startswith(name + "_") for name in HIGHER_IS_BETTER)


def is_fcgipool(peer: str) -> bool:
    """fcgipool or one of its variants ("fcgipool reserved=1")."""
    return peer.split()[0] == "fcgipool"


@dataclass(frozen=True)
class Median:
    scenario: str
    case: str
    peer: str
    metric: str
    median: float
    repeats: int
    ratio_to_fcgipool: float | None  # this peer's median / fcgipool's, same case and metric
    ratio_to_best_peer: float | None  # ... / the best of the peers that are not fcgipool


def _ratio(value: float, base: float | None) -> float | None:
    if base is None or base == 0 or math.isnan(base) or math.isnan(value):
        return None
    return value / base


def summarize(rows: Iterable[Row]) -> list[Median]:
    """One Median per (scenario, case, peer, metric), in the order the rows came."""
    rows = list(rows)
    values = medians(rows)
    counts: dict[tuple[str, str, str, str], int] = {}  # the repeats that measured something
    for row in rows:
        key = (row.scenario, row.case, row.peer, row.metric)
        counts[key] = counts.get(key, 0) + (not math.isnan(row.value))
    best: dict[tuple[str, str, str], float] = {}
    for (scenario, case, peer, metric), value in values.items():
        if is_fcgipool(peer) or math.isnan(value):
            continue
        key = (scenario, case, metric)
        pick = min if lower_is_better(metric) else max
        best[key] = pick(best.get(key, value), value)
    out = []
    for (scenario, case, peer, metric), value in values.items():
        fcgipool = values.get((scenario, case, "fcgipool", metric))
        out.append(Median(scenario, case, peer, metric, value,
                          counts[(scenario, case, peer, metric)], _ratio(value, fcgipool),
                          _ratio(value, best.get((scenario, case, metric)))))  # fmt: skip
    return out


def number(value: float | None, digits: int = 4) -> str:
    """``digits`` significant digits, never an exponent ("17595", "1.853", "0.0123"); "" for
    none."""
    if value is None or math.isnan(value):
        return ""
    if value == 0 or math.isinf(value):
        return f"{value:g}"
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(value))))
    text = f"{value:.{decimals}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def ratio(value: float | None) -> str:
    return number(value, 3)


def write_medians(table: Iterable[Median], path: Path) -> None:
    """medians.csv: the figures of the plots and of summary.md, as they print there."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow([field.name for field in fields(Median)])
        for m in table:
            ratios = ratio(m.ratio_to_fcgipool), ratio(m.ratio_to_best_peer)
            writer.writerow([m.scenario, m.case, m.peer, m.metric, number(m.median), m.repeats,
                             *ratios])  # fmt: skip


# ---------------------------------------------------------------- running a scenario


def log(message: str) -> None:
    """One progress line on stderr (stdout stays free for whoever runs the suite)."""
    print(f"# {message}", file=sys.stderr, flush=True)


def metric_rows(scenario: str, case: str, peer: str, repeat: int,
                metrics: dict[str, float]) -> list[Row]:  # fmt: skip
    return [Row(scenario, case, peer, repeat, name, value) for name, value in metrics.items()]


def wrk_metrics(result) -> dict[str, float]:
    """The metrics of one wrk run (a ``common.Result``)."""
    return {"req_per_s": result.requests_per_s, "p50_ms": result.p50_ms,
            "p99_ms": result.p99_ms, "errors": result.errors}  # fmt: skip


def peer_setups(ctx: Context, workers: int, command: list[str], env: dict[str, str], *,
                fcgipool_settings: dict | None = None,
                variants: dict[str, dict] | None = None) -> list[tuple[str, Any]]:  # fmt: skip
    """(Row.peer, set-up) for every peer ``ctx`` wants: those of ``common.PEERS`` as
    ``common.make_setups`` sets them up, and fcgipool variants (Row.peer → fcgipool
    settings), each in a directory of its own, right after fcgipool."""
    import common  # bench/common.py: not needed to read or write results

    base = [peer for peer in common.PEERS if ctx.wants(peer)]
    named = [(setup.name, setup) for setup in common.make_setups(
        ctx.root, workers, command, env, peers=base, fcgipool_settings=fcgipool_settings)
    ] if base else []  # fmt: skip
    at = 1 if named and named[0][0] == "fcgipool" else 0
    for i, (peer, settings) in enumerate((variants or {}).items()):
        if ctx.wants(peer):
            root = ctx.root / f"variant{i}"
            (setup,) = common.make_setups(root, workers, command, env, peers=["fcgipool"],
                                          fcgipool_settings=settings)  # fmt: skip
            named.insert(at, (peer, setup))
            at += 1
    return named


def warm(setup: Any, path: str, workers: int, connections: int, seconds: float) -> None:
    """wrk on ``path`` for ``seconds``, then on until the set-up runs all ``workers`` children
    (mod_fcgid starts them on demand only, as requests find none idle), 20 s at most."""
    import common

    common.wait_http(setup.url(path), timeout=120)
    deadline = time.monotonic() + 20
    common.run_wrk(setup.url(path), seconds, connections)
    while len(setup.child_pids()) < workers and time.monotonic() < deadline:
        common.run_wrk(setup.url(path), 1, connections)


@contextlib.contextmanager
def running(setups: Iterable) -> Iterator[None]:
    """Start every set-up, and stop every one of them whatever happens (a set-up whose start
    failed half-way too: its stop cleans up what it did start)."""
    setups = list(setups)
    try:
        for setup in setups:
            setup.start()
        yield
    finally:
        for setup in setups:
            try:
                setup.stop()
            except Exception as error:  # the others must stop too
                log(f"stopping {setup.name}: {error!r}")


def wrk_with_cpu(url: str, seconds: float, connections: int, pids: set[int]) -> tuple[Any, float]:
    """wrk on ``url``, and the CPU time ``pids`` used meanwhile per request counted, in µs
    (0 without pids)."""
    import common

    before = cpu_seconds(pids)
    result = common.run_wrk(url, seconds, connections)
    used = cpu_seconds(pids) - before if pids else 0.0
    return result, used / max(result.requests, 1) * 1e6


def cpu_seconds(pids: Iterable[int]) -> float:
    """User + system CPU time these processes have used so far (those gone count 0)."""
    total = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            times = psutil.Process(pid).cpu_times()
            total += times.user + times.system
    return total


def settle(pids: Callable[[], Iterable[int]], timeout: float = 10, quiet: float = 0.05) -> float:
    """Wait until the processes ``pids()`` use less than ``quiet`` cores (over 0.25 s), at
    most ``timeout`` seconds; the seconds waited. After a load generator stops, the children
    still finish the requests it left in flight (QGIS renders a map whose client is gone):
    that work must not land on the next set-up's run."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        before = cpu_seconds(pids())
        time.sleep(0.25)
        if cpu_seconds(pids()) - before < quiet * 0.25:
            break
    return time.monotonic() - start
