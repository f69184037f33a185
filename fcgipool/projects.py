"""The projects the pool has seen: their version on disk, what they cost, warm sets.

A QGIS project can take seconds to minutes to load, and each child has its own cache. The
pool sees every request and knows which child served which project (``Child.projects``),
so it can tell operators what is loaded where (``fcgipool projects``), notice a changed
file (mtime, size and inode polled every ``projects.check_interval``: NFS works, and QGIS's
own watcher is not relied on), and give a child that replaces another the projects its
predecessor held, most requested first, before it takes traffic (a warm set). Acting on
children is children.py's; this module only keeps the facts and answers questions.
"""

from __future__ import annotations

import os
import statistics
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import Config

LOAD_WEIGHT = 0.3  # of the newest load in a project's learned load time (an EWMA)
MAX_PROJECTS = 10_000  # projects remembered; the least requested unheld ones go first
CHECK_BATCH = 512  # files stat()ed per check at most: a bound on the loop's time
UNKNOWN_LOAD = 1.0  # seconds a load is assumed to take until one is measured
RECENT = 32  # request durations kept per project, for its p90
Version = tuple[int, int, int]  # mtime_ns, size, inode


@dataclass(slots=True)
class Project:
    path: str
    version: Version | None = None  # as last seen on disk; None before, or when missing
    requests: int = 0
    seconds: float = 0.0  # total request time
    recent: deque[float] = field(default_factory=lambda: deque(maxlen=RECENT))
    loads: int = 0  # loads on a child: warm-ups, refreshes, requests to a child without it
    reloads: int = 0  # of those, because the file changed (or `projects refresh`)
    load_seconds: float = 0.0  # learned time of one load; 0 until measured
    load_total: float = 0.0
    dropped: bool = False  # `fcgipool projects drop`: no child is asked to hold it
    missing: bool = False  # the file is gone

    @property
    def mean(self) -> float:
        return self.seconds / self.requests if self.requests else 0.0

    def p90(self) -> float:
        if len(self.recent) < 2:
            return self.recent[0] if self.recent else 0.0
        return statistics.quantiles(self.recent, n=10)[-1]


def stat_version(path: str) -> Version | None:
    """The file's version, or None when it is not there (or not a file at all)."""
    try:
        info = os.stat(path)
    except (OSError, ValueError):
        return None
    return info.st_mtime_ns, info.st_size, info.st_ino


class Projects:
    """Every project the pool has seen, for one configuration."""

    def __init__(
        self,
        config: Config,
        clock: Callable[[], float],
        stat: Callable[[str], Version | None] = stat_version,
    ) -> None:
        self.clock = clock
        self.stat = stat
        self.by_path: dict[str, Project] = {}
        self.pins: dict[str, None] = {}  # pinned at run time, in order
        self.next_check = 0.0
        self._cursor = 0  # where the next batch of checks starts
        self.configure(config)

    def configure(self, config: Config) -> None:
        section = config.projects
        self.memory = section.memory
        self.check_interval = section.check_interval
        self.warm_budget = section.warm_budget
        self.configured = list(section.pinned)
        for path in self.configured:
            self.seen(path)

    # ------------------------------------------------------------------ facts

    def seen(self, path: str) -> Project:
        project = self.by_path.get(path)
        if project is None:
            if len(self.by_path) >= MAX_PROJECTS:
                self._forget_one()
            project = self.by_path[path] = Project(path)
            if not is_storage_uri(path):
                project.version = self.stat(path)
        return project

    def _forget_one(self) -> None:
        """Room for one more: the least requested project nobody pinned."""
        pinned = set(self.pinned())
        candidates = [p for p in self.by_path.values() if p.path not in pinned]
        if candidates:
            del self.by_path[min(candidates, key=lambda p: p.requests).path]

    def demand(self, path: str) -> int:
        """Requests seen for ``path`` (0 for a project never seen)."""
        project = self.by_path.get(path)
        return project.requests if project is not None else 0

    def requested(self, path: str) -> None:
        """A request for ``path`` went to a child."""
        self.seen(path).requests += 1

    def finished(self, path: str, seconds: float, cold: bool = False, cost: float = 0.0) -> None:
        """A child answered a request for ``path`` in ``seconds``; if it had to load the
        project first (``cold``), what it took beyond the request's predicted ``cost`` is
        the load time, learned until a warm-up measures it."""
        project = self.by_path.get(path)
        if project is not None:
            project.seconds += seconds
            project.recent.append(seconds)
            if cold and not project.load_seconds and seconds > cost:
                project.load_seconds = seconds - cost

    def load_estimate(self, path: str) -> float:
        """Seconds a child takes to load ``path``: learned, else UNKNOWN_LOAD."""
        project = self.by_path.get(path)
        return project.load_seconds or UNKNOWN_LOAD if project is not None else UNKNOWN_LOAD

    def loaded_by_request(self, path: str) -> None:
        """A request goes to a child that does not hold ``path``: it loads it (unless QGIS
        still has it cached beyond what the pool remembers), and the visitor waits."""
        self.seen(path).loads += 1

    def loaded(self, path: str, seconds: float, reload: bool = False) -> None:
        """A child loaded ``path`` (a warm-up, a refresh, or its first request there)."""
        project = self.seen(path)
        project.loads += 1
        project.reloads += reload
        project.load_total += seconds
        learned = project.load_seconds
        project.load_seconds = seconds if not learned else learned + LOAD_WEIGHT * (
            seconds - learned
        )

    def pinned(self) -> list[str]:
        """Projects every child loads before it takes traffic: the configured ones, then
        those `fcgipool projects warm` pinned."""
        return [*self.configured, *(path for path in self.pins if path not in self.configured)]

    def pin(self, path: str, pinned: bool) -> Project:
        """`fcgipool projects warm` pins, `unpin` unpins (until a restart)."""
        project = self.seen(path)
        project.dropped = project.dropped and not pinned
        if pinned:
            self.pins[path] = None
        else:
            self.pins.pop(path, None)
        return project

    # ------------------------------------------------------------------ warm sets

    def warm_set(self, held: Iterable[str]) -> list[str]:
        """What a child replacing one that held ``held`` loads before it takes traffic:
        those projects most requested first, at most ``projects.memory`` of them and as many
        as fit in ``projects.warm_budget`` seconds of learned load time (a project whose
        load time is unknown counts as UNKNOWN_LOAD; one alone above the budget is skipped).
        Pinned, dropped and missing projects are not in it (the pinned are loaded anyway).
        With nothing held (a child added by scaling), the pool's most requested projects."""
        pinned = set(self.pinned())
        candidates = [
            project
            for path in dict.fromkeys(held)
            if (project := self.by_path.get(path)) is not None
            and not (project.dropped or project.missing or path in pinned)
        ]
        if not candidates and not held:
            candidates = [
                p for p in self.by_path.values()
                if p.requests and not (p.dropped or p.missing or p.path in pinned)
            ]  # fmt: skip
        candidates.sort(key=lambda p: -p.requests)
        chosen: list[str] = []
        budget = self.warm_budget
        for project in candidates:
            if len(chosen) >= self.memory:
                break
            seconds = project.load_seconds or UNKNOWN_LOAD
            if seconds > budget:
                continue
            budget -= seconds
            chosen.append(project.path)
        return chosen

    # ------------------------------------------------------------------ change detection

    def due(self) -> bool:
        """Is it time for :meth:`check` (every ``check_interval``; 0 is never)?"""
        return bool(self.check_interval) and self.clock() >= self.next_check

    def check(self, held: set[str]) -> tuple[list[str], list[str]]:
        """Stat the files of the projects some child holds (and the pinned ones), at most
        CHECK_BATCH per call; returns (changed, gone)."""
        self.next_check = self.clock() + self.check_interval
        watched = sorted({*held, *self.pinned()})
        if len(watched) > CHECK_BATCH:
            start = self._cursor % len(watched)
            watched = (watched[start:] + watched[:start])[:CHECK_BATCH]
            self._cursor = start + CHECK_BATCH
        changed, gone = [], []
        for path in watched:
            if is_storage_uri(path):
                continue
            project = self.seen(path)
            version = self.stat(path)
            if version is None:
                if not project.missing:
                    project.missing = True
                    gone.append(path)
                continue
            if project.missing or (project.version is not None and version != project.version):
                changed.append(path)
            project.missing = False
            project.version = version
        return changed, gone

    # ------------------------------------------------------------------ views

    def rows(self, holders: dict[str, list[int]]) -> list[dict[str, Any]]:
        """Every project, most requested first, for `fcgipool projects`."""
        pinned = set(self.pinned())
        rows: list[dict[str, Any]] = []
        for project in sorted(self.by_path.values(), key=lambda p: (-p.requests, p.path)):
            version = project.version
            rows.append({
                "path": project.path,
                "version": version[0] / 1e9 if version else None,
                "size": version[1] if version else None,
                "missing": project.missing,
                "requests": project.requests,
                "mean_ms": round(project.mean * 1000, 1),
                "p90_ms": round(project.p90() * 1000, 1),
                "loads": project.loads,
                "reloads": project.reloads,
                "load_seconds": round(project.load_seconds, 3),
                "children": holders.get(project.path, []),
                "pinned": project.path in pinned,
                "dropped": project.dropped,
            })  # fmt: skip
        return rows


def is_storage_uri(path: str) -> bool:
    """A storage URI (postgresql:...) rather than a file: nothing to stat."""
    head, sep, _ = path.partition(":")
    return bool(sep) and "/" not in head and len(head) > 1
