"""Scenario (c): mixed load at saturation, 90 % light and 10 % heavy QGIS requests, 4 children.

The question (issue 5): when every child is busy with slow maps, do cheap requests still get
through quickly, and is that paid for with map throughput?

Requests (bench/core.py builds them). *Light*: WMS GetCapabilities of demo/project/demo.qgs
(class ``light`` in fcgipool's default classes; a few ms, QGIS caches the document; a small
GetMap would be class ``heavy`` by default, so it is not the light request). *Heavy*: the
1024x872 GetMap of the whole of demo/project/heavy.qgs (~0.65 s of CPU, a 1.5 MB PNG).

Peers, all with the same 4 children of qgis_mapserv.fcgi, as ``common.make_setups`` sets them
up (fcgipool behind nginx's keepalive upstream; spawn-fcgi+multiwatch on one shared socket;
nginx round-robin over one socket per child, the systemd-template set-up; Apache mod_fcgid,
Apache itself the web server), plus ``fcgipool reserved=1``: ``reserved = 1`` for the light
class, so heavy maps never take the last idle child and a light request finds one free (maps
get 3 children at most). Both fcgipool set-ups use the default classes (light priority 10,
heavy priority 0).

Load: the bounded Python client ``common.run_load``, not wrk: wrk's Lua hooks cannot split
latency by kind of request. 20 closed-loop clients, each on one kept-alive HTTP/1.1
connection to the web server; every peer gets the same sequence, in which exactly one request
in each block of 10 is heavy (the block shuffled by a seeded RNG). Mixing per request, rather
than separate light and heavy clients, keeps the 90/10 mix whatever the peer does: closed-loop
light clients would flood a peer that serves light requests first, starving maps by
construction. 20 clients saturate 4 children (more maps are outstanding than there are
children) and both cores stay busy. A run loads 2 s uncounted (the queues fill), then counts
the answers completing in the next 8 s; then the requests in flight are awaited, uncounted
(at most 15 s; those left are ``abandoned``), so that no work of a run lands on the next one.
Runs are interleaved, medians of the repeats. Every set-up is warmed up first so that each
child has loaded both projects.

Metrics per case (``light``, ``heavy``): ``p50_ms``, ``p99_ms`` (all answers),
``goodput`` (2xx answers per second: light requests/s, maps/s), ``errors``; ``abandoned``
(requests of either kind still unanswered after the drain) is put on the ``heavy`` case.
Goals: light p99 <= 0.2x the best other peer's, heavy goodput >= 0.9x the best other peer's.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable

import common
from core import qgis_paths
from results import Context, Row, interleaved, log, metric_rows, peer_setups, running

from fcgipool.config import HEAVY_REQUESTS, LIGHT_REQUESTS

KEY = "c"
NAME = "c-mixed"
TITLE = "Mixed light/heavy QGIS load at saturation (4 children, 1 map in 10)"
HEADLINE = [("p99_ms", "p99 latency, ms"), ("goodput", "answers/s (2xx)")]
RESERVED = "fcgipool reserved=1"
WORKERS, CLIENTS, HEAVY_EVERY, SEED = 4, 20, 10, 5
SECONDS, RAMP, DRAIN = 8.0, 2.0, 15.0


def urls() -> dict[str, str]:
    paths = qgis_paths()
    return {"light": paths["GetCapabilities"], "heavy": paths["GetMap heavy"]}


def chooser(seed: int, heavy_every: int = HEAVY_EVERY) -> Callable[[], tuple[str, str]]:
    """(kind, path) of the next request: one heavy in every block of ``heavy_every``."""
    paths = urls()
    rng = random.Random(seed)
    block: list[str] = []

    def choose() -> tuple[str, str]:
        if not block:
            block.extend(["heavy"] + ["light"] * (heavy_every - 1))
            rng.shuffle(block)
        kind = block.pop()
        return kind, paths[kind]

    return choose


def settings(reserved: int) -> dict:
    """fcgipool's default classes, spelt out so that ``reserved`` can be set."""
    light = {"name": "light", "priority": 10, "reserved": reserved,
             "match": {"REQUEST": LIGHT_REQUESTS}}  # fmt: skip
    heavy = {"name": "heavy", "priority": 0, "match": {"REQUEST": HEAVY_REQUESTS}}
    return {"classes": [light, heavy]}


def estimate(ctx: Context) -> float:
    count = sum(ctx.wants(p) for p in (*common.PEERS, RESERVED))
    run = ctx.duration(SECONDS) + (0.5 if ctx.quick else RAMP) + 7  # + the drain
    return count * (ctx.repeats * run + 12)


def run(ctx: Context) -> list[Row]:
    (ctx.root / "home").mkdir(exist_ok=True)
    env = common.qgis_env(ctx.root / "home")
    named = peer_setups(ctx, WORKERS, [common.QGIS], env, fcgipool_settings=settings(0),
                        variants={RESERVED: settings(1)})  # fmt: skip
    paths = urls()
    ramp, drain = (0.5, 5.0) if ctx.quick else (RAMP, DRAIN)
    rows: list[Row] = []
    with running(setup for _, setup in named):
        for _, setup in named:
            for path in paths.values():
                common.wait_http(setup.url(path), timeout=120)
            # every child loads both projects: 2 requests per child at once, alternating kinds
            alternate = itertools.cycle(paths.items()).__next__
            common.run_load(setup.port, 1 if ctx.quick else 4, 2 * WORKERS, alternate,
                            timeout=120, drain=drain)  # fmt: skip
        rows += measure_two_kinds(ctx, named, NAME, ("light", "heavy"), chooser, SEED,
                                  ramp, drain)  # fmt: skip
    return rows


def measure_two_kinds(
    ctx: Context,
    named: list[tuple[str, common.Setup]],
    name: str,
    kinds: tuple[str, str],
    choose: Callable[[int], Callable[[], tuple[str, str]]],
    seed: int,
    ramp: float,
    drain: float,
    clients: int = CLIENTS,
    seconds: float = SECONDS,
) -> list[Row]:
    """The interleaved closed-loop runs of a two-kind mix (``clients`` clients, ``seconds``
    counted): p50, p99, goodput and errors per kind, abandoned on the second kind."""
    rows: list[Row] = []
    first, second = kinds
    for repeat, (peer, setup) in interleaved(named, ctx.repeats):
        cpu = common.ForeignCpu([s for _, s in named])
        result = common.run_load(setup.port, ctx.duration(seconds), clients,
                                 choose(seed + repeat), timeout=120, warmup=ramp,
                                 drain=drain)  # fmt: skip
        busy, foreign = cpu.stop()
        for kind in kinds:
            metrics = {
                "p50_ms": result.percentile_ms(50, kind),
                "p99_ms": result.percentile_ms(99, kind),
                "goodput": result.goodput(kind),
                "errors": result.errors(kind),
            }
            if kind == second:
                metrics["abandoned"] = result.abandoned
            rows += metric_rows(name, kind, peer, repeat, metrics)
        log(f"{name} {repeat + 1}/{ctx.repeats} {peer:<22} {first} "
            f"{result.goodput(first):6.1f}/s p50 {result.percentile_ms(50, first):7.1f} "
            f"p99 {result.percentile_ms(99, first):7.1f} ms | {second} "
            f"{result.goodput(second):5.2f}/s p50 {result.percentile_ms(50, second):6.0f} p99 "
            f"{result.percentile_ms(99, second):6.0f} ms | errors {result.errors()} "
            f"{result.statuses()} abandoned {result.abandoned} | CPU busy {busy:.2f} "
            f"cores, not ours {foreign:.2f}")  # fmt: skip
    return rows
