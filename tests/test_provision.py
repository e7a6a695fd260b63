"""Provisioning a worker over SSH (cron/provision.py, cloud/ssh.py) on fake hosts: real sshd, SFTP and worker.

Every host is a network namespace of tests/fakehosts.py with its own address and home; the
endpoint listens on the bridge's gateway address, where the workers inside the namespaces
reach it. Workers run as detached processes (service "process"); their exit command is a
harmless `touch` of a file.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import paramiko
import pytest
from fakehosts import (
    FakeHost,
    HostNetwork,
    host_network_fixture,  # noqa: F401 -- fixture "host_network"
    ssh_keypair,
)

from cloud.ssh import REMOTE_DIR_NAME, HostKeyPins, SshError, SshTarget, ssh_session, wait_for_ssh
from conftest import WORKER_KEY, Endpoint, Services, pid_alive, reference, wait_for
from cron.provision import ProvisionError, WorkerInstall, provision_worker, stop_worker, worker_running

REMOTE_PYTHON = "/usr/bin/python3"
TARGET_SECONDS = 2.0  # the project's target from "SSH answers" to "worker running"
DURATIONS: list[tuple[str, float]] = []  # measured provisioning times, printed at the end of the module


@pytest.fixture(scope="module", autouse=True)
def report_durations() -> Iterator[None]:
    yield
    if DURATIONS:
        print("\nprovisioning durations: " + ", ".join(f"{what} {took:.2f}s" for what, took in DURATIONS))


@pytest.fixture
def client_key(tmp_path: Path) -> tuple[Path, str]:
    return ssh_keypair(tmp_path / "client")


@pytest.fixture
def pins(tmp_path: Path) -> HostKeyPins:
    return HostKeyPins(tmp_path / "known_hosts.json")


def sshd_host(network: HostNetwork, name: str, client_key: tuple[Path, str]) -> FakeHost:
    """A fake host whose sshd takes the client key."""
    host = network.add_host(name)
    host.start_sshd(client_key[1])
    return host


@pytest.fixture
def endpoint(services: Services, host_network: HostNetwork) -> Endpoint:
    """An endpoint on the gateway address, so that workers in the namespaces reach it."""
    return services.endpoint("a", host=host_network.gateway)


def install(endpoint: Endpoint, host: FakeHost, *, worker_id: str = "w1", idle_timeout: float = 300) -> WorkerInstall:
    return WorkerInstall(endpoints=(endpoint.url,), worker_key=WORKER_KEY, worker_id=worker_id,
                         idle_timeout=idle_timeout, processes=1, service="process",
                         exit_command=f"touch {exit_marker(host)}", python=REMOTE_PYTHON)


def exit_marker(host: FakeHost) -> Path:
    return host.root_dir / "idle-exit-ran"


def remote_dir(host: FakeHost) -> Path:
    return host.root_dir / REMOTE_DIR_NAME


def target(host: FakeHost, key: Path, machine_id: str = "i-0123456789abcdef0") -> SshTarget:
    return SshTarget(machine_id, host.address, "root", key)


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    except OSError:
        return []


def supervisors(host: FakeHost) -> list[int]:
    """Worker supervisor processes (`python3 -m worker`) running inside the host."""
    return [pid for pid in host.pids() if cmdline(pid)[1:] == ["-m", "worker"] and pid_alive(pid)]


def parent_of(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def strays(host: FakeHost, worker: int) -> list[int]:
    """Python processes inside the host that are neither `worker` nor its descendants (slots, helpers)."""
    def descends(pid: int) -> bool:
        for _ in range(32):
            if pid == worker:
                return True
            if pid <= 1:
                return False
            pid = parent_of(pid)
        return False

    return [pid for pid in host.pids() if "python" in " ".join(cmdline(pid)) and pid_alive(pid) and not descends(pid)]


def worker_pid(host: FakeHost) -> int:
    return int((remote_dir(host) / "worker.pid").read_text())


def seen_workers(endpoint: Endpoint) -> list[str]:
    return [worker["id"] for worker in endpoint.stats()["workers"]]


def sshd_logins(host: FakeHost) -> int:
    return host.log().count("Accepted publickey")


def provision_timed(what: str, host: FakeHost, key: Path, pins: HostKeyPins, settings: WorkerInstall,
                    machine_id: str = "i-0123456789abcdef0") -> float:
    wait_for_ssh(host.address, timeout=10)  # the clock starts once SSH answers, as the scaler's does
    took = provision_worker(target(host, key, machine_id), pins, settings)
    DURATIONS.append((what, took))
    return took


def test_provisioned_worker_runs_serves_the_endpoint_and_keeps_the_secret_private(
        host_network: HostNetwork, endpoint: Endpoint, client_key: tuple[Path, str], pins: HostKeyPins) -> None:
    key = client_key[0]
    host = sshd_host(host_network, "worker-1", client_key)

    took = provision_timed("first", host, key, pins, install(endpoint, host))
    pid = worker_pid(host)
    assert pid in host.pids() and pid_alive(pid)
    assert supervisors(host) == [pid]
    wait_for(lambda: "w1" in seen_workers(endpoint), 10, "the worker to contact the endpoint")

    # the secret: a 0600 file of its own, named in worker.env but not in it, nor in the process's
    # command line or environment
    secret_file = remote_dir(host) / "secret"
    assert secret_file.stat().st_mode & 0o777 == 0o600
    assert secret_file.read_text().strip() == WORKER_KEY
    settings = (remote_dir(host) / "worker.env").read_text()
    assert WORKER_KEY not in settings
    assert f"DW_SECRET_FILE={secret_file}" in settings
    assert WORKER_KEY.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()
    assert WORKER_KEY.encode() not in Path(f"/proc/{pid}/environ").read_bytes()
    # the log and the pid file, made by the shell before the worker runs: owner-only all the same
    for made_by_the_shell in ("worker.log", "worker.pid"):
        assert (remote_dir(host) / made_by_the_shell).stat().st_mode & 0o777 == 0o600, made_by_the_shell

    # provisioning the same host again replaces the worker: one worker afterwards, a new one
    provision_timed("again", host, key, pins, install(endpoint, host))
    new_pid = worker_pid(host)
    assert new_pid != pid
    wait_for(lambda: not pid_alive(pid), 10, "the replaced worker to exit")
    wait_for(lambda: not strays(host, new_pid), 10, "the replaced worker's slots to exit")
    time.sleep(0.5)  # a second worker, if one was left, would still show
    assert supervisors(host) == [new_pid]
    assert strays(host, new_pid) == []
    assert not exit_marker(host).exists()  # a replaced worker is stopped, not idle: no exit action
    assert took < TARGET_SECONDS, f"provisioning took {took:.2f}s after SSH answered (target {TARGET_SECONDS}s)"


def test_host_key_is_pinned_per_machine_on_first_contact(host_network: HostNetwork, endpoint: Endpoint,
                                                         client_key: tuple[Path, str], tmp_path: Path) -> None:
    key, public = client_key
    host, other = host_network.add_host("pinned"), host_network.add_host("impostor")
    for each in (host, other):
        each.start_sshd(public)
    pins_path = tmp_path / "known_hosts.json"
    pins = HostKeyPins(pins_path)
    machine = target(host, key, "i-pinned")

    # first contact records the key under the machine id; the second contact passes
    assert not worker_running(machine, pins, "process")
    assert json.loads(pins_path.read_text()) == {"i-pinned": host.host_public_key()}
    provision_timed("pinned host", host, key, pins, install(endpoint, host), "i-pinned")
    assert worker_running(machine, pins, "process")
    pid = worker_pid(host)
    stop_worker(machine, pins, "process")
    wait_for(lambda: not pid_alive(pid), 10, "the stopped worker to exit")
    recorded = pins_path.read_text()

    # the same machine id at another host (another key): refused before anything is sent
    with pytest.raises(ProvisionError, match="host key"):
        provision_worker(target(other, key, "i-pinned"), pins, install(endpoint, other))
    assert not remote_dir(other).exists()
    assert sshd_logins(other) == 0
    assert pins_path.read_text() == recorded

    # the host's own key changes (a new machine behind the old name, or a man in the middle)
    before = snapshot(host.root_dir)
    logins = sshd_logins(host)
    host.stop_sshd()
    old_key = host.host_public_key()
    for path in (host.host_key, host.host_key.with_name(host.host_key.name + ".pub")):
        path.unlink()
    host.start_sshd(public)  # generates a new host key
    assert host.host_public_key() != old_key
    with pytest.raises(ProvisionError, match="host key"):
        provision_worker(machine, pins, install(endpoint, host))
    with pytest.raises(ProvisionError, match="host key"):
        worker_running(machine, pins, "process")
    assert snapshot(host.root_dir) == before  # nothing uploaded, nothing changed
    assert sshd_logins(host) == logins  # refused before logging in
    assert json.loads(pins_path.read_text()) == {"i-pinned": old_key}
    assert supervisors(host) == []

    # forgetting the machine (what terminating it does) lets a new machine of that id be pinned
    pins.forget(["i-pinned"])
    provision_timed("re-pinned host", host, key, pins, install(endpoint, host), "i-pinned")
    assert json.loads(pins_path.read_text()) == {"i-pinned": host.host_public_key()}


def snapshot(root: Path) -> dict[str, tuple[int, int, int]]:
    return {str(path.relative_to(root)): (path.stat().st_size, path.stat().st_mtime_ns, path.stat().st_mode)
            for path in sorted(root.rglob("*"))}


def test_stop_worker_and_worker_running_round_trip(host_network: HostNetwork, endpoint: Endpoint,
                                                   client_key: tuple[Path, str], pins: HostKeyPins) -> None:
    key = client_key[0]
    host = sshd_host(host_network, "round-trip", client_key)
    machine = target(host, key)

    assert not worker_running(machine, pins, "process")  # never provisioned
    stop_worker(machine, pins, "process")  # nothing to stop: fine
    provision_timed("round trip", host, key, pins, install(endpoint, host))
    pid = worker_pid(host)
    assert worker_running(machine, pins, "process")

    stop_worker(machine, pins, "process")
    assert not worker_running(machine, pins, "process")
    wait_for(lambda: not pid_alive(pid), 10, "the stopped worker to exit")
    assert supervisors(host) == []
    assert not exit_marker(host).exists()  # stopped, not idle: the exit action is not run
    stop_worker(machine, pins, "process")  # stopping twice is harmless

    # and it starts again
    provision_timed("restart", host, key, pins, install(endpoint, host))
    assert worker_running(machine, pins, "process")
    assert supervisors(host) == [worker_pid(host)]


def test_idle_provisioned_worker_finishes_its_work_exits_and_runs_its_exit_command(
        host_network: HostNetwork, endpoint: Endpoint, client_key: tuple[Path, str], pins: HostKeyPins) -> None:
    key = client_key[0]
    host = sshd_host(host_network, "idle", client_key)
    work_id = endpoint.enqueue(b"one job before idling", 5000)

    provision_timed("idle worker", host, key, pins, install(endpoint, host, worker_id="idle-1", idle_timeout=1.5))
    pid = worker_pid(host)
    results = wait_for(lambda: endpoint.pull(10), 20, "the worker's result")
    assert results == [{"id": work_id, "result": reference(b"one job before idling", 5000)}]

    wait_for(lambda: exit_marker(host).exists(), 20, "the idle worker's exit command")
    wait_for(lambda: not pid_alive(pid), 10, "the idle worker to exit")
    # kill -0 counts a zombie as running, and this box's init reaps orphans only about once a second
    wait_for(lambda: not worker_running(target(host, key), pins, "process"), 5, "worker_running to say no")
    assert supervisors(host) == []
    assert "no work from any endpoint" in (remote_dir(host) / "worker.log").read_text()


def test_unreachable_host_fails_with_provision_error(host_network: HostNetwork, endpoint: Endpoint,
                                                     client_key: tuple[Path, str], tmp_path: Path) -> None:
    key, public = client_key
    wrong_key, _ = ssh_keypair(tmp_path / "wrong", "id_wrong")
    silent, refusing = host_network.add_host("no-sshd"), host_network.add_host("other-key")
    refusing.start_sshd(public)
    pins = HostKeyPins(tmp_path / "known_hosts.json")
    with pytest.raises(ProvisionError, match="SSH to root@"):
        provision_worker(target(silent, key, "i-silent"), pins, install(endpoint, silent))
    with pytest.raises(ProvisionError, match="SSH to root@"):
        provision_worker(target(refusing, wrong_key, "i-refusing"), pins, install(endpoint, refusing))
    assert not remote_dir(silent).exists() and not remote_dir(refusing).exists()
    started = time.monotonic()
    with pytest.raises(SshError, match="did not answer"):
        wait_for_ssh(silent.address, timeout=1)
    assert time.monotonic() - started < 5


def test_only_machines_that_are_ours_to_end_power_off_when_idle() -> None:
    from cron.provision import systemd_unit

    own_server = systemd_unit("/opt/dynamic-workload", "python3", poweroff_on_idle=False)
    ec2_worker = systemd_unit("/opt/dynamic-workload", "python3", poweroff_on_idle=True)
    assert "poweroff" not in own_server
    assert "ExecStopPost=+/bin/sh -c 'if [ \"$EXIT_STATUS\" = 0 ]; then /bin/systemctl poweroff; fi'" in ec2_worker
    for unit in (own_server, ec2_worker):
        assert "LoadCredential=secret:/opt/dynamic-workload/secret" in unit  # the secret is never in the unit
        assert "DynamicUser=yes" in unit and "SuccessExitStatus=143" in unit


@pytest.mark.parametrize("kind", ["missing", "directory", "empty", "public key", "garbage", "passphrase"])
def test_an_unusable_ssh_key_is_a_provisioning_error_that_says_so(kind: str, tmp_path: Path) -> None:
    """Not a crash of the scaler run: cron/provision.py turns it into a ProvisionError, which the providers handle
    (the ssh provider's list() included)."""
    path = tmp_path / "key"
    if kind == "directory":
        path.mkdir()
    elif kind == "empty":
        path.write_text("")
    elif kind == "public key":
        path.write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl test\n")
    elif kind == "garbage":
        path.write_bytes(b"-----BEGIN OPENSSH PRIVATE KEY-----\nnot base64 at all\n-----END OPENSSH PRIVATE KEY-----\n")
    elif kind == "passphrase":
        paramiko.RSAKey.generate(2048).write_private_key_file(str(path), password="a passphrase")
    pins = HostKeyPins(tmp_path / "known_hosts.json")
    with pytest.raises(SshError, match="cannot load the SSH key"), \
            ssh_session(SshTarget("m-1", "127.0.0.1", "root", path, port=9), pins):
        pass
