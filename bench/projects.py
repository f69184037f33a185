"""Many projects: 20 projects whose first load costs 1 s, 4 children that each keep 5.

    .venv/bin/python bench/projects.py                           # 4 set-ups x 3 x 30 s: ~8 min
    .venv/bin/python bench/projects.py --duration 5 --repeats 1   # a quick check

The question (issue 5): does project affinity (fcgipool sends a request to a child that served
its project lately) pay off when there are more projects than one child's cache holds?

Children: tests/apps/fault_app.py --cache-size 5, 4 of them. It keeps an LRU cache of 5
project names; ``/?project=pN&load_ms=1000&sleep=20`` sleeps 1000 ms when pN is not in the
cache (the project load: reading a big .qgs and opening its layers), then 20 ms (the request's
own work). Both are sleeps, not CPU: the machine has 2 cores, and CPU burnt by the children
would compete with nginx, the pool and the load client; a QGIS project load is much I/O too.
Every answer says ``X-Cache: hit|miss``, so the hit rate is measured, not guessed.

Projects: ``--projects`` (20), chosen per request from a seeded RNG, uniformly by default:
the honest worst case for affinity, since no project is hot, nothing fits in one child
(20 > 5), and only a pool that keeps each project on a few children fits them all (4 x 5 =
20 slots). ``--zipf S`` skews the choice (weight of the k-th project 1/k^S), which helps
every set-up's LRU.

Set-ups, each behind its own nginx, all up side by side, runs interleaved (the order reverses
every repeat), medians of the repeats:

- ``fcgipool``: the default ``[projects] memory = 5`` (affinity on), ``parameter =
  "project"`` (the fault app's name for it; QGIS uses MAP, the default).
- ``fcgipool, no affinity``: the same with ``memory = 0``.
- ``spawn-fcgi``: 4 children on one shared socket, a connection per request.
- ``nginx-rr``: 4 single-child sockets, nginx round-robin (the systemd-template set-up).
- with ``--hash``, also ``nginx-hash``: the same sockets with ``hash $arg_project consistent``,
  nginx's own way to pin a project to a child (uneven: 20 projects hashed onto 4 children).

Load: the bounded Python client of common.py (closed loop; ``--clients`` of them, 16 by
default, on kept-alive HTTP/1.1 connections to nginx), so that the hit rate per set-up can be
read from the answers. 16 clients keep the 4 children saturated (the case the goal is about);
``--clients 2`` shows the pool below saturation. Before the runs each set-up gets a warm-up
load; each run loads ``--ramp`` seconds uncounted, then counts ``--duration`` seconds.

Reported: answers per second (2xx), p50/p95 latency, the cache hit rate, and throughput
relative to spawn-fcgi. The goal: fcgipool >= 3x spawn-fcgi's throughput.
"""

from __future__ import annotations

import argparse
import random
import shlex
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from common import (
    FAULT_APP,
    SAFE_PATH,
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
    run_load,
    wait_http,
)


class FcgipoolNoAffinity(Fcgipool):
    name = "fcgipool-noaffinity"


LABELS = {
    "fcgipool": "fcgipool, affinity (memory = 5)",
    "fcgipool-noaffinity": "fcgipool, no affinity (memory = 0)",
    "spawn-fcgi": "spawn-fcgi, 1 shared socket",
    "nginx-rr": "nginx round-robin, 4 sockets",
    "nginx-hash": "nginx hash $arg_project, 4 sockets",
}


def chooser(seed: int, projects: int, zipf: float, load_ms: float, sleep_ms: float):
    rng = random.Random(seed)
    names = [f"p{i}" for i in range(projects)]
    weights = [1 / (k + 1) ** zipf for k in range(projects)]

    def choose() -> tuple[str, str]:
        name = rng.choices(names, weights)[0] if zipf else rng.choice(names)
        return "project", f"/?project={name}&load_ms={load_ms:g}&sleep={sleep_ms:g}"

    return choose


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=30, help="counted seconds per run")
    parser.add_argument("--ramp", type=float, default=3, help="uncounted seconds per run")
    parser.add_argument("--warmup", type=float, default=5, help="seconds of load per set-up "
                        "before the runs")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--clients", type=int, default=16, help="closed-loop HTTP clients")
    parser.add_argument("--workers", type=int, default=4, help="children per set-up")
    parser.add_argument("--cache-size", type=int, default=5, help="projects a child keeps")
    parser.add_argument("--projects", type=int, default=20)
    parser.add_argument("--load-ms", type=float, default=1000, help="cost of a project load")
    parser.add_argument("--sleep-ms", type=float, default=20, help="cost of a request")
    parser.add_argument("--zipf", type=float, default=0, help="skew; 0 is uniform")
    parser.add_argument("--seed", type=int, default=20)
    parser.add_argument("--drain", type=float, default=30,
                        help="seconds to await the requests in flight after a run")  # fmt: skip
    parser.add_argument("--hash", action="store_true", help="add the nginx-hash set-up")
    parser.add_argument("--no-rr", action="store_true", help="leave out nginx round-robin")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="an fcgipool setting for both fcgipool set-ups (TOML value); "
                        "may be repeated")  # fmt: skip
    args = parser.parse_args()
    command = shlex.join([".venv/bin/python", "bench/projects.py", *sys.argv[1:]])

    root = Path(tempfile.mkdtemp(prefix="fcgipool-bench-"))
    root.chmod(0o755)
    n = args.workers
    child = [sys.executable, str(FAULT_APP), "--cache-size", str(args.cache_size)]
    env = {"PATH": SAFE_PATH, "LANG": "C.UTF-8"}
    extra = parse_settings(args.set)

    def settings(memory: int) -> dict:
        base = {"projects": {"parameter": "project", "memory": memory},
                "log": {"format": "json"}}  # fmt: skip
        return merge_settings(base, extra)

    setups = [
        Fcgipool(root, n, child, env, settings=settings(args.cache_size)),
        FcgipoolNoAffinity(root, n, child, env, settings=settings(0)),
        SpawnFcgi(root, n, child, env),
    ]
    if not args.no_rr:
        setups.append(NginxRoundRobin(root, n, child, env))
    if args.hash:
        setups.append(NginxRoundRobin(root, n, child, env, name="nginx-hash",
                                      balance="hash $arg_project consistent;"))  # fmt: skip
    results: dict[str, list[LoadResult]] = {s.name: [] for s in setups}
    machine_load: list[tuple[float, float]] = []
    print(f"# load average before: {loadavg()}", file=sys.stderr, flush=True)

    def choose(seed: int):
        return chooser(seed, args.projects, args.zipf, args.load_ms, args.sleep_ms)

    try:
        for setup in setups:
            setup.start()
        for setup in setups:
            wait_http(setup.url("/?n=0"))
            if args.warmup:
                run_load(setup.port, args.warmup, args.clients, choose(args.seed - 1),
                         drain=args.drain)  # fmt: skip
        for repeat in range(args.repeats):
            for setup in setups if repeat % 2 == 0 else setups[::-1]:
                cpu = ForeignCpu(setups)
                result = run_load(setup.port, args.duration, args.clients,
                                  choose(args.seed + repeat), timeout=120, warmup=args.ramp,
                                  drain=args.drain, tag_header="X-Cache")  # fmt: skip
                busy, foreign = cpu.stop()
                machine_load.append((busy, foreign))
                results[setup.name].append(result)
                print(f"# {repeat + 1}/{args.repeats} {setup.name:<19} {result.goodput():6.1f}/s "
                      f"p50 {result.percentile_ms(50):7.1f} p95 {result.percentile_ms(95):7.1f} ms"
                      f" | hits {_hits(result):.0%} | errors {result.errors()} "
                      f"{result.statuses()} abandoned {result.abandoned} | CPU busy {busy:.2f} "
                      f"cores, not ours {foreign:.2f}, load {loadavg()}",
                      file=sys.stderr, flush=True)  # fmt: skip
    finally:
        for setup in setups:
            setup.stop()
        events = {s.name: pool_events(s.root / "pool.log") for s in setups
                  if isinstance(s, Fcgipool)}  # fmt: skip
        shutil.rmtree(root, ignore_errors=True)

    def med(name: str, metric) -> float:
        return statistics.median(metric(r) for r in results[name])

    rate = {s: med(s, lambda r: r.goodput()) for s in results}
    p50 = {s: med(s, lambda r: r.percentile_ms(50)) for s in results}
    p95 = {s: med(s, lambda r: r.percentile_ms(95)) for s in results}
    hits = {s: med(s, _hits) for s in results}
    errors = {s: sum(r.errors() + r.abandoned for r in results[s]) for s in results}
    busy = statistics.median(b for b, _ in machine_load)
    foreign = max(f for _, f in machine_load)
    spawn = rate["spawn-fcgi"]
    spread = "uniform" if not args.zipf else f"Zipf s={args.zipf:g}"

    print(f"Machine: {machine()}. {n} children (fault_app --cache-size {args.cache_size}), "
          f"{args.projects} projects ({spread}), a project load {args.load_ms:g} ms, a request "
          f"{args.sleep_ms:g} ms; {args.clients} closed-loop clients; runs of {args.duration:g} s "
          f"(after {args.ramp:g} s uncounted), interleaved, median of {args.repeats}. CPU busy "
          f"during runs: median {busy:.2f} cores; other work on the machine used at most "
          f"{foreign:.2f} cores during a run.\n")  # fmt: skip
    print(f"Command: `{command}`\n")
    print("| set-up | req/s | x spawn-fcgi | p50 ms | p95 ms | cache hits | errors |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in results:
        print(
            f"| {LABELS[name]} | {rate[name]:.1f} | {rate[name] / spawn:.2f} | "
            f"{p50[name]:.0f} | {p95[name]:.0f} | {hits[name]:.0%} | {errors[name]} |"
        )
    print()
    ratio = rate["fcgipool"] / spawn
    print(
        f"Goal, fcgipool with affinity >= 3x spawn-fcgi's throughput: "
        f"{'met' if ratio >= 3 else 'NOT met'} ({ratio:.2f}x)."
    )
    for name, counts in events.items():
        if counts:
            print(f"{LABELS[name]}, its log (warnings and errors): {counts}")


def _hits(result: LoadResult) -> float:
    tagged = [s for s in result.samples if s.tag]
    return sum(s.tag == "hit" for s in tagged) / len(tagged) if tagged else float("nan")


if __name__ == "__main__":
    main()
