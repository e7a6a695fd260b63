"""`./deploy.sh aws`: the two endpoint instances, provisioned over SSH from this checkout.

1. reads what `./setup.sh aws` recorded (key pair, security group, subnets, IAM profile);
2. launches endpoint instances a and b unless they already run (found by their tags), with
   the endpoints' instance profile -- the only AWS credentials in the cluster;
3. provisions both over SSH in parallel: code from this checkout (no git clone), a venv
   installed offline from wheels downloaded here for the host's Python, the cluster secret,
   the endpoint service, and the crontab entry of the scaler;
4. waits until both answer /stats, and prints their URLs and the curl commands to try.

`--destroy` terminates every instance of the cluster (by tag), waits until they are gone,
and removes what `./setup.sh aws` created. Each step prints what it does; a failure says
which step failed, and re-running the command resumes (every step is idempotent).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import boto3
from botocore.exceptions import BotoCoreError, ClientError

from cron.providers import ProviderError
from cron.providers.ec2 import DEFAULT_AMI_PARAMETER, Ec2Settings, ec2_client, latest_ami, run_instances
from cron.provision import (
    EndpointInstall,
    HostKeyPins,
    SshTarget,
    ensure_remote_python,
    provision_endpoint,
    wait_for_ssh,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
NODES = ("a", "b")
LIVE_STATES = ["pending", "running", "stopping", "stopped", "shutting-down"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ.get
    parser = argparse.ArgumentParser(prog="./deploy.sh aws", description="Deploy dynamic-workload to EC2.")
    add = parser.add_argument
    add("--destroy", action="store_true", help="terminate every instance of the cluster and remove what setup made")
    add("--cluster", default=env("DW_CLUSTER", "dw"), help="[DW_CLUSTER]")
    add("--region", default=env("AWS_REGION", env("AWS_DEFAULT_REGION", "us-east-1")), help="[AWS_REGION]")
    add("--aws-dir", default=env("DW_AWS_DIR", "var/aws"), help="where setup keeps its files [DW_AWS_DIR]")
    add("--state-file", default=env("DW_AWS_STATE", ""), help="setup's record [DW_AWS_STATE] "
        "(default <aws-dir>/<cluster>.json)")
    add("--endpoint-instance-type", default=env("DW_ENDPOINT_INSTANCE_TYPE", "t3.small"),
        help="[DW_ENDPOINT_INSTANCE_TYPE]")
    add("--instance-type", default=env("DW_INSTANCE_TYPE", "c7i.large"), help="worker instance type [DW_INSTANCE_TYPE]")
    add("--slots-per-worker", default=env("DW_SLOTS_PER_WORKER", "2"),
        help="vCPUs of the worker instance type [DW_SLOTS_PER_WORKER]")
    add("--max-workers", default=env("DW_MAX_WORKERS", "4"), help="cluster-wide cap [DW_MAX_WORKERS]")
    add("--scale-after", default=env("DW_SCALE_AFTER", "30"), help="[DW_SCALE_AFTER]")
    add("--target-drain", default=env("DW_TARGET_DRAIN", "30"), help="[DW_TARGET_DRAIN]")
    add("--idle-timeout", default=env("DW_IDLE_TIMEOUT", "60"), help="[DW_IDLE_TIMEOUT]")
    add("--ami", default=env("DW_AMI", ""), help="image for all instances; default latest Amazon Linux 2023 [DW_AMI]")
    add("--ssh-user", default=env("DW_SSH_USER", "ec2-user"), help="[DW_SSH_USER]")
    add("--service", default=env("DW_SERVICE_MANAGER", "systemd"), choices=["systemd", "process"],
        help="how services run on the hosts; process: for hosts without systemd [DW_SERVICE_MANAGER]")
    add("--cron-install", default=env("DW_CRON_INSTALL", "crontab"), choices=["crontab", "file"],
        help="crontab, or file: only write the entry to <install>/crontab (hosts without cron) [DW_CRON_INSTALL]")
    add("--endpoint-python", default=env("DW_ENDPOINT_PYTHON", "python3.11"),
        help="Python (>= 3.10) for the endpoints' venv; installed on the host if missing [DW_ENDPOINT_PYTHON]")
    add("--remote-python", default=env("DW_REMOTE_PYTHON", "python3"),
        help="Python that runs the (standard-library) workers, 3.9 or newer [DW_REMOTE_PYTHON]")
    add("--ready-timeout", type=float, default=env("DW_READY_TIMEOUT", "600"),
        help="seconds to wait for SSH and then for /stats [DW_READY_TIMEOUT]")
    args = parser.parse_args(argv)
    args.state_file = args.state_file or f"{args.aws_dir}/{args.cluster}.json"
    return args


def step(message: str) -> None:
    print(f"==> {message}", flush=True)


def fail(message: str) -> None:
    print(f"deploy failed: {message}\nFix the cause and run the same command again: finished steps are kept.",
          file=sys.stderr, flush=True)
    raise SystemExit(1)


def secret_for(args: argparse.Namespace) -> str:
    path = Path(args.aws_dir) / f"{args.cluster}-secret"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as file:
            file.write(secrets.token_hex(32) + "\n")
        step(f"cluster secret created in {path} (mode 0600)")
    return path.read_text().strip()


def cluster_instances(ec2: Any, cluster: str, role: str | None = None, states: list[str] | None = None) -> list[dict]:
    filters = [{"Name": "tag:dw:cluster", "Values": [cluster]},
               {"Name": "instance-state-name", "Values": states or LIVE_STATES}]
    if role:
        filters.append({"Name": "tag:dw:role", "Values": [role]})
    instances = []
    for page in ec2.get_paginator("describe_instances").paginate(Filters=filters):
        for reservation in page["Reservations"]:
            instances += reservation["Instances"]
    return instances


def tags_of(instance: dict) -> dict[str, str]:
    return {tag["Key"]: tag["Value"] for tag in instance.get("Tags", [])}


def test_addresses(name: str) -> list[str]:
    """TEST ONLY (DW_TEST_*_ADDRESSES): addresses of the tests' fake instances, by launch order."""
    return [address.strip() for address in os.environ.get(name, "").split(",") if address.strip()]


def endpoint_instances(args: argparse.Namespace, ec2: Any, setup: dict) -> dict[str, dict]:
    """The endpoint instances: started if stopped (their disk holds the queue), launched if missing."""
    found: dict[str, list[dict]] = {}
    for instance in cluster_instances(ec2, args.cluster, "endpoint", ["pending", "running", "stopping", "stopped"]):
        found.setdefault(tags_of(instance).get("dw:node", "?"), []).append(instance)
    for node, instances in found.items():
        if len(instances) > 1:
            ids = ", ".join(instance["InstanceId"] for instance in instances)
            fail(f"more than one instance is endpoint {node} ({ids}): terminate the extra one(s) first")
    running = {node: instances[0] for node, instances in found.items() if node in NODES}
    stopped = [node for node, instance in running.items() if instance["State"]["Name"] in ("stopping", "stopped")]
    if stopped:
        ids = [running[node]["InstanceId"] for node in stopped]
        step(f"starting stopped endpoint instance(s) {', '.join(ids)}")
        ec2.get_waiter("instance_stopped").wait(InstanceIds=ids, WaiterConfig={"Delay": 5, "MaxAttempts": 60})
        ec2.start_instances(InstanceIds=ids)
    missing = [node for node in NODES if node not in running]
    if not missing:
        step("endpoint instances already running: " + ", ".join(running[node]["InstanceId"] for node in NODES))
        return running
    settings = ec2_settings(args, setup)
    image = args.ami or latest_ami(boto3.client("ssm", region_name=setup["region"]), DEFAULT_AMI_PARAMETER)
    pool = test_addresses("DW_TEST_ENDPOINT_ADDRESSES")
    for node in missing:
        step(f"launching endpoint {node} ({args.endpoint_instance_type}, {image})")
        tags = {"dw:cluster": args.cluster, "dw:role": "endpoint", "dw:node": node,
                "Name": f"{args.cluster}-endpoint-{node}"}
        if pool:
            tags["dw:test-address"] = pool[NODES.index(node)]
        for attempt in range(7):
            try:
                # An endpoint that shuts down stops (keeping its disk and queue); workers terminate.
                (instance,) = run_instances(ec2, settings, image=image, instance_type=args.endpoint_instance_type,
                                            count=1, tags=tags, shutdown_behavior="stop",
                                            # this deploy run's decision; a re-run finds the
                                            # instance by its tags instead of relaunching it
                                            intent=f"{args.cluster}-endpoint-{node}-{secrets.token_hex(6)}",
                                            instance_profile_arn=setup["endpoint_instance_profile_arn"])
                break
            except ProviderError as exc:
                # EC2 learns of a new instance profile some seconds after IAM made it.
                if "iaminstanceprofile" not in str(exc).lower().replace(" ", "") or attempt == 6:
                    fail(f"launching endpoint {node}: {exc}")
                step("the new instance profile is not visible to EC2 yet; retrying in 10 s")
                time.sleep(10)
        running[node] = instance
    return running


def ec2_settings(args: argparse.Namespace, setup: dict) -> Ec2Settings:
    return Ec2Settings(cluster=args.cluster, region=setup["region"], key_name=setup["key_name"],
                       key_path=Path(setup["key_path"]), security_group_id=setup["security_group_id"],
                       subnet_ids=tuple(setup.get("subnet_ids", ())))


def addresses(instance: dict) -> tuple[str, str]:
    """(address this machine reaches it at, address the cluster reaches it at)."""
    test_address = tags_of(instance).get("dw:test-address")
    if test_address:
        return test_address, test_address
    private = instance.get("PrivateIpAddress", "")
    return instance.get("PublicIpAddress") or private, private


def wheelhouse_for(args: argparse.Namespace, version: str, machine: str) -> Path:
    """Wheels of requirements.txt for the hosts' Python, downloaded here once: the hosts
    install offline, so they need no access to the package index."""
    folder = Path(args.aws_dir) / "wheels" / f"cp{version.replace('.', '')}-{machine}"
    stamp = folder / ".requirements"
    wanted = (REPO_ROOT / "requirements.txt").read_text()
    if stamp.exists() and stamp.read_text() == wanted:
        return folder
    step(f"downloading wheels for Python {version} on {machine} into {folder}")
    platforms = [f"manylinux{tag}_{machine}" for tag in ("2014", "_2_17", "_2_28", "_2_34")]
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
               "--only-binary=:all:", "--implementation", "cp", "--python-version", version,
               "-r", str(REPO_ROOT / "requirements.txt"), "-d", str(folder)]
    for platform in platforms:
        command += ["--platform", platform]
    if subprocess.run(command).returncode != 0:
        fail(f"downloading wheels for Python {version}/{machine} (is the package index reachable from here?)")
    stamp.write_text(wanted)
    return folder


def endpoint_settings(args: argparse.Namespace, node: str, private: dict[str, str], setup: dict) -> dict[str, str]:
    port = str(setup.get("http_port", 5000))
    peer = NODES[1 - NODES.index(node)]
    settings = {
        "DW_NODE_ID": node, "DW_HOST": "0.0.0.0", "DW_PORT": port,
        "DW_PEER_URL": f"http://{private[peer]}:{port}", "DW_DB": f"var/{node}.sqlite3",
        # the scaler
        "DW_PROVIDER": "ec2", "DW_ENDPOINT_INDEX": str(NODES.index(node)), "DW_SELF_URL": f"http://127.0.0.1:{port}",
        "DW_ENDPOINTS": ",".join(f"http://{private[name]}:{port}" for name in NODES),
        "DW_CLUSTER": args.cluster, "AWS_REGION": setup["region"], "DW_INSTANCE_TYPE": args.instance_type,
        "DW_SLOTS_PER_WORKER": str(args.slots_per_worker), "DW_MAX_WORKERS": str(args.max_workers),
        "DW_SCALE_AFTER": str(args.scale_after), "DW_TARGET_DRAIN": str(args.target_drain),
        "DW_IDLE_TIMEOUT": str(args.idle_timeout), "DW_SSH_USER": args.ssh_user,
        "DW_WORKER_SERVICE": args.service, "DW_REMOTE_PYTHON": args.remote_python,
    }
    if args.ami:
        settings["DW_AMI"] = args.ami
    # Passed through as set here; the exit command only matters for --service process.
    for name in ("DW_WORKER_EXIT_COMMAND", "DW_READY_DEADLINE", "DW_SILENCE_DEADLINE", "DW_BREAKER_THRESHOLD",
                 "DW_TEST_SSH_ADDRESSES"):
        if os.environ.get(name):
            settings[name] = os.environ[name]
    # TEST ONLY: the tests point the hosts' scalers at moto's server instead of AWS.
    for name in os.environ.get("DW_TEST_AWS_ENV", "").split(","):
        if name.strip() and name.strip() in os.environ:
            settings[name.strip()] = os.environ[name.strip()]
    return settings


def wait_for_stats(url: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{url}/stats", timeout=5) as response:
                return json.loads(response.read())
        except (OSError, ValueError) as exc:
            if time.monotonic() > deadline:
                fail(f"{url}/stats did not answer within {timeout:.0f}s: {exc}")
            time.sleep(2)


def deploy(args: argparse.Namespace) -> None:
    try:
        setup = json.loads(Path(args.state_file).read_text())
    except FileNotFoundError:
        fail(f"{args.state_file} not found: run ./setup.sh aws first")
    secret = secret_for(args)
    ec2 = ec2_client(setup["region"])
    try:
        instances = endpoint_instances(args, ec2, setup)
        step("waiting for the endpoint instances to get their addresses")
        ids = [instances[node]["InstanceId"] for node in NODES]
        ec2.get_waiter("instance_running").wait(InstanceIds=ids, WaiterConfig={"Delay": 5, "MaxAttempts": 60})
        fresh = {instance["InstanceId"]: instance for instance in cluster_instances(ec2, args.cluster, "endpoint")}
    except (BotoCoreError, ClientError) as exc:
        fail(f"EC2 API: {exc}")
    public, private = {}, {}
    for node in NODES:
        public[node], private[node] = addresses(fresh[instances[node]["InstanceId"]])
    pins = HostKeyPins(Path(args.aws_dir) / f"{args.cluster}-known_hosts.json")
    targets = {node: SshTarget(instances[node]["InstanceId"], public[node], args.ssh_user, Path(setup["key_path"]))
               for node in NODES}

    def provision(node: str) -> str:
        step(f"endpoint {node}: waiting for SSH on {public[node]}")
        wait_for_ssh(public[node], timeout=args.ready_timeout)
        version, machine = ensure_remote_python(targets[node], pins, args.endpoint_python)
        install = EndpointInstall(settings=endpoint_settings(args, node, private, setup), secret=secret,
                                  worker_key=Path(setup["key_path"]), aws_state=setup,
                                  wheelhouse=wheelhouse_for(args, version, machine), service=args.service,
                                  cron=args.cron_install, python=args.endpoint_python)
        step(f"endpoint {node}: uploading code and wheels, installing, starting the service and the scaler")
        return provision_endpoint(targets[node], pins, install)

    with ThreadPoolExecutor(max_workers=2) as pool:
        try:
            bases = dict(zip(NODES, pool.map(provision, NODES), strict=True))
        except ProviderError as exc:
            fail(f"provisioning: {exc}")
    port = setup.get("http_port", 5000)
    for node in NODES:
        stats = wait_for_stats(f"http://{public[node]}:{port}", args.ready_timeout)
        step(f"endpoint {node} answers: {stats['pending']} pending, installed in {bases[node]}")
    url_a, url_b = (f"http://{public[node]}:{port}" for node in NODES)
    print(f"""
dynamic-workload runs on EC2 (cluster {args.cluster}):
  endpoint a  {url_a}   ({instances['a']['InstanceId']})
  endpoint b  {url_b}   ({instances['b']['InstanceId']})
  workers     launched by the scalers' cron (up to {args.max_workers}); they power off after {args.idle_timeout}s idle

Try it:
  curl -X PUT "{url_a}/enqueue?iterations=10" -d "data=Hello"
  curl -X POST "{url_b}/pullCompleted?top=5"
  curl "{url_a}/stats"

Tear it all down:  ./deploy.sh aws --destroy
""", flush=True)


def terminate_all(ec2: Any, cluster: str, role: str | None) -> list[str]:
    """Terminate the cluster's instances (of one role, or all) and wait until they are gone."""
    ids = [instance["InstanceId"] for instance in cluster_instances(ec2, cluster, role)]
    what = f"{role} instance(s)" if role else "instance(s)"
    if not ids:
        step(f"no {what} of cluster {cluster} left")
        return []
    step(f"terminating {len(ids)} {what} of cluster {cluster}: {', '.join(ids)}")
    for start in range(0, len(ids), 100):
        ec2.terminate_instances(InstanceIds=ids[start:start + 100])
    ec2.get_waiter("instance_terminated").wait(InstanceIds=ids, WaiterConfig={"Delay": 5, "MaxAttempts": 120})
    return ids


def destroy(args: argparse.Namespace) -> None:
    region = args.region
    if Path(args.state_file).exists():
        region = json.loads(Path(args.state_file).read_text()).get("region", region)
    ec2 = ec2_client(region)
    try:
        # The endpoints first: their scalers' cron jobs could otherwise launch workers behind us.
        terminate_all(ec2, args.cluster, "endpoint")
        for _ in range(3):  # then the workers, until a listing finds none
            if not terminate_all(ec2, args.cluster, None):
                break
    except (BotoCoreError, ClientError) as exc:
        fail(f"terminating the cluster's instances: {exc}")
    for name in (f"{args.cluster}-secret", f"{args.cluster}-known_hosts.json"):
        (Path(args.aws_dir) / name).unlink(missing_ok=True)
    step("removing what ./setup.sh aws created")
    command = [sys.executable, "-m", "cron.aws_setup", "--destroy", "--cluster", args.cluster,
               "--region", region, "--state-file", args.state_file]
    if subprocess.run(command, cwd=REPO_ROOT).returncode != 0:
        fail("removing the setup's resources (see above)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.destroy:
        destroy(args)
    else:
        deploy(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
