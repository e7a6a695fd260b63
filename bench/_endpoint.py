"""Start and stop a throwaway endpoint for a benchmark."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cli.tls import urlopen
from endpoint.secret import worker_key

REPO = Path(__file__).resolve().parent.parent
SECRET = "bench-secret-0123456789abcdef"  # the cluster secret of the throwaway endpoint
WORKER_KEY = worker_key(SECRET)  # what its workers present


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def running_endpoint(*extra_args: str, port: int = 0,
                     ca_file: str = "", node: str = "a") -> Iterator[tuple[str, subprocess.Popen[bytes], Path]]:
    """Yields (base URL, server process, data directory with <node>.sqlite3); the server runs in its own
    process group. With `--tls-cert` among the arguments the URL is https, checked against `ca_file`."""
    with tempfile.TemporaryDirectory(prefix="dw-bench-") as directory:
        port = port or free_port()
        process = subprocess.Popen(
            [sys.executable, "-m", "endpoint", "--port", str(port), "--node-id", node,
             "--db", f"{directory}/{node}.sqlite3", "--log-level", "WARNING", *extra_args],
            cwd=REPO, env={**os.environ, "DW_SECRET": SECRET}, start_new_session=True,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"{'https' if '--tls-cert' in extra_args else 'http'}://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 20
            while True:
                try:
                    urlopen(f"{url}/stats", 1, ca_file).read()
                    break
                except OSError:
                    if time.monotonic() > deadline or process.poll() is not None:
                        raise RuntimeError("endpoint did not start") from None
                    time.sleep(0.1)
            yield url, process, Path(directory)
        finally:
            stop_group(process, signal.SIGTERM, 15)


def group_pids(pgid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid:
                pids.append(int(entry.name))
    return pids


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of one process in KiB: resident now, and the peak."""
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(status["VmRSS"].split()[0]), int(status["VmHWM"].split()[0])


def stop_group(process: subprocess.Popen[Any], first: signal.Signals, patience: float) -> int:
    """Send `first` to the process group the bench started, SIGKILL it if it is not gone within
    `patience` seconds; the leader's exit status."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, first)
    try:
        return process.wait(patience)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        return process.wait()
