"""The scaler (`python -m cron.scale`) as cron runs it, against moto's EC2 and fake instances.

Real endpoints, real scaler processes, a real EC2 API (moto's server on 127.0.0.1) and real
"instances": sshd in network namespaces (tests/fakehosts.py) that the scaler provisions over
SSH. moto's instance addresses are never contacted: --test-ssh-addresses hands each new
instance a fake host's address instead (scaler 0 the even positions, scaler 1 the odd ones).
Workers run as detached processes whose exit command only touches a file. The endpoints
listen on the bridge's gateway address, where the workers inside the namespaces reach them.

A test only kills what it started: scaler runs are conftest Services (process groups), fake
hosts are cleaned up by the host_network fixture, local workers by --terminate-all plus a
check of their recorded pids.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fakeapi import BrokenApi
from fakeaws import (
    MotoServer,
    aws_fixture,  # noqa: F401 -- fixture "aws"
    moto_server_fixture,  # noqa: F401 -- fixture "moto_server"
)
from fakehosts import (
    FakeHost,
    HostNetwork,
    host_network_fixture,  # noqa: F401 -- fixture "host_network"
    public_key_from_private,
    ssh_keypair,
    write_private_key,
)

from cloud.ssh import REMOTE_DIR_NAME, HostKeyPins, SshTarget
from conftest import PYTHON, SECRET, WORKER_KEY, Endpoint, Service, Services, free_port, pid_alive, wait_for
from cron.provision import stop_worker

CLUSTER = "dwtest"
AMI = "ami-12c6146b"  # one of moto's images
LIVE = ("pending", "running")
GONE = ("shutting-down", "terminated")
BIG_JOB = 50_000_000  # iterations: ~30 s of hashing, so the backlog stays while a test runs
# Short, fixed settings so that every run is quick and its decision predictable: launch at once,
# one job of 1 s per worker within a 1 s target, i.e. one worker per pending item up to the cap.
DEFAULTS: dict[str, object] = {
    "max_workers": 1, "scale_after": 0, "target_drain": 1, "default_job_duration": 1, "slots_per_worker": 1,
    "worker_processes": 1, "max_launch_per_tick": 2, "idle_timeout": 300, "ready_deadline": 30,
    "silence_deadline": 300, "breaker_threshold": 3, "breaker_cooldown": 600,
    # One lane per worker, as these tests count one pending item per worker; and Python's speed,
    # which keeps BIG_JOB running for the whole test.
    "worker_kernel": "python",
}


# --- moto ----------------------------------------------------------------------------------------

def tags_of(instance: dict) -> dict[str, str]:
    return {tag["Key"]: tag["Value"] for tag in instance.get("Tags", [])}


def cluster_instances(ec2: Any, states: tuple[str, ...] = ()) -> list[dict]:
    filters = [{"Name": "tag:dw:cluster", "Values": [CLUSTER]}, {"Name": "tag:dw:role", "Values": ["worker"]}]
    if states:
        filters.append({"Name": "instance-state-name", "Values": list(states)})
    pages = ec2.get_paginator("describe_instances").paginate(Filters=filters)
    return [instance for page in pages for reservation in page["Reservations"] for instance in reservation["Instances"]]


def state_of(ec2: Any, instance_id: str) -> str:
    reservations = ec2.describe_instances(InstanceIds=[instance_id])["Reservations"]
    return reservations[0]["Instances"][0]["State"]["Name"]


def assert_nothing_unreconciled(ec2: Any) -> None:
    """Every worker instance ever launched is either provisioned (dw:ready) or terminated."""
    limbo = [(instance["InstanceId"], instance["State"]["Name"], tags_of(instance))
             for instance in cluster_instances(ec2)
             if instance["State"]["Name"] not in GONE and "dw:ready" not in tags_of(instance)]
    assert limbo == []


@dataclass
class Cloud:
    """moto prepared as ./setup.sh aws would: a key pair, a security group, the state file."""

    moto: MotoServer
    ec2: Any
    env: dict[str, str]
    key: Path  # the key pair's private key: the scaler's --ssh-key
    public_key: str  # what the fake instances authorize, as EC2 would install it
    aws_state: Path
    secret_file: Path


@pytest.fixture
def cloud(aws: dict[str, str], moto_server: MotoServer, tmp_path: Path) -> Cloud:
    ec2 = moto_server.client("ec2")
    material = ec2.create_key_pair(KeyName=f"{CLUSTER}-workers")["KeyMaterial"]
    key = write_private_key(tmp_path / "worker-key.pem", material)
    group = ec2.create_security_group(GroupName=f"{CLUSTER}-workers", Description="dw test workers")["GroupId"]
    aws_state = tmp_path / "aws-state.json"
    aws_state.write_text(json.dumps({"region": "us-east-1", "key_name": f"{CLUSTER}-workers", "key_path": str(key),
                                     "security_group_id": group, "subnet_ids": []}))
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET + "\n")
    secret_file.chmod(0o600)
    return Cloud(moto_server, ec2, aws, key, public_key_from_private(key), aws_state, secret_file)


# --- endpoints and fake instances ----------------------------------------------------------------

def endpoint_pair_on(services: Services, host: str) -> tuple[Endpoint, Endpoint]:
    """Endpoints a and b, peers of each other, listening on `host`."""
    port_a, port_b = free_port(host), free_port(host)
    a = services.endpoint("a", port_a, f"http://{host}:{port_b}", host=host)
    b = services.endpoint("b", port_b, f"http://{host}:{port_a}", host=host)
    return a, b


def enqueue_backlog(endpoint: Endpoint, count: int, iterations: int = BIG_JOB) -> None:
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda index: endpoint.enqueue(f"{endpoint.node_id}-{index}".encode(), iterations),
                      range(count)))
    assert endpoint.stats()["pending"] >= count - 2  # a worker may already have claimed some


def fake_hosts(network: HostNetwork, count: int, authorized: str | None, prefix: str = "w") -> list[FakeHost]:
    hosts = [network.add_host(f"{prefix}{index}") for index in range(count)]
    if authorized is not None:
        for host in hosts:
            host.start_sshd(authorized)
    return hosts


def host_at(hosts: list[FakeHost], address: str) -> FakeHost:
    return next(host for host in hosts if host.address == address)


def worker_pid_on(host: FakeHost) -> int | None:
    try:
        pid = int((host.root_dir / REMOTE_DIR_NAME / "worker.pid").read_text())
    except (OSError, ValueError):
        return None
    return pid if pid in host.pids() and pid_alive(pid) else None


def stop_worker_on(host: FakeHost, cloud: Cloud, pins_dir: Path) -> None:
    """Stops the worker on a fake host, as the loss of its instance would (the test's own pins)."""
    pid = worker_pid_on(host)
    stop_worker(SshTarget(f"test-{host.name}", host.address, "root", cloud.key), HostKeyPins(pins_dir / "pins.json"),
                "process")
    if pid is not None:
        wait_for(lambda: not pid_alive(pid), 10, f"the worker on {host} to stop")


# --- scaler runs ---------------------------------------------------------------------------------

class Scalers:
    """Builds the scaler's long command line and runs it as a conftest Service."""

    def __init__(self, services: Services, cloud: Cloud, directory: Path) -> None:
        self.services = services
        self.cloud = cloud
        self.directory = directory

    def state_dir(self, node: Endpoint) -> Path:
        return self.directory / f"scaler-{node.node_id}"

    def command(self, node: Endpoint, *, index: int = 0, peer: Endpoint | None = None, addresses: Sequence[str] = (),
                worker_endpoints: list[str] | None = None, peer_url: str = "", **flags: object) -> list[str]:
        """`peer_url`: the peer as this scaler reaches it, if not at `peer`'s own URL."""
        # Without fake hosts' addresses the scaler would SSH to moto's made-up instance addresses.
        assert addresses and all(address.startswith("10.231.") for address in addresses), addresses
        cloud = self.cloud
        args = [PYTHON, "-m", "cron.scale", "--node-id", node.node_id, "--endpoint-index", str(index),
                "--url", node.url, "--peer", peer_url or (peer.url if peer else ""),
                "--state-dir", str(self.state_dir(node)), "--secret-file", str(cloud.secret_file),
                "--provider", "ec2", "--cluster", CLUSTER, "--aws-state", str(cloud.aws_state),
                "--ssh-key", str(cloud.key), "--ssh-user", "root", "--remote-python", "/usr/bin/python3",
                "--worker-service", "process", "--worker-exit-command", "touch idle-exit-ran",
                "--ami", AMI, "--instance-type", "t3.micro", "--test-ssh-addresses", ",".join(addresses),
                "--log-level", "INFO"]
        for url in worker_endpoints or [node.url] + ([peer.url] if peer else []):
            args += ["--endpoint", url]
        for name, value in {**DEFAULTS, **flags}.items():
            args += [f"--{name.replace('_', '-')}", str(value)]
        return args

    def start(self, node: Endpoint, **options: Any) -> Service:
        return self.services.start(f"scaler-{node.node_id}", self.command(node, **options), env=self.cloud.env)

    def run(self, node: Endpoint, **options: Any) -> Service:
        return self.finish(self.start(node, **options))

    def finish(self, run: Service) -> Service:
        """Waits for a run; then every live instance must have a fake host's address, or a later run
        resuming its provisioning would contact moto's address for it."""
        self.wait(run)
        unaddressed = [i["InstanceId"] for i in cluster_instances(self.cloud.ec2, LIVE)
                       if "dw:test-address" not in tags_of(i)]
        assert unaddressed == [], f"instances without a test address:\n{run.log()}"
        return run

    def reset_breaker(self, node: Endpoint) -> Service:
        args = [PYTHON, "-m", "cron.scale", "--reset-breaker", "--url", node.url, "--node-id", node.node_id,
                "--state-dir", str(self.state_dir(node)), "--secret-file", str(self.cloud.secret_file)]
        return self.wait(self.services.start(f"reset-{node.node_id}", args, env=self.cloud.env))

    @staticmethod
    def wait(run: Service, timeout: float = 90) -> Service:
        assert run.process is not None
        try:
            status = run.process.wait(timeout)
        except subprocess.TimeoutExpired:
            run.kill()
            raise AssertionError(f"{run.name} did not finish within {timeout}s:\n{run.log()}") from None
        assert status == 0, f"{run.name} exited with {status}:\n{run.log()}"
        return run

    @staticmethod
    def wait_all(runs: list[Service], timeout: float = 90) -> None:
        """Waits for every run before judging any: none is left running when one failed."""
        deadline = time.monotonic() + timeout
        for run in runs:
            assert run.process is not None
            with contextlib.suppress(subprocess.TimeoutExpired):
                run.process.wait(max(0.1, deadline - time.monotonic()))
        for run in runs:
            Scalers.wait(run, timeout=0.1)


@pytest.fixture
def scalers(services: Services, cloud: Cloud, tmp_path: Path) -> Scalers:
    return Scalers(services, cloud, tmp_path)


class LiveCountSampler:
    """Polls moto in the background: the most live worker instances seen at any one moment."""

    def __init__(self, moto: MotoServer) -> None:
        self.ec2 = moto.client("ec2")
        self.most = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.most = max(self.most, len(cluster_instances(self.ec2, LIVE)))
            self.samples += 1
            self._stop.wait(0.1)

    def __enter__(self) -> LiveCountSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


# --- the cap ----------------------------------------------------------------------------------------

def test_two_scalers_at_once_never_exceed_the_cap(services: Services, host_network: HostNetwork, cloud: Cloud,
                                                  scalers: Scalers, tmp_path: Path) -> None:
    cap = 3
    shares = {"a": 2, "b": 1}  # split_cap(3, 0) and split_cap(3, 1)
    a, b = endpoint_pair_on(services, host_network.gateway)
    # Four addresses per scaler: even a scaler that ignored its share would find an address for
    # every instance it may launch in a round (--max-launch-per-tick 2), so nothing is ever
    # provisioned at a moto address.
    hosts = fake_hosts(host_network, 8, cloud.public_key)
    addresses = [host.address for host in hosts]
    pools = {"a": addresses[0::2], "b": addresses[1::2]}
    enqueue_backlog(a, 100)
    enqueue_backlog(b, 100)

    def both_at_once() -> list[dict]:
        with LiveCountSampler(cloud.moto) as sampler:
            runs = [scalers.start(a, index=0, peer=b, addresses=addresses, max_workers=cap),
                    scalers.start(b, index=1, peer=a, addresses=addresses, max_workers=cap)]
            scalers.wait_all(runs)
            for run in runs:
                scalers.finish(run)
        logs = "\n".join(run.log() for run in runs)
        assert sampler.samples > 0
        assert sampler.most <= cap, f"{sampler.most} live workers at one moment:\n{logs}"
        live = cluster_instances(cloud.ec2, LIVE)
        owners = [tags_of(instance)["dw:owner"] for instance in live]
        assert len(live) <= cap, logs
        assert {owner: owners.count(owner) for owner in shares} == shares, logs
        test_addresses = [tags_of(instance)["dw:test-address"] for instance in live]
        assert len(set(test_addresses)) == len(live)
        for instance in live:
            tags = tags_of(instance)
            assert "dw:ready" in tags, logs
            assert tags["dw:test-address"] in pools[tags["dw:owner"]]
            host = host_at(hosts, tags["dw:test-address"])
            assert worker_pid_on(host) is not None
            # The worker holds the worker key, never the cluster secret (which opens the peer routes).
            assert (host.root_dir / REMOTE_DIR_NAME / "secret").read_text().strip() == WORKER_KEY != SECRET
        assert_nothing_unreconciled(cloud.ec2)
        return live

    first = both_at_once()
    ids = {instance["InstanceId"] for instance in first}

    def heard_from() -> set[str]:
        return {worker["id"] for endpoint in (a, b) for worker in endpoint.stats()["workers"]}

    wait_for(lambda: ids <= heard_from(), 20, "the endpoints to hear from every worker")

    # Nothing changed: nothing launched, nothing terminated.
    assert {instance["InstanceId"] for instance in both_at_once()} == ids

    # Instances lost (one of each scaler's): both refill at the same moment, each within its share.
    lost = [next(i for i in first if tags_of(i)["dw:owner"] == owner) for owner in ("a", "b")]
    for instance in lost:
        cloud.ec2.terminate_instances(InstanceIds=[instance["InstanceId"]])
        stop_worker_on(host_at(hosts, tags_of(instance)["dw:test-address"]), cloud, tmp_path)
    third = both_at_once()
    assert not {i["InstanceId"] for i in lost} & {i["InstanceId"] for i in third}

    # Every instance lost: both launch their whole share at once.
    for instance in third:
        cloud.ec2.terminate_instances(InstanceIds=[instance["InstanceId"]])
        stop_worker_on(host_at(hosts, tags_of(instance)["dw:test-address"]), cloud, tmp_path)
    fourth = both_at_once()
    assert not {i["InstanceId"] for i in third} & {i["InstanceId"] for i in fourth}
    assert len(cluster_instances(cloud.ec2)) == 3 + 2 + 3


# --- a run killed mid-launch --------------------------------------------------------------------------

@pytest.mark.parametrize("next_run", ["resumes provisioning", "terminates after the ready deadline"],
                         ids=["resumes", "expires"])
def test_run_killed_mid_launch_leaves_nothing_unreconciled(next_run: str, services: Services,
                                                           host_network: HostNetwork, cloud: Cloud,
                                                           scalers: Scalers) -> None:
    a = services.endpoint("a", host=host_network.gateway)
    enqueue_backlog(a, 3)
    (host,) = fake_hosts(host_network, 1, authorized=None, prefix="slow-boot")  # SSH does not answer yet

    first = scalers.start(a, addresses=[host.address], ready_deadline=60)

    def launched_and_addressed() -> list[dict]:
        # Killed only once the instance has its test address: an instance without one would be
        # provisioned at its moto address, which must never be contacted.
        assert first.running(), f"the scaler finished before it was killed:\n{first.log()}"
        return [i for i in cluster_instances(cloud.ec2, LIVE) if "dw:test-address" in tags_of(i)]

    (instance,) = wait_for(launched_and_addressed, 30, "the scaler to launch an instance")
    time.sleep(0.5)  # well inside its wait for SSH
    assert first.running()
    first.kill()
    instance_id = instance["InstanceId"]
    assert "dw:ready" not in tags_of(cluster_instances(cloud.ec2, LIVE)[0])

    if next_run == "resumes provisioning":
        host.start_sshd(cloud.public_key)  # the instance finished booting
        second = scalers.run(a, addresses=[host.address], ready_deadline=60)
        assert f"resuming provisioning of {instance_id}" in second.log()
        (live,) = cluster_instances(cloud.ec2, LIVE)
        assert live["InstanceId"] == instance_id and "dw:ready" in tags_of(live)
        assert worker_pid_on(host) is not None
    else:
        launched_at = instance["LaunchTime"].timestamp()
        wait_for(lambda: time.time() - launched_at > 2.5, 10, "the ready deadline to pass")
        # --max-launch-per-tick 0: this run only reconciles, it launches no replacement.
        second = scalers.run(a, addresses=[host.address], ready_deadline=2, max_launch_per_tick=0)
        assert "not ready" in second.log()
        assert state_of(cloud.ec2, instance_id) in GONE
        assert cluster_instances(cloud.ec2, LIVE) == []
    assert len(cluster_instances(cloud.ec2)) == 1  # no second instance
    assert_nothing_unreconciled(cloud.ec2)


# --- provisioning failures and the circuit breaker ----------------------------------------------------

@pytest.fixture
def wrong_key(tmp_path: Path) -> str:
    """A public key that is not the cluster's: sshd answers but refuses the scaler's key."""
    return ssh_keypair(tmp_path / "other-key", "id_other")[1]


@pytest.mark.parametrize(("sshd", "error"), [("refuses the key", "SSH to root@"),
                                             ("does not answer", "of the launch (--ready-deadline)")],
                         ids=["sshd-refuses-the-key", "no-sshd"])
def test_ssh_failure_terminates_the_instance_and_is_counted(sshd: str, error: str, services: Services,
                                                            host_network: HostNetwork, cloud: Cloud,
                                                            scalers: Scalers, wrong_key: str) -> None:
    a = services.endpoint("a", host=host_network.gateway)
    enqueue_backlog(a, 3)
    (host,) = fake_hosts(host_network, 1, wrong_key if sshd == "refuses the key" else None, prefix="failing")

    # A launching run waits for SSH until the ready deadline, counted from the launch.
    run = scalers.run(a, addresses=[host.address], ready_deadline=2)
    (instance,) = cluster_instances(cloud.ec2)
    instance_id = instance["InstanceId"]
    assert instance["State"]["Name"] in GONE, run.log()
    scaler = a.stats()["scaler"]
    assert scaler["consecutive_failures"] == 1
    assert f"provisioning {instance_id}" in scaler["last_error"]
    assert error in scaler["last_error"]
    assert scaler["last_failure_s_ago"] is not None and scaler["breaker_open"] is False
    assert "launching 1" in scaler["last_decision"]
    assert not (host.root_dir / REMOTE_DIR_NAME).exists()
    pins = scalers.state_dir(a) / "known_hosts.json"
    assert instance_id not in (json.loads(pins.read_text()) if pins.exists() else {})  # forgotten with it


def test_repeated_failures_open_the_breaker_and_reset_closes_it(services: Services, host_network: HostNetwork,
                                                                cloud: Cloud, scalers: Scalers,
                                                                wrong_key: str) -> None:
    a = services.endpoint("a", host=host_network.gateway)
    enqueue_backlog(a, 3)
    (host,) = fake_hosts(host_network, 1, wrong_key, prefix="refusing")
    options = {"addresses": [host.address], "breaker_threshold": 2}

    for failures in (1, 2):
        run = scalers.run(a, **options)
        assert len(cluster_instances(cloud.ec2)) == failures, run.log()
        assert cluster_instances(cloud.ec2, LIVE) == []
        assert a.stats()["scaler"]["consecutive_failures"] == failures

    run = scalers.run(a, **options)
    assert len(cluster_instances(cloud.ec2)) == 2, f"launched with the breaker open:\n{run.log()}"
    scaler = a.stats()["scaler"]
    assert scaler["breaker_open"] is True
    assert "circuit breaker open" in scaler["last_decision"]
    assert scaler["consecutive_failures"] == 2
    # The public view says the breaker is open, but not the error (addresses, SSH messages): nowhere in it.
    assert "Authentication failed" in scaler["last_error"] and "Authentication failed" in run.log()
    public = json.dumps(a.stats(public=True))
    assert '"breaker_open": true' in public
    assert "Authentication failed" not in public and host.address not in public

    scalers.reset_breaker(a)
    scaler = a.stats()["scaler"]
    assert scaler["breaker_open"] is False and scaler["consecutive_failures"] == 0

    host.stop_sshd()
    host.start_sshd(cloud.public_key)  # the cause is fixed
    run = scalers.run(a, **options)
    (live,) = cluster_instances(cloud.ec2, LIVE)
    assert "dw:ready" in tags_of(live), run.log()
    assert len(cluster_instances(cloud.ec2)) == 3
    assert a.stats()["scaler"]["consecutive_failures"] == 0
    assert_nothing_unreconciled(cloud.ec2)


def test_stats_show_the_breaker_open_as_soon_as_the_threshold_is_reached(
        services: Services, host_network: HostNetwork, cloud: Cloud, scalers: Scalers, wrong_key: str) -> None:
    a = services.endpoint("a", host=host_network.gateway)
    enqueue_backlog(a, 3)
    (host,) = fake_hosts(host_network, 1, wrong_key, prefix="refusing")
    scalers.run(a, addresses=[host.address], breaker_threshold=1)
    scaler = a.stats()["scaler"]
    assert scaler["consecutive_failures"] == 1  # the threshold: the next run will launch nothing
    assert scaler["breaker_open"] is True
    assert "Authentication failed" in scaler["last_error"]  # the refusal itself, not a key-parsing error
    # Anybody sees that the breaker is open; the error (addresses, SSH messages) only the endpoints and scalers.
    public = a.stats(public=True)["scaler"]
    assert set(public) == set(scaler) - {"last_error"}
    assert (public["breaker_open"], public["consecutive_failures"]) == (True, 1)


def test_separate_launch_decisions_get_separate_client_tokens(
        services: Services, host_network: HostNetwork, cloud: Cloud, scalers: Scalers, wrong_key: str) -> None:
    a = services.endpoint("a", host=host_network.gateway)
    enqueue_backlog(a, 3)
    (host,) = fake_hosts(host_network, 1, wrong_key, prefix="refusing")
    if time.time() % 60 > 45:  # both launches inside one minute, so that the outcome does not depend on the clock
        time.sleep(60.5 - time.time() % 60)
    for _ in range(2):  # each launches one instance, whose provisioning fails: it is terminated
        scalers.run(a, addresses=[host.address])
    first, second = cluster_instances(cloud.ec2)
    assert first["InstanceId"] != second["InstanceId"]  # moto ignores ClientToken; EC2 would not launch a second
    assert first["ClientToken"] != second["ClientToken"]


# --- silent workers -----------------------------------------------------------------------------------

def test_reconcile_terminates_a_ready_worker_no_endpoint_ever_heard_from(
        services: Services, host_network: HostNetwork, cloud: Cloud, scalers: Scalers) -> None:
    a = services.endpoint("a", host=host_network.gateway)
    enqueue_backlog(a, 3)
    (host,) = fake_hosts(host_network, 1, cloud.public_key)
    unreachable = f"http://{host_network.gateway}:{free_port(host_network.gateway)}"  # nothing listens there
    options = {"addresses": [host.address], "worker_endpoints": [unreachable], "silence_deadline": 2}

    scalers.run(a, **options)
    (instance,) = cluster_instances(cloud.ec2, LIVE)
    assert "dw:ready" in tags_of(instance)
    assert worker_pid_on(host) is not None
    launched_at = instance["LaunchTime"].timestamp()
    wait_for(lambda: time.time() - launched_at > 3, 10, "the silence deadline to pass")

    run = scalers.run(a, **options, max_launch_per_tick=0)  # reconcile only: it launches nothing
    assert "neither endpoint heard from it" in run.log()
    assert state_of(cloud.ec2, instance["InstanceId"]) in GONE
    assert cluster_instances(cloud.ec2, LIVE) == []


def test_reconcile_terminates_a_ready_worker_silent_for_the_silence_deadline(
        services: Services, host_network: HostNetwork, cloud: Cloud, scalers: Scalers, tmp_path: Path) -> None:
    a = services.endpoint("a", host=host_network.gateway)
    enqueue_backlog(a, 3)
    (host,) = fake_hosts(host_network, 1, cloud.public_key)
    options = {"addresses": [host.address], "silence_deadline": 2}

    scalers.run(a, **options)
    (instance,) = cluster_instances(cloud.ec2, LIVE)
    instance_id = instance["InstanceId"]
    wait_for(lambda: instance_id in [worker["id"] for worker in a.stats()["workers"]], 10,
             "the endpoint to hear from the worker")
    stop_worker_on(host, cloud, tmp_path)  # the worker hangs or dies; the instance stays
    time.sleep(3)  # longer than the silence deadline

    # The endpoint still lists the worker (it lists those seen in the last 120 s), but it has
    # been silent for longer than the deadline.
    assert instance_id in [worker["id"] for worker in a.stats()["workers"]]
    run = scalers.run(a, **options, max_launch_per_tick=0)  # reconcile only: it launches nothing
    assert "neither endpoint heard from it" in run.log()
    assert state_of(cloud.ec2, instance_id) in GONE, run.log()
    assert cluster_instances(cloud.ec2, LIVE) == []


def test_reconcile_with_the_peer_down_terminates_a_silent_worker_whose_host_answers(
        services: Services, host_network: HostNetwork, cloud: Cloud, scalers: Scalers) -> None:
    """The peer does not answer, so this endpoint's view is all there is: a worker it has not heard
    from, on a host that answers here, can reach this endpoint and says nothing: dead or hung."""
    a = services.endpoint("a", host=host_network.gateway)
    enqueue_backlog(a, 3)
    (host,) = fake_hosts(host_network, 1, cloud.public_key)
    nothing = f"http://{host_network.gateway}:{free_port(host_network.gateway)}"  # nothing listens there
    options = {"addresses": [host.address], "worker_endpoints": [nothing], "peer_url": nothing,
               "silence_deadline": 1}

    scalers.run(a, **options)
    (instance,) = cluster_instances(cloud.ec2, LIVE)
    assert "dw:ready" in tags_of(instance)
    launched_at = instance["LaunchTime"].timestamp()
    wait_for(lambda: time.time() - launched_at > 2, 10, "the silence deadline to pass")

    run = scalers.run(a, **options, max_launch_per_tick=0)  # reconcile only
    assert "although its host answers here: dead or hung" in run.log()
    assert state_of(cloud.ec2, instance["InstanceId"]) in GONE
    assert cluster_instances(cloud.ec2, LIVE) == []


def test_reconcile_with_the_peer_down_keeps_a_worker_that_may_serve_the_peer_until_the_partition_deadline(
        services: Services, host_network: HostNetwork, cloud: Cloud, scalers: Scalers) -> None:
    """A worker that this scaler's endpoint never hears from, while the scaler cannot reach the peer,
    may serve the peer alone (a partition that leaves this host on its own). If its host does not
    answer here either, it is kept -- not counted as capacity for this endpoint's queue, which it does
    not serve -- and terminated only after --partition-deadline."""
    a, b = endpoint_pair_on(services, host_network.gateway)
    enqueue_backlog(a, 3)
    (host,) = fake_hosts(host_network, 1, cloud.public_key)
    cut_off = f"http://{host_network.gateway}:{free_port(host_network.gateway)}"  # b, as a's scaler fails to see it
    options = {"addresses": [host.address], "worker_endpoints": [b.url], "peer_url": cut_off, "silence_deadline": 1}

    scalers.run(a, **options)
    (instance,) = cluster_instances(cloud.ec2, LIVE)
    instance_id = instance["InstanceId"]
    enqueue_backlog(b, 2)
    wait_for(lambda: instance_id in [worker["id"] for worker in b.stats()["workers"]], 20,
             "the peer to hear from the worker")
    host.stop_sshd()  # its host no longer answers here: dead, or on the peer's side of a partition
    launched_at = instance["LaunchTime"].timestamp()
    wait_for(lambda: time.time() - launched_at > 2, 10, "the silence deadline to pass")

    run = scalers.run(a, **options, partition_deadline=300, max_launch_per_tick=0)
    log = run.log()
    assert f"{instance_id}: this endpoint has not heard from it for" in log
    assert "nor its host from here; not counted as capacity, terminated after 300s" in log
    assert "0 ready, 0 booting" in log  # not capacity for a's queue
    assert state_of(cloud.ec2, instance_id) == "running"
    assert worker_pid_on(host) is not None  # it kept serving the peer
    assert instance_id in [worker["id"] for worker in b.stats()["workers"]]

    wait_for(lambda: time.time() - launched_at > 3.5, 10, "a short partition deadline to pass")
    run = scalers.run(a, **options, partition_deadline=3, max_launch_per_tick=0)
    assert "(--partition-deadline), nor its host from here, and the peer does not answer" in run.log()
    assert state_of(cloud.ec2, instance_id) in GONE


def log_time(line: str) -> float:
    """The time of a scaler log line ("2026-12-01 22:15:08,123 INFO scaler: ...")."""
    stamp = " ".join(line.split()[:2])
    return time.mktime(time.strptime(stamp.split(",")[0], "%Y-%m-%d %H:%M:%S")) + int(stamp.split(",")[1]) / 1000


def test_the_ready_deadline_is_honoured_to_the_second(services: Services, host_network: HostNetwork,
                                                      cloud: Cloud, scalers: Scalers) -> None:
    a = services.endpoint("a", host=host_network.gateway)
    enqueue_backlog(a, 3)
    (host,) = fake_hosts(host_network, 1, authorized=None, prefix="never-boots")  # SSH never answers
    run = scalers.run(a, addresses=[host.address], ready_deadline=5)
    (instance,) = cluster_instances(cloud.ec2)
    lines = run.log().splitlines()
    failed = next(line for line in lines if f"provisioning {instance['InstanceId']} failed" in line)
    assert "did not answer within 5s of the launch (--ready-deadline)" in failed
    waited = log_time(failed) - instance["LaunchTime"].timestamp()
    assert 4.5 <= waited < 8, f"gave up {waited:.1f}s after the launch, with --ready-deadline 5"
    assert instance["State"]["Name"] in GONE


# --- signals, settings, files and a broken API: clear words, no traceback ------------------------------

@pytest.mark.parametrize(("signum", "name"), [(signal.SIGINT, "Ctrl-C"), (signal.SIGTERM, "SIGTERM")])
def test_a_signal_stops_a_scaler_run_at_once_and_names_what_it_launched(
        signum: int, name: str, services: Services, host_network: HostNetwork, cloud: Cloud,
        scalers: Scalers) -> None:
    a = services.endpoint("a", host=host_network.gateway)
    enqueue_backlog(a, 3)
    (host,) = fake_hosts(host_network, 1, authorized=None, prefix="slow-boot")  # SSH does not answer yet
    run = scalers.start(a, addresses=[host.address], ready_deadline=60)
    (instance,) = wait_for(lambda: [i for i in cluster_instances(cloud.ec2, LIVE) if "dw:test-address" in tags_of(i)],
                           30, "the scaler to launch an instance")
    time.sleep(1)  # inside its wait for SSH, which would last 60 s
    assert run.running()
    run.signal_group(signum)
    signalled = time.monotonic()
    assert run.process is not None
    status = run.process.wait(30)
    stopped_after = time.monotonic() - signalled
    log = run.log()
    assert status == 128 + signum, log
    assert stopped_after < 5, f"exited {stopped_after:.1f}s after the signal"
    assert f"stopped by {name}: launched by this run and not provisioned: {instance['InstanceId']} (running and " \
           f"billing; the next run provisions them, or terminates them 60s after launch)" in log
    assert "`python -m cron.scale --terminate-all` with this run's settings terminates" in log
    assert "Traceback" not in log and "KeyboardInterrupt" not in log


@pytest.fixture
def plain_files(tmp_path: Path) -> dict[str, str]:
    """A secret file that exists, and paths that do not."""
    secret = tmp_path / "secret"
    secret.write_text(SECRET + "\n")
    other_cluster = tmp_path / "other.json"
    other_cluster.write_text(json.dumps({"cluster": "other", "region": "us-east-1", "key_name": "k",
                                         "key_path": str(tmp_path / "k.pem"), "security_group_id": "sg-1"}))
    return {"secret": str(secret), "missing": str(tmp_path / "missing"),
            "other": str(other_cluster)}


@pytest.mark.parametrize(("args", "message"), [
    (["--secret-file", "{missing}"], "cannot read the cluster secret from {missing} (No such file or directory)"),
    (["--log-level", "chatty"], "--log-level must be one of DEBUG, INFO, WARNING, ERROR, not 'chatty'"),
    (["--provider", "ec2"], "--provider ec2 needs --aws-state (DW_AWS_STATE)"),
    (["--provider", "ec2", "--aws-state", "{missing}"], "no state file {missing}"),
    (["--provider", "ec2", "--aws-state", "{other}"], "belongs to cluster other, not dw"),
    (["--provider", "ec2", "--aws-state", "{other}", "--cluster", "other", "--region", "eu-west-1"],
     "records region us-east-1"),
    (["--provider", "ec2", "--aws-state", "{other}", "--cluster=*"], "--cluster must be 1-40 letters"),
    (["--every", "-1", "--max-workers", "x"], "--max-workers must be a whole number, not 'x'; --every must be at least "
                                              "0, not -1.0"),
])
def test_bad_settings_and_missing_files_are_named_before_any_api_call(
        args: list[str], message: str, plain_files: dict[str, str], tmp_path: Path) -> None:
    with BrokenApi("500") as api:
        defaults = ["--secret-file", plain_files["secret"], "--state-dir", str(tmp_path)]
        command = [PYTHON, "-m", "cron.scale", *defaults, *(arg.format(**plain_files) for arg in args)]
        env = {**os.environ, "AWS_ENDPOINT_URL": api.url, "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x",
               "AWS_DEFAULT_REGION": "us-east-1"}
        completed = subprocess.run(command, capture_output=True, text=True, timeout=60, env=env)
    assert completed.returncode == 2, completed.stdout + completed.stderr
    assert message.format(**plain_files) in completed.stderr
    assert "Traceback" not in completed.stderr
    assert api.requests == 0


def test_an_api_answering_500_fails_the_run_with_words_not_a_traceback(
        services: Services, cloud: Cloud, tmp_path: Path) -> None:
    a = services.endpoint("a")
    with BrokenApi("500") as api:
        scaler = Scalers(services, Cloud(**{**vars(cloud), "env": {**cloud.env, "AWS_ENDPOINT_URL": api.url,
                                                                    "AWS_MAX_ATTEMPTS": "1"}}), tmp_path)
        run = scaler.start(a, addresses=["10.231.0.99"])  # never reached: listing fails first
        assert run.process is not None
        status = run.process.wait(60)
    log = run.log()
    assert status == 1, log
    assert "scaling run failed: listing instances failed: the AWS API (or something between it and here) gave an " \
           "answer that is not an API answer" in log
    assert "0 worker(s) of the cluster known to run" in log
    assert "Traceback" not in log


# --- the local provider -------------------------------------------------------------------------------

def local_workers(state_dir: Path) -> list[dict]:
    return [json.loads(path.read_text()) for path in sorted((state_dir / "workers").glob("*.json"))]


def start_ticks(pid: int) -> int | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else int(fields[19])


def alive(record: dict) -> bool:
    return start_ticks(record["pid"]) == record["start_ticks"]


@pytest.fixture
def local_state(services: Services, tmp_path: Path) -> Iterator[Path]:
    """The state folder both local scalers share; every worker they started is stopped at teardown."""
    state_dir = tmp_path / "local-state"
    state_dir.mkdir()
    try:
        yield state_dir
    finally:
        for scaler in services.started:  # a run left behind by a failure must not launch after the cleanup
            if scaler.name.startswith("local-scaler") and scaler.running():
                scaler.stop()
        run = services.start("terminate-all", [PYTHON, "-m", "cron.scale", "--provider", "local", "--terminate-all",
                                               "--state-dir", str(state_dir), "--log-level", "WARNING"])
        with contextlib.suppress(subprocess.TimeoutExpired):
            run.process.wait(60)
        for path in (state_dir / "workers").glob("*.json"):  # whatever --terminate-all missed
            with contextlib.suppress(OSError, ValueError, KeyError):
                record = json.loads(path.read_text())
                if alive(record):
                    os.killpg(record["pid"], signal.SIGKILL)


def test_two_local_scalers_at_once_never_exceed_the_cap(services: Services, local_state: Path,
                                                        tmp_path: Path) -> None:
    cap = 3
    a, b = services.endpoint_pair()
    enqueue_backlog(a, 30)
    enqueue_backlog(b, 30)
    secret_file = tmp_path / "local-secret"
    secret_file.write_text(SECRET + "\n")
    secret_file.chmod(0o600)

    def command(node: Endpoint, index: int, peer: Endpoint) -> list[str]:
        args = [PYTHON, "-m", "cron.scale", "--provider", "local", "--node-id", node.node_id,
                "--endpoint-index", str(index), "--url", node.url, "--peer", peer.url,
                "--endpoint", a.url, "--endpoint", b.url, "--state-dir", str(local_state),
                "--secret-file", str(secret_file), "--log-level", "INFO"]
        for name, value in {**DEFAULTS, "max_workers": cap}.items():
            args += [f"--{name.replace('_', '-')}", str(value)]
        return args

    def both_at_once() -> list[dict]:
        runs = [services.start("local-scaler-a", command(a, 0, b)), services.start("local-scaler-b", command(b, 1, a))]
        Scalers.wait_all(runs)
        logs = "\n".join(run.log() for run in runs)
        records = local_workers(local_state)
        assert len(records) <= cap, logs
        assert all(alive(record) for record in records), logs
        owners = [record["owner"] for record in records]
        assert {owner: owners.count(owner) for owner in ("a", "b")} == {"a": 2, "b": 1}, logs
        for record in records:  # local workers too hold the worker key only, in a private file
            environ = Path(f"/proc/{record['pid']}/environ").read_bytes().split(b"\0")
            key_file = local_state / "workers" / "worker-key"
            assert f"DW_SECRET_FILE={key_file}".encode() in environ
            assert SECRET.encode() not in b"\0".join(environ)
            assert key_file.read_text().strip() == WORKER_KEY
            assert key_file.stat().st_mode & 0o777 == 0o600
        return records

    first = both_at_once()
    assert [record["id"] for record in both_at_once()] == [record["id"] for record in first]  # nothing changed

    # One worker of each scaler exits: both replace theirs at once, still within the cap.
    for owner in ("a", "b"):
        record = next(record for record in first if record["owner"] == owner)
        os.killpg(record["pid"], signal.SIGKILL)
        wait_for(lambda record=record: not alive(record), 10, "the worker to exit")
    third = both_at_once()
    assert len({record["id"] for record in first} | {record["id"] for record in third}) == cap + 2

    # --terminate-all stops every one of them, and needs no secret: it launches nothing.
    stop = services.start("terminate-all-now", [PYTHON, "-m", "cron.scale", "--provider", "local", "--terminate-all",
                                                "--state-dir", str(local_state)])
    assert stop.process is not None and stop.process.wait(60) == 0, stop.log()
    wait_for(lambda: not any(alive(record) for record in third), 10, "every local worker to stop")


def test_local_scaler_survives_a_record_the_other_scaler_is_writing(services: Services, local_state: Path,
                                                                    tmp_path: Path) -> None:
    a = services.endpoint("a")
    secret_file = tmp_path / "local-secret"
    secret_file.write_text(SECRET + "\n")
    workers = local_state / "workers"
    workers.mkdir()
    torn = workers / "local-b-0123abcd.json"
    torn.write_text("")  # what the peer's record is between write_text's truncate and its write
    try:
        run = services.start("local-scaler-a", [
            PYTHON, "-m", "cron.scale", "--provider", "local", "--node-id", "a", "--url", a.url,
            "--endpoint", a.url, "--state-dir", str(local_state), "--secret-file", str(secret_file)])
        Scalers.wait(run)
        assert torn.exists()  # not deleted either: it may be the record of a live worker
    finally:
        torn.unlink(missing_ok=True)
