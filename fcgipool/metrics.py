"""Prometheus metrics. Counters and histograms are updated per request (a few microseconds);
gauges are read from the pool only when scraped. Labels are bounded: status code, request
class, child state, restart reason."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily as CounterFamily
from prometheus_client.core import GaugeMetricFamily, Metric

if TYPE_CHECKING:
    from .supervisor import Pool

disable_created_metrics()  # *_created samples only add noise to a scrape

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    def __init__(self, pool: Pool) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "fcgipool_requests",
            "Requests answered, by HTTP status and request class.",
            ["code", "class"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "fcgipool_request_duration_seconds",
            "Time from the request's arrival to its end, queue wait included.",
            ["class"],
            buckets=BUCKETS,
            registry=self.registry,
        )
        self.queue_wait = Histogram(
            "fcgipool_queue_wait_seconds",
            "Time a request waited for a free child.",
            ["class"],
            buckets=BUCKETS,
            registry=self.registry,
        )
        self.response_bytes = Counter(
            "fcgipool_response_bytes",
            "FastCGI bytes relayed from children to the web server.",
            registry=self.registry,
        )
        self.registry.register(_PoolCollector(pool))
        self._cache: dict[tuple[int, str], object] = {}

    def observe(self, code: int, klass: str, duration: float, wait: float, size: int) -> None:
        key = (code, klass)
        counter = self._cache.get(key)
        if counter is None:
            counter = self._cache[key] = self.requests.labels(str(code), klass)
        counter.inc()  # type: ignore[attr-defined]
        self.duration.labels(klass).observe(duration)
        self.queue_wait.labels(klass).observe(wait)
        self.response_bytes.inc(size)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _PoolCollector:
    """Gauges read from the pool at scrape time."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        from .child import State

        pool = self.pool
        states = GaugeMetricFamily("fcgipool_children", "Children by state.", labels=["state"])
        counts = {state.value: 0 for state in State if state is not State.DEAD}
        for child in pool.children:
            if child.state is not State.DEAD:
                counts[child.state.value] += 1
        for state, count in counts.items():
            states.add_metric([state], count)
        yield states
        busy = counts["busy"]
        yield GaugeMetricFamily(
            "fcgipool_busy_ratio",
            "Busy children over configured workers (scale on this).",
            value=busy / max(1, pool.config.pool.workers),
        )
        yield GaugeMetricFamily(
            "fcgipool_workers", "Configured number of children.", value=pool.config.pool.workers
        )
        yield GaugeMetricFamily(
            "fcgipool_queue_length",
            "Requests waiting for a free child.",
            value=pool.dispatcher.waiting,
        )
        queues = GaugeMetricFamily(
            "fcgipool_class_queue_length", "Waiting requests by class.", labels=["class"]
        )
        running = GaugeMetricFamily(
            "fcgipool_class_running", "Requests being served by class.", labels=["class"]
        )
        limits = GaugeMetricFamily(
            "fcgipool_class_queue_limit", "Queue bound by class.", labels=["class"]
        )
        for queue in pool.dispatcher.by_priority:
            queues.add_metric([queue.name], len(queue.waiting))
            running.add_metric([queue.name], queue.running)
            limits.add_metric([queue.name], queue.max_waiting)
        yield queues
        yield running
        yield limits
        limit = pool.config.limits.max_waiting
        yield GaugeMetricFamily("fcgipool_queue_limit", "Bound of the queue.", value=limit)
        yield GaugeMetricFamily(
            "fcgipool_connections", "Open front-end connections.", value=len(pool.connections)
        )
        yield GaugeMetricFamily(
            "fcgipool_failure_pressure",
            "Failures within the window over workers; the pool exits above the limit.",
            value=pool.failure_pressure(),
        )
        yield GaugeMetricFamily(
            "fcgipool_failure_pressure_limit",
            "pool.max_failure_pressure.",
            value=pool.config.pool.max_failure_pressure,
        )
        restarts = CounterFamily(
            "fcgipool_child_restarts", "Children replaced, by reason.", labels=["reason"]
        )
        for reason, count in sorted(pool.restarts.items()):
            restarts.add_metric([reason], count)
        yield restarts
        rss = [child.rss() for child in pool.children if child.state is not State.DEAD]
        yield GaugeMetricFamily(
            "fcgipool_children_rss_bytes", "Resident memory of all children.", value=sum(rss)
        )
        yield GaugeMetricFamily(
            "fcgipool_child_rss_max_bytes",
            "Resident memory of the largest child.",
            value=max(rss, default=0),
        )
        yield GaugeMetricFamily(
            "fcgipool_uptime_seconds", "Seconds since the pool started.", value=pool.uptime()
        )
