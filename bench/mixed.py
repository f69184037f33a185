"""Mixed load at saturation: 90 % light, 10 % heavy QGIS requests on 4 QGIS children.

    .venv/bin/python bench/mixed.py                          # 4 set-ups x 3 x 30 s: ~8 min
    .venv/bin/python bench/mixed.py --duration 5 --repeats 1  # a quick check

The question (issue 5): when every child is busy with slow maps, do cheap requests still get
through quickly, and is that paid for with map throughput?

Requests. *Light*: WMS GetCapabilities of demo/project/demo.qgs (class ``light`` in
fcgipool's default classes; a few ms of CPU, QGIS caches the document). A small GetMap of
demo.qgs would be class ``heavy`` by default, so it is not used as the light request.
*Heavy*: a 1024x872 GetMap of the whole extent of demo/project/heavy.qgs (50,000 points,
~0.65 s of CPU alone, a 1.5 MB PNG).

Set-ups, all with the same 4 children of qgis_mapserv.fcgi (env: common.qgis_env), each behind
its own nginx and all up side by side:

- ``fcgipool``: the default classes (light priority 10, heavy priority 0, nothing reserved);
  nginx keepalive upstream with ``fastcgi_keep_conn on``, as fcgipool's docs recommend.
- ``fcgipool reserved=1``: the same, plus ``reserved = 1`` for light: heavy maps never take
  the last idle child, so a light request finds one free (heavy maps get 3 children at most).
- ``spawn-fcgi``: 4 children sharing one socket, a connection per request.
- ``nginx-rr``: the systemd-template set-up: 4 single-child FastCGI servers on their own
  sockets (spawn-fcgi -F 1 in place of systemd's socket units), nginx's round-robin upstream.

Load: a bounded Python client (common.run_load), not wrk: wrk's Lua hooks cannot split
latency by kind of request. ``--clients`` (20) closed-loop clients, each on one kept-alive
HTTP/1.1 connection to nginx; every set-up gets the same sequence of request kinds, in which
exactly one request in each block of 10 is heavy (the block shuffled by a seeded RNG), so 10 %
of the requests *sent* are heavy. Mixing per request (instead of separate light and heavy
clients) keeps that 90/10 mix whatever the set-up does: with separate closed-loop light
clients, a set-up that serves light requests first would be flooded with lights and starve
maps by construction. 20 clients saturate 4 children: more maps are outstanding than there
are children (5 to 16 of the clients wait for a map at any moment, by set-up), and both cores
stay busy. Each run first loads for ``--ramp`` seconds (not counted: the queues fill), then
counts the answers that complete in the next ``--duration`` seconds; at the end the requests
in flight are awaited, uncounted, so that no work of one run is left on the machine for the
next (at most ``--drain`` seconds: requests that get stuck make a run that much longer). Runs
alternate between the set-ups (the order reverses every repeat); each figure is the median of
the repeats. Before the runs, every set-up gets a warm-up so that each child has loaded both
projects.

``--set SECTION.KEY=VALUE`` changes a setting of both fcgipool set-ups (e.g.
``--set limits.write_buffer=16777216``); ``--drain`` bounds the wait for the requests still in
flight after a run (those left are abandoned and counted as errors).

Reported: p50/p99 of light requests (all answers count), heavy maps answered per second (2xx),
and the ratios to the best peer (spawn-fcgi or nginx-rr: the lower light p99, the higher heavy
rate). The goal: light p99 <= 0.2x the best peer's, heavy rate >= 0.9x the best peer's. The
machine is measured too: CPU used by processes outside the benchmark during each run.
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import shlex
import shutil
import statistics
import sys
import tempfile
import urllib.parse
from pathlib import Path

from common import (
    QGIS,
    REPO,
    Fcgipool,
    ForeignCpu,
    LoadResult,
    NginxRoundRobin,
    SpawnFcgi,
    loadavg,
    machine,
    merge_settings,
    parse_settings,
    pool_events,
    qgis_env,
    run_load,
    wait_http,
)

from fcgipool.config import HEAVY_REQUESTS, LIGHT_REQUESTS

DEMO = REPO / "demo" / "project" / "demo.qgs"
HEAVY = REPO / "demo" / "project" / "heavy.qgs"
HEAVY_BBOX = "2584500,6860500,2733700,6987500"  # heavy.qgs's WMS extent, rounded


def urls() -> dict[str, str]:
    light = {"MAP": str(DEMO), "SERVICE": "WMS", "VERSION": "1.3.0", "REQUEST": "GetCapabilities"}
    heavy = {
        "MAP": str(HEAVY),
        "SERVICE": "WMS",
        "VERSION": "1.3.0",
        "REQUEST": "GetMap",
        "LAYERS": "heavy_points",
        "STYLES": "",
        "CRS": "EPSG:3857",
        "BBOX": HEAVY_BBOX,
        "WIDTH": "1024",
        "HEIGHT": "872",
        "FORMAT": "image/png",
    }
    return {
        "light": "/ows?" + urllib.parse.urlencode(light),
        "heavy": "/ows?" + urllib.parse.urlencode(heavy),
    }


def chooser(seed: int, heavy_every: int):
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


class FcgipoolReserved(Fcgipool):
    name = "fcgipool-reserved1"


LABELS = {
    "fcgipool": "fcgipool (defaults)",
    "fcgipool-reserved1": "fcgipool, light reserved = 1",
    "spawn-fcgi": "spawn-fcgi, 1 shared socket",
    "nginx-rr": "nginx round-robin, 4 sockets",
}


def settings(reserved: int) -> dict:
    return {"classes": classes(reserved), "log": {"format": "json"}}


def classes(reserved: int) -> list[dict]:
    return [
        {
            "name": "light",
            "priority": 10,
            "reserved": reserved,
            "match": {"REQUEST": LIGHT_REQUESTS},
        },
        {"name": "heavy", "priority": 0, "match": {"REQUEST": HEAVY_REQUESTS}},
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=30, help="counted seconds per run")
    parser.add_argument("--ramp", type=float, default=2, help="uncounted seconds per run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--clients", type=int, default=20, help="closed-loop HTTP clients")
    parser.add_argument("--workers", type=int, default=4, help="QGIS children per set-up")
    parser.add_argument("--heavy-every", type=int, default=10, help="1 heavy in N requests")
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--drain", type=float, default=15,
                        help="seconds to await the requests in flight after a run")  # fmt: skip
    parser.add_argument("--no-reserved", action="store_true",
                        help="leave out the fcgipool reserved=1 set-up")  # fmt: skip
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="an fcgipool setting for both fcgipool set-ups (TOML value), "
                        "e.g. limits.write_buffer=8388608; may be repeated")  # fmt: skip
    args = parser.parse_args()
    command = shlex.join([".venv/bin/python", "bench/mixed.py", *sys.argv[1:]])
    if not (REPO / "demo" / "project" / "data" / "heavy_points.geojson").exists():
        sys.exit("demo/project/data/heavy_points.geojson is missing: "
                 "/usr/bin/python3 demo/make_project.py --heavy-only")  # fmt: skip

    root = Path(tempfile.mkdtemp(prefix="fcgipool-bench-"))
    root.chmod(0o755)
    (root / "home").mkdir()
    env = qgis_env(root / "home")
    n = args.workers
    extra = parse_settings(args.set)
    setups = [Fcgipool(root, n, [QGIS], env, settings=merge_settings(settings(0), extra))]
    if not args.no_reserved:
        setups.append(FcgipoolReserved(root, n, [QGIS], env,
                                       settings=merge_settings(settings(1), extra)))  # fmt: skip
    setups += [SpawnFcgi(root, n, [QGIS], env), NginxRoundRobin(root, n, [QGIS], env)]
    peers = [s.name for s in setups if not s.name.startswith("fcgipool")]
    results: dict[str, list[LoadResult]] = {s.name: [] for s in setups}
    machine_load: list[tuple[float, float]] = []
    paths = urls()
    print(f"# load average before: {loadavg()}", file=sys.stderr, flush=True)
    try:
        for setup in setups:
            setup.start()
        for setup in setups:
            for path in paths.values():
                wait_http(setup.url(path), timeout=120)
            # every child loads both projects: n clients at once, alternating kinds
            run_load(setup.port, 4, 2 * n, itertools.cycle(paths.items()).__next__, timeout=120)
        for repeat in range(args.repeats):
            for setup in setups if repeat % 2 == 0 else setups[::-1]:
                cpu = ForeignCpu(setups)
                result = run_load(setup.port, args.duration, args.clients,
                                  chooser(args.seed + repeat, args.heavy_every),
                                  timeout=120, warmup=args.ramp, drain=args.drain)  # fmt: skip
                busy, foreign = cpu.stop()
                machine_load.append((busy, foreign))
                results[setup.name].append(result)
                light_p50, light_p99 = (result.percentile_ms(q, "light") for q in (50, 99))
                print(f"# {repeat + 1}/{args.repeats} {setup.name:<18} light "
                      f"{result.goodput('light'):6.1f}/s p50 {light_p50:7.1f} p99 {light_p99:7.1f}"
                      f" ms | heavy {result.goodput('heavy'):5.2f}/s p50 "
                      f"{result.percentile_ms(50, 'heavy'):6.0f} ms | errors {result.errors()} "
                      f"{result.statuses()} abandoned {result.abandoned} | CPU busy "
                      f"{busy:.2f} cores, not ours {foreign:.2f}, load {loadavg()}",
                      file=sys.stderr, flush=True)  # fmt: skip
    finally:
        for setup in setups:
            setup.stop()
        events = {s.name: pool_events(s.root / "pool.log") for s in setups
                  if isinstance(s, Fcgipool)}  # fmt: skip
        shutil.rmtree(root, ignore_errors=True)

    def med(name: str, metric) -> float:
        return statistics.median(metric(r) for r in results[name])

    light_p50 = {s: med(s, lambda r: r.percentile_ms(50, "light")) for s in results}
    light_p99 = {s: med(s, lambda r: r.percentile_ms(99, "light")) for s in results}
    light_rate = {s: med(s, lambda r: r.goodput("light")) for s in results}
    heavy_rate = {s: med(s, lambda r: r.goodput("heavy")) for s in results}
    heavy_p50 = {s: med(s, lambda r: r.percentile_ms(50, "heavy")) for s in results}
    errors = {s: sum(r.errors() + r.abandoned for r in results[s]) for s in results}
    best_p99 = min(light_p99[p] for p in peers)
    best_heavy = max(heavy_rate[p] for p in peers)
    busy = statistics.median(b for b, _ in machine_load)
    foreign = max(f for _, f in machine_load)

    print(f"Machine: {machine()}. {n} QGIS children per set-up; {args.clients} closed-loop "
          f"clients, 1 heavy request in {args.heavy_every}; runs of {args.duration:g} s "
          f"(after {args.ramp:g} s uncounted), interleaved, median of {args.repeats}. "
          f"CPU busy during runs: median {busy:.2f} of {os.cpu_count()} cores; other work on the "
          f"machine used at most {foreign:.2f} cores during a run.\n")  # fmt: skip
    print(f"Command: `{command}`\n")
    print(
        "| set-up | light p50 ms | light p99 ms | light p99 / best peer | heavy maps/s | "
        "heavy / best peer | light req/s | heavy p50 s | errors |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in results:
        print(
            f"| {LABELS[name]} | {light_p50[name]:.1f} | {light_p99[name]:.0f} | "
            f"{light_p99[name] / best_p99:.3f} | {heavy_rate[name]:.2f} | "
            f"{heavy_rate[name] / best_heavy:.2f} | {light_rate[name]:.1f} | "
            f"{heavy_p50[name] / 1000:.2f} | {errors[name]} |"
        )
    print()
    for name in (s.name for s in setups if s.name.startswith("fcgipool")):
        p99_ok = light_p99[name] <= 0.2 * best_p99
        heavy_ok = heavy_rate[name] >= 0.9 * best_heavy
        print(
            f"Goal, {LABELS[name]}: light p99 <= 0.2x best peer: "
            f"{'met' if p99_ok else 'NOT met'} ({light_p99[name] / best_p99:.3f}); "
            "heavy rate >= 0.9x best peer: "
            f"{'met' if heavy_ok else 'NOT met'} ({heavy_rate[name] / best_heavy:.2f})."
        )
    for name, counts in events.items():
        if counts:
            print(f"{LABELS[name]}, its log (warnings and errors): {counts}")


if __name__ == "__main__":
    main()
