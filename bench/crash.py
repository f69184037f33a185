"""(f) A child crash every 100 requests: how many of the clients' requests fail?

Children: 4 of tests/apps/fault_app.py with ``--crash-every 100`` (each process dies by
SIGSEGV at the start of its 100th request, before writing a byte; its replacement counts
from 0 again: a leaking or buggy program). Each request sleeps 20 ms (``/?sleep=20``). Every
peer runs the same children behind its own web server; runs alternate between the peers.

What each peer can do with the request that was on the dying child: fcgipool retries a GET
that died before its answer started on another child, so the client gets a 200;
spawn-fcgi+multiwatch and Apache mod_fcgid hand the web server a closed connection (502 /
500) while the manager forks a replacement; nginx-rr tries the next socket
(``fastcgi_next_upstream error``), but its passive health check (``max_fails=1
fail_timeout=10s``, nginx's defaults) also takes a socket out of the round for 10 s after a
failure, and when all of them are out nginx answers 502 at once ("no live upstreams").

Load: 16 paced clients (``paced_load``) on kept-alive HTTP/1.1 connections to the web server:
each sends a request, waits for its answer, and sends the next one 125 ms after the previous
was sent (or at once when the answer took longer). That offers at most 128 requests/s, about
2/3 of what the 4 children can serve, so the children crash about 1.3 times a second in all.
Pacing, not the usual closed loop: a closed-loop client that gets an error in 0.1 ms sends
its next request at once, so a peer that fails fast (nginx's "no live upstreams") would be
charged thousands of errors for a moment of outage. Here every client offers the same
requests to every peer, and the share that fails is what the users of a site would see.
Per run: 2 s uncounted, then the requests sent in the next 12 s count (also when their
answer comes after). Before the runs, 16 closed-loop clients for 1 s start every peer's
children (mod_fcgid spawns on demand).

fcgipool runs with ``child.respawn_delay = 0.05`` and ``pool.max_failure_pressure = 1000``:
its defaults (0.5 s first respawn delay; exit with code 3 above 2 failures a minute per
child) are meant for a program that cannot start, and would, by design, end the pool here
after a few seconds. Its readiness probe is a real request, so its children crash after 98
client requests instead of 99: the peers get about 1 % fewer crashes than fcgipool.

Metrics per run: ``error_pct`` (failed requests: answers other than 2xx, requests without an
answer — connection error, or none in 10 s — and requests still unanswered 10 s after the
window, over all requests sent; %), ``goodput`` (2xx answers per second: the offered rate
less the failures and less what a peer could not keep up with), ``p99_ms`` and ``max_ms``
(of all answers, errors included), ``crashes`` (children that answered a request of the
window and were gone at its end, by the X-Pid header: about the same for every peer, which
shows that the fault hit all alike).
"""

from __future__ import annotations

import asyncio
import math
import sys
from collections.abc import Callable

import results
from common import (
    FAULT_APP,
    PEERS,
    SAFE_PATH,
    LoadResult,
    Sample,
    Setup,
    _read_response,
    run_load,
    wait_http,
)

KEY = "f"
NAME = "f-crash"
TITLE = "A child crash every 100 requests"
HEADLINE = [("error_pct", "failed requests, %"), ("p99_ms", "p99 latency, ms")]

WORKERS = 4
CLIENTS = 16
SECONDS = 12.0  # counted per run
INTERVAL = 0.125  # seconds between two requests of one client (at least)
CRASH_EVERY = 100
PATH = "/?sleep=20"
CASE = f"crash every {CRASH_EVERY}"
FCGIPOOL_SETTINGS = {
    "child": {"respawn_delay": 0.05},
    "pool": {"max_failure_pressure": 1000.0},
}


# ---------------------------------------------------------------- a paced load client


async def _paced(port: int, duration: float, clients: int, choose: Callable[[], tuple[str, str]],
                 interval: float, warmup: float, timeout: float, drain: float, tag_header: str,
                 extend_while: Callable[[], bool] | None,
                 longest: float) -> LoadResult:  # fmt: skip
    loop = asyncio.get_running_loop()
    begin = loop.time() + warmup
    end = math.inf  # the window closes at begin + duration, or later with extend_while
    samples: list[Sample] = []

    async def close_window() -> None:
        nonlocal end
        await asyncio.sleep(warmup + duration)
        while extend_while is not None and extend_while() and loop.time() < begin + longest:
            await asyncio.sleep(0.05)
        end = loop.time()

    async def client(offset: float) -> None:
        reader = writer = None
        next_at = loop.time() + offset  # the clients' first requests spread over an interval
        try:
            while True:
                await asyncio.sleep(max(0.0, next_at - loop.time()))
                start = loop.time()
                if start >= end:
                    return
                next_at = start + interval
                kind, path = choose()
                request = f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode()
                for attempt in (0, 1):
                    reused = writer is not None
                    try:
                        if writer is None:
                            reader, writer = await asyncio.open_connection("127.0.0.1", port)
                        writer.write(request)
                        answer = _read_response(reader, tag_header)
                        status, close, tag = await asyncio.wait_for(answer, timeout)
                    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                            TimeoutError, ValueError) as error:  # fmt: skip
                        if writer is not None:
                            writer.close()
                        reader = writer = None
                        empty = isinstance(error, asyncio.IncompleteReadError) and not error.partial
                        if reused and attempt == 0 and empty:
                            continue  # the server had closed the idle connection: again
                        status, close, tag = 0, True, ""
                    if start >= begin:
                        samples.append(Sample(kind, loop.time() - start, status, tag))
                    if close and writer is not None:
                        writer.close()
                        reader = writer = None
                    break
        finally:
            if writer is not None:
                writer.close()

    tasks = [asyncio.create_task(client(i * interval / clients)) for i in range(clients)]
    await close_window()
    _, pending = await asyncio.wait(tasks, timeout=interval + drain)
    for task in pending:
        task.cancel()
    for outcome in await asyncio.gather(*tasks, return_exceptions=True):
        if isinstance(outcome, Exception):  # a bug here, not the server's failure
            raise outcome
    return LoadResult(end - begin, samples, len(pending))


def paced_load(port: int, duration: float, clients: int, choose: Callable[[], tuple[str, str]],
               interval: float, *, warmup: float = 0, timeout: float = 60, drain: float = 30,
               tag_header: str = "", extend_while: Callable[[], bool] | None = None,
               longest: float = 60) -> LoadResult:  # fmt: skip
    """Like common.run_load, but each client sends a request at most every ``interval``
    seconds (the next one ``interval`` after the previous was sent, or at once when its
    answer took longer), so a fast error does not make a client send more; and a request
    counts by when it was *sent*: every request sent in the window counts, also when its
    answer (or error) comes after the window closed. The window is the ``duration`` seconds
    after ``warmup``, kept open while ``extend_while()`` is true (``longest`` seconds at
    most). After it no request is sent; those still unanswered ``drain`` seconds later are
    abandoned (``abandoned``)."""
    return asyncio.run(_paced(port, duration, clients, choose, interval, warmup, timeout, drain,
                              tag_header.lower(), extend_while, longest))  # fmt: skip


def failed(load: LoadResult) -> int:
    """Answers other than 2xx, requests without an answer, requests abandoned."""
    return load.errors() + load.abandoned


def error_pct(load: LoadResult) -> float:
    return 100 * failed(load) / max(1, load.count() + load.abandoned)


def max_ms(load: LoadResult) -> float:
    return max((s.latency for s in load.samples), default=float("nan")) * 1000


# ---------------------------------------------------------------- the scenario


def crashes(load: LoadResult, setup: Setup) -> int:
    """Children that answered in the window and are gone at its end."""
    seen = {int(s.tag) for s in load.samples if s.tag.isdigit()}
    return len(seen - setup.child_pids())


def measure(setup: Setup, duration: float, warmup: float) -> LoadResult:
    return paced_load(setup.port, duration, CLIENTS, lambda: ("sleep", PATH), INTERVAL,
                      warmup=warmup, timeout=10, drain=10, tag_header="X-Pid")  # fmt: skip


def estimate(ctx: results.Context) -> float:
    peers = sum(ctx.wants(peer) for peer in PEERS)
    run = ctx.duration(SECONDS) + (0.5 if ctx.quick else 2) + 1
    return peers * (ctx.repeats * run + 4)


def run(ctx: results.Context) -> list[results.Row]:
    command = [sys.executable, str(FAULT_APP), "--crash-every", str(CRASH_EVERY)]
    env = {"PATH": SAFE_PATH, "LANG": "C.UTF-8"}
    setups = results.peer_setups(ctx, WORKERS, command, env, fcgipool_settings=FCGIPOOL_SETTINGS)
    duration, warmup = ctx.duration(SECONDS), (0.5 if ctx.quick else 2)
    rows = []
    with results.running(setup for _, setup in setups):
        for _, setup in setups:
            wait_http(setup.url(PATH))
            run_load(setup.port, 1, CLIENTS, lambda: ("sleep", PATH))  # warm-up: 16 at once
        for repeat, (peer, setup) in results.interleaved(setups, ctx.repeats):
            load = measure(setup, duration, warmup)
            metrics = {
                "error_pct": error_pct(load),
                "goodput": load.goodput(),
                "p99_ms": load.percentile_ms(99),
                "max_ms": max_ms(load),
                "crashes": crashes(load, setup),
            }
            rows += results.metric_rows(NAME, CASE, peer, repeat, metrics)
            results.log(f"{NAME} {repeat + 1}/{ctx.repeats} {peer:<22} failed "
                        f"{metrics['error_pct']:5.2f} %  goodput {metrics['goodput']:6.1f}/s  "
                        f"p99 {metrics['p99_ms']:6.1f} ms  max {metrics['max_ms']:6.0f} ms  "
                        f"crashes {metrics['crashes']}  answers {load.statuses()}  "
                        f"abandoned {load.abandoned}")  # fmt: skip
    return rows
