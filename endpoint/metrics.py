"""GET /metrics: the endpoint's figures in the Prometheus text format (prometheus_client).

Two kinds of values, told apart in the README:

* From the store, read at each scrape, surviving restarts: the item counters (`dw_items_*_total`,
  `dw_results_*_total`, `dw_lease_expiries_total`, kept in the same transaction as what they
  count), the gauges of the queue and the workers, the job-duration histograms (bucket counts
  kept by schema.sql's trigger at each completion), and the scaler's figures from the runs it
  posted.
* Counted by this process, starting from zero at each start: the HTTP request durations by
  route and status (measured by endpoint/bridge.py around each request), results refused, the
  workers that said they are leaving (Spot interruptions, endpoint/departures.py), and
  prometheus_client's own process figures.
* The workers' cost (endpoint/usage.py): worker-seconds and estimated USD over the last hour
  and day, by market and instance type, from the scalers' listings.

Every dw_ series carries the label `node` (the endpoint's id, a or b).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from typing import Any

import bottle
from bottle import HTTPResponse
from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from endpoint.departures import Departures
from endpoint.routing import JSON_ERRORS, Context
from endpoint.store import STATES, LeaseAnswer, Store
from endpoint.usage import Usage

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
HTTP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, math.inf)
# event_counts' names -> (metric name without _total, help)
STORE_COUNTERS = {
    "enqueued": ("dw_items_enqueued", "Items enqueued (PUT /enqueue; an idempotent replay makes none)."),
    "completed": ("dw_items_completed", "Items completed: their first result was stored."),
    "failed": ("dw_items_failed", "Items that failed: their lease expired on every attempt."),
    "delivered": ("dw_results_delivered", "Results handed out by pullCompleted (to a client or the peer)."),
    "given_back": ("dw_results_given_back", "Delivered results made undelivered again: their take's answer was "
                                            "lost, so they go out once more."),
    "lease_expired": ("dw_lease_expiries", "Leases that expired without a result (the worker died, stalled or "
                                           "was cut off)."),
    "scaler_runs": ("dw_scaler_runs", "Runs the scaler of this endpoint's host posted."),
    "scaler_launched": ("dw_scaler_workers_launched", "Workers the scaler launched."),
    "scaler_provisioned": ("dw_scaler_workers_provisioned", "Workers the scaler provisioned."),
    "scaler_terminated": ("dw_scaler_workers_terminated", "Workers the scaler's reconcile terminated."),
    "scaler_launch_failures": ("dw_scaler_launch_failures", "Launches that failed (EC2 or provider errors)."),
    "scaler_provisioning_failures": ("dw_scaler_provisioning_failures", "Provisionings that failed (SSH, setup)."),
}
REFUSED_RESULTS = {LeaseAnswer.COMPLETED: "already_completed", LeaseAnswer.NO_SUCH_ITEM: "no_such_item"}
HISTOGRAM_HELP = {
    "job_run": ("dw_job_run_seconds", "Time a job ran, as its worker reported it."),
    "time_to_result": ("dw_time_to_result_seconds", "Time from an item's enqueue to its completion."),
}


class Metrics:
    """The endpoint's registry: the store's figures, read at each scrape, and this process's own."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(StoreCollector(store))
        ProcessCollector(registry=self.registry)
        self.request_seconds = Histogram(
            "dw_http_request_duration_seconds", "Time from a request's headers to its answer, by route and status.",
            ["node", "route", "method", "status"], buckets=HTTP_BUCKETS, registry=self.registry)
        self.results_refused = Counter(
            "dw_results_refused", "Results a worker sent that were not stored: the item already had one, or is "
                                  "unknown (process counter).", ["node", "reason"], registry=self.registry)
        self._request_children: dict[tuple[str, str, int], Any] = {}
        self._children_lock = threading.Lock()

    def observe_request(self, environ: dict[str, Any], status: int, seconds: float) -> None:
        """Called by endpoint/bridge.py once a request is answered. A route's rule, never its path, is the
        label (a path per work id would make a series per item)."""
        route = environ.get("bottle.route")
        rule = route.rule if route is not None else "(no route)"
        key = (rule, environ.get("REQUEST_METHOD", ""), status)
        child = self._request_children.get(key)
        if child is None:
            with self._children_lock:
                child = self.request_seconds.labels(self.store.node_id, rule, key[1], str(status))
                self._request_children[key] = child
        child.observe(seconds)

    def result_answer(self, answer: LeaseAnswer) -> None:
        """Count a result that was not stored: the item had one already, or there is no such item."""
        reason = REFUSED_RESULTS.get(answer)
        if reason is not None:
            self.results_refused.labels(self.store.node_id, reason).inc()

    def watch_fleet(self, departures: Departures, usage: Usage) -> None:
        """Add the workers leaving (Spot interruptions) and what the workers cost."""
        self.registry.register(FleetCollector(self.store.node_id, departures, usage))

    def render(self) -> bytes:
        return generate_latest(self.registry)



def add_routes(app: bottle.Bottle) -> None:
    # Not JSON_ERRORS: a scrape that fails is the scraper's error (500), not a write to retry.
    app.route("/metrics", "GET", metrics_page, skip=[JSON_ERRORS])


def metrics_page(ctx: Context) -> HTTPResponse:
    return HTTPResponse(ctx.metrics.render(), status=200, headers={"Content-Type": CONTENT_TYPE})


class StoreCollector(Collector):
    """The figures the store keeps, read at each scrape: they survive restarts."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def describe(self) -> list[Metric]:
        return []  # read at each scrape only; describing would read the store at registration

    def collect(self) -> Iterator[Metric]:
        store, node = self.store, self.store.node_id
        history = store.history
        totals = history.counters()
        for name, (metric, help_text) in STORE_COUNTERS.items():
            family = CounterMetricFamily(metric, help_text, labels=["node"])
            family.add_metric([node], totals.get(name, 0))
            yield family
        for name, buckets in history.buckets().items():
            metric, help_text = HISTOGRAM_HELP[name]
            yield histogram(metric, help_text, node, buckets)
        stats = store.stats()
        yield from queue_gauges(node, stats)
        yield from scaler_gauges(node, history.runs(1), stats["scaler"])


def histogram(metric: str, help_text: str, node: str, buckets: list[tuple[float, int, float]]) -> Metric:
    family = HistogramMetricFamily(metric, help_text, labels=["node"])
    cumulative, points = 0, []
    for le, items, _ in buckets:
        cumulative += items
        points.append(("+Inf" if math.isinf(le) else repr(float(le)), cumulative))
    family.add_metric([node], points, sum_value=sum(total for _, _, total in buckets))
    return family


def gauge(metric: str, help_text: str, node: str, value: float) -> Metric:
    family = GaugeMetricFamily(metric, help_text, labels=["node"])
    family.add_metric([node], value)
    return family


def queue_gauges(node: str, stats: dict[str, Any]) -> Iterator[Metric]:
    items = GaugeMetricFamily("dw_items", "Items stored, by state.", labels=["node", "state"])
    for state in STATES:
        items.add_metric([node, state], stats[state])
    yield items
    yield gauge("dw_results_undelivered", "Completed items whose result pullCompleted has not handed out yet.",
                node, stats["undelivered"])
    yield gauge("dw_oldest_pending_age_seconds", "How long the oldest pending item has waited (0: none).",
                node, stats["oldest_pending_age_s"])
    yield gauge("dw_workers_heard_from", "Workers this endpoint heard from in the last 2 minutes.",
                node, len(stats["workers"]))
    if "capacity_reported" in stats:  # what the workers heard from say they run at once (processes x lanes)
        yield gauge("dw_worker_capacity_slots", "Jobs the workers heard from can run at once, as they report it.",
                    node, stats["capacity_reported"])
    yield gauge("dw_disk_full", "1 while the last write failed for want of disk space.", node, int(stats["disk_full"]))


def scaler_gauges(node: str, latest: list[dict[str, Any]], breaker: dict[str, Any] | None) -> Iterator[Metric]:
    """From the last run the scaler posted, and its circuit breaker (none before its first run)."""
    run = latest[0] if latest else None
    for metric, field, help_text in (
            ("dw_scaler_workers_needed", "needed", "Workers the last scaler run sized the cluster for."),
            ("dw_scaler_workers_ready", "ready", "The cluster's ready workers, as the last scaler run saw them."),
            ("dw_scaler_workers_booting", "booting", "The cluster's workers not ready yet (launched, provisioning)."),
            ("dw_scaler_launches_decided", "decided", "Launches the last run's policy asked for."),
            ("dw_scaler_launches_allowed", "allowed", "Launches the circuit breaker let through in the last run.")):
        if run is not None:
            yield gauge(metric, help_text, node, run[field])
    if breaker is not None:
        yield gauge("dw_scaler_breaker_open", "1 while the scaler's circuit breaker stops launches.", node,
                    int(breaker["breaker_open"]))
        yield gauge("dw_scaler_consecutive_failures", "Launch and provisioning failures in a row.", node,
                    breaker["consecutive_failures"])
        if breaker["last_run_s_ago"] is not None:
            yield gauge("dw_scaler_last_run_timestamp_seconds", "When the scaler last posted a run (unix time).",
                        node, round(time.time() - breaker["last_run_s_ago"], 1))


class FleetCollector(Collector):
    """Interruptions and cost, read at each scrape."""

    def __init__(self, node: str, departures: Departures, usage: Usage) -> None:
        self.node = node
        self.departures = departures
        self.usage = usage

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        leaving, announced = self.departures.counts()
        yield gauge("dw_workers_leaving", "Workers that said they are leaving (a Spot interruption), in the last hour.",
                    self.node, leaving)
        departures = CounterMetricFamily("dw_worker_departures", "Workers that said they are leaving, by reason "
                                         "(spot-interruption), since this endpoint started (process counter).",
                                         labels=["node", "reason"])
        for reason, count in sorted(announced.items()):
            departures.add_metric([self.node, reason], count)
        yield departures
        labels = ["node", "window", "market", "instance_type"]
        seconds = GaugeMetricFamily("dw_worker_seconds", "Worker machine seconds in the window (1h, 1d), from the "
                                    "scalers' listings.", labels=labels)
        cost = GaugeMetricFamily("dw_worker_estimated_cost_usd", "Estimated cost of those seconds at the price "
                                 "table (--price); priced types only.", labels=labels)
        figures = self.usage.figures()
        for window, name in (("1h", "last_hour"), ("1d", "last_day")):
            for entry in figures[name]["by_type"]:
                key = [self.node, window, entry["market"], entry["instance_type"]]
                seconds.add_metric(key, entry["worker_seconds"])
                if entry["estimated_usd"] is not None:
                    cost.add_metric(key, entry["estimated_usd"])
        yield seconds
        yield cost
