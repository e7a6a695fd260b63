"""The client commands of earlier systems (shared/reference/prior-art.md) work unchanged,
and every result equals the hashlib reference."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from conftest import Endpoint, Services, drain, reference


def curl(*args: str) -> str:
    completed = subprocess.run(["curl", "--silent", "--show-error", "--fail-with-body", *args],
                               capture_output=True, check=True, timeout=60)
    return completed.stdout.decode()


def enqueued_id(output: str) -> str:
    return json.loads(output)["id"]


@pytest.fixture
def working_pair(services: Services, pair: tuple[Endpoint, Endpoint]) -> tuple[Endpoint, Endpoint]:
    services.worker(list(pair), processes=2)
    return pair


def test_prior_art_client_commands(working_pair: tuple[Endpoint, Endpoint], tmp_path: Path) -> None:
    a, b = working_pair
    dummy = tmp_path / "dummy"
    dummy.write_bytes(os.urandom(100_000))
    expected: dict[str, str] = {}

    for host in (a.url, b.url):
        # A: payload in the query string, capitalised parameter name
        query = "buffer=some%20text%20I%20Implemented&Iterations=10"
        output = curl("--location", "--request", "PUT", f"{host}/enqueue?{query}")
        expected[enqueued_id(output)] = reference(b"some text I Implemented", 10)
        # C: multipart file upload
        output = curl(f"{host}/enqueue?iterations=3", "-F", f"data=@{dummy}", "-X", "PUT")
        expected[enqueued_id(output)] = reference(dummy.read_bytes(), 3)
        # D: urlencoded form field
        output = curl("-X", "PUT", f"{host}/enqueue?iterations=10", "-d", "data=Hello")
        expected[enqueued_id(output)] = reference(b"Hello", 10)
        # raw body
        output = curl("-X", "PUT", f"{host}/enqueue?iterations=10", "--data-binary", f"@{dummy}")
        expected[enqueued_id(output)] = reference(dummy.read_bytes(), 10)

    # Each endpoint's own ids name it.
    assert sorted(work_id[0] for work_id in expected) == ["a"] * 4 + ["b"] * 4

    received: dict[str, str] = {}
    pulls = [
        ("--location", "--request", "POST", f"{a.url}/pullCompleted?top=5"),
        ("-X", "POST", f"{b.url}/pullCompleted?top=3"),
        ("-X", "POST", f"{a.url}/pullCompleted?top=2"),
    ]
    for _ in range(200):
        for command in pulls:
            for item in json.loads(curl(*command)):
                assert item["id"] not in received, "a result was delivered twice"
                received[item["id"]] = item["result"]
        if len(received) == len(expected):
            break
    assert received == expected


@pytest.mark.parametrize("iterations", [1, 2, 100_000])
@pytest.mark.parametrize("size", [1, 16 * 1024, 1024 * 1024], ids=["1B", "16KiB", "1MiB"])
def test_results_equal_reference(working_pair: tuple[Endpoint, Endpoint], iterations: int, size: int) -> None:
    a, b = working_pair
    payload_a, payload_b = os.urandom(size), os.urandom(size)
    expected = {a.enqueue(payload_a, iterations): reference(payload_a, iterations),
                b.enqueue(payload_b, iterations): reference(payload_b, iterations)}
    results = {item["id"]: item["result"] for item in drain([a, b], 2)}
    assert results == expected
    for work_id, result in expected.items():
        status = a.work(work_id).json()
        assert status["state"] == "completed"
        assert status["result"] == result
        assert status["payload_bytes"] == size
