"""Prometheus metrics, made when scraped: from the counters accounting.py keeps per request
(prometheus_client's own Counter/Histogram cost ~8 us a request in labels(), locks and
bucket loops) and from gauges read through the pool's read-only view (status.PoolView).
Labels are bounded: status code, request class, child state, restart reason."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily as CounterFamily
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric

if TYPE_CHECKING:
    from .accounting import Accounting
    from .projects import Projects
    from .status import PoolView

# *_created samples only add noise to a scrape
disable_created_metrics()  # type: ignore[no-untyped-call]

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Histogram:
    """Counts per bucket (``le`` semantics: a value equal to a bound falls in it) and a sum."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)  # the last one: above every bound (+Inf)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(BUCKETS, value)] += 1
        self.total += value

    def cumulative(self) -> list[tuple[str, int]]:
        out, running = [], 0
        for bound, count in zip((*map(str, BUCKETS), "+Inf"), self.counts, strict=True):
            running += count
            out.append((bound, running))
        return out


class Metrics:
    """The registry of one pool: its requests' counters and its gauges."""

    def __init__(self, pool: PoolView) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_RequestCollector(pool))
        self.registry.register(_PoolCollector(pool))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _RequestCollector:
    """The per-request counters as Prometheus families, built at scrape time."""

    def __init__(self, pool: PoolView) -> None:
        self.pool = pool

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        metrics: Accounting = self.pool.accounting
        requests = CounterFamily(
            "fcgipool_requests",
            "Requests answered, by HTTP status and request class.",
            labels=["code", "class"],
        )
        for (code, klass), count in sorted(metrics.requests.items()):
            requests.add_metric([str(code), klass], count)
        yield requests
        for name, help_text, histograms in (
            (
                "fcgipool_request_duration_seconds",
                "Time from the request's arrival to its end, queue wait included.",
                metrics.duration,
            ),
            (
                "fcgipool_queue_wait_seconds",
                "Time a request waited for a free child.",
                metrics.queue_wait,
            ),
            (
                "fcgipool_request_cpu_seconds",
                "CPU time the child spent on a request it answered (log.request_cost).",
                metrics.cpu,
            ),
        ):
            family = HistogramMetricFamily(name, help_text, labels=["class"])
            for klass, histogram in sorted(histograms.items()):
                family.add_metric([klass], histogram.cumulative(), histogram.total)
            yield family
        yield CounterFamily(
            "fcgipool_response_bytes",
            "FastCGI bytes relayed from children to the web server.",
            value=metrics.response_bytes,
        )


class _PoolCollector:
    """Gauges read from the pool at scrape time."""

    def __init__(self, pool: PoolView) -> None:
        self.pool = pool

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        from .status import child_counts

        pool = self.pool
        children, dispatcher = pool.children, pool.dispatcher
        workers = children.workers
        states = GaugeMetricFamily("fcgipool_children", "Children by state.", labels=["state"])
        counts = child_counts(children)
        for state, count in counts.items():
            states.add_metric([state], count)
        yield states
        yield GaugeMetricFamily(
            "fcgipool_busy_ratio",
            "Busy children over configured workers (scale on this).",
            value=counts["busy"] / max(1, workers),
        )
        yield GaugeMetricFamily("fcgipool_workers", "Target number of children.", value=workers)
        yield GaugeMetricFamily(
            "fcgipool_min_workers", "Fewest children (pool.min_workers).", value=children.minimum
        )
        yield GaugeMetricFamily(
            "fcgipool_max_workers", "Most children (pool.max_workers).", value=children.maximum
        )
        scaled = CounterFamily(
            "fcgipool_scaled",
            "Children started or retired by the adaptive number of children.",
            labels=["action"],
        )
        for action in ("started", "retired"):
            scaled.add_metric([action], children.scaled[action])
        yield scaled
        yield GaugeMetricFamily(
            "fcgipool_queue_length", "Requests waiting for a free child.", value=dispatcher.waiting
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
        waits = GaugeMetricFamily(
            "fcgipool_class_predicted_wait_seconds",
            "Predicted wait of a new request of the class's mean learned cost.",
            labels=["class"],
        )
        predictions = dispatcher.predictions()
        for queue in dispatcher.by_priority:
            queues.add_metric([queue.name], len(queue))
            running.add_metric([queue.name], queue.running)
            limits.add_metric([queue.name], queue.max_waiting)
            waits.add_metric([queue.name], predictions[queue.name])
        yield queues
        yield running
        yield limits
        yield waits
        yield CounterFamily(
            "fcgipool_refused_predicted_wait",
            "Requests refused at once because their predicted wait was above queue_timeout.",
            value=dispatcher.refused,
        )
        for name, peak, what in (
            ("fcgipool_peak_waiting", dispatcher.peak_waiting, "Requests waiting"),
            ("fcgipool_peak_busy", dispatcher.peak_busy, "Busy children"),
        ):
            family = GaugeMetricFamily(
                name, f"{what} at the highest, since start or in the last 30-60 s.",
                labels=["window"],
            )
            family.add_metric(["since_start"], peak.ever)
            family.add_metric(["last_minute"], peak.lately)
            yield family
        yield CounterFamily(
            "fcgipool_slow_requests",
            "Requests reported running longer than timeouts.slow (slow_request lines).",
            value=pool.diagnostics.reported,
        )
        yield CounterFamily(
            "fcgipool_all_busy",
            "Times a request took the last idle child (every child busy after it).",
            value=dispatcher.all_busy,
        )
        yield CounterFamily(
            "fcgipool_queue_full",
            "Requests refused at once because their class's queue held max_waiting.",
            value=dispatcher.queue_full,
        )
        yield GaugeMetricFamily(
            "fcgipool_requests_held",
            "Requests waiting for a busy child that holds their project (hold_for_holder).",
            value=dispatcher.held_count,
        )
        yield CounterFamily(
            "fcgipool_holds",
            "Requests held for a busy child that holds their project, since start.",
            value=dispatcher.holds,
        )
        yield GaugeMetricFamily(
            "fcgipool_reserved_for_short",
            "Children kept free for short requests (learned; tuning.protect_short).",
            value=dispatcher.reserve() if dispatcher.protect else 0,
        )
        yield GaugeMetricFamily(
            "fcgipool_buffered_bytes",
            "Request bytes held for requests no child has taken yet (limits.max_buffered).",
            value=pool.frontend.context.buffered,
        )
        limit = pool.config.limits.max_waiting
        yield GaugeMetricFamily("fcgipool_queue_limit", "Bound of the queue.", value=limit)
        yield GaugeMetricFamily(
            "fcgipool_connections",
            "Open front-end connections.",
            value=len(pool.frontend.connections),
        )
        yield GaugeMetricFamily(
            "fcgipool_failure_pressure",
            "Failures within the window over workers; the pool exits above the limit.",
            value=children.failure_pressure(),
        )
        yield GaugeMetricFamily(
            "fcgipool_failure_pressure_limit",
            "pool.max_failure_pressure.",
            value=pool.config.pool.max_failure_pressure,
        )
        restarts = CounterFamily(
            "fcgipool_child_restarts", "Children replaced, by reason.", labels=["reason"]
        )
        for reason, count in sorted(pool.accounting.restarts.items()):
            restarts.add_metric([reason], count)
        yield restarts
        yield from _project_families(children.projects)
        rss = [children.rss(child) for child in children.all]
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


TOP_PROJECTS = 10  # projects with their own label; the rest are summed as "other"


def _project_families(projects: Projects) -> Iterator[Metric]:
    """Loads, reloads on change and load seconds per project: the TOP_PROJECTS most
    requested by path, the rest as project="other" (a bounded label set)."""
    ranked = sorted(projects.by_path.values(), key=lambda p: -p.requests)
    families = [
        CounterFamily("fcgipool_project_loads", "Project loads on a child (warm-ups, "
                      "refreshes, and requests to a child that lacked it).", labels=["project"]),
        CounterFamily("fcgipool_project_reloads", "Project loads because its file changed "
                      "(or `fcgipool projects refresh`).", labels=["project"]),
        CounterFamily("fcgipool_project_load_seconds", "Seconds children spent loading the "
                      "project before taking traffic (warm-ups, refreshes).", labels=["project"]),
    ]  # fmt: skip
    rest = [0.0, 0.0, 0.0]
    for rank, project in enumerate(ranked):
        values = (project.loads, project.reloads, project.load_total)
        if rank < TOP_PROJECTS:
            for family, value in zip(families, values, strict=True):
                family.add_metric([project.path], value)
        else:
            rest = [total + value for total, value in zip(rest, values, strict=True)]
    if len(ranked) > TOP_PROJECTS:
        for family, value in zip(families, rest, strict=True):
            family.add_metric(["other"], value)
    yield from families
