"""Scenario (d): many projects, 20 of them whose first load costs 1 s; 4 children keep 5 each.

The question (issue 5): does project affinity (fcgipool sends a request to a child that served
its project lately) pay off when there are more projects than one child's cache holds?

Children: tests/apps/fault_app.py --cache-size 5, 4 of them. It keeps an LRU cache of 5
project names; ``/?project=pN&load_ms=1000&sleep=20`` sleeps 1000 ms when pN is not in the
cache (the project load: reading a big .qgs and opening its layers), then 20 ms (the request's
own work). Both are sleeps, not CPU: the machine has 2 cores, and CPU burnt by the children
would compete with the web server, the pool and the load client; a QGIS project load is much
I/O too. Every answer says ``X-Cache: hit|miss``, so the hit rate is measured, not guessed.

Projects: 20, chosen uniformly per request by a seeded RNG (the same sequence for every
peer): the honest worst case for affinity, since no project is hot, nothing fits in one child
(20 > 5), and only a manager that keeps each project on a few children fits them all (4 x 5 =
20 slots).

Peers, each behind its own web server as ``common.make_setups`` sets them up: fcgipool with
``[projects] memory = 5`` (the fault child's cache size; affinity on) and ``parameter =
"project"`` (the fault app's name for it; QGIS uses MAP, the default); ``fcgipool no
affinity``, the same with ``memory = 0``; spawn-fcgi+multiwatch on one shared socket; nginx
round-robin over one socket per child; Apache mod_fcgid (Apache itself the web server).

Load: the bounded Python client ``common.run_load`` (16 closed-loop clients on kept-alive
HTTP/1.1 connections), so that the hit rate can be read from the answers; 16 clients keep the
4 children saturated, the case the goal is about. Each set-up gets a 3 s warm-up; each run
loads 2 s uncounted, then counts 8 s; runs interleaved, medians of the repeats.

Metrics (case ``20 projects``): ``goodput`` (2xx answers per second), ``p50_ms``, ``p99_ms``,
``hit_rate`` (share of answers that were cache hits), ``errors`` (non-2xx, failed and
abandoned requests). Goal: fcgipool >= 3x spawn-fcgi's throughput.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Callable

import common
from results import Context, Row, interleaved, log, metric_rows, peer_setups, running

KEY = "d"
NAME = "d-projects"
TITLE = "Many projects: 20 projects, 4 children caching 5 each (1 s per project load)"
HEADLINE = [
    ("goodput", "answers/s (2xx)"),
    ("p99_ms", "p99 latency, ms"),
    ("hit_rate", "project cache hit rate"),
]
NO_AFFINITY = "fcgipool no affinity"
WORKERS, CLIENTS, CACHE, PROJECTS, SEED = 4, 16, 5, 20, 20
LOAD_MS, SLEEP_MS = 1000, 20
SECONDS, RAMP, WARMUP, DRAIN = 8.0, 2.0, 3.0, 30.0
CASE = f"{PROJECTS} projects"


def chooser(seed: int, load_ms: float = LOAD_MS) -> Callable[[], tuple[str, str]]:
    rng = random.Random(seed)
    names = [f"p{i}" for i in range(PROJECTS)]

    def choose() -> tuple[str, str]:
        return "project", f"/?project={rng.choice(names)}&load_ms={load_ms:g}&sleep={SLEEP_MS}"

    return choose


def hit_rate(result: common.LoadResult) -> float:
    tagged = [s for s in result.samples if s.tag]
    return sum(s.tag == "hit" for s in tagged) / len(tagged) if tagged else float("nan")


def estimate(ctx: Context) -> float:
    count = sum(ctx.wants(p) for p in (*common.PEERS, NO_AFFINITY))
    run = ctx.duration(SECONDS) + (0.5 if ctx.quick else RAMP) + 0.5
    return count * (ctx.repeats * run + (1 if ctx.quick else WARMUP) + 2.5)


def run(ctx: Context) -> list[Row]:
    command = [sys.executable, str(common.FAULT_APP), "--cache-size", str(CACHE)]
    env = {"PATH": common.SAFE_PATH, "LANG": "C.UTF-8"}

    def settings(memory: int) -> dict:
        return {"projects": {"parameter": "project", "memory": memory}}

    named = peer_setups(ctx, WORKERS, command, env, fcgipool_settings=settings(CACHE),
                        variants={NO_AFFINITY: settings(0)})  # fmt: skip
    # a quick run loads projects faster, so that its 2 s see a few answers
    load_ms = 100 if ctx.quick else LOAD_MS
    ramp = 0.5 if ctx.quick else RAMP
    rows: list[Row] = []
    with running(setup for _, setup in named):
        for _, setup in named:
            common.wait_http(setup.url("/?n=0"))
            common.run_load(setup.port, 1 if ctx.quick else WARMUP, CLIENTS,
                            chooser(SEED - 1, load_ms), drain=DRAIN)  # fmt: skip
        for repeat, (peer, setup) in interleaved(named, ctx.repeats):
            cpu = common.ForeignCpu([s for _, s in named])
            result = common.run_load(setup.port, ctx.duration(SECONDS), CLIENTS,
                                     chooser(SEED + repeat, load_ms), timeout=120, warmup=ramp,
                                     drain=DRAIN, tag_header="X-Cache")  # fmt: skip
            busy, foreign = cpu.stop()
            metrics = {"goodput": result.goodput(), "p50_ms": result.percentile_ms(50),
                       "p99_ms": result.percentile_ms(99), "hit_rate": hit_rate(result),
                       "errors": result.errors() + result.abandoned}  # fmt: skip
            rows += metric_rows(NAME, CASE, peer, repeat, metrics)
            log(f"{NAME} {repeat + 1}/{ctx.repeats} {peer:<22} {result.goodput():6.1f}/s p50 "
                f"{result.percentile_ms(50):7.1f} p99 {result.percentile_ms(99):7.1f} ms | hits "
                f"{hit_rate(result):.0%} | errors {result.errors()} {result.statuses()} "
                f"abandoned {result.abandoned} | CPU busy {busy:.2f} cores, not ours "
                f"{foreign:.2f}")  # fmt: skip
    return rows
