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
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cli.interrupts import Interrupted, exit_now, parallel, stop_on_signals
from cli.settings import Setting, add_settings, check_settings, choice, environment, seconds, text
from cli.tls import urlopen
from cloud.aws import CLUSTER_SETTING, REGION_SETTING, ClusterUsageError, Region, api_step, client, read_state
from cloud.ec2 import (
    Ec2Error,
    Launch,
    Tag,
    cluster_instances,
    image,
    tags_of,
    wait_until,
)
from cloud.ssh import HostKeyPins, SshError, SshTarget, wait_for_ssh
from cron.config import HOST_KNOBS, check_knobs
from cron.config import SETTINGS as SCALER_SETTINGS
from deploy.cluster import (
    AWS_DIR_SETTING,
    DESTROY_COMMAND,
    STATE_FILE_SETTING,
    SetupError,
    announce,
    cluster_flag,
    cluster_region,
    make_clients,
    settings_for,
)
from deploy.cluster_ca import Pem, ensure_ca, issue
from deploy.destroy import destroy_summary, left_running, remove_resources, terminate_cluster
from deploy.iam import ensure_spot_role
from deploy.install import EndpointInstall, InstallError, ensure_remote_python, install_endpoint, wheelhouse_for
from endpoint.config import OPTIONS as ENDPOINT_SETTINGS

NODES = ("a", "b")
# TEST ONLY: the tests' fake endpoint instances' SSH addresses, by node; the names of the variables
# (moto's URL, fake credentials) that the endpoint hosts' scalers are handed as they are here.
TEST_ENDPOINT_ADDRESSES = "DW_TEST_ENDPOINT_ADDRESSES"
TEST_AWS_ENV = "DW_TEST_AWS_ENV"

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
    "client_keys": Setting("DW_CLIENT_KEYS", "off", choice("on", "off", fold=str.lower),
                           "on: the clients' routes need a client key (python -m endpoint.client_keys)"),
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
    parser.add_argument("--no-tls", dest="tls", action="store_false",
                        help="plain HTTP on the endpoints' port (default: HTTPS on every hop, with the cluster's "
                             "own CA in <aws-dir>/<cluster>-ca.pem)")
    args = parser.parse_args(argv)
    check_settings(parser, SETTINGS, args)
    check_knobs(parser, args)
    args.state_file = args.state_file or f"{args.aws_dir}/{args.cluster}.json"
    return args


@contextmanager
def deploy_step(what: str) -> Iterator[None]:
    """A failure of AWS, EC2, SSH or the host's install, as a DeployError that names `what`."""
    try:
        with api_step(what, DeployError):
            yield
    except (Ec2Error, SshError, InstallError) as exc:
        raise DeployError(f"{what}: {exc}") from exc


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
            announce(f"cluster secret created in {path} (mode 0600)")
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
        found.setdefault(tags_of(instance).get(Tag.NODE, "?"), []).append(instance)
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
        announce(f"starting stopped endpoint instance(s) {', '.join(ids)}")
        wait_until(ec2, "stopped", ids)
        ec2.start_instances(InstanceIds=ids)
    missing = [node for node in NODES if node not in running]
    if not missing:
        announce("endpoint instances already running: " + ", ".join(running[node]["InstanceId"] for node in NODES))
        return running
    ami = image(args.ami, setup["region"])
    for node in missing:
        running[node] = launch_endpoint(args, ec2, setup, node, ami)
    return running


def launch_endpoint(args: argparse.Namespace, ec2: Any, setup: dict, node: str, image: str) -> dict:
    announce(f"launching endpoint {node} ({args.endpoint_instance_type}, {image})")
    tags = {Tag.ROLE: "endpoint", Tag.NODE: node, "Name": f"{args.cluster}-endpoint-{node}"}
    pool = test_addresses(TEST_ENDPOINT_ADDRESSES)
    if pool:
        tags[Tag.TEST_ADDRESS] = pool[NODES.index(node)]
    launch = Launch.from_state(setup, args.cluster, setup["region"])
    for attempt in range(7):
        try:
            # An endpoint that shuts down stops (keeping its disk and queue); workers terminate.
            (instance,) = launch.run(ec2, image=image, instance_type=args.endpoint_instance_type, count=1,
                                     tags=tags, shutdown_behavior="stop",
                                     # this deploy run's decision; a re-run finds the
                                     # instance by its tags instead of relaunching it
                                     intent=f"{args.cluster}-endpoint-{node}-{secrets.token_hex(6)}",
                                     instance_profile_arn=setup["endpoint_instance_profile_arn"])
            return instance
        except Ec2Error as exc:
            # EC2 learns of a new instance profile some seconds after IAM made it.
            if "iaminstanceprofile" not in str(exc).lower().replace(" ", "") or attempt == 6:
                raise DeployError(f"launching endpoint {node}: {exc}") from exc
            announce("the new instance profile is not visible to EC2 yet; retrying in 10 s")
            time.sleep(10)
    raise AssertionError("unreachable")


def addresses(instance: dict) -> tuple[str, str]:
    """(address this machine reaches it at, address the cluster reaches it at)."""
    test_address = tags_of(instance).get(Tag.TEST_ADDRESS)
    if test_address:
        return test_address, test_address
    private = instance.get("PrivateIpAddress", "")
    return instance.get("PublicIpAddress") or private, private


def endpoint_settings(args: argparse.Namespace, node: str, private: dict[str, str], setup: dict) -> dict[str, str]:
    """The environment of an endpoint host's endpoint and scaler, named by their own tables."""
    port = setup.get("http_port", 5000)
    peer = NODES[1 - NODES.index(node)]
    scheme = "https" if args.tls else "http"
    both = {"node_id": node, "peer": f"{scheme}://{private[peer]}:{port}"}
    scaler = {
        **both, "provider": "ec2", "endpoint_index": NODES.index(node), "url": f"{scheme}://127.0.0.1:{port}",
        "endpoints": [f"{scheme}://{private[name]}:{port}" for name in NODES], "cluster": args.cluster,
        "ssh_user": args.ssh_user, "worker_service": args.service, "remote_python": args.remote_python,
        **{name: getattr(args, name) for name in HOST_KNOBS},
    }
    if args.ami:
        scaler["ami"] = args.ami
    # TEST ONLY: the fake worker instances' addresses.
    test_ssh = SCALER_SETTINGS["test_ssh_addresses"].env
    if test_ssh in os.environ:
        scaler["test_ssh_addresses"] = os.environ[test_ssh]
    # DW_DB, the endpoint's data file, is the variable the scaler reads it from too.
    endpoint = {**both, "host": "0.0.0.0", "port": port, "db": f"var/{node}.sqlite3", "client_keys": args.client_keys}
    settings = {**environment(ENDPOINT_SETTINGS, endpoint),
                **environment(SCALER_SETTINGS, scaler), "AWS_DEFAULT_REGION": setup["region"]}
    # TEST ONLY: the tests' moto server instead of AWS.
    for name in (name.strip() for name in os.environ.get(TEST_AWS_ENV, "").split(",")):
        if name and name in os.environ:
            settings[name] = os.environ[name]
    return settings


def wait_for_stats(url: str, timeout: float, ca_file: str = "") -> dict:
    """The endpoint's /stats, asked until it answers (an https one checked against `ca_file`); DeployError once
    `timeout` is over (to the second)."""
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        try:
            with urlopen(f"{url}/stats", max(0.1, min(5.0, remaining)), ca_file) as response:
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
    with deploy_step("EC2 API"):
        instances = endpoint_instances(args, ec2, setup)
        announce("waiting for the endpoint instances to get their addresses")
        ids = [instances[node]["InstanceId"] for node in NODES]
        wait_until(ec2, "running", ids)
        fresh = {instance["InstanceId"]: instance for instance in cluster_instances(ec2, args.cluster, "endpoint")}
    return {node: fresh[instances[node]["InstanceId"]] for node in NODES}


def ca_paths(args: argparse.Namespace) -> tuple[Path, Path]:
    """The cluster CA's certificate (handed to clients) and its key (0600, never leaves this machine)."""
    folder = Path(args.aws_dir)
    return folder / f"{args.cluster}-ca.pem", folder / f"{args.cluster}-ca-key.pem"


def cluster_ca(args: argparse.Namespace) -> Pem | None:
    if not args.tls:
        return None
    certificate, key = ca_paths(args)
    try:
        ca, made = ensure_ca(certificate, key, f"cluster {args.cluster}")
    except ValueError as exc:
        raise DeployError(f"the cluster CA: {exc}") from exc
    if made:
        announce(f"cluster CA created: {certificate} (its key {key}, mode 0600, stays on this machine)")
    return ca


def endpoint_names(instance: dict) -> list[str]:
    """Every address an endpoint is reached at: by clients (public), by the peer and the workers (private)."""
    names = [*addresses(instance), instance.get("PublicIpAddress", ""), instance.get("PrivateIpAddress", ""),
             instance.get("PublicDnsName", ""), instance.get("PrivateDnsName", "")]
    return [name for name in dict.fromkeys(names) if name]


def provision_endpoints(args: argparse.Namespace, setup: dict, secret: str, instances: dict[str, dict],
                        ca: Pem | None) -> dict:
    public = {node: addresses(instances[node])[0] for node in NODES}
    private = {node: addresses(instances[node])[1] for node in NODES}
    pins = HostKeyPins(Path(args.aws_dir) / f"{args.cluster}-known_hosts.json")
    targets = {node: SshTarget(instances[node]["InstanceId"], public[node], args.ssh_user, Path(setup["key_path"]))
               for node in NODES}

    def provision(node: str) -> str:
        announce(f"endpoint {node}: waiting for SSH on {public[node]}")
        wait_for_ssh(public[node], timeout=args.ready_timeout, what=f"within {args.ready_timeout:g}s (--ready-timeout)")
        version, machine = ensure_remote_python(targets[node], pins, args.endpoint_python)
        install = EndpointInstall(settings=endpoint_settings(args, node, private, setup), cluster_secret=secret,
                                  ssh_key=Path(setup["key_path"]), aws_state=setup,
                                  wheelhouse=wheelhouse_for(Path(args.aws_dir), version, machine),
                                  service=args.service, cron=args.cron_install, python=args.endpoint_python,
                                  # a fresh key for this host alone, made here and kept nowhere else
                                  tls=issue(ca, endpoint_names(instances[node])) if ca else None,
                                  ca_certificate=ca.certificate.decode() if ca else "")
        announce(f"endpoint {node}: uploading code and wheels, installing, starting the service and the scaler")
        return install_endpoint(targets[node], pins, install)

    with deploy_step("provisioning"):
        bases = dict(zip(NODES, parallel(provision, NODES), strict=True))
    for node in NODES:
        stats = wait_for_stats(endpoint_url(args, public[node], setup), args.ready_timeout,
                               str(ca_paths(args)[0]) if ca else "")
        announce(f"endpoint {node} answers: {stats['pending']} pending, installed in {bases[node]}")
    return public


def deploy(args: argparse.Namespace, setup: dict, region: Region) -> None:
    announce(f"deploying cluster {args.cluster} in {region.name} (region from {region.source})")
    if args.market == "spot":
        ensure_spot_role(make_clients(region.name)[1])
    secret = secret_for(args)
    ca = cluster_ca(args)
    instances = start_endpoints(args, client("ec2", region.name), setup)
    public = provision_endpoints(args, setup, secret, instances, ca)
    url_a, url_b = (endpoint_url(args, public[node], setup) for node in NODES)
    curl = f"curl --cacert {ca_paths(args)[0]}" if ca else "curl"
    if args.client_keys == "on":
        curl += ' -H "Authorization: Bearer $KEY"'
    keys = client_keys_help(args, url_a, url_b) if args.client_keys == "on" else ""
    tls = (f"  TLS         every hop (no plain HTTP on port {setup.get('http_port', 5000)}); the cluster CA is "
           f"{ca_paths(args)[0]}\n" if ca else "")
    types = ", ".join(args.instance_types)
    print(f"""
dynamic-workload runs on EC2 (cluster {args.cluster}, region {region.name}):
  endpoint a  {url_a}   ({instances['a']['InstanceId']})
  endpoint b  {url_b}   ({instances['b']['InstanceId']})
  workers     launched by the scalers' cron (up to {args.max_workers}; {args.market}: {types}); they power off after
              {args.idle_timeout:g}s idle
  dashboard   {url_a}/   {url_b}/   (both endpoints on each; worker ids, errors and failed items at /details)
  metrics     {url_a}/metrics   {url_b}/metrics   (Prometheus text format)
{tls}
The dashboard's /details asks for a login: any user name, and the operator key as the password, which
  .venv/bin/python -m endpoint.operator_key --secret-file {Path(args.aws_dir) / f"{args.cluster}-secret"}
prints (it is derived from the cluster secret; keep it as you keep that file).

{keys}Try it:
  {curl} -X PUT "{url_a}/enqueue?iterations=10" -d "data=Hello"
  {curl} -X POST "{url_b}/pullCompleted?top=5"
  {curl} "{url_a}/stats"

Tear it all down:  {destroy_command(args)}
""", flush=True)


def client_keys_help(args: argparse.Namespace, url_a: str, url_b: str) -> str:
    ca = f" --tls-ca {ca_paths(args)[0]}" if args.tls else ""
    return (f"Client keys are on: the clients' routes need one. Make one (shown once) with\n"
            f"  KEY=$(.venv/bin/python -m endpoint.client_keys --endpoint {url_a} --endpoint {url_b} "
            f"--secret-file {Path(args.aws_dir) / f'{args.cluster}-secret'}{ca} create <name>)\n"
            f"(list and revoke <id> with the same settings).\n\n")


def endpoint_url(args: argparse.Namespace, address: str, setup: dict) -> str:
    return f"{'https' if args.tls else 'http'}://{address}:{setup.get('http_port', 5000)}"


def destroy_command(args: argparse.Namespace) -> str:
    flags = cluster_flag(args.cluster)
    if args.region:
        flags += f" --region {args.region}"
    return DESTROY_COMMAND + flags


def destroy(args: argparse.Namespace, state: dict, region: Region) -> int:
    record = f"state file {args.state_file}" if state else f"no state file {args.state_file}"
    announce(f"destroying cluster {args.cluster} in region {region.name} (region from {region.source}; {record})")
    terminated = terminate_cluster(client("ec2", region.name), args.cluster)
    for name in (f"{args.cluster}-secret", f"{args.cluster}-known_hosts.json", f"{args.cluster}-ca.pem",
                 f"{args.cluster}-ca-key.pem", f"{args.cluster}-ca-key.pem.lock"):
        (Path(args.aws_dir) / name).unlink(missing_ok=True)
    announce("removing what ./setup.sh aws created")
    settings = settings_for(args, region.name)
    removed = remove_resources(*make_clients(region.name), settings, state)
    if terminated:
        removed.insert(0, f"{len(terminated)} instance(s) ({', '.join(terminated)})")
    status, summary = destroy_summary(args.cluster, region, removed, DESTROY_COMMAND)
    announce(summary)
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
        region = cluster_region(args, state)
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
