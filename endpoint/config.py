"""The endpoint's settings: one table, read as command-line flags with environment fallbacks
(the pattern of every program, cli/settings.py).

`python -m endpoint --port 5001` and `DW_PORT=5001 python -m endpoint` are the same. The
server runs the app in a worker process, which reads the very same table from the
environment the launcher exported (see `export`).
"""

from __future__ import annotations

import argparse
import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, fields

from cli.settings import Setting, add_settings, check_settings, environment, read_environment
from cli.tls import client_context, is_https
from endpoint.prices import Price, price_entry


@dataclass(frozen=True)
class Settings:
    host: str
    port: int
    node_id: str
    peer: str
    db: str
    secret_file: str
    threads: int
    max_connections: int
    header_timeout: float
    body_timeout: float
    max_waiting_claims: int
    max_payload_bytes: int
    max_iterations: int
    max_top: int
    lease_seconds: float
    max_attempts: int
    synchronous: str
    retention_days: float
    log_level: str
    instance_id: str
    prices: list[Price]
    tls_cert: str
    tls_key: str
    tls_ca: str
    client_keys: str

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert)

    @property
    def db_path(self) -> str:
        return self.db or f"var/{self.node_id}.sqlite3"


# name -> Setting(environment variable, default, type, help)
OPTIONS: dict[str, Setting] = {
    "host": Setting("DW_HOST", "127.0.0.1", str, "listen address"),
    "port": Setting("DW_PORT", "5000", int, "listen port"),
    "node_id": Setting("DW_NODE_ID", "a", str, "this endpoint's id, the prefix of its work ids (a-z, 0-9)"),
    "peer": Setting("DW_PEER_URL", "", str, "base URL of the other endpoint, e.g. http://10.0.0.2:5000"),
    "db": Setting("DW_DB", "", str, "SQLite file (default var/<node-id>.sqlite3)"),
    "secret_file": Setting("DW_SECRET_FILE", "", str,
                           "file holding the cluster secret (or put the secret in DW_SECRET)"),
    "threads": Setting("DW_THREADS", "16", int, "threads that answer requests once they have been read"),
    "max_connections": Setting("DW_MAX_CONNECTIONS", "1024", int,
                               "open client connections at most; more wait in the listen queue"),
    "header_timeout": Setting("DW_HEADER_TIMEOUT", "10", float,
                              "seconds a client has to send a request's headers; also how long an idle "
                              "kept-alive connection stays open"),
    "body_timeout": Setting("DW_BODY_TIMEOUT", "30", float,
                            "seconds a client has to send a request's body once its headers arrived (408 after)"),
    "max_waiting_claims": Setting("DW_MAX_WAITING_CLAIMS", "512", int,
                                  "workers' claims that may wait for work at once, each holding a connection (at "
                                  "most --max-connections; 0: claims never wait, workers poll)"),
    "max_payload_bytes": Setting("DW_MAX_PAYLOAD_BYTES", str(4 * 1024 * 1024), int, "largest payload accepted"),
    "max_iterations": Setting("DW_MAX_ITERATIONS", "100000000", int, "largest iterations accepted"),
    "max_top": Setting("DW_MAX_TOP", "1000", int, "largest pullCompleted top accepted"),
    "lease_seconds": Setting("DW_LEASE_SECONDS", "30", float, "a claim lasts this long unless the worker renews it"),
    "max_attempts": Setting("DW_MAX_ATTEMPTS", "3", int, "claims an item gets before an expired lease fails it"),
    "synchronous": Setting("DW_SYNCHRONOUS", "FULL", str.upper,
                           "SQLite synchronous: FULL puts every acknowledged write on disk; NORMAL may lose the last "
                           "writes on power loss"),
    "retention_days": Setting("DW_RETENTION_DAYS", "7", float,
                              "delete results this many days after pullCompleted delivered them; 0 keeps them forever"),
    "log_level": Setting("DW_LOG_LEVEL", "INFO", str.upper, "DEBUG, INFO, WARNING or ERROR"),
    "instance_id": Setting("DW_INSTANCE_ID", "", str,
                           "any id for this run, reported in GET /stats, so that whoever started it can tell it is "
                           "this process that answers (./deploy.sh local passes a fresh random one)"),
    "prices": Setting("DW_PRICES", "", price_entry,
                      "a worker machine's price for the cost estimate in GET /stats, USD per hour: TYPE=USD "
                      "(On-Demand) or TYPE/spot=USD; the defaults are us-east-1's (README)", many=True),
    "tls_cert": Setting("DW_TLS_CERT", "", str,
                        "PEM certificate (chain) to serve HTTPS with, together with --tls-key; then the port "
                        "serves no plain HTTP"),
    "tls_key": Setting("DW_TLS_KEY", "", str, "PEM private key of --tls-cert (keep it 0600)"),
    "tls_ca": Setting("DW_TLS_CA", "", str,
                      "CA certificate the peer's HTTPS certificate is checked against (default: the system's CAs)"),
    "client_keys": Setting("DW_CLIENT_KEYS", "off", str.lower,
                           "on: enqueue, pullCompleted and /work/<id> need a client key (python -m "
                           "endpoint.client_keys), and a key pulls only its own results; off: open to anybody"),
}


def parse_args(argv: list[str] | None = None, environ: Mapping[str, str] = os.environ) -> Settings:
    parser = argparse.ArgumentParser(prog="python -m endpoint", description="Run one dynamic-workload endpoint.")
    add_settings(parser, OPTIONS, environ=environ)
    args = parser.parse_args(argv)
    check_settings(parser, OPTIONS, args, environ=environ)
    return _checked(Settings(**vars(args)))


def from_env(environ: Mapping[str, str] = os.environ) -> Settings:
    try:
        return _checked(Settings(**read_environment(OPTIONS, environ)))
    except ValueError as exc:
        raise SystemExit(f"endpoint: {exc}") from None


def export(settings: Settings) -> dict[str, str]:
    """The environment that makes `from_env` return these settings."""
    return environment(OPTIONS, {field.name: getattr(settings, field.name) for field in fields(settings)})


def _checked(settings: Settings) -> Settings:
    problems = []
    if settings.synchronous not in ("FULL", "NORMAL", "EXTRA"):
        problems.append("synchronous must be FULL, NORMAL or EXTRA")
    if settings.client_keys not in ("on", "off"):
        problems.append("client_keys must be on or off")
    for name in ("threads", "max_connections", "max_payload_bytes", "max_iterations", "max_top", "max_attempts"):
        if getattr(settings, name) < 1:
            problems.append(f"{name} must be at least 1")
    if not 0 <= settings.max_waiting_claims <= settings.max_connections:
        problems.append("max_waiting_claims must be from 0 to max_connections")
    for name in ("header_timeout", "body_timeout"):
        if not 0 < getattr(settings, name) <= 3600:
            problems.append(f"{name} must be more than 0 and at most 3600 seconds")
    if settings.lease_seconds <= 0:
        problems.append("lease_seconds must be positive")
    if settings.retention_days < 0:
        problems.append("retention_days must be 0 (keep forever) or more")
    problems += _tls_problems(settings)
    if problems:
        raise SystemExit("endpoint: " + "; ".join(problems))
    return settings


def _tls_problems(settings: Settings) -> list[str]:
    """A certificate and a key together, that belong together; with TLS on, an https peer: the peer
    key never travels in clear text."""
    if bool(settings.tls_cert) != bool(settings.tls_key):
        return ["tls_cert and tls_key go together: give both, or neither"]
    problems = []
    if settings.tls:
        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(settings.tls_cert, settings.tls_key)
        except (OSError, ssl.SSLError) as exc:
            problems.append(f"tls_cert {settings.tls_cert} with tls_key {settings.tls_key} is unusable: {exc}")
        if settings.peer and not is_https(settings.peer):
            problems.append(f"with TLS on, the peer must be an https:// URL, not {settings.peer}")
    if settings.tls_ca:
        try:
            client_context(settings.tls_ca)
        except (OSError, ssl.SSLError) as exc:
            problems.append(f"tls_ca {settings.tls_ca} is no usable CA certificate: {exc}")
    return problems
