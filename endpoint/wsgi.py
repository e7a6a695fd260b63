"""The WSGI application as the server's worker process builds it: `endpoint.wsgi:create_app`."""

from __future__ import annotations

import atexit
import functools
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

import bottle
import granian._signals as granian_signals

from endpoint.app import Limits, make_app
from endpoint.config import from_env
from endpoint.peer import Peer
from endpoint.secret import peer_key, read_secret
from endpoint.store import Store

log = logging.getLogger("endpoint")


def create_app() -> bottle.Bottle:
    settings = from_env()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    secret = read_secret(settings.secret_file)
    store = Store(settings.db_path, settings.node_id, lease_seconds=settings.lease_seconds,
                  max_attempts=settings.max_attempts, synchronous=settings.synchronous,
                  retention_days=settings.retention_days, max_waiting_claims=settings.max_waiting_claims)
    atexit.register(store.close)
    _exit_with_parent(store)
    _end_waiting_claims_at_shutdown(store)
    peer = Peer(settings.peer, peer_key(secret)) if settings.peer else None
    limits = Limits(settings.max_payload_bytes, settings.max_iterations, settings.max_top)
    log.info("endpoint %s serving on http://%s:%d (db %s, peer %s)", settings.node_id, settings.host,
             settings.port, store.path, settings.peer or "none")
    return make_app(store, secret, limits, peer, settings.instance_id)


def _end_waiting_claims_at_shutdown(store: Store) -> None:
    """granian finishes every request in progress before its app process exits, and a claim may be
    waiting for work for many seconds: end the waits as soon as the server is told to stop.

    granian's app process calls set_sync_signals() once the app is loaded, on its main thread, to
    install its SIGTERM and SIGINT handlers; each is wrapped here to end the waits first. (The
    request reader of endpoint/bridge.py will end them from its own stop signal instead.)"""
    original = granian_signals.set_sync_signals

    def set_sync_signals() -> Any:
        event = original()
        for signum in (signal.SIGTERM, signal.SIGINT):
            granian_handler = signal.getsignal(signum)
            if callable(granian_handler):
                signal.signal(signum, functools.partial(_stop_waiting_then, store, granian_handler))
        return event

    granian_signals.set_sync_signals = set_sync_signals


def _stop_waiting_then(store: Store, handler: Callable[[int, FrameType | None], Any], signum: int,
                       frame: FrameType | None) -> None:
    store.stop_waiting()
    handler(signum, frame)


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
