"""Scenario (j): map-viewer bursts: 10 viewers, each asking for 40 tiles at once, 2 children.

The question (issue 12, self-tuning pool): a web map (demo/www/index.html: Leaflet, tiled
WMS) turns every pan or zoom into a burst of 16-40 GetMap requests at the same moment; with
a few viewers at once the queue is hundreds deep for a second or two, then empty. Do the
pool's *defaults* serve that, without refusing anything, and how long does a viewer wait for
its whole view?

Requests: WMS GetMap 256x256 PNG tiles of demo/project/demo.qgs (``LAYERS=demo``, every
layer; ``MAP=`` the project, as the bench's nginx sets no QGIS_PROJECT_FILE), in the tile
grid of EPSG:3857 (Leaflet's): ~20-35 ms of QGIS each. A *view* is 8x5 = 40 neighbouring
tiles at zoom 14, 15 or 16, placed at random over the project's extent (zoom 14's grid holds
10x9 tiles of it): every tile of a view is distinct, and views differ, as after a zoom (the
whole view anew); nothing is cached anywhere. Each viewer's sequence of views comes from a
seeded RNG, so every peer gets the same views.

Load: ``common.run_viewers``: 10 viewers, each on 40 kept-alive HTTP/1.1 connections to the
web server (a browser's HTTP/2 connection, or a tile client's pool), sends its 40 tile
requests at once, waits for all 40 answers, thinks 0.5-1 s (uniform), repeats. Viewers
start at random moments of their first think time. A run lasts 2 s uncounted, then 20 s in
which every burst that starts is counted, each to its end; no burst starts after that, and
bursts still running 30 s later are ``abandoned``. 10 x 40 tiles keep 2 children busy: the
queue swings between 0 and ~400.

Peers, all with 2 children of qgis_mapserv.fcgi, as ``common.make_setups`` sets them up.
fcgipool runs its **default configuration** (as every scenario does: common.Fcgipool
sets only the socket, the children and the log), since whether the defaults refuse a burst
is the question. Runs interleaved, medians of the repeats; every set-up is
warmed up first (each child has loaded demo.qgs).

Metrics (case ``40 tiles x 10 viewers``), over the counted bursts: ``refused`` (503
answers), ``errors`` (any other non-2xx answer or no answer), ``p50_ms`` and ``p99_ms`` (of
the 2xx tiles' latencies: a refusal is not a fast answer), ``burst_p99_ms`` (p99 of the time
from a burst's start to its last answer, over the bursts whose 40 answers were all 2xx),
``bursts_failed`` (bursts with any other answer), ``goodput`` (2xx tiles of the counted
bursts per second of the counted window), ``abandoned``.
Goals: fcgipool refuses nothing (0), and its tile p99 and burst p99 are at most every other
peer's.
"""

from __future__ import annotations

import math
import random
import urllib.parse

import common
from core import DEMO
from results import Context, Row, interleaved, log, metric_rows, peer_setups, running, settle

KEY = "j"
NAME = "j-viewer"
TITLE = "Map-viewer bursts: 10 viewers x 40 tiles at once (2 children, default config)"
HEADLINE = [("p99_ms", "tile p99, ms"), ("burst_p99_ms", "whole view p99, ms"),
            ("refused", "refused (503)")]  # fmt: skip
WORKERS, VIEWERS, BURST, THINK, SEED = 2, 10, (8, 5), (0.5, 1.0), 12
SECONDS, RAMP, DRAIN = 20.0, 2.0, 30.0
CASE = f"{BURST[0] * BURST[1]} tiles x {VIEWERS} viewers"
ZOOMS = (14, 15, 16)

R = 6378137.0  # the sphere of EPSG:3857
EXTENT = (2643108.2, 6917006.5, 2666315.6, 6938475.0)  # demo.qgs's WMSExtent, EPSG:3857


def tile_path(x: int, y: int, z: int) -> str:
    """The GetMap of tile (x, y, z) of EPSG:3857's grid (Leaflet's L.tileLayer.wms)."""
    size = 2 * math.pi * R / 2**z
    minx, maxy = -math.pi * R + x * size, math.pi * R - y * size
    params = {"MAP": str(DEMO), "SERVICE": "WMS", "REQUEST": "GetMap", "LAYERS": "demo",
              "STYLES": "", "FORMAT": "image/png", "TRANSPARENT": "true", "VERSION": "1.3.0",
              "WIDTH": "256", "HEIGHT": "256", "CRS": "EPSG:3857"}  # fmt: skip
    bbox = f"{minx:.2f},{maxy - size:.2f},{minx + size:.2f},{maxy:.2f}"
    return "/ows?" + urllib.parse.urlencode(params) + "&BBOX=" + bbox


def grid(z: int) -> tuple[range, range]:
    """The columns and rows of zoom z's tiles that hold some of the project's extent."""
    size = 2 * math.pi * R / 2**z
    xs = range(int((EXTENT[0] + math.pi * R) // size), int((EXTENT[2] + math.pi * R) // size) + 1)
    ys = range(int((math.pi * R - EXTENT[3]) // size), int((math.pi * R - EXTENT[1]) // size) + 1)
    return xs, ys


def view(rng: random.Random, width: int = BURST[0], height: int = BURST[1]) -> list[str]:
    """The ``width`` x ``height`` tiles of a view at a random zoom of ZOOMS and a random place
    over the extent (its top-left tile inside the extent's tiles)."""
    z = rng.choice(ZOOMS)
    xs, ys = grid(z)
    x0 = rng.randrange(xs.start, max(xs.start + 1, xs.stop - width + 1))
    y0 = rng.randrange(ys.start, max(ys.start + 1, ys.stop - height + 1))
    return [tile_path(x, y, z) for y in range(y0, y0 + height) for x in range(x0, x0 + width)]


def a_tile(rng: random.Random) -> str:
    """One tile of the extent at a random zoom of ZOOMS (open-loop traffic)."""
    z = rng.choice(ZOOMS)
    xs, ys = grid(z)
    return tile_path(rng.choice(xs), rng.choice(ys), z)


def views(seed: int, width: int = BURST[0], height: int = BURST[1]):
    """views(viewer, i) → the paths of that viewer's i-th view: the same for every peer."""
    cache: dict[tuple[int, int], list[str]] = {}

    def of(viewer: int, i: int) -> list[str]:
        if (viewer, i) not in cache:
            cache[(viewer, i)] = view(random.Random(f"{seed}/{viewer}/{i}"), width, height)
        return cache[(viewer, i)]

    return of


def estimate(ctx: Context) -> float:
    count = sum(ctx.wants(p) for p in common.PEERS)
    run = ctx.duration(SECONDS) + (0.5 if ctx.quick else RAMP) + 5  # + the last bursts, settle
    return count * (ctx.repeats * run + 15)


def run(ctx: Context) -> list[Row]:
    (ctx.root / "home").mkdir(exist_ok=True)
    env = common.qgis_env(ctx.root / "home")
    named = peer_setups(ctx, WORKERS, [common.QGIS], env)
    ramp = 0.5 if ctx.quick else RAMP
    warm_views = views(SEED - 1)
    rows: list[Row] = []
    with running(setup for _, setup in named):
        for _, setup in named:
            common.wait_http(setup.url(a_tile(random.Random(0))), timeout=120)
            # every child renders some tiles (mod_fcgid starts its children on demand)
            common.run_viewers(setup.port, 1 if ctx.quick else 3, 2, warm_views, THINK,
                               SEED - 1, drain=DRAIN)  # fmt: skip
            settle(setup.child_pids, timeout=15)
        for repeat, (peer, setup) in interleaved(named, ctx.repeats):
            result = common.run_viewers(setup.port, ctx.duration(SECONDS), VIEWERS, views(SEED),
                                        THINK, SEED + repeat, warmup=ramp,
                                        drain=DRAIN)  # fmt: skip
            waited = settle(setup.child_pids, timeout=15)
            load = common.LoadResult(result.seconds, result.samples)
            ok = common.LoadResult(result.seconds, [s for s in load.of() if 200 <= s.status < 300])
            statuses = load.statuses()
            refused = statuses.get(503, 0)
            metrics = {
                "refused": refused,
                "errors": load.errors() - refused,
                "p50_ms": ok.percentile_ms(50),
                "p99_ms": ok.percentile_ms(99),
                "burst_p99_ms": result.burst_percentile_ms(99),
                "bursts_failed": result.failed_bursts(),
                "goodput": load.goodput(),
                "abandoned": result.abandoned,
            }
            rows += metric_rows(NAME, CASE, peer, repeat, metrics)
            log(f"{NAME} {repeat + 1}/{ctx.repeats} {peer:<22} {len(result.bursts)} bursts, "
                f"{load.goodput():6.1f} tiles/s, tile p50 {metrics['p50_ms']:7.1f} p99 "
                f"{metrics['p99_ms']:7.1f} ms, view p99 {metrics['burst_p99_ms']:7.0f} ms | "
                f"refused {refused} errors {metrics['errors']} {statuses} abandoned "
                f"{result.abandoned} (settled in {waited:.1f} s)")  # fmt: skip
    return rows
