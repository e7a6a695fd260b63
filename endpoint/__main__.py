"""Run one endpoint: `python -m endpoint --node-id a --port 5000 --peer http://127.0.0.1:5001`.

Served by granian, a threaded production server with a compiled HTTP core: it hands the
body to the app as a stream (so oversized uploads are refused before they are read) and
measured 2x waitress's throughput on the same app (see README, "Measured").
"""

from __future__ import annotations

import os
import sys

from granian import Granian
from granian.constants import Interfaces

from endpoint.config import export, parse_args
from endpoint.secret import read_secret


def main(argv: list[str] | None = None) -> None:
    os.umask(0o077)  # its database, WAL and logs hold the users' payloads and results: owner-only
    settings = parse_args(argv)
    read_secret(settings.secret_file)  # fail here, with a clear message, rather than in the server's worker
    os.environ.update(export(settings))
    Granian(
        "endpoint.wsgi:create_app",
        factory=True,
        interface=Interfaces.WSGI,
        address=settings.host,
        port=settings.port,
        workers=1,  # one process: its writer thread is the file's only writer
        blocking_threads=settings.threads,
        log_level=settings.log_level.lower(),
        respawn_failed_workers=True,
        websockets=False,
    ).serve()


if __name__ == "__main__":
    sys.exit(main())
