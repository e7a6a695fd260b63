"""Files the endpoint and the scaler create are owner-only also when they are started by hand from a shell
whose umask lets others read (022): databases, WAL files, locks, local worker records and logs."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from conftest import PYTHON, SECRET, Services, drain, wait_for


@pytest.fixture
def open_umask() -> Iterator[None]:
    """The processes the test starts inherit umask 022, the usual shell default."""
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


def modes_open_to_others(directory: Path, besides: set[Path]) -> dict[str, str]:
    return {str(path.relative_to(directory)): oct(stat.S_IMODE(path.lstat().st_mode))
            for path in directory.rglob("*") if path not in besides and stat.S_IMODE(path.lstat().st_mode) & 0o077}


def test_an_endpoint_and_a_scaler_started_by_hand_create_owner_only_files(open_umask: None, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    services = Services(data)
    try:
        endpoint = services.endpoint("a")  # its --db in data/
        wait_for(lambda: endpoint.db.with_name("a.sqlite3-wal").exists(), 10, "the WAL file")
        state = data / "state"
        secret_file = data / "secret"
        secret_file.write_text(SECRET + "\n")
        secret_file.chmod(0o600)
        response = requests.put(f"{endpoint.url}/enqueue?iterations=5", data=b"x",
                                headers={"Content-Type": "application/octet-stream"}, timeout=10)
        assert response.status_code == 200, response.text
        run = services.start("scaler", [
            PYTHON, "-m", "cron.scale", "--provider", "local", "--node-id", "a", "--url", endpoint.url,
            "--endpoint", endpoint.url, "--state-dir", str(state),
            "--secret-file", str(secret_file), "--scale-after", "0", "--idle-timeout", "5"])
        assert run.process is not None and run.process.wait(60) == 0, run.log()
        assert len(drain([endpoint], 1)) == 1  # the worker it launched ran the job

        created = {str(path.relative_to(data)) for path in data.rglob("*")}
        for name in ("a.sqlite3", "a.sqlite3-wal", "a.sqlite3-shm", "state/scale-a.lock", "state/workers",
                     "state/workers/worker-key", "state/log"):
            assert name in created, sorted(created)
        assert any(name.startswith("state/workers/local-a-") for name in created)
        assert any(name.startswith("state/log/worker-local-a-") for name in created)
        # The test's own logs of the processes' output aside (the shell's redirection would make those).
        assert modes_open_to_others(data, {service.log_path for service in services.started}) == {}
    finally:
        stop = services.start("terminate-all", [PYTHON, "-m", "cron.scale", "--provider", "local",
                                                "--terminate-all", "--state-dir", str(data / "state")])
        assert stop.process is not None
        stop.process.wait(60)
        services.stop_all()
