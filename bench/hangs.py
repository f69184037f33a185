"""Scenario (e): goodput when 1 % of requests hang forever, the same 4 children behind each peer.

Children: tests/apps/fault_app.py, 4 of them; a normal request sleeps 100 ms (an I/O-bound
map request), a hanging one (``hang=1``) never answers. wrk -c16 with a Lua script that makes
each request hang with probability 1 % (case ``1% hangs``) or never (case ``no faults``).

What each peer can do about a hang: fcgipool answers 504 after its request timeout (0.5 s
here), cancels the child (0.2 s) and replaces it; its failure-pressure limit is raised out of
the way (every kill of a hung child counts as a failure and, by design, with 1 % of ~40
requests/s hanging the default limit would end the pool). spawn-fcgi+multiwatch and nginx
round-robin cannot see a request: the web server gives up on it after its read timeout, but
the child hangs on forever, so each hang costs one of the 4 children for good. Apache
mod_fcgid, as ``make_setups`` sets it up, gives up on a request after FcgidIOTimeout (120 s,
nginx's read timeout) and kills a busy child after FcgidBusyTimeout (an hour): within a run,
a hang costs it a child too.

Each repeat of a peer starts from fresh children (the set-up is stopped and started again,
then loaded without faults for a second and until all 4 children run: mod_fcgid starts them
on demand), runs ``no faults`` (which hangs no child), then ``1% hangs``; peers interleaved,
medians of the repeats. ``no faults`` runs last 4 s (a steady state: the figure does not
depend on the length); ``1% hangs`` runs 30 s: at ~40 requests/s that is about 12 hangs,
enough to take every child of a peer that cannot recover, at some point of the run. The
score depends on that length: longer runs only make such a peer look worse (a 60 s run of
issue 3's benchmark left spawn-fcgi with a fifth of its goodput).

Metrics: ``goodput`` (2xx answers per second), ``errors``, and on the ``1% hangs`` case
``kept_pct``: its goodput as a percentage of the same repeat's no-fault goodput.
Goal (issue 3): fcgipool keeps >= 90 %.
"""

from __future__ import annotations

import sys

import common
from results import Context, Row, interleaved, log, metric_rows, peer_setups, running, warm

KEY = "e"
NAME = "e-hangs"
TITLE = "1 % of requests hang forever (4 children, 100 ms per request)"
HEADLINE = [("goodput", "answers/s (2xx)"), ("kept_pct", "kept, % of no-fault goodput")]
WORKERS, CONNECTIONS = 4, 16
CASES = {"no faults": (0.0, 4.0), "1% hangs": (0.01, 30.0)}  # hang share, seconds per run
SETTINGS = {
    "timeouts": {"request": 0.5, "cancel": 0.2, "kill_grace": 0.5},
    "child": {"respawn_delay": 0.05},
    "pool": {"max_failure_pressure": 1000.0},
}
LUA = """
counter = 0
request = function()
  counter = counter + 1
  if math.random() < {share} then
    return wrk.format("GET", "/?hang=1&n=" .. counter)
  end
  return wrk.format("GET", "/?sleep=100&n=" .. counter)
end
"""


def estimate(ctx: Context) -> float:
    peers = sum(ctx.wants(p) for p in common.PEERS)
    seconds = sum(ctx.duration(s) + 0.3 for _, s in CASES.values()) + 4  # + restart, warm-up
    return peers * ctx.repeats * seconds


def run(ctx: Context) -> list[Row]:
    command = [sys.executable, str(common.FAULT_APP)]
    env = {"PATH": common.SAFE_PATH, "LANG": "C.UTF-8"}
    named = peer_setups(ctx, WORKERS, command, env, fcgipool_settings=SETTINGS)
    scripts = {}
    for case, (share, _) in CASES.items():
        scripts[case] = ctx.root / f"load-{share}.lua"
        scripts[case].write_text(LUA.replace("{share}", repr(share)))
    rows: list[Row] = []
    with running(setup for _, setup in named):
        for repeat, (peer, setup) in interleaved(named, ctx.repeats):
            if repeat:  # fresh children: no hung child left by the previous repeat
                setup.stop()
                setup.start()
            warm(setup, "/?sleep=100", WORKERS, CONNECTIONS, 1)
            goodput = {}
            for case, (_, seconds) in CASES.items():  # "no faults" first: it hangs no child
                result = common.run_wrk(
                    setup.url("/"), ctx.duration(seconds), CONNECTIONS, scripts[case], timeout=10
                )
                goodput[case] = result.goodput
                metrics = {"goodput": result.goodput, "errors": result.errors}
                if case != "no faults" and goodput["no faults"]:
                    metrics["kept_pct"] = 100 * result.goodput / goodput["no faults"]
                rows += metric_rows(NAME, case, peer, repeat, metrics)
                kept = f", kept {metrics['kept_pct']:.0f} %" if "kept_pct" in metrics else ""
                log(
                    f"{NAME} {repeat + 1}/{ctx.repeats} {case:<9} {peer:<22} {result.requests} "
                    f"requests, {result.errors} errors, goodput {result.goodput:5.1f}/s{kept}"
                )
    return rows
