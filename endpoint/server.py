"""One endpoint per data file and per port, and the server that runs it.

`python -m endpoint` takes an exclusive lock beside its data file (`<db>.lock`, flock) and binds
its port without port sharing before granian starts. Both live in the launching process, which
is granian's supervisor, for the server's whole life; the app process that granian forks
inherits them. So a second endpoint on the same file or port fails at once, and the lock is
only released when every process of the server is gone. An app process that granian starts
while an earlier one still runs (a respawn, a SIGHUP reload) first waits for the earlier one
to exit: the data file never has two writers.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import multiprocessing
import os
import socket
import time
from pathlib import Path
from typing import Any

from granian.net import SocketHolder
from granian.server import MPServer

from endpoint.bridge import STOP_READING


class InUse(Exception):
    """Another endpoint holds the data file or the port."""


class DataFileLock:
    """An exclusive flock on `<db>.lock`, recording the holder's PID inside."""

    def __init__(self, db_path: str) -> None:
        self.db_path = os.path.abspath(db_path)
        self.path = self.db_path + ".lock"
        self.fd: int | None = None

    def acquire(self) -> None:
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise InUse(f"{self.db_path} is in use by another endpoint (PID {holder}; lock file {self.path})") \
                from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd

    def wait_as_writer(self, timeout_s: float = 60.0) -> None:
        """In the app process: wait until no earlier app process of this server holds the file.

        A POSIX record lock on the same file: per process, and independent of the flock that the
        whole server shares, so only an app process still running blocks the next one."""
        assert self.fd is not None, "acquire() first"
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.lockf(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except OSError as exc:
                if exc.errno not in (errno.EACCES, errno.EAGAIN) or time.monotonic() > deadline:
                    raise
            time.sleep(0.05)


def listen_exclusively(host: str, port: int, backlog: int) -> socket.socket:
    """A listening socket that no other process shares: no SO_REUSEPORT."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        # SO_REUSEADDR only lets a restart bind past connections in TIME_WAIT; a second
        # listener on the port is still refused.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise InUse(f"cannot listen on {host}:{port}: address already in use") from None
        raise
    sock.set_inheritable(True)
    return sock


class ExclusiveServer(MPServer):
    """granian's multi-process server, serving on a socket bound beforehand (granian's own
    socket shares the port with SO_REUSEPORT, so a second server would silently join)."""

    def __init__(self, *args: Any, listener: socket.socket, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.listener = listener
        # The app process must inherit the listener and the lock: fork, whatever the default.
        multiprocessing.set_start_method("fork", force=True)

    def _stop_workers(self) -> None:
        # First tell the app processes to give up on requests still being read (see
        # endpoint.bridge.STOP_READING): granian drains every request in progress before it stops.
        for worker in self.wrks:
            if worker.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.inner.pid, STOP_READING)
        super()._stop_workers()

    def _init_shared_socket(self) -> None:
        self._ssp = None
        self._sfd = self.listener.fileno()
        self._shd = SocketHolder(self._sfd, False, self.backlog)
        self._sso = self.listener


_held: DataFileLock | None = None  # the launcher's lock; a forked app process finds it here


def hold_data_lock(db_path: str) -> DataFileLock:
    global _held
    lock = DataFileLock(db_path)
    lock.acquire()
    _held = lock
    return lock


def held_data_lock() -> DataFileLock:
    if _held is None:
        raise RuntimeError("the data file lock is not held: start the endpoint with `python -m endpoint`")
    return _held
