"""One endpoint per data file and per port: a second one refuses to start and leaves the first alone."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

from conftest import PYTHON, Endpoint, Service, Services, free_port, group_members, wait_for


def start_second(services: Services, node_id: str, port: int, db: Path) -> Service:
    return services.start(f"second-{node_id}", [PYTHON, "-m", "endpoint", "--node-id", node_id, "--port", str(port),
                                                "--db", str(db), "--log-level", "WARNING"])


def exit_status(service: Service, timeout: float = 10) -> int:
    assert service.process is not None
    try:
        return service.process.wait(timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{service.name} is still running after {timeout}s:\n{service.log()}") from None


def assert_still_serving(endpoint: Endpoint) -> None:
    assert endpoint.service.running()
    for _ in range(20):  # with a shared port the kernel would spread these over both servers
        assert endpoint.enqueue(b"x", 1).startswith(f"{endpoint.node_id}-")


def test_second_endpoint_on_the_same_data_file_exits_at_once(services: Services, tmp_path: Path) -> None:
    first = services.endpoint("a")
    started = time.monotonic()
    second = start_second(services, "a", free_port(), first.db)
    assert exit_status(second) == 1
    assert time.monotonic() - started < 10
    log = second.log()
    assert f"{first.db} is in use by another endpoint (PID {first.service.pid};" in log, log
    assert_still_serving(first)


def test_second_endpoint_on_the_same_port_exits_at_once(services: Services, tmp_path: Path) -> None:
    first = services.endpoint("a")
    second = start_second(services, "b", first.port, tmp_path / "other.sqlite3")
    assert exit_status(second) == 1
    assert f"cannot listen on 127.0.0.1:{first.port}: address already in use" in second.log(), second.log()
    assert_still_serving(first)


def test_the_lock_goes_with_the_server(services: Services, tmp_path: Path) -> None:
    """Released when the server dies, even by SIGKILL; a new endpoint then takes the file."""
    first = services.endpoint("a")
    first.enqueue(b"kept", 1)
    first.service.kill()
    replacement = services.endpoint("a", port=free_port())
    assert replacement.stats()["pending"] == 1


def db_holders(endpoint: Endpoint) -> set[int]:
    """The processes of the endpoint's group that have its data file open."""
    holders = set()
    for pid in group_members(endpoint.service.pid):
        try:
            targets = {str(fd.readlink()) for fd in Path(f"/proc/{pid}/fd").iterdir()}
        except OSError:
            continue
        if str(endpoint.db) in targets:
            holders.add(pid)
    return holders


def test_a_reloaded_app_process_waits_for_the_old_one(services: Services) -> None:
    """granian's SIGHUP reload starts the new app process before it stops the old one; the new one
    must not open the data file while the old one still has it: one writer per file."""
    endpoint = services.endpoint("a")
    old = db_holders(endpoint)
    assert len(old) == 1
    endpoint.service.process.send_signal(signal.SIGHUP)
    seen: list[set[int]] = []

    def replaced() -> bool:
        holders = db_holders(endpoint)
        seen.append(holders)
        return bool(holders) and holders != old

    wait_for(replaced, timeout=30, what="the reloaded app process to open the data file")
    assert max(len(holders) for holders in seen) == 1, seen
    endpoint.wait_ready()
