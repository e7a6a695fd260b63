"""The ssh provider: workers on a fixed list of the user's own hosts, split between the two scalers.

Four fake hosts (real sshd in network namespaces) and two endpoints on the bridge's gateway; the
scalers run as `python -m cron.scale --provider ssh`, as cron would run them.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from fakehosts import (
    HostNetwork,
    host_network_fixture,  # noqa: F401 -- fixture "host_network"
    ssh_keypair,
)

from conftest import PYTHON, REPO, SECRET, Services, drain, reference, wait_for


def scaler(node: str, index: int, hosts: list[str], key: Path, endpoints: list, tmp_path: Path,
           *extra: str) -> subprocess.CompletedProcess[str]:
    own, peer = endpoints[index], endpoints[1 - index]
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET)
    command = [PYTHON, "-m", "cron.scale", "--provider", "ssh", "--node-id", node, "--endpoint-index", str(index),
               "--url", own.url, "--peer", peer.url,
               "--endpoint", endpoints[0].url, "--endpoint", endpoints[1].url,
               "--ssh-hosts", ",".join(hosts), "--ssh-user", "root", "--ssh-key", str(key),
               "--worker-service", "process", "--remote-python", "/usr/bin/python3", "--worker-processes", "1",
               "--secret-file", str(secret_file), "--state-dir", str(tmp_path / f"state-{node}"),
               "--scale-after", "0", "--max-workers", "4", "--slots-per-worker", "1", "--target-drain", "2", *extra]
    env = {key: value for key, value in os.environ.items() if key != "DW_SECRET"}
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def running_workers(host_dirs: list[Path]) -> list[int]:
    """Indexes of the hosts whose worker process runs."""
    running = []
    for index, directory in enumerate(host_dirs):
        pid_file = directory / "dynamic-workload" / "worker.pid"
        if pid_file.exists():
            cmdline = Path(f"/proc/{pid_file.read_text().strip()}/cmdline")
            if cmdline.exists() and b"worker" in cmdline.read_bytes():
                running.append(index)
    return running


def test_ssh_provider_uses_each_scalers_own_hosts_and_stops_them(services: Services, host_network: HostNetwork,
                                                                  tmp_path: Path) -> None:
    # The workers' hosts have no compiler: provisioning ships the kernel built here (as the endpoint
    # hosts build it at deploy).
    built = subprocess.run(["sh", str(REPO / "worker" / "build_kernel.sh")], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    key, public = ssh_keypair(tmp_path / "client")
    hosts = [host_network.add_host(f"own-{index}") for index in range(4)]
    for host in hosts:
        host.start_sshd(public)
    addresses = [host.address for host in hosts]
    a, b = services.endpoint_pair(host=host_network.gateway)
    expected = {}
    # 160 jobs of 1,000,000 iterations to drain within 2 s: the backlog asks for the whole cap of 4
    # workers, also once the first workers report that each runs up to 8 of them at once.
    # Eight payloads, twenty jobs each: the reference (the pure-Python loop) is computed once per
    # payload, not 160 times (that alone took this test's two minutes); every item is still checked.
    references = {index: reference(f"ssh job {index}".encode(), 1_000_000) for index in range(8)}
    for index in range(160):
        payload = f"ssh job {index % 8}".encode()
        expected[(a, b)[index % 2].enqueue(payload, 1_000_000)] = references[index % 8]

    first = scaler("a", 0, addresses, key, [a, b], tmp_path)
    assert first.returncode == 0, first.stderr
    # Scaler 0 only ever uses hosts 0 and 2, scaler 1 hosts 1 and 3.
    assert set(running_workers([host.root_dir for host in hosts])) == {0, 2}
    second = scaler("b", 1, addresses, key, [a, b], tmp_path)
    assert second.returncode == 0, second.stderr
    assert set(running_workers([host.root_dir for host in hosts])) == {0, 1, 2, 3}

    results = {item["id"]: item["result"] for item in drain([a, b], len(expected), timeout=180)}
    assert results == expected
    for host in hosts:
        installed = host.root_dir / "dynamic-workload"
        shipped = (installed / "worker" / "sha512_lanes.so").read_bytes()
        assert shipped == (REPO / "worker" / "sha512_lanes.so").read_bytes()
        log = (installed / "worker.log").read_text()
        assert re.search(r"hashing kernel: (avx512|avx2|scalar), \d+ lane\(s\) per group: chosen", log), log
    kernels = a.stats(public=True)["kernels"]
    assert set(kernels) <= {"avx512", "avx2", "scalar"} and sum(kernels.values()) >= 1, kernels

    # --terminate-all stops the cluster's workers: here the worker service on every host, while
    # the machines themselves (their sshd) stay.
    stopped = scaler("a", 0, addresses, key, [a, b], tmp_path, "--terminate-all")
    assert stopped.returncode == 0, stopped.stderr
    wait_for(lambda: not running_workers([host.root_dir for host in hosts]), timeout=20, what="the workers to stop")
    assert all(host.sshd_running() for host in hosts)
