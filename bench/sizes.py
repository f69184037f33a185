"""Scenario (k): mixed GetMap sizes in one class: 9 tiles in 10, 1 big map, 4 children.

The question (issue 12): scenario (c) mixes classes (GetCapabilities is ``light``, GetMap
``heavy``) and fcgipool's classes keep the cheap ones moving. Here every request is a
GetMap, so all are in the same class (``heavy`` by fcgipool's default classes) and no
class rule can tell a 25 ms tile from a 0.4 s print-size map: do the tiles still get
through at saturation, or do they queue behind the maps?

Requests, all WMS GetMap PNGs of demo/project/demo.qgs (``LAYERS=demo``, every layer):
*tile*: a 256x256 tile of EPSG:3857's grid at zoom 14-16 (bench/viewer.py's tiles, chosen
by a seeded RNG; ~20-35 ms of QGIS); *map*: the whole extent at 2048x2048 (~0.4 s, a
0.6 MB PNG; about 17 tiles' worth: heavy.qgs at 2048x2048 takes 2 s, too long for a run).
By time, the maps are about two thirds of the work.

Load: the closed-loop client ``common.run_load`` as in scenario (c): 20 clients, each on one
kept-alive HTTP/1.1 connection, every peer the same sequence, exactly one map in every block
of 10 requests (shuffled by a seeded RNG); 2 s uncounted, 8 s counted, then the requests in
flight awaited (at most 15 s). 20 clients keep 4 children saturated.

Peers: all of common.PEERS with 4 children of qgis_mapserv.fcgi, fcgipool with the suite's
default configuration (its default classes: tiles and maps both ``heavy``). Runs
interleaved, medians of the repeats; every set-up is warmed up first.

Metrics per case (``tile``, ``map``): ``p50_ms``, ``p99_ms``, ``goodput`` (2xx answers per
second), ``errors``; ``abandoned`` on the ``map`` case.
Goal: fcgipool's tile p99 <= spawn-fcgi+multiwatch's (its kernel-queue FIFO is the reference
for "no worse than a plain shared socket"), map goodput >= 0.9x its.
"""

from __future__ import annotations

import itertools
import random
import urllib.parse
from collections.abc import Callable

import common
from core import DEMO, demo_bbox
from mixed import measure_two_kinds
from results import Context, Row, peer_setups, running
from viewer import a_tile

KEY = "k"
NAME = "k-sizes"
TITLE = "Mixed GetMap sizes in one class: 256x256 tiles and 1 in 10 a 2048x2048 map (4 children)"
HEADLINE = [("p99_ms", "p99 latency, ms"), ("goodput", "answers/s (2xx)")]
WORKERS, CLIENTS, MAP_EVERY, SEED = 4, 20, 10, 11
SECONDS, RAMP, DRAIN = 8.0, 2.0, 15.0
MAP_SIZE = 2048


def map_path() -> str:
    params = {"MAP": str(DEMO), "SERVICE": "WMS", "VERSION": "1.3.0", "REQUEST": "GetMap",
              "LAYERS": "demo", "STYLES": "", "CRS": "EPSG:3857", "FORMAT": "image/png",
              "BBOX": demo_bbox(), "WIDTH": str(MAP_SIZE), "HEIGHT": str(MAP_SIZE)}  # fmt: skip
    return "/ows?" + urllib.parse.urlencode(params)


def chooser(seed: int) -> Callable[[], tuple[str, str]]:
    """(kind, path) of the next request: one map in every block of MAP_EVERY."""
    rng = random.Random(seed)
    big = map_path()
    block: list[str] = []

    def choose() -> tuple[str, str]:
        if not block:
            block.extend(["map"] + ["tile"] * (MAP_EVERY - 1))
            rng.shuffle(block)
        kind = block.pop()
        return kind, big if kind == "map" else a_tile(rng)

    return choose


def estimate(ctx: Context) -> float:
    count = sum(ctx.wants(p) for p in common.PEERS)
    run = ctx.duration(SECONDS) + (0.5 if ctx.quick else RAMP) + 2  # + the drain
    return count * (ctx.repeats * run + 12)


def run(ctx: Context) -> list[Row]:
    (ctx.root / "home").mkdir(exist_ok=True)
    env = common.qgis_env(ctx.root / "home")
    named = peer_setups(ctx, WORKERS, [common.QGIS], env)
    ramp, drain = (0.5, 5.0) if ctx.quick else (RAMP, DRAIN)
    rows: list[Row] = []
    with running(setup for _, setup in named):
        for _, setup in named:
            common.wait_http(setup.url(map_path()), timeout=120)
            # every child loads demo.qgs: 2 requests per child at once, a map and a tile
            warm_rng = random.Random(0)
            both = itertools.cycle([("map", map_path()), ("tile", a_tile(warm_rng))]).__next__
            common.run_load(setup.port, 1 if ctx.quick else 3, 2 * WORKERS, both, timeout=120,
                            drain=drain)  # fmt: skip
        rows += measure_two_kinds(ctx, named, NAME, ("tile", "map"), chooser, SEED,
                                  ramp, drain, CLIENTS, SECONDS)  # fmt: skip
    return rows
