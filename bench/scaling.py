"""(i) Scaling with the number of children: light GetMap throughput for 1, 2, 4, 8, 16.

For each size (children=N, only those up to os.cpu_count(): a CPU-bound child cannot use
more cores than there are, and on a small machine more children only add contention), every
peer is started with N children of qgis_mapserv.fcgi (env common.qgis_env), warmed up (every
child has loaded demo.qgs), and loaded by wrk -t1 with 2N connections for 5 s per run on the
256x256 GetMap of demo.qgs (bench/core.py's request, tens of milliseconds of CPU): enough
clients to keep every child busy, few enough that the queue stays short. Runs alternate
between the peers; the peers are stopped before the next size is started, so that only N
children exist at a time. After each run the children are left to settle (results.settle).

The question: does a manager let throughput grow with the children up to the cores (the pool
in the data path is one more process competing for them), and what does it do to latency?
Metrics: ``req_per_s``, ``p50_ms``, ``p99_ms``, ``errors`` (wrk's non-2xx and socket errors).
Plot: req/s over the children, a line per peer.
"""

from __future__ import annotations

import dataclasses
import os

import common
import core
import results

KEY = "i"
NAME = "i-scaling"
TITLE = "Scaling: light GetMap (256x256) with 1 to 16 QGIS children"
HEADLINE = [("req_per_s", "requests/s"), ("p99_ms", "p99 latency, ms")]

SIZES = (1, 2, 4, 8, 16)
SECONDS = 5.0
CASE = "GetMap 256x256"


def sizes(ctx: results.Context) -> list[int]:
    """The sizes up to the cores (at least 1); a quick run takes the first two."""
    fitting = [n for n in SIZES if n <= (os.cpu_count() or 1)] or [1]
    return fitting[:2] if ctx.quick else fitting


def estimate(ctx: results.Context) -> float:
    peers = sum(ctx.wants(peer) for peer in common.PEERS)
    run = ctx.duration(SECONDS) + 1
    start = 4 if ctx.quick else 6  # start, wait, warm-up, settle; and a second per child
    return sum(peers * (ctx.repeats * run + start + n) for n in sizes(ctx))


def run(ctx: results.Context) -> list[results.Row]:
    path = core.qgis_paths()[CASE]
    rows = []
    for n in sizes(ctx):
        root = ctx.root / f"children-{n}"
        (root / "home").mkdir(parents=True, exist_ok=True)
        root.chmod(0o755)
        env = common.qgis_env(root / "home")
        setups = results.peer_setups(dataclasses.replace(ctx, root=root), n, [common.QGIS], env)
        case = f"children={n}"
        with results.running(setup for _, setup in setups):
            for _, setup in setups:
                common.wait_http(setup.url(path), timeout=120)
                common.run_wrk(setup.url(path), 1 if ctx.quick else 3, 2 * n)  # warm-up
                results.settle(setup.child_pids, timeout=15)
            for repeat, (peer, setup) in results.interleaved(setups, ctx.repeats):
                result = common.run_wrk(setup.url(path), ctx.duration(SECONDS), 2 * n)
                waited = results.settle(setup.child_pids, timeout=15)
                rows += results.metric_rows(NAME, case, peer, repeat, results.wrk_metrics(result))
                results.log(f"{NAME} {repeat + 1}/{ctx.repeats} {case:<11} {peer:<22} "
                            f"{result.requests_per_s:7.1f} req/s  p99 {result.p99_ms:7.1f} ms  "
                            f"errors {result.errors}  (settled in {waited:.1f} s)")  # fmt: skip
    return rows
