"""The fake AWS of the tests: moto's server for the EC2, IAM and SSM APIs (MotoServer).

It listens on 127.0.0.1 (or on a HostNetwork's gateway, so that processes inside the fake hosts
of tests/fakehosts.py reach it too), in a process group of its own, stopped at teardown. Children
point boto3 at it with the variables of `env()` (AWS_ENDPOINT_URL and fake credentials). moto
starts instances as running at once and does not de-duplicate ClientToken: no test leans on either.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import free_port, kill_group, wait_for

PYTHON = sys.executable

_NO_PROXY_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only, never a proxy


class MotoServer:
    """moto's server on 127.0.0.1:<free port> (or on `host`, e.g. a HostNetwork's gateway, so that
    processes inside the fake hosts reach it too), in a process group of its own."""

    def __init__(self, directory: str | Path, timeout: float = 30.0, host: str = "127.0.0.1") -> None:
        self.host = host
        self.log_path = Path(directory) / "moto-server.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0
        for _attempt in range(3):  # the free port may be taken between choosing and binding it
            self.port = free_port()
            with open(self.log_path, "ab") as log:
                self.process = subprocess.Popen(
                    [PYTHON, "-m", "moto.server", "-H", self.host, "-p", str(self.port)],
                    env={**os.environ, **self._server_env()}, stdin=subprocess.DEVNULL, stdout=log,
                    stderr=subprocess.STDOUT, start_new_session=True)
            try:
                wait_for(self._answers, timeout, "moto server to answer")
                return
            except RuntimeError:  # it exited: try another port
                self.stop()
            except BaseException:
                self.stop()
                raise
        raise AssertionError(f"moto server did not start:\n{self.log()}")

    @staticmethod
    def _server_env() -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_EC2_METADATA_DISABLED": "true", "PYTHONUNBUFFERED": "1"}

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _answers(self) -> bool:
        if self.process is None or self.process.poll() is not None:
            raise RuntimeError("moto server exited")
        try:
            with _NO_PROXY_OPENER.open(f"{self.url}/moto-api/", timeout=2) as response:
                return response.status < 500
        except urllib.error.HTTPError as error:
            return error.code < 500
        except OSError:
            return False

    def env(self) -> dict[str, str]:
        """What a boto3 client or a child process needs to talk to this server and nothing else."""
        return {
            "AWS_ENDPOINT_URL": self.url,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",  # never ask 169.254.169.254 for credentials
        }

    def client(self, service: str) -> Any:
        """A boto3 client for this server (explicit settings: the process environment plays no part)."""
        import boto3

        return boto3.client(service, endpoint_url=self.url, region_name="us-east-1", aws_access_key_id="testing",
                            aws_secret_access_key="testing")

    def reset(self) -> None:
        """Forgets all state (instances, key pairs, tags...)."""
        request = urllib.request.Request(f"{self.url}/moto-api/reset", data=b"", method="POST")
        with _NO_PROXY_OPENER.open(request, timeout=30) as response:
            assert response.status == 200, response.status

    def stop(self) -> None:
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            kill_group(self.process.pid)
            self.process.wait(10)
        kill_group(self.process.pid)  # anything else left in its group
        self.process = None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


# Each fixture is registered under its name= and also bound to that name (see tests/fakehosts.py).

@pytest.fixture(name="moto_server", scope="session")
def moto_server_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    """One moto server for the whole session; use `aws` in tests to start each test from empty state."""
    server = MotoServer(tmp_path_factory.mktemp("moto"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(name="aws")
def aws_fixture(moto_server: MotoServer) -> dict[str, str]:
    """Resets moto, then returns the environment variables that point boto3 at it (a fresh dict per test)."""
    moto_server.reset()
    return moto_server.env()


moto_server = moto_server_fixture
aws = aws_fixture
