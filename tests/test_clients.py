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


def test_what_the_payload_is_for_each_client_form(working_pair: tuple[Endpoint, Endpoint], tmp_path: Path) -> None:
    """README, "What the payload is": a urlencoded body is a form only when it is well-formed and has
    one `data` field; anything else is the raw body. `buffer` is the fallback for every body type."""
    a, _ = working_pair
    form_looking = tmp_path / "f"
    form_looking.write_bytes(b"data=42\nhello world\n")  # printf 'data=42\nhello world\n' > f
    url = f"{a.url}/enqueue?iterations=2"
    cases = [
        (("--data-binary", f"@{form_looking}"), form_looking.read_bytes()),  # sent as a form, is no form
        (("--data-binary", "hello&data=evil"), b"hello&data=evil"),
        (("-d", "data=Hello"), b"Hello"),
        (("-d", "data=a%3Db+c", "-d", "other=1"), b"a=b c"),
        (("-d", "other=1"), b"other=1"),  # a form without `data`: the raw body
        (("-F", f"data=@{form_looking}"), form_looking.read_bytes()),
        (("--data-binary", "{not a form}", "-H", "Content-Type: application/json"), b"{not a form}"),
    ]
    expected: dict[str, str] = {}
    for args, payload in cases:
        expected[enqueued_id(curl("-X", "PUT", url, *args))] = reference(payload, 2)
    for args in (("-d", "other=1"), ("-F", "other=1"), ("--data-binary", "raw")):  # buffer, whatever the body
        expected[enqueued_id(curl("-X", "PUT", f"{url}&buffer=fallback", *args))] = reference(b"fallback", 2)
    results = {item["id"]: item["result"] for item in drain([a], len(expected))}
    assert results == expected


@pytest.mark.parametrize("args", [("-d", "data=a", "-d", "data=b"), ("-F", "data=a", "-F", "data=b")],
                         ids=["urlencoded", "multipart"])
def test_a_data_field_given_twice_is_refused(pair: tuple[Endpoint, Endpoint], args: tuple[str, ...]) -> None:
    a, _ = pair
    completed = subprocess.run(["curl", "-sS", "-X", "PUT", f"{a.url}/enqueue?iterations=1", *args,
                                "-w", "\n%{http_code}"], capture_output=True, check=True, timeout=30)
    answer, status = completed.stdout.decode().rsplit("\n", 1)
    assert status == "400"
    assert "'data' is given more than once" in json.loads(answer)["error"]
    assert a.stats()["pending"] == 0
