"""`./deploy.sh aws`: the two endpoint instances, provisioned over SSH from this checkout.

1. checks every setting (the scaler's knobs with the scaler's own table and checks) and the
   region, before anything is launched;
2. reads what `./setup.sh aws` recorded (key pair, security group, subnets, IAM profile);
3. launches endpoint instances a and b unless they already run (found by their tags), with
   the endpoints' instance profile -- the only AWS credentials in the cluster;
4. provisions both over SSH in parallel: code from this checkout (no git clone), a venv
   installed offline from wheels downloaded here for the host's Python, the cluster secret,
   the endpoint service, and the crontab entry of the scaler;
5. waits until both answer /stats, and prints their URLs and the curl commands to try.

`--destroy` terminates every instance of the cluster (by tag; the endpoints first, so that
their scalers launch nothing more), waits until they are gone, and removes what `./setup.sh
aws` created. Each step prints what it does. A failure or a Ctrl-C says which step stopped,
which of the cluster's instances are running and billing, and that `--destroy` removes them;
re-running the command resumes (every step is idempotent).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from cron import aws_setup
from cron.aws_setup import SetupError
from cron.cluster import (
    AWS_DIR_SETTING,
    CLUSTER_SETTING,
    REGION_SETTING,
    STATE_FILE_SETTING,
    ClusterUsageError,
    Region,
    api_step,
    cluster_instances,
    ec2_client,
    left_running,
    read_state,
    tags_of,
)
from cron.interrupts import Interrupted, exit_now, parallel, stop_on_signals
from cron.providers import ProviderError
from cron.providers.ec2 import DEFAULT_AMI_PARAMETER, Ec2Settings, latest_ami, run_instances, ssm_client
from cron.provision import (
    EndpointInstall,
    HostKeyPins,
    SshTarget,
    ensure_remote_python,
    provision_endpoint,
    wait_for_ssh,
)
from cron.scale import HOST_KNOBS
from cron.scale import SETTINGS as SCALER_SETTINGS
from cron.settings import Setting, add_settings, check_settings, choice, environment_of, seconds, text

REPO_ROOT = Path(__file__).resolve().parents[1]
NODES = ("a", "b")
DESTROY = "./deploy.sh aws --destroy"

SETTINGS: dict[str, Setting] = {
    "cluster": CLUSTER_SETTING,
    "region": REGION_SETTING,
    "aws_dir": AWS_DIR_SETTING,
    "state_file": STATE_FILE_SETTING,
    "endpoint_instance_type": Setting("DW_ENDPOINT_INSTANCE_TYPE", "t3.small", text, "the endpoints' instance type"),
    "ami": Setting("DW_AMI", "", text, "image of all instances (default: the latest Amazon Linux 2023)"),
    "ssh_user": SCALER_SETTINGS["ssh_user"],
    "service": Setting("DW_SERVICE_MANAGER", "systemd", choice("systemd", "process"),
                       "how the endpoint and the workers run on their hosts; process: for hosts without systemd"),
    "cron_install": Setting("DW_CRON_INSTALL", "crontab", choice("crontab", "file"),
                            "crontab, or file: only write the scaler's entry to <install>/crontab (hosts without "
                            "cron)"),
    "endpoint_python": Setting("DW_ENDPOINT_PYTHON", "python3.11", text,
                               "Python (3.10 or newer) for the endpoints' venv; installed on the host if missing"),
    "remote_python": SCALER_SETTINGS["remote_python"],
    "ready_timeout": Setting("DW_READY_TIMEOUT", "600", seconds(0),
                             "seconds to wait for each endpoint's SSH, and then for its /stats"),
    # The scaler's knobs, with the scaler's own entries: a value accepted here is accepted there.
    **{name: SCALER_SETTINGS[name] for name in HOST_KNOBS},
}
# c7i.large, the default worker instance type, has 2 vCPUs.
DEFAULTS = {"slots_per_worker": "2"}


class DeployError(Exception):
    """A step failed; the message says which."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="./deploy.sh aws", description="Deploy dynamic-workload to EC2, or --destroy it. The scaler's knobs "
                                            "(from --max-workers on) are handed to the endpoints' scalers.")
    add_settings(parser, SETTINGS, DEFAULTS)
    parser.add_argument("--destroy", action="store_true",
                        help="terminate every instance of the cluster, then remove what setup created")
    args = parser.parse_args(argv)
    check_settings(parser, SETTINGS, args)
    if args.partition_deadline < args.silence_deadline:
        parser.error(f"--partition-deadline ({args.partition_deadline:g}) must be at least --silence-deadline "
                     f"({args.silence_deadline:g})")
    args.state_file = args.state_file or f"{args.aws_dir}/{args.cluster}.json"
    return args


def step(message: str) -> None:
    print(f"==> {message}", flush=True)


def secret_for(args: argparse.Namespace) -> str:
    """The cluster secret, made once: written aside and linked into place, so that a run killed
    midway leaves either no secret file or a whole one."""
    path = Path(args.aws_dir) / f"{args.cluster}-secret"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # 0600
        try:
            with os.fdopen(descriptor, "w") as file:
                file.write(secrets.token_hex(32) + "\n")
            os.link(temporary, path)  # fails if another run made it meanwhile: that one is used
            step(f"cluster secret created in {path} (mode 0600)")
        except FileExistsError:
            pass
        finally:
            os.unlink(temporary)
    secret = path.read_text().strip()
    if not secret:
        raise DeployError(f"the cluster secret {path} is empty: delete it, and run the same command again")
    return secret


def test_addresses(name: str) -> list[str]:
    """TEST ONLY (DW_TEST_*_ADDRESSES): addresses of the tests' fake instances, by launch order."""
    return [address.strip() for address in os.environ.get(name, "").split(",") if address.strip()]


def existing_endpoints(ec2: Any, cluster: str) -> dict[str, dict]:
    found: dict[str, list[dict]] = {}
    for instance in cluster_instances(ec2, cluster, "endpoint", ("pending", "running", "stopping", "stopped")):
        found.setdefault(tags_of(instance).get("dw:node", "?"), []).append(instance)
    for node, instances in found.items():
        if len(instances) > 1:
            ids = ", ".join(instance["InstanceId"] for instance in instances)
            raise DeployError(f"more than one instance is endpoint {node} ({ids}): terminate the extra one(s) first")
    return {node: instances[0] for node, instances in found.items() if node in NODES}


def endpoint_instances(args: argparse.Namespace, ec2: Any, setup: dict) -> dict[str, dict]:
    """The endpoint instances: started if stopped (their disk holds the queue), launched if missing."""
    running = existing_endpoints(ec2, args.cluster)
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
    image = args.ami or latest_ami(ssm_client(setup["region"]), DEFAULT_AMI_PARAMETER)
    for node in missing:
        running[node] = launch_endpoint(args, ec2, setup, node, image)
    return running


def launch_endpoint(args: argparse.Namespace, ec2: Any, setup: dict, node: str, image: str) -> dict:
    step(f"launching endpoint {node} ({args.endpoint_instance_type}, {image})")
    tags = {"dw:cluster": args.cluster, "dw:role": "endpoint", "dw:node": node,
            "Name": f"{args.cluster}-endpoint-{node}"}
    pool = test_addresses("DW_TEST_ENDPOINT_ADDRESSES")
    if pool:
        tags["dw:test-address"] = pool[NODES.index(node)]
    for attempt in range(7):
        try:
            # An endpoint that shuts down stops (keeping its disk and queue); workers terminate.
            (instance,) = run_instances(ec2, ec2_settings(args, setup), image=image,
                                        instance_type=args.endpoint_instance_type, count=1, tags=tags,
                                        shutdown_behavior="stop",
                                        # this deploy run's decision; a re-run finds the
                                        # instance by its tags instead of relaunching it
                                        intent=f"{args.cluster}-endpoint-{node}-{secrets.token_hex(6)}",
                                        instance_profile_arn=setup["endpoint_instance_profile_arn"])
            return instance
        except ProviderError as exc:
            # EC2 learns of a new instance profile some seconds after IAM made it.
            if "iaminstanceprofile" not in str(exc).lower().replace(" ", "") or attempt == 6:
                raise DeployError(f"launching endpoint {node}: {exc}") from exc
            step("the new instance profile is not visible to EC2 yet; retrying in 10 s")
            time.sleep(10)
    raise AssertionError("unreachable")


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


_wheels_lock = threading.Lock()  # both endpoints' provisioning may want the same folder at once


def wheelhouse_for(args: argparse.Namespace, version: str, machine: str) -> Path:
    """Wheels of requirements.txt for the hosts' Python, downloaded here once: the hosts
    install offline, so they need no access to the package index."""
    folder = Path(args.aws_dir) / "wheels" / f"cp{version.replace('.', '')}-{machine}"
    stamp = folder / ".requirements"
    wanted = (REPO_ROOT / "requirements.txt").read_text()
    with _wheels_lock:
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
            raise DeployError(f"downloading wheels for Python {version}/{machine} (is the package index reachable "
                              f"from here?)")
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
        "DW_CLUSTER": args.cluster, "AWS_DEFAULT_REGION": setup["region"], "DW_SSH_USER": args.ssh_user,
        "DW_WORKER_SERVICE": args.service, "DW_REMOTE_PYTHON": args.remote_python,
        **environment_of(SETTINGS, args, HOST_KNOBS),
    }
    if args.ami:
        settings["DW_AMI"] = args.ami
    # TEST ONLY: the fake worker instances' addresses, and the tests' moto server instead of AWS.
    names = ["DW_TEST_SSH_ADDRESSES"] + os.environ.get("DW_TEST_AWS_ENV", "").split(",")
    for name in (name.strip() for name in names):
        if name and name in os.environ:
            settings[name] = os.environ[name]
    return settings


def wait_for_stats(url: str, timeout: float) -> dict:
    """The endpoint's /stats, asked until it answers; DeployError once `timeout` is over (to the second)."""
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        try:
            with urllib.request.urlopen(f"{url}/stats", timeout=max(0.1, min(5.0, remaining))) as response:
                return json.loads(response.read())
        except (OSError, ValueError) as exc:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DeployError(f"{url}/stats did not answer within {timeout:.0f}s: {exc}") from exc
            time.sleep(min(2.0, remaining))


def check_setup(args: argparse.Namespace, setup: dict) -> None:
    if not setup:
        raise DeployError(f"{args.state_file} not found: run ./setup.sh aws first")
    missing = [key for key in ("key_name", "key_path", "security_group_id", "endpoint_instance_profile_arn")
               if not setup.get(key)]
    if missing:
        raise DeployError(f"{args.state_file} lacks {', '.join(missing)}: ./setup.sh aws did not finish; run it again")


def start_endpoints(args: argparse.Namespace, ec2: Any, setup: dict) -> dict[str, dict]:
    """The endpoint instances, running, as EC2 describes them now (with their addresses)."""
    with api_step("EC2 API", DeployError):
        instances = endpoint_instances(args, ec2, setup)
        step("waiting for the endpoint instances to get their addresses")
        ids = [instances[node]["InstanceId"] for node in NODES]
        ec2.get_waiter("instance_running").wait(InstanceIds=ids, WaiterConfig={"Delay": 5, "MaxAttempts": 60})
        fresh = {instance["InstanceId"]: instance for instance in cluster_instances(ec2, args.cluster, "endpoint")}
    return {node: fresh[instances[node]["InstanceId"]] for node in NODES}


def provision_endpoints(args: argparse.Namespace, setup: dict, secret: str, instances: dict[str, dict]) -> dict:
    public = {node: addresses(instances[node])[0] for node in NODES}
    private = {node: addresses(instances[node])[1] for node in NODES}
    pins = HostKeyPins(Path(args.aws_dir) / f"{args.cluster}-known_hosts.json")
    targets = {node: SshTarget(instances[node]["InstanceId"], public[node], args.ssh_user, Path(setup["key_path"]))
               for node in NODES}

    def provision(node: str) -> str:
        step(f"endpoint {node}: waiting for SSH on {public[node]}")
        wait_for_ssh(public[node], timeout=args.ready_timeout, what=f"within {args.ready_timeout:g}s (--ready-timeout)")
        version, machine = ensure_remote_python(targets[node], pins, args.endpoint_python)
        install = EndpointInstall(settings=endpoint_settings(args, node, private, setup), secret=secret,
                                  worker_key=Path(setup["key_path"]), aws_state=setup,
                                  wheelhouse=wheelhouse_for(args, version, machine), service=args.service,
                                  cron=args.cron_install, python=args.endpoint_python)
        step(f"endpoint {node}: uploading code and wheels, installing, starting the service and the scaler")
        return provision_endpoint(targets[node], pins, install)

    try:
        bases = dict(zip(NODES, parallel(provision, NODES), strict=True))
    except ProviderError as exc:
        raise DeployError(f"provisioning: {exc}") from exc
    port = setup.get("http_port", 5000)
    for node in NODES:
        stats = wait_for_stats(f"http://{public[node]}:{port}", args.ready_timeout)
        step(f"endpoint {node} answers: {stats['pending']} pending, installed in {bases[node]}")
    return public


def deploy(args: argparse.Namespace, setup: dict, region: Region) -> None:
    step(f"deploying cluster {args.cluster} in {region.name} (region from {region.source})")
    secret = secret_for(args)
    instances = start_endpoints(args, ec2_client(region.name), setup)
    public = provision_endpoints(args, setup, secret, instances)
    url_a, url_b = (f"http://{public[node]}:{setup.get('http_port', 5000)}" for node in NODES)
    print(f"""
dynamic-workload runs on EC2 (cluster {args.cluster}, region {region.name}):
  endpoint a  {url_a}   ({instances['a']['InstanceId']})
  endpoint b  {url_b}   ({instances['b']['InstanceId']})
  workers     launched by the scalers' cron (up to {args.max_workers}); they power off after {args.idle_timeout:g}s idle
  dashboard   {url_a}/   {url_b}/   (both endpoints on each; worker ids, errors and failed items at /details)
  metrics     {url_a}/metrics   {url_b}/metrics   (Prometheus text format)

The dashboard's /details asks for a login: any user name, and the operator key as the password, which
  .venv/bin/python -m endpoint.operator_key --secret-file {Path(args.aws_dir) / f"{args.cluster}-secret"}
prints (it is derived from the cluster secret; keep it as you keep that file).

Try it:
  curl -X PUT "{url_a}/enqueue?iterations=10" -d "data=Hello"
  curl -X POST "{url_b}/pullCompleted?top=5"
  curl "{url_a}/stats"

Tear it all down:  {destroy_command(args)}
""", flush=True)


def destroy_command(args: argparse.Namespace) -> str:
    flags = aws_setup.cluster_flag(args.cluster)
    if args.region:
        flags += f" --region {args.region}"
    return DESTROY + flags


def terminate_all(ec2: Any, cluster: str, role: str | None) -> list[str]:
    """Terminate the cluster's instances (of one role, or all) and wait until they are gone."""
    ids = [instance["InstanceId"] for instance in cluster_instances(ec2, cluster, role)]
    what = f"{role} instance(s)" if role else "instance(s)"
    if not ids:
        step(f"no {what} of cluster {cluster} found")
        return []
    step(f"terminating {len(ids)} {what} of cluster {cluster}: {', '.join(ids)}")
    for start in range(0, len(ids), 100):
        ec2.terminate_instances(InstanceIds=ids[start:start + 100])
    ec2.get_waiter("instance_terminated").wait(InstanceIds=ids, WaiterConfig={"Delay": 5, "MaxAttempts": 120})
    return ids


def terminate_cluster(ec2: Any, cluster: str) -> list[str]:
    with api_step("terminating the cluster's instances", DeployError):
        # The endpoints first: their scalers' cron jobs could otherwise launch workers behind us.
        terminated = terminate_all(ec2, cluster, "endpoint")
        for _ in range(3):  # then the workers, until a listing finds none
            more = terminate_all(ec2, cluster, None)
            terminated += more
            if not more:
                break
    return terminated


def destroy(args: argparse.Namespace, state: dict, region: Region) -> int:
    record = f"state file {args.state_file}" if state else f"no state file {args.state_file}"
    step(f"destroying cluster {args.cluster} in region {region.name} (region from {region.source}; {record})")
    terminated = terminate_cluster(ec2_client(region.name), args.cluster)
    for name in (f"{args.cluster}-secret", f"{args.cluster}-known_hosts.json"):
        (Path(args.aws_dir) / name).unlink(missing_ok=True)
    step("removing what ./setup.sh aws created")
    settings = aws_setup.settings_for(args, region.name)
    removed = aws_setup.remove_resources(*aws_setup.make_clients(region.name), settings, state)
    if terminated:
        removed.insert(0, f"{len(terminated)} instance(s) ({', '.join(terminated)})")
    status, summary = aws_setup.destroy_summary(args.cluster, region, removed, DESTROY)
    step(summary)
    return status


def what_is_left(args: argparse.Namespace, region: Region | None, interrupted: bool = False) -> str:
    """Which of the cluster's instances run and bill (asked of EC2), and how to remove them."""
    if region is None:  # no region, so nothing was launched
        return ""
    remedy = f"`{destroy_command(args)}` {'again ' if args.destroy else ''}terminates them and removes the rest."
    left = left_running(args.cluster, region.name, remedy)
    if not args.destroy:
        fix = "" if interrupted else "fix the cause and "
        left += f"\nOr {fix}run the same command again: finished steps are kept."
    return left


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stop_on_signals()
    what = "destroy" if args.destroy else "deploy"
    region: Region | None = None
    try:
        state = read_state(args.state_file)
        if not args.destroy:
            check_setup(args, state)  # before the region: without setup's record, that is what to say
        region = aws_setup.cluster_region(args, state)
        if args.destroy:
            return destroy(args, state, region)
        deploy(args, state, region)
        return 0
    except ClusterUsageError as exc:
        print(f"./deploy.sh aws: {exc}", file=sys.stderr, flush=True)
        return 2
    except (DeployError, SetupError) as exc:
        print(f"{what} failed: {exc}\n{what_is_left(args, region)}", file=sys.stderr, flush=True)
        exit_now(1)  # a provisioning thread may still wait for its host: it is not waited for
        return 1
    except Interrupted as exc:
        print(f"\nstopped by {exc.name}: the {what} did not finish. {what_is_left(args, region, interrupted=True)}",
              file=sys.stderr, flush=True)
        exit_now(exc.exit_status)
        return exc.exit_status


if __name__ == "__main__":
    sys.exit(main())
