"""Scenario (o): reload under load: what does the first request of each project cost on the
new children?

The question (issue 13, warm sets): a reload (SIGHUP: a new release, a new config) replaces
every child. A new QGIS child holds no project, so without help the first request of each
project on it pays the project's load: over a second for a big one. fcgipool's new child
loads, before it takes traffic, the projects its predecessor held (most requested first, at
most ``projects.memory``, within ``projects.warm_budget`` seconds of learned load time).
Does the first visitor of each project then see a warm child?

Projects (bench/changes.py's, in a directory per set-up): the slow project (heavy.qgs with
150,000 points: over a second to load) and 5 copies of demo.qgs. Children: 2 of
qgis_mapserv.fcgi. Load: bench/changes.py's open loop, RATE requests/s (Poisson, seeded),
20 % GetCapabilities of the slow project, the rest spread over the 5 demo copies, half
GetCapabilities, half a 256x256 GetMap: the children about 50-70 % busy. Each set-up
first has every project loaded on both children and 10 s of the mix, so that each child
holds them (affinity memory 100: a child remembers all 6). A run counts BEFORE (5 s) of
load, then reloads, and counts on for AFTER (20 s: the reload and well after it); 2 s
uncounted before.

Peers:

- ``fcgipool``: defaults (``projects.warm_budget = 30``): SIGHUP; each replacement is started,
  loads its predecessor's warm set and is ready before the child it replaces stops, one at a
  time (``pool.max_recycling = 1``);
- ``fcgipool warm_budget=0``: the same, but the new children should load no project before
  traffic (only pinned ones, and there are none), so that each pays its first request of
  each project (a project whose load time the pool has not learned counts as 1 s, above
  the budget of 0: nothing is carried; the first version counted it as free);
- ``spawn-fcgi+multiwatch``: the service's restart (stop, then start), for context: the
  socket is gone between the two (requests fail meanwhile) and every new child is cold.

Both fcgipool set-ups log at ``info``, as JSON (the access lines too), so that each answer
can be put to the child that served it: the access line's ``pid``.

Metrics, case ``after the reload`` (the requests of the count not answered before the reload
command: in flight at it, or sent in the AFTER s after it), ``slow project`` (its requests
among those) and ``before the reload`` (the requests answered before it): ``p50_ms``,
``p99_ms``, ``max_ms``, ``over_500ms`` (answers slower than 0.5 s), ``errors`` (non-2xx
answers, none within 60 s, abandoned). Case ``after the reload`` also has ``first_ms``: the
slowest *first* request of a project on a new child, over every project and new child: for
fcgipool, from the pool's access log (``ms``: the time in the pool, its queue included; the
first by start time per child pid and project); for spawn-fcgi, whose children cannot be
told apart from outside, the slowest of the first 2 successful answers per project after the
restart (2 children: each project's first request on each child, if they went to different
ones); for fcgipool also ``first_child_ms``, the same less each request's wait for a child
(the access line's ``wait_ms``): what the child itself took, a project load if it paid one;
and ``reload_s`` (from the command until no child of before is left). Each run's log line
gives, per new child and project, both times, the warm-set loads, and the CPU not the
benchmark's (changes.CpuUse). Case ``slow project`` has ``first_ms`` for the slow project
alone, and for fcgipool ``carried``: project loads of the warm sets (``project_loaded``
events with ``why = "inherited"``) in the run, over both new children.
"""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path

import changes
import common
from reload import Reload
from results import Context, Row, interleaved, log, metric_rows, running, settle

KEY = "o"
NAME = "o-carryover"
TITLE = "Reload under load: the first request of each project on the new children (2 children)"
HEADLINE = [
    ("first_ms", "slowest first request per project and child, ms"),
    ("first_child_ms", "the same, less its wait for a child, ms"),
    ("max_ms", "longest answer, ms"),
    ("over_500ms", "answers slower than 0.5 s"),
]
WORKERS = 2
COPIES = 5
BEFORE, AFTER, RAMP = 5.0, 20.0, 2.0  # seconds counted before / after the reload; uncounted
LONGEST = 60.0  # the reload thread gives up waiting for the old children after this
SEED = 17
DEFAULT, NO_CARRY, SPAWN = "fcgipool", "fcgipool warm_budget=0", common.PEERS[1]
VARIANTS = {DEFAULT: {}, NO_CARRY: {"projects": {"warm_budget": 0}}}
AFTER_CASE, SLOW_CASE, BEFORE_CASE = "after the reload", "slow project", "before the reload"


def first_requests_pool(
    lines: list[dict], old: set[int], since: float
) -> dict[tuple[int, str], tuple[float, float]]:
    """(new child's pid, project) → (ms, ms less its wait for a child) of its first request
    there (by start time), from the pool's JSON access lines of requests that started after
    ``since`` (a time.time())."""
    firsts: dict[tuple[int, str], tuple[float, tuple[float, float]]] = {}
    for line in lines:
        if line.get("event") != "access" or not line.get("pid") or line["pid"] in old:
            continue
        if line.get("status") != 200 or not line.get("project"):
            continue
        start = _epoch(line["timestamp"]) - line["ms"] / 1000
        if start < since:
            continue
        key = (line["pid"], line["project"])
        if key not in firsts or start < firsts[key][0]:
            firsts[key] = (start, (line["ms"], line["ms"] - line["wait_ms"]))
    return {key: times for key, (_, times) in firsts.items()}


def first_metrics(times) -> dict[str, float]:
    """``first_ms`` (the slowest of these first requests) and, where the pool's log tells,
    ``first_child_ms`` (the slowest of them less their wait for a child)."""
    times = list(times)
    metrics = {"first_ms": max((ms for ms, _ in times), default=math.nan)}
    service = [s for _, s in times if not math.isnan(s)]
    if service:
        metrics["first_child_ms"] = max(service)
    return metrics


def answered(sent: changes.Sent, hup: float) -> bool:
    """Whether the answer came before the reload command (``hup``, seconds into the count)."""
    return sent.at + sent.sample.latency < hup


def _epoch(stamp: str) -> float:
    """An access line's ISO UTC timestamp ("2026-12-01T23:04:43.123456Z") as time.time()."""
    import calendar

    whole, _, fraction = stamp.rstrip("Z").partition(".")
    seconds = calendar.timegm(time.strptime(whole, "%Y-%m-%dT%H:%M:%S"))
    return seconds + (float("0." + fraction) if fraction else 0.0)


def first_requests_client(
    run: changes.Run, hup: float, per_project: int = WORKERS
) -> dict[tuple[int, str], tuple[float, float]]:
    """(n, project) → (ms, NaN) of the n-th successful answer per project sent after ``hup``
    (seconds into the count), the first ``per_project`` of each project (the client's view,
    where the children cannot be told apart, nor the wait for one)."""
    firsts: dict[tuple[int, str], float] = {}
    counts: dict[str, int] = {}
    for sent in sorted(run.sent, key=lambda s: s.at):
        if sent.at < hup or not 200 <= sent.sample.status < 300:
            continue
        project = sent.sample.kind
        n = counts.get(project, 0)
        if n < per_project:
            firsts[(n, project)] = (sent.sample.latency * 1000, math.nan)
            counts[project] = n + 1
    return firsts


def estimate(ctx: Context) -> float:
    peers = sum(ctx.wants(p) for p in (*VARIANTS, SPAWN))
    if ctx.quick:
        return 15 + peers * (ctx.repeats * 10 + 8)
    run = BEFORE + AFTER + RAMP + 5  # + drain and settle
    return 10 + peers * (ctx.repeats * run + changes.WARM_MIX + 8)


def run(ctx: Context) -> list[Row]:
    (ctx.root / "home").mkdir(exist_ok=True)
    env = common.qgis_env(ctx.root / "home")
    quick = ctx.quick
    copies, points = (2, 20_000) if quick else (COPIES, changes.POINTS)
    data = changes.slow_points(ctx.root, points)
    named = changes.setups(ctx, env, data, copies, VARIANTS)
    before, after = (1.0, 4.0) if quick else (BEFORE, AFTER)
    ramp = 0.5 if quick else RAMP
    rows: list[Row] = []
    with running(setup for _, setup, _ in named):
        for peer, setup, projects in named:
            cold = changes.load_everywhere(setup, projects) * 1000
            changes.open_loop(
                setup,
                projects,
                1.0 if quick else changes.WARM_MIX,
                0,
                changes.RATE,
                SEED - 1,
                (),
                0,
                tagged(projects),
            )
            log(f"{NAME} {peer:<24} slow project's cold load {cold:.0f} ms")
        order = [(peer, (setup, projects)) for peer, setup, projects in named]
        for repeat, (peer, (setup, projects)) in interleaved(order, ctx.repeats):
            settle(setup.child_pids, timeout=15)
            cpu = changes.CpuUse([s for _, s, _ in named])
            since = changes.log_size(setup)
            old = setup.child_pids()
            reload = Reload(setup, ramp + before, LONGEST)
            reload.start()
            result = changes.open_loop(
                setup,
                projects,
                before + after,
                ramp,
                changes.RATE,
                SEED + repeat,
                (),
                0,
                tagged(projects),
            )
            busy, foreign = cpu.stop()
            reload.join(LONGEST + 30)
            if reload.error is not None:
                raise reload.error
            time.sleep(1.0)  # the pool writes its access log in batches
            hup = reload.done_at - reload.seconds - result.begin  # seconds into the count
            hup_epoch = time.time() - (time.monotonic() - (result.begin + hup))
            lines = changes.pool_log(setup, since)
            if isinstance(setup, common.Fcgipool):
                firsts = first_requests_pool(lines, old, hup_epoch)
            else:
                firsts = first_requests_client(result, hup)
            slow = str(projects.slow)
            windows = {
                AFTER_CASE: [s.sample for s in result.sent if not answered(s, hup)],
                SLOW_CASE: [
                    s.sample for s in result.sent if not answered(s, hup) and s.sample.kind == slow
                ],
                BEFORE_CASE: [s.sample for s in result.sent if answered(s, hup)],
            }
            parts = []
            for case, samples in windows.items():
                metrics = changes.latency_metrics(samples)
                if case == AFTER_CASE:
                    metrics["errors"] += result.abandoned
                    metrics.update(first_metrics(firsts.values()))
                    metrics["reload_s"] = reload.seconds
                if case == SLOW_CASE:
                    mine = [times for (_, project), times in firsts.items() if project == slow]
                    metrics.update(first_metrics(mine))
                    if isinstance(setup, common.Fcgipool):
                        metrics["carried"] = changes.count_events(
                            lines, "project_loaded", why="inherited"
                        )
                rows += metric_rows(NAME, case, peer, repeat, metrics)
                first = f", first {metrics['first_ms']:.0f}" if "first_ms" in metrics else ""
                parts.append(
                    f"{case}: p99 {metrics['p99_ms']:.0f} max {metrics['max_ms']:.0f} "
                    f"ms{first}, {metrics['over_500ms']} > 0.5 s, {metrics['errors']} "
                    "errors"
                )
            detail = ", ".join(
                f"{Path(project).stem}@{key}: {ms:.0f}"
                + ("" if math.isnan(service) else f" ({service:.0f} at the child)")
                for (key, project), (ms, service) in sorted(firsts.items())
            )
            loads = [
                f"{Path(line['project']).stem}@{line['pid']} {line['seconds']:.2f}s"
                for line in lines
                if line.get("event") == "project_loaded" and line.get("why") == "inherited"
            ]
            log(
                f"{NAME} {repeat + 1}/{ctx.repeats} {peer:<24} reload {reload.seconds:.1f} s, "
                f"{len(result.sent)} requests, CPU busy {busy:.2f} cores, not ours {foreign:.2f} | "
                + " | ".join(parts)
                + f" | first per (project@child) ms: {detail}"
                + (f" | warm sets: {', '.join(loads)}" if loads else "")
            )
    shutil.rmtree(ctx.root / "home", ignore_errors=True)
    return rows


def tagged(projects: changes.Projects) -> changes.Choose:
    """bench/changes.py's mix over these projects, each request's kind its project's path
    (so that answers can be told apart by project)."""
    choose = changes.chooser(projects)
    by_path = {}
    for project in projects.all:
        by_path[changes.capabilities_path(project)] = str(project)
        by_path[changes.getmap_path(project, changes.demo_bbox())] = str(project)

    def pick(rng):
        _, path = choose(rng)
        return by_path[path], path

    return pick
