"""The endpoint's HTTP API: one Bottle app whose routes are plain functions in route modules.

Public (clients, no key):     endpoint/public_api.py   PUT /enqueue, POST /pullCompleted, GET /work/<id>,
                                                       GET /stats
Worker (the worker key):      endpoint/worker_api.py   POST /internal/claims, /internal/claims/cancel,
                                                       /internal/leases/{renew,release}, /internal/results
                                                       (batches); /internal/claim,
                                                       /internal/work/<id>/{renew,release,result} (one job)
                              endpoint/departures.py   POST /internal/leaving (a Spot interruption)
Peer (the peer key):          endpoint/peer_api.py     POST /internal/peer/take-completed, /internal/peer/give-back,
                                                       GET /internal/peer/work/<id>
Scaler (the scaler key):      endpoint/scaler_record.py  the scaler's runs and its breaker
                                                       and PUT /internal/scaler/fleet (the workers, for their cost)
Operator and anybody:         endpoint/dashboard.py    GET /, GET /details (the operator key), and the peer's
                                                       GET /internal/peer/dashboard
Anybody:                      endpoint/metrics.py      GET /metrics
Operator (client keys):       endpoint/client_key_api.py  GET /internal/client-keys, PUT and DELETE
                                                       /internal/client-keys/<id>

Each route module's add_routes(app) names the role a route needs (`auth="worker"`); the plugins of
endpoint/routing.py check the key, turn errors into JSON answers and pass each route the app's
Context (store, limits, keys, metrics, pulls, peer). The keys are derived from the cluster secret
(endpoint/secret.py); none opens another role's routes.

Every error is JSON {"error": "..."} with a 4xx status for anything a client sent wrong. A write
the store did not take is 503 with "outcome": "not_stored" (retry), 507 with "reason": "disk_full"
as well when the disk is full; one whose commit had not finished within the store's wait is 504
with "outcome": "unknown".
"""

from __future__ import annotations

import bottle

from endpoint import (
    client_key_api,
    dashboard,
    departures,
    metrics,
    peer_api,
    public_api,
    routing,
    scaler_record,
    worker_api,
)
from endpoint.departures import Departures
from endpoint.metrics import Metrics
from endpoint.peer import Peer
from endpoint.prices import PriceTable
from endpoint.pulls import Pulls
from endpoint.routing import Context, JsonBottle, Keys, Limits
from endpoint.store import Store

__all__ = ["Limits", "make_app"]
ROUTE_MODULES = (public_api, worker_api, departures, peer_api, scaler_record, metrics, dashboard, client_key_api)


def make_app(store: Store, secret: str, limits: Limits, peer: Peer | None = None,
             instance_id: str = "", metrics: Metrics | None = None, prices: PriceTable | None = None,
             client_keys: bool = False) -> bottle.Bottle:
    """`secret` is the cluster secret; callers present the key derived from it for their role. With
    `client_keys`, the clients' routes need a client key (endpoint/routing.py's ClientKeys)."""
    context = Context(store=store, limits=limits, keys=Keys.from_secret(secret), metrics=metrics or Metrics(store),
                      pulls=Pulls(store, peer), peer=peer, instance_id=instance_id, client_keys=client_keys,
                      departures=Departures(), usage=store.usage(prices or PriceTable()))
    context.metrics.watch_fleet(context.departures, context.usage)
    app = JsonBottle()
    routing.install(app, context)
    for module in ROUTE_MODULES:
        module.add_routes(app)
    for route in app.routes:
        route.prepare()  # a route naming an unknown role fails here, at start, not at its first request
    return app
