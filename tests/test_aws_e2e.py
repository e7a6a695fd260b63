"""End to end on "EC2": moto serves the EC2 API, every instance is a real sshd in a network
namespace of its own, and everything after the API call is real -- SSH, SFTP, the offline
venv install, the endpoint service, the scaler's crontab entry, the workers, the results.

With TLS on (the default): the deploy makes the cluster CA, each endpoint serves HTTPS with a
certificate for its addresses, and the clients (this test, curl), the peer, the scalers and the
workers all check it; the endpoints' port serves no plain HTTP.

setup.sh aws -> deploy.sh aws (two endpoints provisioned over SSH) -> a burst of jobs -> both
scalers run (as their crontab entry would) and launch and provision workers over SSH -> all
results equal the reference -> idle workers run their exit action (a harmless stand-in for
the poweroff) -> the scalers see them gone and terminate them -> deploy.sh aws --destroy. Once
On-Demand, once with --market spot (moto records Spot instances; no interruption here, see
tests/test_spot.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import requests
from fakeaws import MotoServer
from fakehosts import (
    FakeHost,
    HostNetwork,
    public_key_from_private,
    require_root,
)

from conftest import REPO, reference, wait_for

CLUSTER = "e2e"
AMI = "ami-12c6146b"  # one of moto's images


def live_instances(ec2, role: str) -> list[dict]:
    pages = ec2.get_paginator("describe_instances").paginate(Filters=[
        {"Name": "tag:dw:cluster", "Values": [CLUSTER]}, {"Name": "tag:dw:role", "Values": [role]},
        {"Name": "instance-state-name", "Values": ["pending", "running"]}])
    return [instance for page in pages for reservation in page["Reservations"] for instance in reservation["Instances"]]


def run_script(args: list[str], env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    completed = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert completed.returncode == 0, f"{args} failed:\n{completed.stdout}\n{completed.stderr}"
    return completed


def modes(host: FakeHost, *paths: str) -> list[int]:
    """The permission bits of files in the host's install folder."""
    return [(host.root_dir / "dynamic-workload" / path).stat().st_mode & 0o777 for path in paths]


def run_scaler(host: FakeHost) -> subprocess.Popen[str]:
    """What cron does every minute on an endpoint host: run the line of the crontab entry."""
    line = (host.root_dir / "dynamic-workload" / "crontab").read_text().strip()
    command = line.split(None, 5)[5].split(" # ")[0]  # drop the schedule and the marker comment
    return host.run(["sh", "-c", command], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def start_beside_the_service(host: FakeHost) -> subprocess.CompletedProcess[str]:
    """A second endpoint started by hand on the host, with the service's own settings (issue 13)."""
    base = host.root_dir / "dynamic-workload"
    command = f"cd {base} && set -a && . ./dw.env && set +a && exec .venv/bin/python -m endpoint"
    second = host.run(["sh", "-c", command], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = second.communicate(timeout=60)[0]
    return subprocess.CompletedProcess(second.args, second.returncode, output)


def check_market(moto: MotoServer, market: str, launched: list[dict[str, Any]], deployed: str) -> None:
    """The workers' type and market as EC2 (moto) recorded them."""
    assert {instance["InstanceType"] for instance in launched} == {"c7i.large"}
    assert {instance.get("InstanceLifecycle", "on-demand") for instance in launched} == {market}
    if market == "spot":  # the deploy made the account's Spot role, with the operator's credentials
        roles = moto.client("iam").list_roles(PathPrefix="/aws-service-role/spot.amazonaws.com/")["Roles"]
        assert roles and "AWSServiceRoleForEC2Spot" in deployed


def pull_all(urls: list[str], count: int, ca: str, timeout: float = 120) -> dict[str, str]:
    """Pull from the endpoints in turn until `count` results came, each once."""
    results: dict[str, str] = {}
    deadline = time.monotonic() + timeout
    while len(results) < count:
        assert time.monotonic() < deadline, f"{len(results)} of {count} results"
        for url in urls:
            for item in requests.post(f"{url}/pullCompleted", params={"top": 5}, timeout=10, verify=ca).json():
                assert item["id"] not in results
                results[item["id"]] = item["result"]
        time.sleep(0.2)
    return results


def check_usage(urls: list[str], market: str, launched: list[dict[str, Any]], ca: str) -> None:
    """What the workers cost, as either endpoint reports it from the scalers' listings."""
    for url in urls:
        usage = requests.get(f"{url}/stats", timeout=10, verify=ca).json()["usage"]["last_hour"]
        assert [(entry["market"], entry["instance_type"]) for entry in usage["by_type"]] == [(market, "c7i.large")]
        # Each worker at least EC2's minute from its launch, so far as that minute has passed: the
        # workers ended sooner, yet count up to now.
        billed = sum(min(60.0, time.time() - instance["LaunchTime"].timestamp()) for instance in launched)
        assert usage["worker_seconds"] >= billed - 2 and usage["estimated_usd"] > 0, (usage, billed)


def check_tls(deployed: str, urls: list[str], ca: str, endpoints: list[FakeHost]) -> None:
    """HTTPS only, checked against the cluster CA, which the deploy printed for curl; each endpoint host holds
    its own key (0600) and the CA's certificate, never the CA's key."""
    assert f'curl --cacert {ca} -X PUT "{urls[0]}/enqueue?iterations=10"' in deployed
    ca_key = Path(ca).with_name(f"{CLUSTER}-ca-key.pem")
    assert ca_key.stat().st_mode & 0o777 == 0o600
    for url in urls:
        assert requests.get(f"{url}/stats", timeout=10, verify=ca).json()["pending"] == 0
        with pytest.raises(requests.exceptions.SSLError):  # only the cluster's CA vouches for it
            requests.get(f"{url}/stats", timeout=10)
        with pytest.raises(requests.ConnectionError):  # no plain HTTP on the port
            requests.get(url.replace("https://", "http://") + "/stats", timeout=10)
    for host in endpoints:
        assert modes(host, "tls", "tls/endpoint-key.pem") == [0o700, 0o600]
        held = "".join(path.read_text(errors="replace") for path in host.root_dir.rglob("*.pem") if path.is_file())
        assert ca_key.read_text().strip() not in held
    key_a, key_b = ((host.root_dir / "dynamic-workload" / "tls" / "endpoint-key.pem").read_text() for host in endpoints)
    assert key_a != key_b


def check_worker_tls(host: FakeHost, ca: str) -> None:
    """The worker was handed the CA's certificate, and reaches the endpoints over https only."""
    worker_env = (host.root_dir / "dynamic-workload" / "worker.env").read_text()
    assert "DW_TLS_CA=" in worker_env and "https://" in worker_env and "http://" not in worker_env
    assert (host.root_dir / "dynamic-workload" / "ca.pem").read_text() == Path(ca).read_text()


@pytest.mark.slow
@pytest.mark.parametrize("market", ["on-demand", "spot"])
def test_setup_deploy_scale_and_destroy(market: str, tmp_path: Path) -> None:
    require_root()
    with HostNetwork(tmp_path / "hosts") as network:
        moto = MotoServer(tmp_path, host=network.gateway)
        try:
            endpoints = [network.add_host(f"endpoint-{node}") for node in "ab"]
            workers = [network.add_host(f"worker-{index}") for index in range(4)]
            env = {
                **os.environ, **moto.env(),
                "DW_AWS_DIR": str(tmp_path / "aws"), "DW_AWS_STATE": str(tmp_path / "aws" / f"{CLUSTER}.json"),
                "DW_CLUSTER": CLUSTER, "DW_AMI": AMI, "DW_SSH_USER": "root", "DW_REMOTE_PYTHON": "/usr/bin/python3",
                "DW_ENDPOINT_PYTHON": "/usr/bin/python3",
                # hosts without systemd or cron: services run as detached processes, the crontab
                # entry is written to a file and run by this test
                "DW_SERVICE_MANAGER": "process", "DW_CRON_INSTALL": "file",
                "DW_MAX_WORKERS": "2", "DW_SLOTS_PER_WORKER": "1", "DW_SCALE_AFTER": "0", "DW_IDLE_TIMEOUT": "4",
                "DW_MARKET": market, "DW_INSTANCE_TYPES": "c7i.large,c6i.large",
                "DW_SILENCE_DEADLINE": "3", "DW_READY_DEADLINE": "60",
                "DW_WORKER_EXIT_COMMAND": "touch idle-exit-ran",  # the harmless stand-in for a poweroff
                # test-only settings: the fake instances' addresses, and moto for the hosts' scalers
                "DW_TEST_ENDPOINT_ADDRESSES": ",".join(host.address for host in endpoints),
                "DW_TEST_SSH_ADDRESSES": ",".join(host.address for host in workers),
                "DW_TEST_AWS_ENV": "AWS_ENDPOINT_URL,AWS_ACCESS_KEY_ID,AWS_SECRET_ACCESS_KEY,AWS_EC2_METADATA_DISABLED",
            }
            env.pop("DW_SECRET", None)

            # setup, twice: the second run changes nothing
            setup = ["./setup.sh", "aws", "--cluster", CLUSTER, "--allowed-cidr", f"{network.gateway}/32"]
            run_script(setup, env)
            run_script(setup, env)
            state = json.loads((tmp_path / "aws" / f"{CLUSTER}.json").read_text())
            key_path = Path(state["key_path"])
            assert key_path.stat().st_mode & 0o077 == 0
            for host in endpoints + workers:  # the instances accept the cluster's key pair, as EC2 arranges
                host.start_sshd(public_key_from_private(key_path))

            deployed = run_script(["./deploy.sh", "aws"], env)
            urls = [f"https://{host.address}:5000" for host in endpoints]
            assert all(url in deployed.stdout for url in urls), deployed.stdout
            ca = str(tmp_path / "aws" / f"{CLUSTER}-ca.pem")
            check_tls(deployed.stdout, urls, ca, endpoints)
            ec2 = moto.client("ec2")
            assert len(live_instances(ec2, "endpoint")) == 2
            secret_file = endpoints[0].root_dir / "dynamic-workload" / "secret"
            assert secret_file.stat().st_mode & 0o077 == 0
            for host in endpoints:  # data and logs owner-only, also the log the shell opens
                assert modes(host, "var", "var/log", "var/log/endpoint.log") == [0o700, 0o700, 0o600]
            second = start_beside_the_service(endpoints[0])
            assert second.returncode == 1, second.stdout
            assert "is in use by another endpoint" in second.stdout and "a.sqlite3" in second.stdout, second.stdout
            assert requests.get(f"{urls[0]}/stats", timeout=10, verify=ca).json()["pending"] == 0  # still serves

            # a burst of jobs at both endpoints
            expected = {}
            for index in range(12):
                payload = f"burst {index}".encode()
                response = requests.put(f"{urls[index % 2]}/enqueue", params={"iterations": 20_000}, data=payload,
                                        timeout=10, verify=ca)
                expected[response.json()["id"]] = reference(payload, 20_000)

            # both scalers run at once, as their crontab entries would
            runs = [run_scaler(host) for host in endpoints]
            outputs = [run.communicate(timeout=180)[0] for run in runs]
            assert all(run.returncode == 0 for run in runs), outputs
            launched = live_instances(ec2, "worker")
            assert 1 <= len(launched) <= 2, outputs
            assert all(any(tag["Key"] == "dw:ready" for tag in instance["Tags"]) for instance in launched), outputs
            check_market(moto, market, launched, deployed.stdout)
            for host in endpoints:  # the crontab line's log, opened by its shell
                assert modes(host, "var/log/scaler.log") == [0o600]

            assert pull_all(urls, len(expected), ca) == expected

            # idle workers run their exit action; the next scaler runs see them gone
            launched_hosts = [host for host in workers
                              if (host.root_dir / "dynamic-workload" / "worker.env").exists()]
            assert len(launched_hosts) == len(launched)
            for host in launched_hosts:
                settings = (host.root_dir / "dynamic-workload" / "worker.env").read_text()
                # A Spot worker watches for its interruption notice; no other does.
                assert ("DW_INTERRUPTION_NOTICES=ec2-spot" in settings) == (market == "spot")
                assert modes(host, "worker.log", "worker.pid", "secret") == [0o600, 0o600, 0o600]
                check_worker_tls(host, ca)
            wait_for(lambda: all((host.root_dir / "dynamic-workload" / "idle-exit-ran").exists()
                                 for host in launched_hosts), timeout=60, what="the idle workers' exit action")
            time.sleep(4)  # past the silence deadline

            def workers_terminated() -> bool:
                for run in [run_scaler(host) for host in endpoints]:
                    run.communicate(timeout=120)
                return not live_instances(ec2, "worker")

            wait_for(workers_terminated, timeout=60, what="the scalers to terminate the idle workers")
            check_usage(urls, market, launched, ca)

            # destroy leaves nothing of the cluster
            run_script(["./deploy.sh", "aws", "--destroy"], env)
            remaining = ec2.describe_instances(Filters=[{"Name": "tag:dw:cluster", "Values": [CLUSTER]},
                                                        {"Name": "instance-state-name",
                                                         "Values": ["pending", "running", "stopping", "stopped"]}])
            assert remaining["Reservations"] == []
            assert not (tmp_path / "aws" / f"{CLUSTER}.json").exists()
            assert not (tmp_path / "aws" / f"{CLUSTER}-ca-key.pem").exists()
        finally:
            moto.stop()
