"""Run one endpoint: `python -m endpoint --node-id a --port 5000 --peer http://127.0.0.1:5001`.

Served by granian (a compiled HTTP/1.1 core) in one app process: `endpoint.bridge` reads each
request on granian's event loop within time and size limits, then the Bottle app answers it
on one of `--threads` threads. This process is granian's supervisor; it holds the data file's
lock and the listening socket for the server's whole life (`endpoint.server`).
"""

from __future__ import annotations

import os
import resource
import sys
from pathlib import Path

from granian.constants import HTTPModes, Interfaces
from granian.http import HTTP1Settings

from endpoint import server
from endpoint.config import export, parse_args
from endpoint.secret import read_secret

# File descriptors beyond the client connections: the database, its WAL, logs, peer connections.
_SPARE_FILES = 64


def main(argv: list[str] | None = None) -> int:
    os.umask(0o077)  # its database, WAL and logs hold the users' payloads and results: owner-only
    settings = parse_args(argv)
    read_secret(settings.secret_file)  # fail here, with a clear message, rather than in the server's worker
    try:
        server.hold_data_lock(settings.db_path)
        listener = server.listen_exclusively(settings.host, settings.port, backlog=1024)
    except server.InUse as exc:
        print(f"endpoint: {exc}", file=sys.stderr)
        return 1
    _allow_open_files(settings.max_connections + _SPARE_FILES)
    os.environ.update(export(settings))
    server.ExclusiveServer(
        "endpoint.wsgi:create_app",
        factory=True,
        listener=listener,
        interface=Interfaces.ASGI,  # with lifespan, to learn of the server stopping (endpoint.bridge)
        # HTTP/1.1 only: granian's HTTP/2 detection keeps a silent connection open with no time
        # limit, and no client of this API needs HTTP/2.
        http=HTTPModes.http1,
        http1_settings=HTTP1Settings(header_read_timeout=int(settings.header_timeout * 1000)),
        address=settings.host,
        port=settings.port,
        workers=1,  # one app process: its writer thread is the file's only writer
        backpressure=settings.max_connections,
        log_level=settings.log_level.lower(),
        respawn_failed_workers=True,
        websockets=False,
        # With a certificate, the port speaks TLS only (1.3, granian's minimum): no plain HTTP.
        ssl_cert=Path(settings.tls_cert) if settings.tls else None,
        ssl_key=Path(settings.tls_key) if settings.tls else None,
    ).serve()
    return 0


def _allow_open_files(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        wanted = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


if __name__ == "__main__":
    sys.exit(main())
