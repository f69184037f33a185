"""The read-only view of the pool, and the status document made from it.

The status document (``snapshot``) is a public contract, documented in docs/status.md:
fields are added, never renamed or removed. It is what `fcgipool status --json` prints,
what admin.status_path and the HTTP /status.json answer; metrics.py reads the same view.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Protocol

from . import __version__
from .child import State
from .children import START_SECONDS

if TYPE_CHECKING:
    from .accounting import Accounting
    from .children import Children
    from .config import Config
    from .diagnostics import Diagnostics
    from .dispatch import Dispatcher
    from .frontend import Frontend
    from .scaling import Autoscaler

STATUS_VERSION = 1


class PoolView(Protocol):
    """What status and metrics read of the pool (the supervisor is one)."""

    @property
    def config(self) -> Config: ...
    @property
    def config_path(self) -> str | None: ...
    @property
    def children(self) -> Children: ...
    @property
    def dispatcher(self) -> Dispatcher: ...
    @property
    def accounting(self) -> Accounting: ...
    @property
    def frontend(self) -> Frontend: ...
    @property
    def diagnostics(self) -> Diagnostics: ...
    @property
    def autoscaler(self) -> Autoscaler: ...
    @property
    def reloads(self) -> int: ...
    @property
    def stopping(self) -> bool: ...
    @property
    def state(self) -> str:
        """The pool's Lifecycle, by name."""

    def now(self) -> float: ...
    def uptime(self) -> float: ...
    def readiness(self) -> tuple[bool, str]: ...
    def memory_cap(self) -> dict[str, object]: ...


def child_counts(children: Children) -> dict[str, int]:
    counts = {state.value: 0 for state in State if state is not State.DEAD}
    for child in children.all:
        if child.state is not State.DEAD:
            counts[child.state.value] += 1
    return counts


def scaling(pool: PoolView) -> dict[str, Any]:
    """The adaptive number of children: its decisions and what it has learned."""
    children = pool.children
    last = children.last_scaling
    if last is not None:
        at = float(last["at"])  # type: ignore[arg-type]
        last = {**last, "at": round(pool.uptime() - (pool.now() - at), 3)}
    learned = children.start_seconds
    scaler = pool.autoscaler
    share, trial, rate = scaler.share, scaler.trial, scaler.throughput.rate()
    tried = None
    if trial is not None:
        tried = {"rate_before": round(trial.rate_before, 2), "workers": trial.size,
                 "seconds": round(pool.now() - trial.at, 3), "parked": trial.parked,
                 "rate_with": round(trial.rate(True), 2),
                 "rate_without": round(trial.rate(False), 2)}  # fmt: skip
    return {
        "last": last,
        "started": children.scaled["started"],
        "retired": children.scaled["retired"],
        "start_seconds": round(START_SECONDS if learned is None else learned, 3),
        "held_by_cpu": scaler.held_by_cpu,
        "cpu_share": None if share is None else round(share, 3),
        "rate": None if rate is None else round(rate, 2),
        "trial": tried,
        "trials": dict(scaler.trials),
        "next_trial_in": round(max(0.0, scaler.next_trial_at - pool.now()), 3),
    }


def snapshot(pool: PoolView) -> dict[str, Any]:
    """The pool and one row per child, as `fcgipool status --json` prints it."""
    now = pool.now()
    children = pool.children
    rows = []
    for child in children.all:
        if child.state is State.DEAD:
            continue
        request = child.request
        rows.append(
            {
                "pid": child.pid,
                "state": child.state.value,
                "requests": child.requests_served,
                "request": None
                if request is None
                else {
                    "method": request.params.get(b"REQUEST_METHOD", b"").decode("latin-1"),
                    "uri": request.uri,
                    "elapsed": round(now - (request.started or now), 3),
                    "state": request.state.value,
                },
                "rss": children.rss(child),
                "cpu_percent": children.cpu_percent(child),
                "age": round(now - child.started_at, 3),
                "retiring": child.retiring or None,
                "last_request": None if child.last_cost is None else {
                    "cpu_ms": child.last_cost[0], "rss_mib": child.last_cost[1]},
                "projects": list(child.projects),
                "stale": sorted(child.stale),
            }
        )
    dispatcher = pool.dispatcher
    waits = dispatcher.predictions()
    return {
        "version": STATUS_VERSION,
        "pool": {
            "pid": os.getpid(),
            "fcgipool": __version__,
            "uptime": round(pool.uptime(), 3),
            "generation": pool.reloads,
            "config_file": pool.config_path,
            "workers": children.workers,
            "min_workers": children.minimum,
            "max_workers": children.maximum,
            "scaling": scaling(pool),
            "children": child_counts(children),
            "queue_length": dispatcher.waiting,
            "classes": {
                queue.name: {
                    "waiting": len(queue),
                    "running": queue.running,
                    "predicted_wait": round(waits[queue.name], 3),
                }
                for queue in dispatcher.by_priority
            },
            "refused_predicted_wait": dispatcher.refused,
            "held": {"now": dispatcher.held_count, "since_start": dispatcher.holds},
            "peaks": dispatcher.peaks(),
            "slow_requests": pool.diagnostics.reported,
            "reserved_for_short": dispatcher.reserve() if dispatcher.protect else 0,
            "buffered_bytes": pool.frontend.context.buffered,
            "max_waiting": pool.config.limits.max_waiting,
            "connections": len(pool.frontend.connections),
            "requests_served": pool.accounting.requests_served,
            "restarts": dict(pool.accounting.restarts),
            "memory_cap": pool.memory_cap(),
            "failure_pressure": round(children.failure_pressure(), 4),
            "max_failure_pressure": pool.config.pool.max_failure_pressure,
            "stopping": pool.stopping,
            "ready": pool.readiness()[0],
            "state": pool.state,
        },
        "children": rows,
        "costs": dispatcher.costs.rows(),
    }
