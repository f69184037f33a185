"""(g) Reload under load: does replacing every child (a new release) fail or stall requests?

Children: 4 of qgis_mapserv.fcgi (env common.qgis_env) serving demo/project/demo.qgs.
Each run loads one peer and, a third of the way into its counted window, calls the peer's
``reload()`` once, from a thread so that the load goes on meanwhile: the operator's way to
put a new release in, under load:

- fcgipool: SIGHUP (``fcgipool reload``): a replacement is started and ready before the
  child it replaces stops, one child at a time (``pool.max_recycling = 1``);
- spawn-fcgi+multiwatch: the service's restart (stop, then start): the socket is gone
  between the two, and the new children start cold;
- nginx-rr: a rolling restart of the instances, one after the other (``systemctl restart
  qgis-server@i``): requests queue on each socket while its child is replaced;
- apache-mod_fcgid: ``apachectl graceful``: a new generation; mod_fcgid ends the old
  children and spawns new ones on demand.

Load: 16 paced clients (crash.paced_load): each sends a request at most every 0.4 s,
alternately a GetCapabilities and a 256x256 GetMap of demo.qgs (bench/core.py's requests):
at most 40 requests/s, about half of what the 2 cores can render, so a peer has the CPU to
start its new children: what is measured is the reload, not the saturation. Paced, not a
closed loop, so that a peer whose requests fail at once is not charged for more requests
than the others (see crash.py). The counted window (after 1 s uncounted) lasts 10 s, and
longer while the reload is not done (no child of before left) and 1 s after (40 s at
most), so that every peer's whole reload is in it; a request counts when it was sent in the
window, also if its answer comes later. Before each run, 16 closed-loop clients for 1 s
make sure the peer has its 4 children up and each has loaded the project (mod_fcgid spawns
on demand), then the machine is left to settle.

Metrics per run: ``errors`` (failed requests: answers other than 2xx, no answer within
30 s, connection errors, and requests still unanswered 30 s after the window),
``error_pct`` (of all requests sent), ``goodput`` (2xx answers/s), ``p99_ms`` and
``max_ms`` (latency of all answers; ``max_ms`` is the longest stall a client saw),
``reload_s`` (seconds from the reload command until no child of before was left: when a
new child is ready, for fcgipool; when the old ones are killed, for the others),
``replaced_pct`` (children of before gone when the window closed: 100 unless the reload
took over 40 s).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from functools import partial

import common
import core
import results
from crash import error_pct, failed, max_ms, paced_load

KEY = "g"
NAME = "g-reload"
TITLE = "Reload under load (4 QGIS children)"
HEADLINE = [("errors", "failed requests in one reload"), ("max_ms", "longest answer, ms")]

WORKERS = 4
CLIENTS = 16
INTERVAL = 0.4  # seconds between two requests of one client (at least)
SECONDS = 10.0  # counted per run, at least: the reload comes after a third of it
TAIL = 1.0  # the window goes on until this long after the reload is done
LONGEST = 40.0  # seconds a window lasts at most
WARMUP = 1.0  # uncounted, per run
CASE = "one reload"
KINDS = ("GetCapabilities", "GetMap 256x256")


class Reload(threading.Thread):
    """``setup.reload()`` after ``delay`` seconds; ``seconds``: how long until no child of
    before was left (at most ``limit``)."""

    def __init__(self, setup: common.Setup, delay: float, limit: float):
        super().__init__(daemon=True)
        self.setup, self.delay, self.limit = setup, delay, limit
        self.old = setup.child_pids()
        self.seconds = float("nan")
        self.done_at: float | None = None  # time.monotonic() when it was done
        self.error: Exception | None = None

    def run(self) -> None:
        time.sleep(self.delay)
        start = time.monotonic()
        try:
            self.setup.reload()
            while self.old & self.setup.child_pids() and time.monotonic() - start < self.limit:
                time.sleep(0.1)
        except Exception as error:  # re-raised by the caller
            self.error = error
        self.done_at = time.monotonic()
        self.seconds = self.done_at - start

    def running(self, after: float) -> bool:
        """Whether the reload is not done yet, or was done less than ``after`` s ago."""
        return self.done_at is None or time.monotonic() < self.done_at + after


def paths() -> dict[str, str]:
    return {kind: path for kind, path in core.qgis_paths().items() if kind in KINDS}


def chooser() -> Callable[[], tuple[str, str]]:
    """GetCapabilities and GetMap 256x256 in turn."""
    kinds = itertools.cycle(KINDS)
    urls = paths()

    def choose() -> tuple[str, str]:
        kind = next(kinds)
        return kind, urls[kind]

    return choose


def estimate(ctx: results.Context) -> float:
    peers = sum(ctx.wants(peer) for peer in common.PEERS)
    run = ctx.duration(SECONDS) + (0.5 if ctx.quick else WARMUP) + 4  # warm-up, settle, drain
    rolling = 1 if ctx.quick else 8  # fcgipool's window goes on until its reload is done
    return peers * (ctx.repeats * run + 8) + ctx.repeats * rolling


def run(ctx: results.Context) -> list[results.Row]:
    (ctx.root / "home").mkdir(exist_ok=True)
    env = common.qgis_env(ctx.root / "home")
    setups = results.peer_setups(ctx, WORKERS, [common.QGIS], env)
    duration, warmup = ctx.duration(SECONDS), (0.5 if ctx.quick else WARMUP)
    longest = duration + 1 if ctx.quick else LONGEST  # quick: the reload may not be done
    rows = []
    with results.running(setup for _, setup in setups):
        for _, setup in setups:
            for path in paths().values():
                common.wait_http(setup.url(path), timeout=120)
        for repeat, (peer, setup) in results.interleaved(setups, ctx.repeats):
            common.run_load(setup.port, 0.5 if ctx.quick else 1, CLIENTS, chooser())  # warm-up
            results.settle(setup.child_pids, timeout=15)
            reload = Reload(setup, warmup + duration / 3, longest)
            reload.start()
            load = paced_load(setup.port, duration, CLIENTS, chooser(), INTERVAL, warmup=warmup,
                              timeout=30, drain=30, longest=longest,
                              extend_while=partial(reload.running, TAIL))  # fmt: skip
            left = reload.old & setup.child_pids()
            reload.join(longest + 30)
            if reload.error is not None:
                raise reload.error
            metrics = {
                "errors": failed(load),
                "error_pct": error_pct(load),
                "goodput": load.goodput(),
                "p99_ms": load.percentile_ms(99),
                "max_ms": max_ms(load),
                "replaced_pct": 100 * (1 - len(left) / max(1, len(reload.old))),
                "reload_s": reload.seconds,
            }
            rows += results.metric_rows(NAME, CASE, peer, repeat, metrics)
            results.log(f"{NAME} {repeat + 1}/{ctx.repeats} {peer:<22} failed "
                        f"{metrics['errors']} ({metrics['error_pct']:.2f} %)  goodput "
                        f"{metrics['goodput']:5.1f}/s  p99 {metrics['p99_ms']:6.0f} ms  max "
                        f"{metrics['max_ms']:6.0f} ms  replaced {metrics['replaced_pct']:.0f} % "
                        f"(all in {reload.seconds:.1f} s)  answers {load.statuses()}")  # fmt: skip
    return rows
