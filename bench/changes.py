"""Scenario (n): a slow project is updated under load: who pays its reload?

The question (issue 13, change detection): an operator publishes a new version of a
project that takes over a second to load, while the site is being used. QGIS Server 3.22
notices the changed file by itself and reloads it in the next request that names it, on
each child, so a visitor pays the load once per child (docs/projects.md, measured). The
pool stats the files its children hold every ``projects.check_interval`` (1 s) and brings
each child to the new version itself, one at a time; with the default fixed pool (every
child is the minimum) by a warmed replacement that loads what the old child held, the new
version included, before it takes traffic. Does that keep visitors from paying, and what
does it cost everybody else?

Projects, written for each set-up into a directory of its own (so that one peer's changes
never reach another's children): 20 copies of demo/project/demo.qgs (their layers point at
demo/project/data by absolute path; each has its own WMS title), and one slow project: a
copy of demo/project/heavy.qgs whose one layer is a GeoJSON of 150,000 points (generated in
the scenario's directory by demo/make_project.py's seeded generator, shared by the set-ups:
the data never changes, only the .qgs does). Its load takes over a second (``load_ms``
below, measured on each set-up: the first GetCapabilities of it, alone, on a child that has
served a demo copy before, so QGIS's own start-up is not in it: 1.2-1.9 s on these 2 cores);
a warm GetCapabilities of it takes 1-2 ms, a demo copy's 256x256 GetMap 35-50 ms.

Children: 2 of qgis_mapserv.fcgi (fcgipool's default ``workers``). Peers: ``fcgipool``
(defaults: change detection every 1 s, affinity memory 100, warm sets), ``fcgipool
check_interval=0`` (no change detection: QGIS alone reloads, on each child's next request
for it) and spawn-fcgi+multiwatch, the same 2 children on one shared socket. Both fcgipool
set-ups log at ``info`` and as JSON (common.Fcgipool logs warnings only, as text), so that
the pool's ``project_changed``, ``child_recycling`` (with its reason) and ``project_loaded``
events can be counted and each access line put to the child that served it (its ``pid``);
that adds a few lines per change and nothing per request but the format.

Load: open loop, Poisson arrivals at RATE requests/s, each on a kept-alive HTTP/1.1
connection of its own (one is opened when none is idle), so that requests go on arriving
while children are stalled, as a site's visitors do. 20 % are GetCapabilities of the slow
project; the rest go to a demo copy chosen uniformly, half GetCapabilities, half 256x256
GetMap of its districts, roads and sites (bench/core.py's light map). 4 to 8 closed-loop
clients got 113-121 answers/s of that mix from fcgipool's 2 children on these 2 cores, but
under open-loop load the children's own time per request is higher (a GetMap takes 45-90 ms
at the child, not 35: nginx, the pool and the client share the 2 cores): at 70 requests/s
the children were busy 1.2 to 2.0 s per second, too close to saturation. RATE = 50 keeps
them about 50-70 % busy: moderate load, where a stall shows as latency, not as a queue that
never drains. The sequence of requests and the arrival times come from a
seeded RNG, the same for every peer. A run counts SECONDS (90 s) after 3 s uncounted; the
slow project's file is changed at 10, 40 and 70 s into the count (its WMS title rewritten to
a new version; in place and by an atomic rename in turn). 20 s after each change (well after
any reload) 4 GetCapabilities of the slow project (2 at a time, outside the counted load)
check that the new title is served (``stale``: answers with an old title). Before the
runs, each set-up has every project loaded on both children (each request sent twice at
once) and 10 s of the load mix. Runs interleaved, medians of the repeats.

Metrics, case ``all requests`` (every request of the count) and ``slow project`` (its
requests only), and ``after a change`` (every request sent within 5 s after one of the three
changes): ``p50_ms``, ``p99_ms``, ``max_ms`` (latency of the answers), ``over_500ms``
(answers that took longer than 0.5 s: a visitor who paid a project load, or waited behind
one), ``errors`` (answers other than 2xx, no answer within 60 s, requests still unanswered
30 s after the count). Case ``slow project`` also has ``load_ms`` (its cold load on that
set-up), ``stale`` (see above) and, for fcgipool set-ups, ``reloads`` (the growth in the
run of ``fcgipool projects --json``'s ``reloads`` for the slow project: loads of it because
its file changed, by the pool or by a visitor's request after the pool noticed) and
``replaced`` (children recycled with reason ``project_changed`` during the run: warmed
replacements, from the pool's log). Each run's log line also gives the CPU the machine was
busy with, and how much of it was not the benchmark's (CpuUse): a run with much of the
latter was disturbed and should be run again.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import importlib.util
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import common
from core import demo_bbox
from results import Context, Row, interleaved, log, metric_rows, running, settle

KEY = "n"
NAME = "n-changes"
TITLE = "Project update under load: a 1.2 s project changed every 30 s, 21 projects, 2 children"
HEADLINE = [
    ("p99_ms", "p99 latency, ms"),
    ("max_ms", "longest answer, ms"),
    ("over_500ms", "answers slower than 0.5 s"),
]
WORKERS = 2
COPIES = 20  # demo copies
POINTS = 150_000  # points of the slow project's layer: >= 1 s to load on these 2 cores
SLOW_SHARE = 0.2  # of the requests
GETMAP_SHARE = 0.5  # of the demo copies' requests
RATE = 50.0  # requests/s, open loop: the children about 50-70 % busy (see above)
SECONDS = 90.0  # counted per run
RAMP = 3.0  # uncounted, per run
CHANGES = (10.0, 40.0, 70.0)  # seconds into the count
CHECK_AFTER = 20.0  # seconds after a change: the title probes
AFTER = 5.0  # seconds after a change that make the case "after a change"
SLOW_MS = 500.0  # an answer slower than this counts in over_500ms
WARM_MIX = 10.0  # seconds of the load mix per set-up before its first run
DRAIN, TIMEOUT = 30.0, 60.0
SEED = 13
DEFAULT, NO_CHECK, SPAWN = "fcgipool", "fcgipool check_interval=0", common.PEERS[1]
VARIANTS = {DEFAULT: {}, NO_CHECK: {"projects": {"check_interval": 0}}}
INFO_LOG = {"log": {"level": "info", "format": "json"}}
SLOW, DEMO_CAPS, DEMO_MAP = "slow GetCapabilities", "demo GetCapabilities", "demo GetMap"
TITLE_RE = re.compile(r'(<WMSServiceTitle type="QString">)[^<]*<')


# ---------------------------------------------------------------- projects


def _make_project_module():
    spec = importlib.util.spec_from_file_location(
        "make_project", common.REPO / "demo" / "make_project.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def slow_points(directory: Path, points: int) -> Path:
    """A GeoJSON of ``points`` clustered points (demo/make_project.py's generator, seeded:
    the same bytes every time) in ``directory``."""
    path = directory / f"slow_points_{points}.geojson"
    if not path.exists():
        make = _make_project_module()
        make.write_geojson(path, "heavy_points", make.make_heavy_points(points))
    return path


@dataclass
class Projects:
    """One set-up's projects: the slow one and the demo copies, absolute paths."""

    slow: Path
    demos: list[Path]
    version: int = 0  # of the slow project's title
    renames: int = 0

    @property
    def all(self) -> list[Path]:
        return [self.slow, *self.demos]

    def title(self) -> str:
        return f"slow project version {self.version}"

    def change(self, rename: bool) -> str:
        """Rewrite the slow project's WMS title to the next version, in place or by an
        atomic rename; the new title."""
        self.version += 1
        text = TITLE_RE.sub(rf"\g<1>{self.title()}<", self.slow.read_text(), count=1)
        if rename:
            temporary = self.slow.with_suffix(".qgs.tmp")
            temporary.write_text(text)
            os.rename(temporary, self.slow)
        else:
            with self.slow.open("w") as out:
                out.write(text)
        return self.title()


def make_projects(directory: Path, copies: int, data: Path) -> Projects:
    """``copies`` copies of demo.qgs and the slow copy of heavy.qgs (its layer: ``data``)
    in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    source = common.REPO / "demo" / "project"
    demo = (source / "demo.qgs").read_text().replace("./data/", f"{source / 'data'}/")
    demos = []
    for i in range(copies):
        path = directory / f"demo{i:02d}.qgs"
        path.write_text(TITLE_RE.sub(rf"\g<1>demo copy {i}<", demo, count=1))
        demos.append(path)
    heavy = (source / "heavy.qgs").read_text().replace("./data/heavy_points.geojson", str(data))
    slow = directory / "slow.qgs"
    projects = Projects(slow, demos)
    slow.write_text(TITLE_RE.sub(rf"\g<1>{projects.title()}<", heavy, count=1))
    return projects


def capabilities_path(project: Path) -> str:
    query = {
        "MAP": str(project),
        "SERVICE": "WMS",
        "VERSION": "1.3.0",
        "REQUEST": "GetCapabilities",
    }
    return "/ows?" + urllib.parse.urlencode(query)


def getmap_path(project: Path, bbox: str) -> str:
    query = {
        "MAP": str(project),
        "SERVICE": "WMS",
        "VERSION": "1.3.0",
        "REQUEST": "GetMap",
        "STYLES": "",
        "CRS": "EPSG:3857",
        "FORMAT": "image/png",
        "LAYERS": "districts,roads,sites",
        "BBOX": bbox,
        "WIDTH": "256",
        "HEIGHT": "256",
    }
    return "/ows?" + urllib.parse.urlencode(query)


Choose = Callable[[random.Random], tuple[str, str]]


def chooser(
    projects: Projects, slow_share: float = SLOW_SHARE, getmap_share: float = GETMAP_SHARE
) -> Choose:
    """(kind, path) of the next request, from the caller's RNG."""
    bbox = demo_bbox()
    slow = capabilities_path(projects.slow)
    caps = [capabilities_path(p) for p in projects.demos]
    maps = [getmap_path(p, bbox) for p in projects.demos]

    def choose(rng: random.Random) -> tuple[str, str]:
        if rng.random() < slow_share:
            return SLOW, slow
        i = rng.randrange(len(caps))
        return (DEMO_MAP, maps[i]) if rng.random() < getmap_share else (DEMO_CAPS, caps[i])

    return choose


def fetch(setup: common.Setup, path: str, timeout: float = TIMEOUT) -> tuple[float, int, str]:
    """(seconds, status, WMS title or "") of one request, outside any load."""
    started = time.monotonic()
    try:
        with urllib.request.urlopen(setup.url(path), timeout=timeout) as response:
            body, status = response.read(), response.status
    except urllib.error.HTTPError as error:
        body, status = error.read(), error.code
    except OSError:
        return time.monotonic() - started, 0, ""
    seconds = time.monotonic() - started
    title = re.search(rb"<Service>.*?<Title>([^<]*)</Title>", body, re.S)
    return seconds, status, title.group(1).decode() if title else ""


def in_pairs(setup: common.Setup, paths: list[str]) -> list[tuple[float, int, str]]:
    """Each path requested twice at once (so that each of 2 children gets one: the first
    goes to one, the second finds only the other idle), one path after the other."""
    answers = []
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        for path in paths:
            answers += list(pool.map(lambda p: fetch(setup, p), [path, path]))
    return answers


def load_everywhere(setup: common.Setup, projects: Projects) -> float:
    """Every project loaded on both children: the demo copies, then the slow one, once
    alone (timed: its cold load, on a child that has served a demo copy, so QGIS's own
    start is not in it) and then in pairs; the seconds of that first load."""
    common.wait_http(setup.url(capabilities_path(projects.demos[0])), timeout=120)
    bbox = demo_bbox()
    paths = [p for d in projects.demos for p in (capabilities_path(d), getmap_path(d, bbox))]
    for answer in in_pairs(setup, paths):
        if answer[1] != 200:
            raise RuntimeError(f"{setup.name}: a demo copy answered {answer[1]}")
    slow = capabilities_path(projects.slow)
    seconds, status, _ = fetch(setup, slow)
    answers = in_pairs(setup, [slow, slow])
    if status != 200 or any(code != 200 for _, code, _ in answers):
        raise RuntimeError(f"{setup.name}: the slow project answered {status}, {answers}")
    return seconds


# ---------------------------------------------------------------- fcgipool's own view


def pool_projects(setup: common.Setup) -> dict[str, dict]:
    """``fcgipool projects --json`` of a fcgipool set-up, by path ({} for another peer)."""
    if not isinstance(setup, common.Fcgipool):
        return {}
    control = setup.socket.with_suffix(".ctl")
    done = subprocess.run(
        [sys.executable, "-m", "fcgipool", "projects", "--control", str(control), "--json"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if done.returncode != 0:
        log(f"{setup.name}: fcgipool projects failed: {done.stderr.strip()[:300]}")
        return {}
    return {row["path"]: row for row in json.loads(done.stdout)}


def log_size(setup: common.Setup) -> int:
    path = setup.root / "pool.log"
    return path.stat().st_size if path.exists() else 0


def pool_log(setup: common.Setup, since: int) -> list[dict]:
    """The pool's JSON log lines (INFO_LOG) written after byte ``since``: access lines
    (``event`` "access") and events."""
    path = setup.root / "pool.log"
    if not path.exists():
        return []
    with path.open("rb") as source:
        source.seek(since)
        text = source.read().decode(errors="replace")
    lines = []
    for line in text.splitlines():
        with contextlib.suppress(ValueError):
            lines.append(json.loads(line))
    return lines


def count_events(lines: list[dict], event: str, **match: object) -> int:
    return sum(
        line.get("event") == event and all(line.get(k) == v for k, v in match.items())
        for line in lines
    )


class CpuUse:
    """common.ForeignCpu, but the CPU of children that ended during the run (reaped by a
    manager: its cutime + cstime grew) counts as ours: a pool that replaces children would
    otherwise be charged their CPU as another process's."""

    def __init__(self, setups: list[common.Setup]):
        self.setups = setups
        self.cpu = common.ForeignCpu(setups)
        self.t0 = time.monotonic()
        self.reaped0 = self._reaped()

    def _reaped(self) -> int:
        total = 0
        for setup in self.setups:
            for pid in setup.manager_pids():
                with contextlib.suppress(OSError, IndexError, ValueError):
                    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
                    total += int(fields[13]) + int(fields[14])
        return total

    def stop(self) -> tuple[float, float]:
        """(cores busy in all, cores used by processes not ours), averaged over the run."""
        busy, foreign = self.cpu.stop()
        ticks = (self._reaped() - self.reaped0) / os.sysconf("SC_CLK_TCK")
        return busy, max(0.0, foreign - ticks / (time.monotonic() - self.t0))


# ---------------------------------------------------------------- the load


@dataclass
class Sent:
    at: float  # seconds after the count began, when it was sent
    sample: common.Sample


@dataclass
class Run:
    sent: list[Sent] = field(default_factory=list)
    changes: list[float] = field(default_factory=list)  # seconds after the count began
    stale: int = 0  # probe answers with an old title
    probe_errors: int = 0
    abandoned: int = 0
    seconds: float = 0.0
    begin: float = 0.0  # time.monotonic() when the count began

    def samples(self, kind: str | None = None, near_change: float = 0.0) -> list[common.Sample]:
        out = []
        for sent in self.sent:
            if kind is not None and sent.sample.kind != kind:
                continue
            if near_change and not any(0 <= sent.at - c < near_change for c in self.changes):
                continue
            out.append(sent.sample)
        return out


def open_loop(
    setup: common.Setup,
    projects: Projects,
    seconds: float,
    ramp: float,
    rate: float,
    seed: int,
    changes: tuple[float, ...],
    check_after: float,
    choose: Callable[[random.Random], tuple[str, str]],
) -> Run:
    """Poisson arrivals at ``rate``/s for ``ramp`` + ``seconds``; the requests sent in the
    last ``seconds`` count. At each of ``changes`` (seconds into the count) the slow project
    changes (in place and by rename in turn, by ``projects.version``), and ``check_after``
    seconds later its title is probed."""
    run = Run(seconds=seconds)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        rng = random.Random(seed)
        connections = common._Connections(setup.port, TIMEOUT)
        begin = loop.time() + ramp
        end = begin + seconds
        run.begin = begin
        tasks: list[asyncio.Task] = []

        async def one(kind: str, path: str) -> None:
            at = loop.time() - begin
            sample = await connections.get(kind, path)
            if at >= 0:
                run.sent.append(Sent(at, sample))

        async def probe(title: str) -> None:
            answers = await asyncio.to_thread(
                in_pairs, setup, [capabilities_path(projects.slow)] * 2
            )
            run.stale += sum(status == 200 and got != title for _, status, got in answers)
            run.probe_errors += sum(status != 200 for _, status, _ in answers)

        async def changer() -> None:
            probes = []
            for offset in changes:
                await asyncio.sleep(max(0.0, begin + offset - loop.time()))
                run.changes.append(loop.time() - begin)
                title = projects.change(rename=bool(projects.version % 2))
                probes.append(asyncio.create_task(_later(check_after, probe(title))))
            await asyncio.gather(*probes)

        changing = asyncio.create_task(changer())
        at = loop.time()
        while True:
            at += rng.expovariate(rate)
            if at >= end:
                break
            await asyncio.sleep(max(0.0, at - loop.time()))
            tasks.append(asyncio.create_task(one(*choose(rng))))
        _, pending = await asyncio.wait(tasks, timeout=DRAIN) if tasks else (set(), set())
        for task in pending:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        run.abandoned = len(pending)
        await changing
        connections.close()

    asyncio.run(main())
    return run


async def _later(delay: float, coroutine) -> None:
    await asyncio.sleep(delay)
    await coroutine


def latency_metrics(samples: list[common.Sample]) -> dict[str, float]:
    result = common.LoadResult(1.0, samples)
    latencies = [s.latency * 1000 for s in samples]
    return {
        "p50_ms": result.percentile_ms(50),
        "p99_ms": result.percentile_ms(99),
        "max_ms": max(latencies, default=math.nan),
        "over_500ms": sum(ms > SLOW_MS for ms in latencies),
        "errors": result.errors(),
    }


# ---------------------------------------------------------------- the scenario


def setups(
    ctx: Context, env: dict[str, str], data: Path, copies: int,
    variants: dict[str, dict] | None = None,
) -> list[tuple[str, common.Setup, Projects]]:
    """(peer, set-up, its projects) for the peers ``ctx`` wants, each in a directory of its
    own: fcgipool with each of ``variants`` (VARIANTS by default), and spawn-fcgi."""
    named = []
    for i, (peer, settings) in enumerate((variants or VARIANTS).items()):
        if ctx.wants(peer):
            root = ctx.root / f"fcgipool{i}"
            (setup,) = common.make_setups(
                root,
                WORKERS,
                [common.QGIS],
                env,
                peers=["fcgipool"],
                fcgipool_settings={**INFO_LOG, **settings},
            )
            named.append((peer, setup, make_projects(root / "projects", copies, data)))
    if ctx.wants(SPAWN):
        root = ctx.root / "spawn"
        (setup,) = common.make_setups(root, WORKERS, [common.QGIS], env, peers=[SPAWN])
        named.append((SPAWN, setup, make_projects(root / "projects", copies, data)))
    return named


def estimate(ctx: Context) -> float:
    peers = sum(ctx.wants(p) for p in (*VARIANTS, SPAWN))
    if ctx.quick:
        return 20 + peers * (ctx.repeats * 8 + 10)
    run = SECONDS + RAMP + 4  # + drain and settle
    return 15 + peers * (ctx.repeats * run + WARM_MIX + 15)


def run(ctx: Context) -> list[Row]:
    (ctx.root / "home").mkdir(exist_ok=True)
    env = common.qgis_env(ctx.root / "home")
    quick = ctx.quick
    copies, points = (3, 20_000) if quick else (COPIES, POINTS)
    t0 = time.monotonic()
    data = slow_points(ctx.root, points)
    log(
        f"{NAME}: {points} points written in {time.monotonic() - t0:.1f} s "
        f"({data.stat().st_size / 2**20:.1f} MiB)"
    )
    named = setups(ctx, env, data, copies)
    seconds = ctx.duration(SECONDS)
    ramp = 0.5 if quick else RAMP
    changes = (0.5,) if quick else CHANGES
    check_after = 1.0 if quick else CHECK_AFTER
    rows: list[Row] = []
    loads: dict[str, float] = {}
    with running(setup for _, setup, _ in named):
        for peer, setup, projects in named:
            loads[peer] = load_everywhere(setup, projects) * 1000
            warm_s = 1.0 if quick else WARM_MIX
            open_loop(setup, projects, warm_s, 0, RATE, SEED - 1, (), 0, chooser(projects))
            row = pool_projects(setup).get(str(projects.slow), {})
            log(
                f"{NAME} {peer:<26} slow project's cold load {loads[peer]:.0f} ms"
                + (f" (pool's learned load_seconds {row['load_seconds']})" if row else "")
            )
        order = [(peer, (setup, projects)) for peer, setup, projects in named]
        for repeat, (peer, (setup, projects)) in interleaved(order, ctx.repeats):
            settle(setup.child_pids, timeout=15)
            cpu = CpuUse([s for _, s, _ in named])
            before = pool_projects(setup).get(str(projects.slow), {})
            since = log_size(setup)
            result = open_loop(
                setup,
                projects,
                seconds,
                ramp,
                RATE,
                SEED + repeat,
                changes,
                check_after,
                chooser(projects),
            )
            busy, foreign = cpu.stop()
            time.sleep(0.5)  # the pool writes its log in batches
            after = pool_projects(setup).get(str(projects.slow), {})
            events = pool_log(setup, since)
            cases = {
                "all requests": result.samples(),
                "slow project": result.samples(SLOW),
                "after a change": result.samples(near_change=AFTER),
            }
            parts = []
            for case, samples in cases.items():
                metrics = latency_metrics(samples)
                if case == "all requests":
                    metrics["errors"] += result.abandoned
                if case == "slow project":
                    metrics["load_ms"] = loads[peer]
                    metrics["stale"] = result.stale + result.probe_errors
                    if isinstance(setup, common.Fcgipool):
                        metrics["reloads"] = after.get("reloads", math.nan) - before.get(
                            "reloads", math.nan
                        )
                        metrics["replaced"] = count_events(
                            events, "child_recycling", reason="project_changed"
                        )
                rows += metric_rows(NAME, case, peer, repeat, metrics)
                parts.append(
                    f"{case} p50 {metrics['p50_ms']:.0f} p99 {metrics['p99_ms']:.0f} "
                    f"max {metrics['max_ms']:.0f} ms, {metrics['over_500ms']} > 0.5 s, "
                    f"{metrics['errors']} errors"
                )
            extra = ""
            if isinstance(setup, common.Fcgipool):
                grown = metrics_delta(before, after)
                extra = (
                    f" | pool: reloads {after.get('reloads')} (+{grown}),"
                    f" loads {after.get('loads')}, project_changed "
                    f"{count_events(events, 'project_changed')}, replaced "
                    f"{count_events(events, 'child_recycling', reason='project_changed')}"
                )
            log(
                f"{NAME} {repeat + 1}/{ctx.repeats} {peer:<26} {len(result.sent)} requests, "
                f"stale {result.stale}, probe errors {result.probe_errors}, abandoned "
                f"{result.abandoned} | CPU busy {busy:.2f} cores, not ours {foreign:.2f} | "
                + " | ".join(parts)
                + extra
            )
        for peer, setup, projects in named:
            row = pool_projects(setup).get(str(projects.slow))
            if row:
                log(
                    f"{NAME} {peer}: fcgipool projects --json, slow project at the end: "
                    + json.dumps(
                        {
                            k: row[k]
                            for k in (
                                "requests",
                                "loads",
                                "reloads",
                                "load_seconds",
                                "children",
                                "mean_ms",
                                "p90_ms",
                            )
                        }
                    )
                )
    shutil.rmtree(ctx.root / "home", ignore_errors=True)
    return rows


def metrics_delta(before: dict, after: dict) -> object:
    if "reloads" in before and "reloads" in after:
        return after["reloads"] - before["reloads"]
    return "?"
