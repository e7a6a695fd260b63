"""The dashboard: GET / (anybody: counts only) and GET /details (the operator key, HTTP Basic).

One page shows both endpoints. Each endpoint computes its own figures (`figures`) from its store
and its history (endpoint/history.py), and asks its peer for the peer's over the peer API
(GET /internal/peer/dashboard) with a short timeout, at the same time; a peer that does not answer
is shown as such and the page renders all the same. The page is a Bottle template
(endpoint/views/dashboard.tpl) with the charts drawn as inline SVG by endpoint/charts.py: no
JavaScript, nothing fetched from anywhere, and it reloads itself (`<meta http-equiv="refresh">`).

It also shows what the workers cost over the last hour and day, by market and instance type
(endpoint/usage.py; either endpoint's figures are the whole cluster's), and how many workers said
they are leaving (Spot interruptions, endpoint/departures.py).

The public page shows counts, charts, percentiles and the scaler's decisions with their reasons;
worker ids, the scaler's errors (addresses, SSH and EC2 messages) and the failed items (ids, last
error) are for the operator. Their password is the operator key, derived from the cluster secret
(`python -m endpoint.operator_key` prints it); any user name. The operator key opens nothing else.
"""

from __future__ import annotations

import bisect
import json
import math
import time
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any

import bottle
from bottle import HTTPResponse, request

from endpoint import charts
from endpoint.departures import Departures
from endpoint.history import HISTOGRAMS
from endpoint.inputs import positive_int, query_params
from endpoint.peer import Peer, PeerUnavailable
from endpoint.routing import Context
from endpoint.store import Store
from endpoint.usage import Usage

VIEWS = Path(__file__).resolve().parent / "views"
# name -> (seconds shown, seconds per bin)
WINDOWS = {"hour": (3600, 60), "day": (86_400, 600)}
PEER_TIMEOUT_S = 1.0
DEFAULT_REFRESH_S = 10
RECENT_RUNS = 12
FAILED_SHOWN = 20
QUANTILES = (0.5, 0.9, 0.99)
HEADERS = {
    "Content-Type": "text/html; charset=utf-8",
    # Nothing runs and nothing is fetched: the page is its own HTML, CSS and SVG.
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; img-src data:; "
                               "frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


# -- the figures of one endpoint ---------------------------------------------------------------

def figures(store: Store, instance_id: str = "", now: float | None = None, usage: Usage | None = None,
            departures: Departures | None = None) -> dict[str, Any]:
    """Everything the page shows of this endpoint, details included (JSON: the peer asks for it)."""
    now = time.time() if now is None else now
    history = store.history
    stats = store.stats()
    totals = history.counters()
    live = {"at": now, "enqueued_total": totals.get("enqueued", 0), "completed_total": totals.get("completed", 0),
            "pending": stats["pending"], "running": stats["running"],
            "workers_heard_from": len(stats["workers"])}
    longest = max(span for span, _ in WINDOWS.values())
    points = history.samples(now - longest - max(bin_s for _, bin_s in WINDOWS.values())) + [live]
    buckets = history.buckets()
    return {
        "node": store.node_id,
        "instance_id": instance_id or None,
        "counts": {key: stats[key] for key in ("pending", "running", "completed", "failed", "undelivered",
                                               "oldest_pending_age_s", "disk_full")}
                  | {"workers_heard_from": len(stats["workers"]), "enqueued_total": live["enqueued_total"]},
        "windows": {name: window(points, history.fleet(now - span, bin_s), now, span, bin_s)
                    for name, (span, bin_s) in WINDOWS.items()},
        "percentiles": {name: percentiles(buckets, history.durations_at(now - span))
                        for name, (span, _) in WINDOWS.items()},
        "bounds": [le for le, _, _ in buckets[HISTOGRAMS[0]]],
        "scaler": stats["scaler"],
        "runs": history.runs(RECENT_RUNS),
        "failed_items": store.failed_items(FAILED_SHOWN),
        "workers": stats["workers"],
        "cost": usage.figures(now) if usage is not None else None,
        "workers_leaving": departures.counts()[0] if departures is not None else 0,
    }


def public(view: dict[str, Any]) -> dict[str, Any]:
    """The figures anybody may see: no worker ids, no failed items, no scaler errors."""
    shown = {key: value for key, value in view.items() if key not in ("workers", "failed_items")}
    if shown.get("scaler"):
        shown["scaler"] = {key: value for key, value in shown["scaler"].items() if key != "last_error"}
    shown["runs"] = [{key: value for key, value in run.items() if key != "errors"} for run in view.get("runs", [])]
    return shown


def _bins(now: float, span: int, bin_s: int) -> tuple[int, int]:
    """The first bin's start and the number of bins, the last one holding `now`."""
    count = span // bin_s
    return int(now // bin_s) * bin_s - (count - 1) * bin_s, count


def window(points: list[dict[str, Any]], fleet: list[dict[str, Any]], now: float, span: int,
           bin_s: int) -> dict[str, Any]:
    """One window's series, binned: rates per minute from the counters' differences, gauges at their
    highest in each bin (None where no sample fell), the scaler's fleet and its launches and terminations."""
    first, count = _bins(now, span, bin_s)
    per_minute = bin_s / 60

    def index(at: float) -> int | None:
        position = int((at - first) // bin_s)
        return position if 0 <= position < count else None

    points = points[bisect.bisect_left([point["at"] for point in points], first - bin_s):]
    rates: dict[str, list[float]] = {"enqueued": [0.0] * count, "completed": [0.0] * count}
    for before, after in zip(points, points[1:], strict=False):
        position = index(before["at"])  # what happened between two samples, in the bin of the first
        if position is None:
            continue
        for name in rates:
            rates[name][position] += max(0, after[f"{name}_total"] - before[f"{name}_total"]) / per_minute
    gauges: dict[str, list[float | None]] = {"pending": [None] * count, "running": [None] * count,
                                             "workers_heard_from": [None] * count}
    for point in points:
        position = index(point["at"])
        if position is not None:
            for name, values in gauges.items():
                values[position] = max(values[position] or 0, point[name])
    runs: dict[str, list[Any]] = {"fleet": [None] * count, "launched": [0] * count, "terminated": [0] * count}
    for row in fleet:
        position = index(row["at"])
        if position is not None:
            runs["fleet"][position] = row["workers"]
            runs["launched"][position] = row["launched"] or 0
            runs["terminated"][position] = row["terminated"] or 0
    return {"first": first, "bin_s": bin_s, **{name: [round(v, 2) for v in values] for name, values in rates.items()},
            **gauges, **runs}


def percentiles(buckets: dict[str, list[tuple[float, int, float]]],
                before: dict[str, list[int]] | None) -> dict[str, dict[str, Any]]:
    """Per histogram: the jobs counted since the sample `before` (all of them without one) and their
    percentiles, interpolated within buckets as Prometheus' histogram_quantile does."""
    found = {}
    for name in HISTOGRAMS:
        bounds = [le for le, _, _ in buckets[name]]
        counts = [items for _, items, _ in buckets[name]]
        earlier = (before or {}).get(name) or [0] * len(counts)
        if len(earlier) == len(counts):
            counts = [max(0, now - then) for now, then in zip(counts, earlier, strict=True)]
        total = sum(counts)
        found[name] = {"jobs": total,
                       **{f"p{round(q * 100)}": quantile(bounds, counts, q) for q in QUANTILES}}
    return found


def quantile(bounds: list[float], counts: list[int], q: float) -> float | None:
    total = sum(counts)
    if not total:
        return None
    rank, seen, lower = q * total, 0, 0.0
    for le, items in zip(bounds, counts, strict=True):
        if items and seen + items >= rank:
            if math.isinf(le):
                return lower  # beyond the last finite bound: at least that
            return round(lower + (le - lower) * (rank - seen) / items, 4)
        seen += items
        lower = le
    return lower


# -- the page ----------------------------------------------------------------------------------

TIME_AXES = {"hour": ("-60 min", "now"), "day": ("-24 h", "now")}


def endpoint_charts(view: dict[str, Any]) -> dict[str, str]:
    """The SVG charts of one endpoint's figures."""
    drawn = {}
    for name, series in view["windows"].items():
        axis = TIME_AXES[name]
        unit = "per minute" if series["bin_s"] == 60 else f"per minute, {series['bin_s'] // 60}-minute bins"
        node = view["node"]
        drawn[f"throughput_{name}"] = charts.bars(
            f"enqueued and completed {unit}",
            [charts.Series("enqueued", series["enqueued"]), charts.Series("completed", series["completed"])], axis,
            f"endpoint {node}: items enqueued and completed {unit}, last {name}")
        drawn[f"backlog_{name}"] = charts.lines(
            "backlog (pending) and running", [charts.Series("pending", series["pending"]),
                                              charts.Series("running", series["running"])], axis,
            f"endpoint {node}: pending and running items, last {name}")
        drawn[f"workers_{name}"] = charts.lines(
            "workers: the cluster (scaler) and heard from here",
            [charts.Series("cluster", series["fleet"]), charts.Series("heard from", series["workers_heard_from"])],
            axis, f"endpoint {node}: workers, last {name}, launches and terminations marked",
            [charts.Marks("launched", series["launched"], up=True),
             charts.Marks("terminated", series["terminated"], up=False)])
    return drawn


TEMPLATE = bottle.SimpleTemplate(name="dashboard", lookup=[str(VIEWS)])


def render(views: list[dict[str, Any]], detailed: bool, refresh_s: int, now: float) -> str:
    shown = []
    for view in views:
        if "error" in view:
            shown.append(view)
        else:
            shown.append({**view, "charts": endpoint_charts(view)})
    return TEMPLATE.render(endpoints=shown, detailed=detailed, refresh_s=refresh_s,
                           generated=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(now)), ago=ago,
                           seconds=seconds, view_time=now)


def ago(value: float | None) -> str:
    if value is None:
        return "never"
    return f"{seconds(value)} ago"


def seconds(value: float | None) -> str:
    if value is None:
        return "–"
    if value < 1:
        return f"{value * 1000:.0f} ms"
    if value < 120:
        return f"{value:.1f} s"
    if value < 7200:
        return f"{value / 60:.0f} min"
    return f"{value / 3600:.1f} h"


def add_routes(app: bottle.Bottle) -> None:
    app.route("/", "GET", dashboard)
    app.route("/details", "GET", details, auth="operator")
    app.route("/internal/peer/dashboard", "GET", peer_dashboard, auth="peer")


def dashboard(ctx: Context) -> HTTPResponse:
    return page(ctx, detailed=False)


def details(ctx: Context) -> HTTPResponse:
    return page(ctx, detailed=True)


def peer_dashboard(ctx: Context) -> HTTPResponse:
    return HTTPResponse(json.dumps(own_figures(ctx)), status=200,
                        headers={"Content-Type": "application/json"})


def own_figures(ctx: Context, now: float | None = None) -> dict[str, Any]:
    return figures(ctx.store, ctx.instance_id, now, ctx.usage, ctx.departures)


def page(ctx: Context, detailed: bool) -> HTTPResponse:
    params = query_params(request.query_string)
    refresh = positive_int(params, "refresh", 3600) if "refresh" in params else DEFAULT_REFRESH_S
    now = time.time()
    asked = ctx.peer_asking.submit(peer_view, ctx.peer) if ctx.peer is not None else None
    views = [own_figures(ctx, now)]
    if asked is not None:
        try:
            views.append(asked.result(PEER_TIMEOUT_S + 0.5))
        except FutureTimeout:
            views.append({"node": "peer", "error": "the peer did not answer in time"})
    views.sort(key=lambda view: view["node"])
    if not detailed:
        views = [view if "error" in view else public(view) for view in views]
    headers = {**HEADERS, "Cache-Control": "no-store" if detailed else "no-cache"}
    return HTTPResponse(render(views, detailed, max(refresh, 2), now), status=200, headers=headers)


def peer_view(peer: Peer) -> dict[str, Any]:
    try:
        view = peer.get_json("/internal/peer/dashboard", PEER_TIMEOUT_S)
    except PeerUnavailable as exc:
        return {"node": peer.node_id or "peer", "error": f"the peer ({peer.base_url}) does not answer: {exc}"}
    if not isinstance(view, dict) or "windows" not in view:
        return {"node": peer.node_id or "peer", "error": f"the peer ({peer.base_url}) gave no dashboard figures"}
    return view
