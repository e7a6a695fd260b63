"""The scaler launching and provisioning many workers in one run (`python -m cron.scale --provider ec2`,
the real program): EC2 is moto's server, and each instance is a fake host of the tests (a network
namespace with a real OpenSSH sshd, tests/fakehosts.py), where the scaler provisions a real worker
(`--worker-service process`). The backlog asks for WORKERS workers at once; the run is timed from
its start to its exit, with its CPU time, and the log says when each worker was provisioned.

The fake hosts all share this machine, where a hundred Python workers starting at once take far
longer than the second the provisioning waits for each to say it runs (on EC2 each boots on its own
machine). So by default the hosts' "python" is a stand-in that says what a starting worker says and
then sleeps: everything the scaler does is real (SSH, SFTP of the worker's files and key, the start
script, the confirmation, the EC2 calls); only the worker's own start-up is not. `real` as the
fourth argument starts real workers instead.

Each round runs once per `--provision-parallel` value given (alternating), on the same hosts; the
instances of a round are terminated before the next. Needs root (namespaces), like the tests' fakes.

    usage: .venv/bin/python -m bench.scale_out [WORKERS [ROUNDS [PARALLEL,PARALLEL... [real]]]]
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

from bench._endpoint import REPO, SECRET, running_endpoint

sys.path.insert(0, str(REPO / "tests"))  # the tests' fakes: moto's server, fake hosts with sshd

from fakeaws import MotoServer  # noqa: E402
from fakehosts import HostNetwork, public_key_from_private, require_root, write_private_key  # noqa: E402

CLUSTER = "dwbench"
AMI = "ami-12c6146b"  # one of moto's images
# What a worker says once it runs (worker/runner.py), which the provisioning waits for; then it idles.
STAND_IN = """#!/bin/sh
echo "$(date) INFO worker: stand-in worker: 1 slots on the endpoints"
sleep 60
"""
LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


def cloud(directory: Path, moto: MotoServer) -> tuple[Path, Path]:
    """A key pair, a security group and the state file, as ./setup.sh aws leaves them: (state, key)."""
    ec2 = moto.client("ec2")
    material = ec2.create_key_pair(KeyName=f"{CLUSTER}-workers")["KeyMaterial"]
    key = write_private_key(directory / "worker-key.pem", material)
    group = ec2.create_security_group(GroupName=f"{CLUSTER}-workers", Description="bench workers")["GroupId"]
    state = directory / "aws-state.json"
    state.write_text(json.dumps({"region": "us-east-1", "key_name": f"{CLUSTER}-workers", "key_path": str(key),
                                 "security_group_id": group, "subnet_ids": []}))
    return state, key


def hosts(network: HostNetwork, count: int, authorized: str) -> list[str]:
    made = [network.add_host(f"w{index}") for index in range(count)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda host: host.start_sshd(authorized, timeout=60), made))
    return [host.address for host in made]


def enqueue(url: str, count: int) -> None:
    for index in range(count):
        request = urllib.request.Request(f"{url}/enqueue?iterations=1", data=b"backlog %d" % index, method="PUT")
        urllib.request.urlopen(request, timeout=10).read()


def log_seconds(line: str) -> float | None:
    match = LOG_TIME.match(line)
    return datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp() if match else None


def scaler_run(directory: Path, url: str, state: Path, key: Path, addresses: list[str], parallel: int,
               moto: MotoServer, round_name: str, python: str) -> str:
    secret = directory / "secret"
    workers = len(addresses)
    args = [sys.executable, "-m", "cron.scale", "--node-id", "a", "--endpoint-index", "0", "--url", url,
            "--state-dir", str(directory / f"scaler-{round_name}"), "--secret-file", str(secret), "--provider", "ec2",
            "--cluster", CLUSTER, "--aws-state", str(state), "--ssh-key", str(key), "--ssh-user", "root",
            "--remote-python", python, "--worker-service", "process", "--worker-exit-command",
            "touch idle-exit-ran", "--ami", AMI, "--instance-type", "t3.micro", "--test-ssh-addresses",
            # Each scaler takes every other address (its half of the pool): each is given twice.
            ",".join(address for address in addresses for _ in range(2)), "--endpoint", url,
            "--max-workers", str(2 * workers), "--max-launch-per-tick",
            str(workers), "--scale-after", "0", "--target-drain", "30", "--default-job-duration", "30",
            "--slots-per-worker", "1", "--worker-processes", "1", "--idle-timeout", "20", "--ready-deadline", "300",
            "--breaker-threshold", str(workers + 1), "--provision-parallel", str(parallel), "--log-level", "INFO"]
    log_path = directory / f"scaler-{round_name}.log"
    with open(log_path, "wb") as log:
        started = time.time()
        process = subprocess.Popen(args, cwd=REPO, env={**os.environ, **moto.env()}, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        _, status, usage = os.wait4(process.pid, 0)
        ended = time.time()
    text = log_path.read_text(errors="replace")
    lines = text.splitlines()
    provisioned = [log_seconds(line) for line in lines if " provisioned i-" in line]
    launched = next((log_seconds(line) for line in lines if " launched i-" in line), None)
    failures = sum("provisioning" in line and "failed" in line for line in lines)
    last = max((at for at in provisioned if at), default=None)
    for line in [line for line in lines if " ERROR " in line and "provisioning" in line][:3]:
        print(f"    {line[:400]}")
    return (f"--provision-parallel {parallel}: {len(provisioned)}/{workers} provisioned, {failures} failed; run "
            f"{ended - started:.1f} s (exit status {os.waitstatus_to_exitcode(status)}): launched at "
            f"{(launched or started) - started:.1f} s, last provisioned at {(last or ended) - started:.1f} s; "
            f"scaler CPU {usage.ru_utime + usage.ru_stime:.1f} s")


def terminate_all(moto: MotoServer) -> None:
    ec2 = moto.client("ec2")
    ids = [instance["InstanceId"] for page in ec2.get_paginator("describe_instances").paginate()
           for reservation in page["Reservations"] for instance in reservation["Instances"]
           if instance["State"]["Name"] in ("pending", "running")]
    if ids:
        ec2.terminate_instances(InstanceIds=ids)


def main() -> None:
    require_root()
    workers = int(sys.argv[1]) if len(sys.argv) > 1 else 50
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    choices = [int(value) for value in (sys.argv[3] if len(sys.argv) > 3 else "8,32").split(",")]
    real = len(sys.argv) > 4 and sys.argv[4] == "real"
    with tempfile.TemporaryDirectory(prefix="dw-bench-scale-") as name, HostNetwork(Path(name) / "hosts") as network:
        directory = Path(name)
        (directory / "secret").write_text(SECRET + "\n")
        (directory / "secret").chmod(0o600)
        python = "/usr/bin/python3"
        if not real:
            python = str(directory / "stand-in-python")
            Path(python).write_text(STAND_IN)
            Path(python).chmod(0o755)
            directory.chmod(0o755)  # the hosts' logins run it
        moto = MotoServer(directory)
        try:
            state, key = cloud(directory, moto)
            started = time.monotonic()
            addresses = hosts(network, workers, public_key_from_private(key))
            print(f"{workers} fake hosts with sshd in {time.monotonic() - started:.1f} s (load average "
                  f"{os.getloadavg()[0]:.1f}); workers: {'real' if real else 'stand-ins'}", flush=True)
            with running_endpoint() as (url, _, _):
                for round_number in range(rounds):
                    order = choices if round_number % 2 == 0 else choices[::-1]
                    for parallel in order:
                        enqueue(url, workers)
                        outcome = scaler_run(directory, url, state, key, addresses, parallel, moto,
                                             f"{round_number}-{parallel}", python)
                        print(f"round {round_number + 1}: {outcome}", flush=True)
                        terminate_all(moto)
                        failing = [host for host in network.hosts if "Accepted publickey" not in host.log()]
                        for host in failing[:2]:
                            print(f"    {host}: sshd log ends: {host.log()[-600:]!r}")
        finally:
            moto.stop()


if __name__ == "__main__":
    main()
