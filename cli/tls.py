"""How every client of the cluster talks HTTPS: the worker, the peer, the scaler, the deploy.

One rule: the server's certificate and its host name are always checked, against the cluster's
CA (`--tls-ca` / DW_TLS_CA, the file `./deploy.sh` writes) or, without one, against the
system's CAs. There is no switch that skips the check. Plain `http://` URLs are still allowed
(a cluster deployed without TLS); `urlopen` simply passes them on.

Standard library only, and Python 3.9 like the worker, which is shipped with this package.
"""

from __future__ import annotations

import ssl
import urllib.request
from http.client import HTTPResponse
from urllib.parse import urlsplit

CA_ENV = "DW_TLS_CA"  # every program's name for the CA it verifies endpoints against


def client_context(ca_file: str = "") -> ssl.SSLContext:
    """Verifies the certificate chain and the host name (or IP address) of the server; TLS 1.2 or later."""
    context = ssl.create_default_context(cafile=ca_file or None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def is_https(url: str) -> bool:
    return urlsplit(url).scheme == "https"


def urlopen(request: str | urllib.request.Request, timeout: float, ca_file: str = "") -> HTTPResponse:
    """urllib's urlopen, verifying an https server against `ca_file` (or the system's CAs)."""
    import urllib.request  # here: the worker, which imports this module at start, never needs it

    url = request if isinstance(request, str) else request.full_url
    context = client_context(ca_file) if is_https(url) else None
    return urllib.request.urlopen(request, timeout=timeout, context=context)
