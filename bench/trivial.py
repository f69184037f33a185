"""Scenario (a): a trivial C FastCGI child, the worst case for a manager in the data path.

The child is bench/apps/hello.c (libfcgi, answers one line; built here with gcc): it costs
almost nothing, so whatever a manager spends per request shows. Every peer runs 2 of them,
behind its own web server as ``common.make_setups`` sets it up: fcgipool behind nginx's
keepalive upstream; spawn-fcgi+multiwatch, 2 children on one shared socket, nginx opening a
connection per request; nginx round-robin over one single-child socket per child; Apache with
mod_fcgid, Apache itself the web server (no nginx in front). wrk -t1 -c8 loads each for 8 s
per run, runs interleaved, medians of the repeats.

Metrics: ``req_per_s``, ``p50_ms``, ``p99_ms`` and ``errors`` (non-2xx answers and socket
errors) from wrk; for fcgipool also ``cpu_us_per_request``: the pool process's user + system
CPU time over the run divided by the requests wrk counted. The other managers are not in the
data path (spawn-fcgi, multiwatch) or are the web server itself (Apache), so they have no such
figure. Goals (issue 6): >= 0.6x spawn-fcgi's requests/s, <= 40 µs of pool CPU per request.
"""

from __future__ import annotations

import common
from memory import build_hello
from results import (
    Context,
    Row,
    interleaved,
    log,
    metric_rows,
    peer_setups,
    running,
    warm,
    wrk_metrics,
    wrk_with_cpu,
)

KEY = "a"
NAME = "a-trivial"
TITLE = "Trivial C FastCGI child (worst case for a proxy)"
HEADLINE = [
    ("req_per_s", "requests/s"),
    ("p99_ms", "p99 latency, ms"),
    ("cpu_us_per_request", "pool CPU per request, µs"),
]
WORKERS, CONNECTIONS, SECONDS = 2, 8, 8.0


def estimate(ctx: Context) -> float:
    """Seconds the scenario takes, for the suite's estimate."""
    peers = sum(ctx.wants(p) for p in common.PEERS)
    return peers * (ctx.repeats * (ctx.duration(SECONDS) + 0.3) + (1.7 if ctx.quick else 2.7))


def run(ctx: Context) -> list[Row]:
    if not any(ctx.wants(p) for p in common.PEERS):
        return []
    command = [str(build_hello(ctx.root))]
    named = peer_setups(ctx, WORKERS, command, {"PATH": common.SAFE_PATH})
    rows: list[Row] = []
    with running(setup for _, setup in named):
        for _, setup in named:
            warm(setup, "/x", WORKERS, CONNECTIONS, 1 if ctx.quick else 2)
        for repeat, (peer, setup) in interleaved(named, ctx.repeats):
            pool = setup.manager_pids() if peer == "fcgipool" else set()
            result, used = wrk_with_cpu(setup.url("/x"), ctx.duration(SECONDS), CONNECTIONS, pool)
            metrics = wrk_metrics(result)
            if pool:
                metrics["cpu_us_per_request"] = used
            rows += metric_rows(NAME, "hello", peer, repeat, metrics)
            cpu = metrics.get("cpu_us_per_request")
            log(f"{NAME} {repeat + 1}/{ctx.repeats} {peer:<22} {result.requests_per_s:8.0f}"
                f" req/s p99 {result.p99_ms:6.2f} ms errors {result.errors}"
                + (f" pool CPU {cpu:.0f} µs/request" if cpu is not None else ""))  # fmt: skip
    return rows
