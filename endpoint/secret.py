"""The cluster secret, and the keys derived from it for the internal routes.

The cluster secret stays on the endpoint hosts. What a caller presents is a key derived from
it for its role: workers hold the worker key, which opens the worker routes and nothing else;
the endpoints present the peer key to each other. The derivation is one-way (HMAC-SHA256),
so a worker -- an instance that may be compromised -- cannot compute the peer key and take
the users' results through the peer routes. One secret to deploy, least privilege to hand out.
Two more roles: the scaler key (each host's scaler posts its runs to its endpoint and reads the
endpoints' /stats with it, and can take no results) and the operator key (a person's, for the
dashboard's details; it opens no /internal route).
"""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

MIN_SECRET_LENGTH = 16


def worker_key(cluster_secret: str) -> str:
    """The key workers present: opens the worker routes only."""
    return _derive(cluster_secret, "worker")


def peer_key(cluster_secret: str) -> str:
    """The key endpoints present to each other: opens the peer routes only."""
    return _derive(cluster_secret, "peer")


def scaler_key(cluster_secret: str) -> str:
    """The key a scaler presents: opens the scaler routes and the details of /stats, nothing else."""
    return _derive(cluster_secret, "scaler")


def operator_key(cluster_secret: str) -> str:
    """The operator's password for the dashboard's details (HTTP Basic); opens no internal route."""
    return _derive(cluster_secret, "operator")


def _derive(cluster_secret: str, role: str) -> str:
    return hmac.new(cluster_secret.encode(), f"dynamic-workload {role} key".encode(), hashlib.sha256).hexdigest()


def read_secret(secret_file: str = "") -> str:
    """From `secret_file` if given, else from the DW_SECRET environment variable.

    Never taken from a command-line flag: those show up in `ps` and in shell history.
    """
    if secret_file:
        secret = Path(secret_file).read_text().strip()
        source = secret_file
    else:
        secret = os.environ.get("DW_SECRET", "").strip()
        source = "DW_SECRET"
    if not secret:
        raise SystemExit("no cluster secret: pass --secret-file (or DW_SECRET_FILE) or set DW_SECRET")
    if len(secret) < MIN_SECRET_LENGTH:
        raise SystemExit(f"the cluster secret from {source} is shorter than {MIN_SECRET_LENGTH} characters")
    return secret
