"""Scenario (b): QGIS Server behind each peer, the same 2 children of qgis_mapserv.fcgi.

Cases, all on the demo projects of demo/project/:

- ``GetCapabilities`` of demo.qgs: about half a millisecond of QGIS (it caches the
  document), so what a manager spends per request shows;
- ``GetMap 256x256`` of demo.qgs (three layers): a light map, tens of milliseconds;
- ``GetMap heavy``: the 1024x872 GetMap of the whole of heavy.qgs (50,000 points, ~0.65 s of
  CPU, a 1.5 MB PNG), the heavy request of scenario (c): there the manager's cost vanishes.

Peers as ``common.make_setups`` sets them up: fcgipool behind nginx's keepalive upstream;
spawn-fcgi+multiwatch, the children on one shared socket; nginx round-robin over one socket
per child; Apache with mod_fcgid, Apache itself the web server (no nginx in front). wrk -t1
-c8 loads each for 4 s per run (12 s for the heavy map, of which a peer answers only
2-3 a second: shorter runs count too few to rank anyone); runs interleaved case by case,
medians of the repeats. After each run the children get time to finish what wrk left in
flight (``results.settle``: a queued map is still rendered when its client has gone), so
that it does not land on the next peer's run.
Every set-up is warmed up first, so that each child has loaded both projects.

Metrics: ``req_per_s``, ``p50_ms``, ``p99_ms``, ``errors`` (non-2xx and socket errors).
Goals (issue 2): >= 0.95x spawn-fcgi on GetCapabilities, >= 0.99x on GetMap.
"""

from __future__ import annotations

import re
import urllib.parse

import common
from results import (
    Context,
    Row,
    interleaved,
    log,
    metric_rows,
    peer_setups,
    running,
    settle,
    warm,
    wrk_metrics,
)

KEY = "b"
NAME = "b-qgis"
TITLE = "QGIS Server: GetCapabilities, light and heavy GetMap (2 children)"
HEADLINE = [("req_per_s", "requests/s"), ("p99_ms", "p99 latency, ms")]
WORKERS, CONNECTIONS = 2, 8
SECONDS = {"GetCapabilities": 4.0, "GetMap 256x256": 4.0, "GetMap heavy": 12.0}  # per run

PROJECTS = common.REPO / "demo" / "project"
DEMO = PROJECTS / "demo.qgs"
HEAVY = PROJECTS / "heavy.qgs"
HEAVY_BBOX = "2584500,6860500,2733700,6987500"  # heavy.qgs's WMS extent, rounded


def demo_bbox() -> str:
    text = DEMO.read_text()
    match = re.search(r"<WMSExtent[^>]*>((?:\s*<value>[^<]+</value>){4})", text)
    assert match, "demo.qgs has no WMSExtent"
    return ",".join(re.findall(r"<value>([^<]+)</value>", match.group(1)))


def qgis_paths() -> dict[str, str]:
    """case → the request's path; scenario (c) uses GetCapabilities and GetMap heavy."""
    if not (PROJECTS / "data" / "heavy_points.geojson").exists():
        raise RuntimeError("demo/project/data/heavy_points.geojson is missing: "
                           "/usr/bin/python3 demo/make_project.py --heavy-only")  # fmt: skip
    wms = {"SERVICE": "WMS", "VERSION": "1.3.0"}
    getmap = {**wms, "REQUEST": "GetMap", "STYLES": "", "CRS": "EPSG:3857",
              "FORMAT": "image/png"}  # fmt: skip
    light = {**getmap, "MAP": str(DEMO), "LAYERS": "districts,roads,sites", "BBOX": demo_bbox(),
             "WIDTH": "256", "HEIGHT": "256"}  # fmt: skip
    heavy = {**getmap, "MAP": str(HEAVY), "LAYERS": "heavy_points", "BBOX": HEAVY_BBOX,
             "WIDTH": "1024", "HEIGHT": "872"}  # fmt: skip
    capabilities = {**wms, "MAP": str(DEMO), "REQUEST": "GetCapabilities"}
    return {
        "GetCapabilities": "/ows?" + urllib.parse.urlencode(capabilities),
        "GetMap 256x256": "/ows?" + urllib.parse.urlencode(light),
        "GetMap heavy": "/ows?" + urllib.parse.urlencode(heavy),
    }


def cases(ctx: Context) -> dict[str, str]:
    paths = qgis_paths()
    return {"GetCapabilities": paths["GetCapabilities"]} if ctx.quick else paths


def estimate(ctx: Context) -> float:
    peers = sum(ctx.wants(p) for p in common.PEERS)
    settle = {"GetCapabilities": 0.6, "GetMap 256x256": 1.1, "GetMap heavy": 5.2}  # + wrk's start
    runs = sum(ctx.duration(SECONDS[case]) + settle[case] for case in cases(ctx))
    return peers * (ctx.repeats * runs + (3.5 if ctx.quick else 4.5) * len(cases(ctx)))


def run(ctx: Context) -> list[Row]:
    paths = cases(ctx)
    (ctx.root / "home").mkdir(exist_ok=True)
    named = peer_setups(ctx, WORKERS, [common.QGIS], common.qgis_env(ctx.root / "home"))
    rows: list[Row] = []
    with running(setup for _, setup in named):
        for _, setup in named:
            for path in paths.values():
                warm(setup, path, WORKERS, CONNECTIONS, 1 if ctx.quick else 2)
                settle(setup.child_pids, timeout=15)
        for case, path in paths.items():
            for repeat, (peer, setup) in interleaved(named, ctx.repeats):
                seconds = ctx.duration(SECONDS[case])
                result = common.run_wrk(setup.url(path), seconds, CONNECTIONS)
                waited = settle(setup.child_pids, timeout=15)
                rows += metric_rows(NAME, case, peer, repeat, wrk_metrics(result))
                log(f"{NAME} {repeat + 1}/{ctx.repeats} {case:<15} {peer:<22} "
                    f"{result.requests_per_s:8.1f} req/s p99 {result.p99_ms:8.2f} ms errors "
                    f"{result.errors} (settled in {waited:.1f} s)")  # fmt: skip
    return rows
