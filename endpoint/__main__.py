"""Run one endpoint: `python -m endpoint --node-id a --port 5000 --peer http://127.0.0.1:5001`.

Every flag falls back to an environment variable (shown in --help); the shared secret is
read from a file or the environment, never from the command line.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from types import FrameType

import waitress
import waitress.channel
import waitress.task

from endpoint.app import Limits, make_app
from endpoint.inputs import FORM_OVERHEAD_BYTES
from endpoint.peer import Peer
from endpoint.secret import read_secret
from endpoint.store import Store

log = logging.getLogger("endpoint")


class _JsonErrorTask(waitress.task.ErrorTask):
    """waitress answers some requests itself before the app sees them: a malformed request,
    or a declared body over max_request_body_size (refused before reading it). Make those
    answers JSON like every other error of ours."""

    def execute(self) -> None:
        error = self.request.error
        body = json.dumps({"error": f"{error.reason}: {error.body}"}).encode()
        self.status = f"{error.code} {error.reason}"
        self.response_headers.append(("Content-Type", "application/json"))
        self.set_close_on_finish()
        self.content_length = len(body)
        self.write(body)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ.get
    parser = argparse.ArgumentParser(prog="python -m endpoint", description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--host", default=env("DW_HOST", "127.0.0.1"), help="listen address [DW_HOST]")
    add("--port", type=int, default=env("DW_PORT", "5000"), help="listen port [DW_PORT]")
    add("--node-id", default=env("DW_NODE_ID", "a"), help="this endpoint's id, the prefix of its work ids [DW_NODE_ID]")
    add("--peer", default=env("DW_PEER_URL", ""), help="base URL of the other endpoint [DW_PEER_URL]")
    add("--db", default=env("DW_DB", ""), help="SQLite file [DW_DB] (default var/<node-id>.sqlite3)")
    add("--secret-file", default=env("DW_SECRET_FILE", ""), help="file holding the shared secret [DW_SECRET_FILE]; "
        "or put the secret itself in DW_SECRET")
    add("--threads", type=int, default=env("DW_THREADS", "32"), help="request threads [DW_THREADS]")
    add("--max-connections", type=int, default=env("DW_MAX_CONNECTIONS", "1000"),
        help="open connections accepted at once [DW_MAX_CONNECTIONS]")
    add("--max-payload-bytes", type=int, default=env("DW_MAX_PAYLOAD_BYTES", str(4 * 1024 * 1024)),
        help="largest payload accepted [DW_MAX_PAYLOAD_BYTES]")
    add("--max-iterations", type=int, default=env("DW_MAX_ITERATIONS", "100000000"),
        help="largest iterations accepted [DW_MAX_ITERATIONS]")
    add("--max-top", type=int, default=env("DW_MAX_TOP", "1000"), help="largest pullCompleted top [DW_MAX_TOP]")
    add("--lease-seconds", type=float, default=env("DW_LEASE_SECONDS", "30"),
        help="how long a claim lasts unless the worker renews it [DW_LEASE_SECONDS]")
    add("--max-attempts", type=int, default=env("DW_MAX_ATTEMPTS", "3"),
        help="claims an item gets before an expired lease marks it failed [DW_MAX_ATTEMPTS]")
    add("--synchronous", default=env("DW_SYNCHRONOUS", "FULL"), choices=["FULL", "NORMAL", "EXTRA"],
        help="SQLite synchronous setting: FULL makes every acknowledged write durable [DW_SYNCHRONOUS]")
    add("--log-level", default=env("DW_LOG_LEVEL", "INFO"), help="[DW_LOG_LEVEL]")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    secret = read_secret(args.secret_file)
    store = Store(
        args.db or f"var/{args.node_id}.sqlite3",
        args.node_id,
        lease_seconds=args.lease_seconds,
        max_attempts=args.max_attempts,
        synchronous=args.synchronous,
    )
    limits = Limits(args.max_payload_bytes, args.max_iterations, args.max_top)
    app = make_app(store, secret, limits, Peer(args.peer, secret) if args.peer else None)

    waitress.channel.HTTPChannel.error_task_class = _JsonErrorTask
    server = waitress.create_server(
        app,
        host=args.host,
        port=args.port,
        threads=args.threads,
        connection_limit=args.max_connections,
        max_request_body_size=args.max_payload_bytes + FORM_OVERHEAD_BYTES + 1,
        asyncore_use_poll=True,  # select() stops at 1024 descriptors
        ident="dynamic-workload",
    )

    def stop(signum: int, _frame: FrameType | None) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    log.info("endpoint %s serving on http://%s:%d (db %s, peer %s)",
             args.node_id, args.host, args.port, store.path, args.peer or "none")
    try:
        server.run()
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        server.close()
        store.close()
        log.info("endpoint %s stopped", args.node_id)


if __name__ == "__main__":
    sys.exit(main())
