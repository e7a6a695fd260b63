"""The worker with each hashing kernel (forced by --kernel), end to end: exact results, lanes of
different lengths, a lane cancelled while the others go on, and the fallback to the Python loop."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import requests

from conftest import PYTHON, REPO, WORKER_AUTH, WORKER_KEY, Endpoint, Services, drain, reference, wait_for
from worker.native import LANES_PREFERENCE, select_kernel

LIBRARY = REPO / "worker" / "sha512_lanes.so"
ITERATIONS = (1, 2, 3, 8191, 8192, 8193, 100_000)


@pytest.fixture(scope="module")
def built_library() -> Path:
    built = subprocess.run(["sh", str(REPO / "worker" / "build_kernel.sh")], capture_output=True, text=True)
    if built.returncode == 2:
        pytest.skip("no C compiler on this machine")
    assert built.returncode == 0, built.stderr
    return LIBRARY


def supported_kernels() -> list[str]:
    """The native kernels this machine runs (they pass the self-check), and python."""
    if not LIBRARY.exists():
        subprocess.run(["sh", str(REPO / "worker" / "build_kernel.sh")], capture_output=True)
    kernels = [name for name in LANES_PREFERENCE if select_kernel(name, LIBRARY).name == name]
    return kernels + ["python"]


def enqueue_mix(endpoints: list[Endpoint], copies: int) -> dict[str, str]:
    """Jobs of different lengths (so lanes finish at different times) and payloads of 1 byte to 1 MiB."""
    expected = {}
    sizes = (1, 64, 1000, 1 << 20)
    for copy in range(copies):
        for index, iterations in enumerate(ITERATIONS):
            payload = os.urandom(sizes[(index + copy) % len(sizes)])
            endpoint = endpoints[(index + copy) % len(endpoints)]
            expected[endpoint.enqueue(payload, iterations)] = reference(payload, iterations)
    return expected


@pytest.mark.parametrize("kernel", supported_kernels())
def test_the_worker_gives_exact_results_with_each_kernel(services: Services, built_library: Path,
                                                         kernel: str) -> None:
    a, b = services.endpoint_pair()
    expected = enqueue_mix([a, b], copies=3)  # 21 jobs: more than the lanes of one slot
    worker = services.worker([a, b], processes=2, extra_args=("--kernel", kernel))
    results = {item["id"]: item["result"] for item in drain([a, b], len(expected), timeout=120)}
    assert results == expected
    assert f"hashing kernel: {kernel}" in worker.log()
    assert a.stats(public=True)["kernels"] == {kernel: 1}
    lanes = 1 if kernel in ("python", "scalar") else select_kernel(kernel, built_library).lanes
    reported = {entry["id"]: entry for entry in a.stats()["workers"]}
    assert [(entry["processes"], entry["capacity"]) for entry in reported.values()] == [(2, 2 * lanes)]


def test_without_the_library_the_worker_falls_back_to_python_and_says_why(services: Services,
                                                                          tmp_path: Path) -> None:
    endpoint = services.endpoint("a")
    expected = enqueue_mix([endpoint], copies=1)
    missing = tmp_path / "nowhere" / "sha512_lanes.so"
    worker = services.start("worker-fallback", [*services_worker_args(endpoint), "--kernel", "auto"],
                            {"DW_SECRET": WORKER_KEY, "DW_KERNEL_LIBRARY": str(missing)})
    results = {item["id"]: item["result"] for item in drain([endpoint], len(expected), timeout=120)}
    assert results == expected
    log = worker.log()
    assert "hashing kernel: python" in log and f"{missing} is missing" in log
    assert endpoint.stats(public=True)["kernels"] == {"python": 1}


def test_a_library_that_is_not_one_falls_back_too(services: Services, tmp_path: Path) -> None:
    endpoint = services.endpoint("a")
    expected = enqueue_mix([endpoint], copies=1)
    broken = tmp_path / "sha512_lanes.so"
    broken.write_bytes(b"\x7fELF but not really a library")
    worker = services.start("worker-broken", [*services_worker_args(endpoint), "--kernel", "avx2"],
                            {"DW_SECRET": WORKER_KEY, "DW_KERNEL_LIBRARY": str(broken)})
    results = {item["id"]: item["result"] for item in drain([endpoint], len(expected), timeout=120)}
    assert results == expected
    assert "does not load" in worker.log() and "hashing kernel: python" in worker.log()


def services_worker_args(endpoint: Endpoint) -> list[str]:
    return [PYTHON, "-m", "worker", "--processes", "1", "--idle-timeout", "300", "--endpoint", endpoint.url]


def test_a_lost_lease_cancels_its_lane_only(services: Services, built_library: Path) -> None:
    """Three long jobs share one slot's lanes; one of them is completed elsewhere meanwhile: its lane
    stops at the next renewal, the others go on and deliver exact results."""
    kernel = supported_kernels()[0]
    endpoint = services.endpoint("a", extra_args=("--lease-seconds", "3"))
    iterations = 30_000_000 if kernel != "python" else 6_000_000
    payloads = [f"lane {index}".encode() for index in range(3)]
    ids = [endpoint.enqueue(payload, iterations) for payload in payloads]
    worker = services.worker([endpoint], processes=1, extra_args=("--kernel", kernel))
    if kernel == "python":  # one lane: the jobs run one after the other; the first one is the one to lose
        wait_for(lambda: endpoint.stats()["running"] >= 1, what="the worker to claim")
    else:
        wait_for(lambda: endpoint.stats()["running"] == 3, what="all three jobs in the worker's lanes")
    lost = next(work_id for work_id in ids if endpoint.work(work_id).json()["state"] == "running")
    # Another worker's result for it (any result: the first one stored wins).
    answer = requests.post(f"{endpoint.url}/internal/results", headers=WORKER_AUTH, timeout=10,
                           json={"worker": "elsewhere", "results": [{"id": lost, "result": "e" * 128}]})
    assert answer.json() == {"answers": ["done"]}
    wait_for(lambda: "is completed, abandoning it" in worker.log(), timeout=10, what="the lane to be cancelled")
    results = {item["id"]: item["result"] for item in drain([endpoint], 3, timeout=180)}
    for work_id, payload in zip(ids, payloads, strict=True):
        if work_id == lost:
            assert results[work_id] == "e" * 128  # ours was never sent
        else:
            assert results[work_id] == reference(payload, iterations)
    assert endpoint.work(lost).json()["worker_id"] == "elsewhere"
