"""(h) 1,000 idle keep-alive connections to the web server while it serves a load.

A *front-end connection* here is an HTTP client's connection to the web server (nginx in
front of fcgipool, spawn-fcgi+multiwatch and nginx-rr; Apache itself for mod_fcgid), as
browsers and map clients leave them open between requests. Each of the 1,000 sends one GET
(and reads its answer) first, so that the web server holds it as an idle keep-alive
connection; they stay open, silent, while wrk loads the same web server. What it costs the
web server and the manager to hold them, and whether it holds them at all, is the question.
(fcgipool's own front-end connections, FastCGI from the web server to the pool, stay few
here — nginx's upstream keepalive; 1,000 of those are scenario m.)

Children: 2 of the trivial libfcgi program bench/apps/hello.c and wrk -t1 -c8, as in
scenario (a), 5 s per run: the child costs almost nothing, so whatever holding the idle
connections costs the serving path shows in req/s and p99 (with QGIS it would drown in the
CPU of the maps).
Cases: ``idle=0`` and ``idle=1000``, run back to back on one peer, the peers interleaved.
The benchmark raises its RLIMIT_NOFILE (the web servers inherit it). An idle connection
whose first answer does not come within 15 s is closed and not counted.

Metrics per run: ``req_per_s``, ``p50_ms``, ``p99_ms``, ``errors`` (wrk's non-2xx and
socket errors), ``idle_kept`` (of the idle connections, how many were still open when wrk
ended: a web server may close idle connections early, e.g. at its keep-alive timeout or
connection limit), ``manager_rss_mib`` (the sum of the RSS of ``setup.manager_pids()``: the
pool; multiwatch; Apache's processes, which hold the connections too) and ``server_rss_mib``
(the manager plus nginx, where there is one: all that serves, but the children), both taken
when wrk ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource

import common
import psutil
import results
from memory import build_hello

KEY = "h"
NAME = "h-idle"
TITLE = "1,000 idle keep-alive front-end connections during a load (trivial C child)"
HEADLINE = [("req_per_s", "requests/s"), ("p99_ms", "p99 latency, ms"),
            ("idle_kept", "idle connections still open")]  # fmt: skip

WORKERS, CONNECTIONS, SECONDS = 2, 8, 5.0
IDLE = 1000
PATH = "/hello"
Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


def raise_nofile(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        top = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (top, hard))


async def _open_idle(port: int, count: int, timeout: float) -> list[Connection]:
    """``count`` connections that have each had one answer (those that got none in
    ``timeout`` s are closed and left out)."""
    request = f"GET {PATH}?idle=1 HTTP/1.1\r\nHost: localhost\r\n\r\n".encode()
    gate = asyncio.Semaphore(64)  # not 1,000 SYNs at once into a listen backlog

    async def one() -> Connection | None:
        writer = None
        try:
            async with gate:
                opening = asyncio.open_connection("127.0.0.1", port)
                reader, writer = await asyncio.wait_for(opening, timeout)
                writer.write(request)
                answer = common._read_response(reader, "")
                status, close, _ = await asyncio.wait_for(answer, timeout)
            if status == 200 and not close:
                return reader, writer
        except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError):
            pass
        if writer is not None:
            writer.close()
        return None

    return [c for c in await asyncio.gather(*(one() for _ in range(count))) if c is not None]


def still_open(reader: asyncio.StreamReader) -> bool:
    """Not closed by the server: no EOF, no reset (the loop has seen whatever came)."""
    return reader.exception() is None and not reader.at_eof()


def rss_mib(pids: set[int]) -> float:
    total = 0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            total += psutil.Process(pid).memory_info().rss
    return total / 2**20


def server_pids(setup: common.Setup) -> set[int]:
    """The manager's processes and nginx's (master and workers), if it has one."""
    pids = set(setup.manager_pids())
    nginx = getattr(setup, "nginx", None)
    if nginx is not None and nginx.poll() is None:
        with contextlib.suppress(psutil.Error):
            pids |= {nginx.pid, *(p.pid for p in psutil.Process(nginx.pid).children())}
    return pids


async def _measure(setup: common.Setup, idle: int, seconds: float) -> dict[str, float]:
    connections = await _open_idle(setup.port, idle, 15) if idle else []
    try:
        loop = asyncio.get_running_loop()
        url = setup.url(PATH)
        result = await loop.run_in_executor(None, common.run_wrk, url, seconds, CONNECTIONS)
        metrics = results.wrk_metrics(result)
        metrics["manager_rss_mib"] = rss_mib(setup.manager_pids())
        metrics["server_rss_mib"] = rss_mib(server_pids(setup))
        if idle:
            await asyncio.sleep(0.1)  # whatever the server sent them is seen
            metrics["idle_kept"] = sum(still_open(reader) for reader, _ in connections)
        return metrics
    finally:
        for _, writer in connections:
            writer.close()


def estimate(ctx: results.Context) -> float:
    peers = sum(ctx.wants(peer) for peer in common.PEERS)
    return peers * (ctx.repeats * 2 * (ctx.duration(SECONDS) + 1.5) + 4)


def run(ctx: results.Context) -> list[results.Row]:
    if not any(ctx.wants(peer) for peer in common.PEERS):
        return []
    raise_nofile(IDLE * 4 + 1024)
    command = [str(build_hello(ctx.root))]
    setups = results.peer_setups(ctx, WORKERS, command, {"PATH": common.SAFE_PATH})
    cases = {"idle=0": 0, f"idle={IDLE}": IDLE}
    rows = []
    with results.running(setup for _, setup in setups):
        for _, setup in setups:
            common.wait_http(setup.url(PATH))
            common.run_wrk(setup.url(PATH), 1 if ctx.quick else 2, CONNECTIONS)  # warm-up
        for repeat, (peer, setup) in results.interleaved(setups, ctx.repeats):
            for case, idle in cases.items():
                metrics = asyncio.run(_measure(setup, idle, ctx.duration(SECONDS)))
                rows += results.metric_rows(NAME, case, peer, repeat, metrics)
                kept = f"  idle kept {metrics['idle_kept']:.0f}" if idle else ""
                results.log(f"{NAME} {repeat + 1}/{ctx.repeats} {case:<9} {peer:<22} "
                            f"{metrics['req_per_s']:8.0f} req/s  p99 {metrics['p99_ms']:6.2f} ms"
                            f"  errors {metrics['errors']:.0f}{kept}  manager "
                            f"{metrics['manager_rss_mib']:.1f} MiB  server "
                            f"{metrics['server_rss_mib']:.1f} MiB")  # fmt: skip
    return rows
