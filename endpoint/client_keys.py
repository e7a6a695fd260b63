"""Create, list and revoke the client keys of the public API, at both endpoints:

    python -m endpoint.client_keys --endpoint https://A:5000 --endpoint https://B:5000 create alice
    python -m endpoint.client_keys list
    python -m endpoint.client_keys revoke 0123456789abcdef

With `--client-keys on`, the endpoints answer PUT /enqueue, POST /pullCompleted and GET /work/<id>
only to a live key (`Authorization: Bearer <key>`), and a key pulls only the results of what it
enqueued. A key is made here, shown once on stdout, and each endpoint is handed only its hash
(endpoint/key_store.py) over its operator routes (the operator key, derived from the cluster
secret, which this command reads). A key is created at both endpoints or at neither: if one does
not take it, it is revoked again where it was taken and the command fails. Revoking is repeatable.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import urllib.error
import urllib.request
from datetime import datetime, timezone
from typing import Any

from cli.settings import Setting, parse_settings, text
from cli.tls import urlopen
from endpoint.key_store import KEY_ID_PATTERN, NAME_PATTERN, new_key
from endpoint.secret import operator_key, read_secret

SETTINGS = {
    "endpoints": Setting("DW_ENDPOINTS", "", text, "an endpoint's URL; give it once per endpoint", many=True),
    "secret_file": Setting("DW_SECRET_FILE", "var/secret", text, "the cluster secret's file"),
    "tls_ca": Setting("DW_TLS_CA", "", text, "CA certificate https endpoints are checked against"),
}
ROUTE = "/internal/client-keys"


class Refused(Exception):
    """An endpoint did not do what was asked."""


def call(url: str, method: str, password: str, ca_file: str, body: dict[str, Any] | None = None) -> Any:
    credentials = base64.b64encode(f"operator:{password}".encode()).decode()
    request = urllib.request.Request(url, method=method, data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Authorization": f"Basic {credentials}",
                                              "Content-Type": "application/json"})
    try:
        with urlopen(request, 10, ca_file) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raise Refused(f"{method} {url}: HTTP {exc.code} {exc.read(300).decode(errors='replace')}") from exc
    except (OSError, ValueError) as exc:
        raise Refused(f"{method} {url}: {exc}") from exc


def create(args: argparse.Namespace, password: str) -> int:
    if not NAME_PATTERN.fullmatch(args.name):
        print("a key's name is 1-100 of letters, digits, spaces and ._@:/+-", file=sys.stderr)
        return 2
    made = new_key()
    taken: list[str] = []
    for endpoint in args.endpoints:
        try:
            call(f"{endpoint}{ROUTE}/{made.key_id}", "PUT", password, args.tls_ca,
                 {"name": args.name, "hash": made.key_hash})
        except Refused as exc:
            undone = revoke_at(taken, made.key_id, password, args.tls_ca)
            print(f"the key was not created: {exc}" + (f"; revoked again at {', '.join(undone)}" if undone else ""),
                  file=sys.stderr)
            return 1
        taken.append(endpoint)
    print(f"created client key {made.key_id} ({args.name}) at {', '.join(taken)}; it is shown once:", file=sys.stderr)
    print(made.key)
    return 0


def revoke_at(endpoints: list[str], key_id: str, password: str, ca_file: str) -> list[str]:
    revoked = []
    for endpoint in endpoints:
        try:
            call(f"{endpoint}{ROUTE}/{key_id}", "DELETE", password, ca_file)
            revoked.append(endpoint)
        except Refused as exc:
            print(f"could not revoke {key_id} at {endpoint}: {exc}", file=sys.stderr)
    return revoked


def revoke(args: argparse.Namespace, password: str) -> int:
    if not KEY_ID_PATTERN.fullmatch(args.key_id):
        print("a key id is 16 hex digits (the second part of dwk_<id>_...)", file=sys.stderr)
        return 2
    revoked = revoke_at(args.endpoints, args.key_id, password, args.tls_ca)
    if len(revoked) < len(args.endpoints):
        print("not revoked everywhere: run the same command again once the endpoint answers", file=sys.stderr)
        return 1
    print(f"client key {args.key_id} revoked at {', '.join(revoked)}")
    return 0


def listing(args: argparse.Namespace, password: str) -> int:
    status = 0
    keys: dict[str, dict[str, Any]] = {}
    for endpoint in args.endpoints:
        try:
            for key in call(f"{endpoint}{ROUTE}", "GET", password, args.tls_ca)["keys"]:
                keys.setdefault(key["id"], {**key, "at": []})["at"].append(endpoint)
        except Refused as exc:
            print(f"not listed: {exc}", file=sys.stderr)
            status = 1
    for key in sorted(keys.values(), key=lambda key: key["created_at"]):
        made = datetime.fromtimestamp(key["created_at"], timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")
        state = "revoked" if key["revoked_at"] else "live"
        print(f"{key['id']}  {state:7}  {made}  {key['name']}  ({', '.join(key['at'])})")
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m endpoint.client_keys", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("create", help="make a key, at every endpoint").add_argument("name")
    commands.add_parser("list", help="the keys every endpoint knows")
    commands.add_parser("revoke", help="revoke a key, at every endpoint").add_argument("key_id")
    args = parse_settings(parser, SETTINGS, argv)
    if not args.endpoints:
        parser.error("give the endpoints: --endpoint URL, once per endpoint (or DW_ENDPOINTS)")
    args.endpoints = [endpoint.rstrip("/") for endpoint in args.endpoints]
    try:
        password = operator_key(read_secret(args.secret_file))
    except OSError as exc:
        print(f"cannot read the cluster secret from {args.secret_file}: {exc.strerror}", file=sys.stderr)
        return 1
    return {"create": create, "list": listing, "revoke": revoke}[args.command](args, password)


if __name__ == "__main__":
    sys.exit(main())
