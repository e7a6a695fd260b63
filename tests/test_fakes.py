"""The tests' fakes work: fake hosts with sshd in network namespaces (fakehosts.py), and moto's EC2 (fakeaws.py)."""

from __future__ import annotations

import io
import json
import os
import socket
import socketserver
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import paramiko
import pytest
from fakeaws import (
    MotoServer,
    aws_fixture,  # noqa: F401 -- fixture "aws"
    moto_server_fixture,  # noqa: F401 -- fixture "moto_server"
)
from fakehosts import (
    PYTHON,
    FakeHost,
    HostNetwork,
    host_network_fixture,  # noqa: F401 -- fixture "host_network"
    link_names,
    netns_list,
    public_key_from_private,
    require_root,
    ssh_keypair,
    tcp_open,
    write_private_key,
)

from conftest import pid_alive, wait_for


def connect(host: FakeHost, key: Path, known_hosts: Path, *, first: bool) -> paramiko.SSHClient:
    """First connection: record the host key in known_hosts. Later ones: only the recorded key is accepted."""
    client = paramiko.SSHClient()
    if known_hosts.exists():
        client.load_host_keys(str(known_hosts))
    client.set_missing_host_key_policy(paramiko.AutoAddPolicy() if first else paramiko.RejectPolicy())
    client.connect(host.address, port=22, username="root", key_filename=str(key), look_for_keys=False,
                   allow_agent=False, timeout=5, banner_timeout=5, auth_timeout=5)
    if first:
        client.save_host_keys(str(known_hosts))
    return client


def run(client: paramiko.SSHClient, command: str) -> str:
    _, stdout, stderr = client.exec_command(command, timeout=10)
    output = stdout.read().decode()
    assert stdout.channel.recv_exit_status() == 0, stderr.read().decode()
    return output


@pytest.fixture
def client_key(tmp_path: Path) -> tuple[Path, str]:
    return ssh_keypair(tmp_path / "client")


def test_two_hosts_serve_ssh_and_sftp_each_from_its_own_home(host_network: HostNetwork, client_key: tuple[Path, str],
                                                             tmp_path: Path) -> None:
    key, public = client_key
    hosts = [host_network.add_host("alpha"), host_network.add_host("beta")]
    for host in hosts:
        host.start_sshd(public)
    assert len({host.address for host in hosts}) == 2

    roots = []
    for host in hosts:
        known_hosts = tmp_path / f"known_hosts-{host.name}"
        known_hosts.touch()
        client = connect(host, key, known_hosts, first=True)
        try:
            recorded = paramiko.HostKeys(str(known_hosts)).lookup(host.address)
            assert recorded is not None
            assert f"{recorded['ssh-ed25519'].get_name()} {recorded['ssh-ed25519'].get_base64()}" \
                == host.host_public_key()
            assert run(client, "hostname").strip() == host.hostname == host.name
            assert f"inet {host.address}/24" in run(client, "ip -o addr")
            assert run(client, 'pwd; echo "$HOME"').split() == [str(host.root_dir)] * 2

            sftp = client.open_sftp()
            assert sftp.normalize(".") == str(host.root_dir)
            roots.append(sftp.normalize("."))
            sftp.putfo(io.BytesIO(f"hello from {host.name}\n".encode()), "greeting.txt")
            with sftp.open("greeting.txt") as file:
                assert file.read() == f"hello from {host.name}\n".encode()
            assert (host.root_dir / "greeting.txt").read_text() == f"hello from {host.name}\n"
            sftp.close()
        finally:
            client.close()

        # Second connection: nothing is added any more, the pinned key has to match.
        client = connect(host, key, known_hosts, first=False)
        try:
            assert run(client, "cat greeting.txt") == f"hello from {host.name}\n"
        finally:
            client.close()
    assert roots[0] != roots[1]

    # A pin for another host's key under this address is refused.
    wrong = tmp_path / "known_hosts-wrong"
    wrong.write_text(f"{hosts[0].address} {hosts[1].host_public_key()}\n")
    with pytest.raises(paramiko.BadHostKeyException):
        connect(hosts[0], key, wrong, first=False)
    assert hosts[0].host_key_fingerprint().startswith("SHA256:")
    assert hosts[0].host_key_fingerprint() != hosts[1].host_key_fingerprint()


class _Hello(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.request.sendall(b"hello from the root namespace\n")


@pytest.fixture
def root_server(host_network: HostNetwork) -> Iterator[tuple[str, int]]:
    """A TCP server in the root namespace on the bridge address."""
    server = socketserver.ThreadingTCPServer((host_network.gateway, 0), _Hello)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[:2]
    finally:
        server.shutdown()
        server.server_close()


def read_from(host: FakeHost, address: str, port: int) -> str:
    """Connects from inside `host` to address:port and returns the first line it sends."""
    script = ("import socket, sys\n"
              "with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5) as s:\n"
              "    print(s.makefile('rb').readline().decode().strip())\n")
    return host.execute([PYTHON, "-c", script, address, str(port)], timeout=20).stdout.strip()


def test_hosts_reach_the_root_namespace_and_each_other(host_network: HostNetwork, root_server: tuple[str, int],
                                                       client_key: tuple[Path, str]) -> None:
    forwarding = Path("/proc/sys/net/ipv4/ip_forward").read_text()
    a, b = host_network.add_host("a"), host_network.add_host("b")
    b.start_sshd(client_key[1])
    address, port = root_server
    assert address == host_network.gateway

    assert read_from(a, address, port) == "hello from the root namespace"
    assert read_from(b, address, port) == "hello from the root namespace"
    assert read_from(a, b.address, 22).startswith("SSH-2.0-OpenSSH")
    # No sysctl had to change for any of this.
    assert Path("/proc/sys/net/ipv4/ip_forward").read_text() == forwarding


def test_a_host_without_sshd_refuses_port_22_at_once(host_network: HostNetwork, client_key: tuple[Path, str]) -> None:
    host = host_network.add_host("no-ssh")
    started = time.monotonic()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((host.address, 22), timeout=5).close()
    assert time.monotonic() - started < 1
    assert not tcp_open(host.address, 22)
    client = paramiko.SSHClient()
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    with pytest.raises(paramiko.ssh_exception.NoValidConnectionsError):
        client.connect(host.address, username="root", key_filename=str(client_key[0]), look_for_keys=False,
                       allow_agent=False, timeout=5)
    assert time.monotonic() - started < 2


def test_stop_and_restart_sshd_keeps_the_host_key(host_network: HostNetwork, client_key: tuple[Path, str],
                                                  tmp_path: Path) -> None:
    key, public = client_key
    host = host_network.add_host("restart")
    host.start_sshd(public)
    known_hosts = tmp_path / "known_hosts"
    known_hosts.touch()
    client = connect(host, key, known_hosts, first=True)
    _, stdout, _ = client.exec_command("echo started; exec sleep 300")
    assert stdout.readline().strip() == "started"
    session_pids = [pid for pid in host.pids() if pid != host.sshd.pid]
    assert session_pids
    host.stop_sshd()
    client.close()
    assert not tcp_open(host.address, 22)
    assert host.pids() == []  # the sessions (sshd makes them sessions of their own) went too
    host.start_sshd(public)
    client = connect(host, key, known_hosts, first=False)  # same pinned key after the "reboot"
    client.close()


def test_close_leaves_nothing_behind(tmp_path: Path, client_key: tuple[Path, str]) -> None:
    require_root()
    key, public = client_key
    network = HostNetwork(tmp_path / "hosts")
    try:
        hosts = [network.add_host("one"), network.add_host("two")]
        for host in hosts:
            host.start_sshd(public)
        client = connect(hosts[0], key, tmp_path / "known_hosts", first=True)
        client.exec_command("exec sleep 300")  # an SSH session still running at close()
        wait_for(lambda: len(hosts[0].pids()) >= 3, 10, "the session to start")
        background = hosts[1].run(["sleep", "300"])
        # A process that left its group, as a daemon would.
        hosts[1].execute(["/bin/sh", "-c", "setsid sleep 300 > /dev/null 2>&1 < /dev/null &"])
        wait_for(lambda: len(hosts[1].pids()) >= 3, 10, "the background processes to start")
        pids = [pid for host in hosts for pid in host.pids()]
        assert background.pid in pids
        gateway, tag = network.gateway, network.tag
        assert f"inet {gateway}/24" in subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True).stdout
        assert network.leftovers()
    finally:
        network.close()
    client.close()
    assert network.leftovers() == []
    assert not [ns for ns in netns_list() if ns.startswith(f"dw{tag}")]
    assert not [link for link in link_names() if tag in link]
    assert f"inet {gateway}/" not in subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True).stdout
    assert [pid for pid in pids if pid_alive(pid)] == []
    network.close()  # closing twice is harmless


# --- moto ---------------------------------------------------------------------------------------

def ec2_client(env: dict[str, str]) -> Any:
    """A client built from nothing but the environment, as the project's code builds its own."""
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        return boto3.session.Session().client("ec2")
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def states(ec2: Any) -> dict[str, str]:
    return {instance["InstanceId"]: instance["State"]["Name"]
            for reservation in ec2.describe_instances()["Reservations"] for instance in reservation["Instances"]}


def test_moto_runs_tags_and_terminates_instances(aws: dict[str, str]) -> None:
    ec2 = ec2_client(aws)
    assert ec2.meta.endpoint_url == aws["AWS_ENDPOINT_URL"]
    image = ec2.describe_images(ImageIds=["ami-12c6146b"])["Images"][0]["ImageId"]
    launched = ec2.run_instances(ImageId=image, InstanceType="c7i.large", MinCount=2, MaxCount=2,
                                 TagSpecifications=[{"ResourceType": "instance",
                                                     "Tags": [{"Key": "dw:cluster", "Value": "test"}]}])
    ids = sorted(instance["InstanceId"] for instance in launched["Instances"])
    assert states(ec2) == dict.fromkeys(ids, "running")

    ec2.create_tags(Resources=[ids[0]], Tags=[{"Key": "dw:ready", "Value": "1"}])
    tagged = ec2.describe_instances(Filters=[{"Name": "tag:dw:cluster", "Values": ["test"]},
                                             {"Name": "tag:dw:ready", "Values": ["1"]}])
    assert [i["InstanceId"] for r in tagged["Reservations"] for i in r["Instances"]] == [ids[0]]

    ec2.terminate_instances(InstanceIds=[ids[0]])
    assert states(ec2) == {ids[0]: "terminated", ids[1]: "running"}


def test_moto_env_is_enough_for_a_child_process(aws: dict[str, str]) -> None:
    ec2_client(aws).run_instances(ImageId="ami-12c6146b", MinCount=1, MaxCount=1)
    script = ("import boto3, json\n"
              "r = boto3.client('ec2').describe_instances()['Reservations']\n"
              "print(json.dumps([i['State']['Name'] for x in r for i in x['Instances']]))\n")
    env = {name: value for name, value in os.environ.items() if not name.startswith("AWS_")}
    result = subprocess.run([PYTHON, "-c", script], env={**env, **aws}, capture_output=True, text=True,
                            timeout=60, check=True)
    assert json.loads(result.stdout) == ["running"]


def test_moto_reset_forgets_everything(aws: dict[str, str], moto_server: MotoServer) -> None:
    ec2 = ec2_client(aws)
    ec2.run_instances(ImageId="ami-12c6146b", MinCount=1, MaxCount=1)
    ec2.create_key_pair(KeyName="dw-test")
    assert states(ec2)
    moto_server.reset()
    assert states(ec2) == {}
    assert ec2.describe_key_pairs()["KeyPairs"] == []


def test_moto_key_pair_logs_in_to_a_fake_host(aws: dict[str, str], host_network: HostNetwork,
                                              tmp_path: Path) -> None:
    material = ec2_client(aws).create_key_pair(KeyName="dw-test")["KeyMaterial"]
    private = write_private_key(tmp_path / "dw-test.pem", material)
    public = public_key_from_private(private)
    assert public.startswith("ssh-rsa ")
    host = host_network.add_host("ec2ish")
    host.start_sshd(public + " dw-test\n")
    client = connect(host, private, tmp_path / "known_hosts", first=True)
    try:
        assert run(client, "hostname").strip() == "ec2ish"
    finally:
        client.close()
