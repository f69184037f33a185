"""Scenario (l): a day in three minutes: idle, a burst, steady load, idle again.

The question (issue 12, self-tuning pool): a fixed pool sized for the peak holds every
child's memory all day (~140-210 MB per QGIS child), though most of the day it waits. Does
an adaptive pool (``min_workers`` .. ``max_workers``, children stopped after
``idle_timeout`` s idle) save most of that memory, and what does it cost in latency when
the load comes back?

One run plays a day compressed, the phases back to back, on schedule (``common.run_phases``:
a phase does not wait for the answers of the one before):

- ``idle``: 30 s of a trickle, 0.5 tiles a second (open loop, Poisson arrivals);
- ``burst``: 30 s of 4 map viewers (bench/viewer.py's views: 40 distinct tiles at once at
  zoom 14-16, then 0.5-1 s of think time): more than 4 children can serve;
- ``steady``: 60 s of 20 tiles a second (open loop, Poisson): about half a core of QGIS,
  what one or two children serve;
- ``idle again``: 60 s of the trickle: time for idle children to go.

``FCGIPOOL_DAY_SCALE=4`` in the environment makes every phase 4 times longer (a day in 12
minutes; 10: half an hour, 20: the hour the issue asks for): in 30 s of burst the seconds
the first view waits for children to start are a larger share of the answers than in a
longer one.

Requests: 256x256 WMS GetMap tiles of demo/project/demo.qgs (bench/viewer.py), every peer
the same sequence (seeded). Between runs the set-up rests 10 s (settled, then idle), so
that each run starts from a pool that has been idle, as after a night.

Peers: ``fcgipool adaptive`` with ADAPTIVE (1 child at the start, 1 to 4, a child idle for
10 s is stopped); ``fcgipool fixed 4`` (``workers = 4``); spawn-fcgi+multiwatch with 4
children for reference. Both fcgipool set-ups otherwise run the suite's configuration
(common.Fcgipool: the default configuration but for the socket, the children and the log). The
children's memory is sampled every 0.25 s (``common.ChildMemory``: the sum of the RSS of the
manager's children, psutil), its integral over the run is the memory-seconds.

Metrics per phase (case = the phase): ``p50_ms``, ``p99_ms`` (of 2xx answers: a refusal is
not a fast answer), ``served`` (2xx answers), ``refused`` (503), ``errors`` (other), and
``mem_gib_s``, ``children`` (their mean number) over the phase. Per run (case ``day``):
``mem_gib_s``, ``children``, ``served``, ``refused``, ``errors``, ``abandoned``.
Goal: ``fcgipool adaptive`` uses >= 50 % less memory-seconds than ``fcgipool fixed 4`` over
the day, at <= 1.2x its p99 in every phase.
"""

from __future__ import annotations

import os
import random
import time

import common
from results import Context, Row, interleaved, log, metric_rows, running, settle
from viewer import a_tile, views

KEY = "l"
NAME = "l-day"
TITLE = "A day in three minutes: idle, burst, steady, idle (adaptive vs fixed 4 children)"
HEADLINE = [("p99_ms", "p99 latency, ms"), ("mem_gib_s", "children's memory, GiB·s")]
WORKERS, SEED, REST = 4, 13, 10.0
# The adaptive pool of issue 12: this one constant is its configuration.
ADAPTIVE = {"pool": {"workers": 1, "min_workers": 1, "max_workers": 4, "idle_timeout": 10}}
FIXED = {"pool": {"workers": WORKERS}}
ADAPTIVE_PEER, FIXED_PEER, SPAWN_PEER = "fcgipool adaptive", "fcgipool fixed 4", common.PEERS[1]
TRICKLE, STEADY = 0.5, 20.0  # tiles a second


def phases(ctx: Context) -> list[common.Phase]:
    scale = float(os.environ.get("FCGIPOOL_DAY_SCALE", "1"))
    seconds = (lambda s: 3.0) if ctx.quick else (lambda s: s * scale)
    return [
        common.Phase("idle", seconds(30.0), rate=TRICKLE),
        common.Phase("burst", seconds(30.0), viewers=4, think=(0.5, 1.0)),
        common.Phase("steady", seconds(60.0), rate=STEADY),
        common.Phase("idle again", seconds(60.0), rate=TRICKLE),
    ]


def estimate(ctx: Context) -> float:
    peers = sum(ctx.wants(p) for p in (ADAPTIVE_PEER, FIXED_PEER, SPAWN_PEER))
    day = sum(phase.seconds for phase in phases(ctx)) + (2 if ctx.quick else REST) + 3
    return peers * (ctx.repeats * day + 15)


def setups(ctx: Context, env: dict[str, str]) -> list[tuple[str, common.Setup]]:
    named: list[tuple[str, common.Setup]] = []
    for peer, settings, directory in (
        (ADAPTIVE_PEER, ADAPTIVE, "adaptive"),
        (FIXED_PEER, FIXED, "fixed"),
    ):
        if ctx.wants(peer):
            root = ctx.root / directory
            (setup,) = common.make_setups(root, WORKERS, [common.QGIS], env, peers=["fcgipool"],
                                          fcgipool_settings=settings)  # fmt: skip
            named.append((peer, setup))
    if ctx.wants(SPAWN_PEER):
        named += [(s.name, s) for s in common.make_setups(ctx.root, WORKERS, [common.QGIS], env,
                                                          peers=[SPAWN_PEER])]  # fmt: skip
    return named


def measure(result: common.PhasesResult, memory: common.ChildMemory, kind: str | None,
            start: float, end: float) -> dict[str, float]:  # fmt: skip
    load = common.LoadResult(end - start, result.samples)
    ok = common.LoadResult(end - start, [s for s in load.of(kind) if 200 <= s.status < 300])
    statuses = load.statuses(kind)
    refused = statuses.get(503, 0)
    return {
        "p50_ms": ok.percentile_ms(50),
        "p99_ms": ok.percentile_ms(99),
        "served": ok.count(),
        "refused": refused,
        "errors": load.errors(kind) - refused,
        "mem_gib_s": memory.gib_seconds(start, end),
        "children": memory.mean_children(start, end),
    }


def run(ctx: Context) -> list[Row]:
    (ctx.root / "home").mkdir(exist_ok=True)
    named = setups(ctx, common.qgis_env(ctx.root / "home"))
    day = phases(ctx)
    rest = 2.0 if ctx.quick else REST
    rows: list[Row] = []
    with running(setup for _, setup in named):
        for _, setup in named:
            common.wait_http(setup.url(a_tile(random.Random(0))), timeout=120)
        for repeat, (peer, setup) in interleaved(named, ctx.repeats):
            settle(setup.child_pids, timeout=15)
            time.sleep(rest)  # the night before
            with common.ChildMemory(setup) as memory:
                result = common.run_phases(setup.port, day, a_tile, views(SEED + repeat),
                                           SEED + repeat, drain=30)  # fmt: skip
            start, end = result.windows[day[0].name][0], result.windows[day[-1].name][1]
            whole = measure(result, memory, None, start, end)
            whole["abandoned"] = result.abandoned
            del whole["p50_ms"], whole["p99_ms"]
            rows += metric_rows(NAME, "day", peer, repeat, whole)
            parts = []
            for phase in day:
                t0, t1 = result.windows[phase.name]
                metrics = measure(result, memory, phase.name, t0, t1)
                rows += metric_rows(NAME, phase.name, peer, repeat, metrics)
                parts.append(f"{phase.name} p99 {metrics['p99_ms']:.0f} ms ({metrics['served']:.0f}"
                             f" ok, {metrics['children']:.1f} children)")  # fmt: skip
            log(f"{NAME} {repeat + 1}/{ctx.repeats} {peer:<22} {whole['mem_gib_s']:7.1f} GiB·s, "
                f"{whole['children']:.2f} children, served {whole['served']:.0f}, refused "
                f"{whole['refused']:.0f}, errors {whole['errors']:.0f}, abandoned "
                f"{result.abandoned} | " + " | ".join(parts))  # fmt: skip
    return rows
