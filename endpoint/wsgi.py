"""The application as granian's app process builds it: `endpoint.wsgi:create_app`.

The Bottle (WSGI) app of endpoint/app.py, behind the request reader of endpoint/bridge.py.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import threading
import time

from endpoint.app import Limits, make_app
from endpoint.bridge import STOP_READING, ReadLimits, RequestReader
from endpoint.config import from_env
from endpoint.inputs import FORM_OVERHEAD_BYTES
from endpoint.metrics import Metrics
from endpoint.peer import Peer
from endpoint.prices import PriceTable
from endpoint.secret import peer_key, read_secret
from endpoint.server import held_data_lock
from endpoint.store import Store

log = logging.getLogger("endpoint")


def create_app() -> RequestReader:
    signal.signal(STOP_READING, signal.SIG_IGN)  # until the request reader handles it
    settings = from_env()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    secret = read_secret(settings.secret_file)
    held_data_lock().wait_as_writer()  # an earlier app process of this server may still be exiting
    store = Store(settings.db_path, settings.node_id, lease_seconds=settings.lease_seconds,
                  max_attempts=settings.max_attempts, synchronous=settings.synchronous,
                  retention_days=settings.retention_days, max_waiting_claims=settings.max_waiting_claims)
    atexit.register(store.close)
    _exit_with_parent(store)
    peer = Peer(settings.peer, peer_key(secret), ca_file=settings.tls_ca) if settings.peer else None
    limits = Limits(settings.max_payload_bytes, settings.max_iterations, settings.max_top)
    log.info("endpoint %s serving on %s://%s:%d (db %s, peer %s)", settings.node_id,
             "https" if settings.tls else "http", settings.host,
             settings.port, store.path, settings.peer or "none")
    metrics = Metrics(store)
    app = make_app(store, secret, limits, peer, settings.instance_id, metrics, PriceTable(settings.prices),
                   client_keys=settings.client_keys == "on")
    read_limits = ReadLimits(settings.max_payload_bytes + FORM_OVERHEAD_BYTES, settings.body_timeout)
    # Claims that wait for work are held on the reader's event loop, not on the app's threads.
    return RequestReader(app, read_limits, settings.threads, metrics.observe_request, news=store.work_signal)


def _exit_with_parent(store: Store) -> None:
    """Stop serving if the server's supervising process dies (e.g. SIGKILL), rather than
    linger as an orphan that holds the port and the database."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1)
        log.error("server supervisor %d is gone: exiting", parent)
        store.close()
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
