"""The plugins around every route (endpoint/routing.py): each route names its role, the
authentication plugin opens it to that role's key alone, and errors become JSON answers.

In process: the app is called as a WSGI application, with a real store on disk.
"""

from __future__ import annotations

import base64
import io
import json
import wsgiref.util
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bottle
import pytest

from conftest import SECRET
from endpoint import routing
from endpoint.app import Limits, make_app
from endpoint.inputs import InputError
from endpoint.metrics import Metrics
from endpoint.pulls import Pulls
from endpoint.routing import Context, JsonBottle, Keys
from endpoint.store import Store

KEYS = Keys.from_secret(SECRET)
BEARER = {role: {"HTTP_AUTHORIZATION": f"Bearer {getattr(KEYS, role)}"} for role in routing.BEARER_ROLES}
OPERATOR = {"HTTP_AUTHORIZATION": "Basic " + base64.b64encode(f"any:{KEYS.operator}".encode()).decode()}
# What each route is opened to, by its rule: a route module that forgets its role fails here.
EXPECTED_ROLES = {"/internal/peer/": "peer", "/internal/scaler/": "scaler", "/internal/client-keys": "operator",
                  "/internal/": "worker", "/details": "operator"}


def call(app: bottle.Bottle, method: str, path: str, headers: dict[str, str] | None = None,
         body: bytes = b"{}") -> tuple[int, dict[str, str], bytes]:
    environ: dict[str, Any] = {"REQUEST_METHOD": method, "PATH_INFO": path, "CONTENT_LENGTH": str(len(body)),
                               "CONTENT_TYPE": "application/json", "wsgi.input": io.BytesIO(body), **(headers or {})}
    wsgiref.util.setup_testing_defaults(environ)
    started: list[Any] = []
    chunks = app(environ, lambda status, response_headers, *_: started.extend([status, response_headers]))
    answer = b"".join(chunks)
    return int(started[0].split()[0]), dict(started[1]), answer


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    opened = Store(tmp_path / "a.sqlite3", "a", maintenance_interval=3600)
    yield opened
    opened.close()


def expected_role(rule: str) -> str | None:
    return next((role for prefix, role in EXPECTED_ROLES.items() if rule.startswith(prefix)), None)


def concrete(rule: str) -> str:
    return rule.replace("<work_id>", "a-0000000000000001").replace("<run_id>", "run-1").replace(
        "<key_id>", "0123456789abcdef")


def test_each_route_is_opened_to_its_role_alone(store: Store) -> None:
    app = make_app(store, SECRET, Limits())
    roles = {route.rule: route.config.get("auth") for route in app.routes}
    assert roles == {rule: expected_role(rule) for rule in roles}
    assert len(roles) >= 20  # the whole API, not an empty app
    for route in app.routes:
        role, path = roles[route.rule], concrete(route.rule)
        if role is None:
            continue
        status, headers, body = call(app, route.method, path)
        assert status == 401, (route.rule, status)
        assert "error" in json.loads(body)
        # Another role's bearer key is wrong credentials (403); a key of the other scheme is none (401).
        others = [(auth, 401 if role == "operator" else 403) for other, auth in BEARER.items() if other != role]
        for wrong, refused in others + ([(OPERATOR, 401)] if role != "operator" else []):
            status, _, _ = call(app, route.method, path, wrong)
            assert status == refused, (route.rule, wrong, status)
        own = OPERATOR if role == "operator" else BEARER[role]
        status, headers, _ = call(app, route.method, path, own)
        assert status not in (401, 403), (route.rule, status)
        # Keyed answers tell the caller which endpoint it reached; the operator's page does not need it.
        assert ("X-Node-Id" in headers) == (role != "operator"), route.rule
        if role != "operator":
            assert headers["X-Node-Id"] == "a"


def context(store: Store) -> Context:
    return Context(store=store, limits=Limits(), keys=KEYS, metrics=Metrics(store), pulls=Pulls(store, None))


def test_a_route_module_declares_its_role_and_gets_json_errors(store: Store) -> None:
    """How a new route module plugs in: a plain function taking the Context, `auth=` in its route."""
    app = JsonBottle()
    routing.install(app, context(store))

    def teapot(ctx: Context, name: str) -> bottle.HTTPResponse:
        if name == "bad":
            raise InputError(418, f"no tea at {ctx.store.node_id}")
        return routing.json_response({"name": name})

    app.route("/internal/peer/tea/<name>", "GET", teapot, auth="peer")
    assert call(app, "GET", "/internal/peer/tea/bad")[0] == 401
    assert call(app, "GET", "/internal/peer/tea/bad", BEARER["worker"])[0] == 403
    status, headers, body = call(app, "GET", "/internal/peer/tea/bad", BEARER["peer"])
    assert (status, json.loads(body), headers["X-Node-Id"]) == (418, {"error": "no tea at a"}, "a")
    status, _, body = call(app, "GET", "/internal/peer/tea/green", BEARER["peer"])
    assert (status, json.loads(body)) == (200, {"name": "green"})


def test_a_route_naming_an_unknown_role_fails_when_the_app_is_built(store: Store) -> None:
    app = JsonBottle()
    routing.install(app, context(store))
    app.route("/internal/typo", "POST", lambda ctx: routing.json_response({}), auth="wroker")
    with pytest.raises(ValueError, match="unknown auth role 'wroker'"):
        app.routes[-1].prepare()
