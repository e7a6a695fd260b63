"""`./setup.sh aws`: the one-time AWS preparation of a cluster, safe to re-run.

What it creates, all named after the cluster (default "dw") and tagged dw:cluster=<cluster>:

- key pair `<cluster>-key`: SSH access to the endpoint instances (for `./deploy.sh aws`) and, from
  the endpoints' scalers, to the worker instances. EC2 hands out the private key once, at
  creation; it is saved to `<aws-dir>/<cluster>-key.pem` with mode 0600.
- security group `<cluster>-sg` in the region's default VPC, shared by endpoints and workers:
  the HTTP port and SSH from one allowed CIDR only (your own address, normally), and all TCP
  from the group itself (workers <-> endpoints, endpoint <-> endpoint, scaler SSH to workers).
  The rules setup adds carry the description prefix "dw:<cluster> "; a re-run with another
  allowed CIDR or HTTP port revokes those and adds the new ones. Rules added by hand are kept.
- IAM role and instance profile `<cluster>-endpoint` for the two endpoint instances. They are
  the only AWS credentials in the cluster: workers get no instance profile. The role's inline
  policy `dw-scaler` allows what the scaler on the endpoints does, and nothing else:
    ec2:RunInstances        launch workers. Resources: any image (the AMI is Amazon Linux from SSM
                            or the operator's --ami); only this cluster's key pair and security
                            group; subnets of the cluster's VPC only; the new network interface;
                            and instances/volumes only when the request tags them dw:cluster=<cluster>.
    ec2:CreateTags          (a) as part of RunInstances only (ec2:CreateAction), to tag what it
                            launches; (b) on instances already tagged dw:cluster=<cluster>, to
                            mark workers ready (dw:ready).
    ec2:TerminateInstances  on instances tagged dw:cluster=<cluster> only: retire idle or broken workers.
    ec2:Describe{Instances,Images,Subnets,SecurityGroups}
                            read-only listing. EC2's Describe* actions support no resource-level
                            permissions, so these are granted on "*".
    ssm:GetParameter        the public parameter of the latest Amazon Linux AMI (/aws/service/...).
    iam:PassRole            only if a worker role `<cluster>-worker` (tagged for the cluster) exists;
                            by default there is none: workers hold no AWS credentials.

Everything it made is recorded in a state file (JSON, mode 0600, default
`<aws-dir>/<cluster>.json`) that `./deploy.sh aws` and the scalers read. Each step looks before
it acts, so a re-run creates only what is missing and completes an earlier run that failed half-way.

`--destroy` removes, in dependency order, what setup created: instance profile, role (inline
policy first), security group (retried while terminating instances still hold it), key pair
and its local private key, and the state file. It touches only resources with this cluster's
names that carry the tag dw:cluster=<cluster>; anything else is left alone and reported.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

TAG_CLUSTER = "dw:cluster"
TAG_ROLE = "dw:role"
POLICY_NAME = "dw-scaler"
CHECKIP_URL = "https://checkip.amazonaws.com"
SG_DELETE_TIMEOUT = 60.0  # seconds to wait for terminating instances to let go of the security group
_ACCESS_ERRORS = {"AccessDenied", "AccessDeniedException", "UnauthorizedOperation", "AuthFailure",
                  "InvalidClientTokenId", "SignatureDoesNotMatch", "ExpiredToken"}


class SetupError(Exception):
    """A step failed; the message says which and what to do about it."""


class UsageError(SetupError):
    """The command line (or environment) is wrong; nothing was changed."""


# --- settings ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    cluster: str
    region: str
    aws_dir: Path
    state_file: Path
    http_port: int
    key_type: str

    @property
    def key_name(self) -> str:
        return f"{self.cluster}-key"

    @property
    def key_path(self) -> Path:
        return (self.aws_dir / f"{self.cluster}-key.pem").absolute()

    @property
    def group_name(self) -> str:
        return f"{self.cluster}-sg"

    @property
    def role_name(self) -> str:
        return f"{self.cluster}-endpoint"

    @property
    def profile_name(self) -> str:
        return f"{self.cluster}-endpoint"

    @property
    def worker_role_name(self) -> str:
        return f"{self.cluster}-worker"

    def tags(self, name: str, role: str = "") -> list[dict[str, str]]:
        tags = {TAG_CLUSTER: self.cluster, "Name": name}
        if role:  # which part of the cluster uses it, where that is one part
            tags[TAG_ROLE] = role
        return [{"Key": key, "Value": value} for key, value in tags.items()]


def port_number(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}")
    return port


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ.get
    parser = argparse.ArgumentParser(
        prog="./setup.sh aws",
        description="One-time AWS preparation for dynamic-workload: key pair, security group, IAM role and "
                    "instance profile of the endpoints. Safe to re-run: only what is missing is created.")
    add = parser.add_argument
    add("--cluster", default=env("DW_CLUSTER", "dw"), help="name prefix and dw:cluster tag [DW_CLUSTER] (default dw)")
    add("--region", default="",
        help="AWS region; default: the state file's, else AWS_REGION / AWS_DEFAULT_REGION, else us-east-1")
    add("--allowed-cidr", default=env("DW_ALLOWED_CIDR", ""),
        help="who may reach the HTTP port and SSH, normally your public address as /32 [DW_ALLOWED_CIDR]; "
             "default: discovered via checkip.amazonaws.com if DW_DISCOVER_IP=1, else the one an earlier run recorded")
    add("--allow-anywhere", action="store_true", help="accept 0.0.0.0/0 (or ::/0) as --allowed-cidr")
    add("--http-port", type=port_number, default=env("DW_HTTP_PORT", "5000"),
        help="the endpoints' HTTP port [DW_HTTP_PORT] (default 5000)")
    add("--key-type", choices=["ed25519", "rsa"], default=env("DW_KEY_TYPE", "ed25519"),
        help="type of a new key pair [DW_KEY_TYPE] (default ed25519)")
    add("--aws-dir", default=env("DW_AWS_DIR", "var/aws"),
        help="where the private key and the state file go [DW_AWS_DIR] (default var/aws)")
    add("--state-file", default=env("DW_AWS_STATE", ""),
        help="the record of what was created [DW_AWS_STATE] (default <aws-dir>/<cluster>.json)")
    add("--destroy", action="store_true", help="remove what setup created (terminate the instances first)")
    args = parser.parse_args(argv)
    # Names end up in EC2 and IAM names (IAM allows at most 64 characters, no spaces or slashes).
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9-]{0,39}", args.cluster):
        parser.error(f"--cluster {args.cluster!r}: use 1-40 letters, digits and dashes")
    args.state_file = args.state_file or f"{args.aws_dir}/{args.cluster}.json"
    return args


def resolve_region(args: argparse.Namespace, state: dict) -> str:
    """An existing cluster stays in its region: a different explicit --region is refused rather
    than silently setting up a second copy and losing track of the first."""
    recorded = state.get("region", "")
    if args.region and recorded and args.region != recorded:
        raise UsageError(f"the state file {args.state_file} records region {recorded}, not {args.region}: "
                         f"destroy that cluster first, or use another --cluster / --state-file")
    env = os.environ.get
    return args.region or recorded or env("AWS_REGION") or env("AWS_DEFAULT_REGION") or "us-east-1"


# --- the allowed CIDR --------------------------------------------------------------------------


def parse_cidr(text: str, allow_anywhere: bool, source: str) -> str:
    try:
        network = ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise UsageError(f"{source} {text!r} is not a valid CIDR (expected e.g. 203.0.113.7/32 or "
                         f"2001:db8::1/128)") from None
    if network.prefixlen == 0 and not allow_anywhere:
        raise UsageError(f"{source} {network} would open SSH and the endpoints' HTTP API (which has no "
                         f"authentication) to the whole internet. Give your own address, e.g. "
                         f"--allowed-cidr 203.0.113.7/32, or pass --allow-anywhere if that is really meant")
    if str(network) != text.strip():
        print(f"allowed CIDR: {text.strip()} taken as {network}", flush=True)
    return str(network)


def discover_public_cidr() -> str:
    """This machine's public address as a single-address CIDR, asked of checkip.amazonaws.com --
    only when DW_DISCOVER_IP=1, as setup must not reach out to the internet unasked."""
    if os.environ.get("DW_DISCOVER_IP") != "1":
        return ""
    try:
        with urllib.request.urlopen(CHECKIP_URL, timeout=3) as response:
            address = ipaddress.ip_address(response.read(100).decode("ascii", "replace").strip())
    except (OSError, ValueError) as exc:
        print(f"allowed CIDR: could not discover this machine's public address via {CHECKIP_URL}: {exc}", flush=True)
        return ""
    print(f"allowed CIDR: discovered this machine's public address {address}", flush=True)
    return f"{address}/{address.max_prefixlen}"


def resolve_allowed_cidr(args: argparse.Namespace, state: dict) -> str:
    if args.allowed_cidr:
        return parse_cidr(args.allowed_cidr, args.allow_anywhere, "--allowed-cidr")
    discovered = discover_public_cidr()
    if discovered:
        return parse_cidr(discovered, args.allow_anywhere, "the discovered address")
    if state.get("allowed_cidr"):  # a re-run keeps what the first run was given
        return parse_cidr(state["allowed_cidr"], args.allow_anywhere, f"the allowed CIDR in {args.state_file}")
    raise UsageError("no allowed CIDR: SSH and the endpoints' HTTP port are opened to one address range only, "
                     "normally your own public address. Pass --allowed-cidr <your address>/32 (or set "
                     "DW_ALLOWED_CIDR); `curl https://checkip.amazonaws.com` shows your address, or set "
                     "DW_DISCOVER_IP=1 to have setup look it up")


# --- state file, output, errors ----------------------------------------------------------------


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def load_state(path: Path) -> dict:
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise SetupError(f"reading the state file {path}: {exc} (fix or remove it)") from exc
    if not isinstance(state, dict):
        raise SetupError(f"the state file {path} does not hold a JSON object (fix or remove it)")
    return state


def save_state(path: Path, state: dict) -> None:
    """Write-to-temp-then-rename: a reader sees the old or the new record, never half of one.
    mkstemp creates the file 0600; the record names the private key, which is nobody else's business."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "w") as file:
            json.dump(state, file, indent=2, sort_keys=True)
            file.write("\n")
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, 0o600)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def report(what: str, outcome: str) -> None:
    print(f"{what}: {outcome}", flush=True)


def error_code(exc: ClientError) -> str:
    return exc.response.get("Error", {}).get("Code", "")


@contextmanager
def step(what: str) -> Iterator[None]:
    """Turns an AWS error into a SetupError that names the step it happened in."""
    try:
        yield
    except ClientError as exc:
        hint = ""
        if error_code(exc) in _ACCESS_ERRORS:
            hint = " (the AWS credentials used here lack a permission this step needs, or are invalid)"
        raise SetupError(f"{what}: {exc}{hint}") from exc
    except BotoCoreError as exc:
        raise SetupError(f"{what}: {exc}") from exc


def tag_value(tags: list[dict] | None, key: str = TAG_CLUSTER) -> str | None:
    return next((tag["Value"] for tag in tags or [] if tag.get("Key") == key), None)


def require_ours(what: str, tags: list[dict] | None, cluster: str) -> None:
    """Setup adopts an existing resource only if it made it: same name is not enough."""
    found = tag_value(tags)
    if found != cluster:
        tagged = f"tagged {TAG_CLUSTER}={found}" if found else f"not tagged {TAG_CLUSTER}"
        raise SetupError(f"{what} exists but is {tagged}, so this setup did not create it for cluster "
                         f"{cluster} and will not take it over: remove or rename it, or choose another --cluster")


def make_clients(region: str) -> tuple[Any, Any]:
    # AWS_ENDPOINT_URL (the tests' moto server) is honoured by botocore itself.
    session = boto3.session.Session(region_name=region)
    config = Config(retries={"max_attempts": 6, "mode": "standard"}, connect_timeout=10, read_timeout=30)
    return session.client("ec2", config=config), session.client("iam", config=config)


# --- key pair -----------------------------------------------------------------------------------


def find_key_pair(ec2: Any, name: str) -> dict | None:
    try:
        pairs = ec2.describe_key_pairs(KeyNames=[name])["KeyPairs"]
    except ClientError as exc:
        if error_code(exc) == "InvalidKeyPair.NotFound":
            return None
        raise
    return pairs[0] if pairs else None


def write_private_key(path: Path, material: str) -> None:
    """Created 0600 from the first byte (os.open with the mode; never chmod-ed down afterwards),
    under a temporary name, then renamed: a crash leaves no half-written key at the real path."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    temporary = path.with_name(path.name + ".tmp")
    temporary.unlink(missing_ok=True)
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(descriptor, 0o600)  # exactly 0600, whatever the umask
        with os.fdopen(descriptor, "w") as file:
            file.write(material if material.endswith("\n") else material + "\n")
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def ensure_key_pair(ec2: Any, settings: Settings) -> dict:
    name, pem = settings.key_name, settings.key_path
    what = f"key pair {name}"
    with step(what):
        existing = find_key_pair(ec2, name)
    if existing:
        require_ours(what, existing.get("Tags"), settings.cluster)
        if not pem.exists():
            raise SetupError(
                f"{what} exists in EC2 ({existing.get('KeyPairId', '?')}) but its private key {pem} is missing "
                f"here. EC2 hands out a private key only once, so setup will not make a second key pair. Either "
                f"restore {pem} (mode 0600) from where you keep a copy, or, if it is lost and no running instance "
                f"needs it, delete the key pair (`aws ec2 delete-key-pair --key-name {name} --region "
                f"{settings.region}`, or `./setup.sh aws --destroy`) and run setup again")
        if pem.stat().st_mode & 0o077:  # ssh refuses a private key others can read
            pem.chmod(0o600)
            report(what, f"private key {pem} was readable by others: now mode 0600")
        report(what, f"already exists ({existing.get('KeyPairId', '?')}), private key {pem}")
        return existing
    if pem.exists():
        raise SetupError(f"{pem} exists but EC2 has no {what}: it is the key of a key pair deleted since. Setup "
                         f"never overwrites a private key: move it away (e.g. `mv {pem} {pem}.old`) and run again")
    with step(what):
        created = ec2.create_key_pair(KeyName=name, KeyType=settings.key_type,
                                      TagSpecifications=[{"ResourceType": "key-pair", "Tags": settings.tags(name)}])
    try:
        write_private_key(pem, created["KeyMaterial"])
    except OSError as exc:
        # Without its private key the key pair is useless and would block the next run: undo it.
        with step(f"{what} (deleting it again after the private key could not be saved)"):
            ec2.delete_key_pair(KeyName=name)
        raise SetupError(f"saving the private key to {pem}: {exc}; the key pair was deleted again") from exc
    report(what, f"created ({created.get('KeyPairId', '?')}), private key saved to {pem} (mode 0600)")
    return created


# --- VPC and subnets ----------------------------------------------------------------------------


def default_vpc(ec2: Any, region: str) -> tuple[str, list[str]]:
    with step("default VPC"):
        vpcs = ec2.describe_vpcs(Filters=[{"Name": "is-default", "Values": ["true"]}])["Vpcs"]
        if not vpcs:
            raise SetupError(f"region {region} has no default VPC, which setup uses. Create one with "
                             f"`aws ec2 create-default-vpc --region {region}` and run setup again")
        vpc_id = vpcs[0]["VpcId"]
        subnets = []
        pages = ec2.get_paginator("describe_subnets").paginate(
            Filters=[{"Name": "vpc-id", "Values": [vpc_id]}, {"Name": "default-for-az", "Values": ["true"]}])
        for page in pages:
            subnets += page["Subnets"]
    if not subnets:
        raise SetupError(f"the default VPC {vpc_id} has no default subnets: create them with "
                         f"`aws ec2 create-default-subnet --availability-zone <zone>` and run setup again")
    subnet_ids = [subnet["SubnetId"] for subnet in sorted(subnets, key=lambda subnet: subnet["AvailabilityZone"])]
    report("default VPC", f"{vpc_id}, subnets {', '.join(subnet_ids)}")
    return vpc_id, subnet_ids


# --- security group -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """One TCP ingress rule; `source` is a CIDR or a security group id. The description is
    not part of the identity: EC2 treats rules differing only in it as the same rule."""

    from_port: int
    to_port: int
    source: str
    description: str = field(default="", compare=False)

    def permission(self) -> dict:
        permission: dict[str, Any] = {"IpProtocol": "tcp", "FromPort": self.from_port, "ToPort": self.to_port}
        if self.source.startswith("sg-"):
            permission["UserIdGroupPairs"] = [{"GroupId": self.source, "Description": self.description}]
        elif ipaddress.ip_network(self.source).version == 6:
            permission["Ipv6Ranges"] = [{"CidrIpv6": self.source, "Description": self.description}]
        else:
            permission["IpRanges"] = [{"CidrIp": self.source, "Description": self.description}]
        return permission

    def __str__(self) -> str:
        ports = str(self.from_port) if self.from_port == self.to_port else f"{self.from_port}-{self.to_port}"
        return f"tcp {ports} from {self.source}"


def rule_prefix(cluster: str) -> str:
    return f"dw:{cluster} "


def wanted_rules(cluster: str, group_id: str, cidr: str, http_port: int) -> list[Rule]:
    prefix = rule_prefix(cluster)
    return [
        Rule(http_port, http_port, cidr, prefix + "HTTP from the allowed CIDR"),
        Rule(22, 22, cidr, prefix + "SSH from the allowed CIDR"),
        # endpoint <-> worker, endpoint <-> endpoint, and the scalers' SSH to the workers
        Rule(0, 65535, group_id, prefix + "all TCP within the cluster"),
    ]


def current_rules(group: dict) -> list[Rule]:
    rules = []
    for permission in group.get("IpPermissions", []):
        if permission.get("IpProtocol") != "tcp":
            continue
        ports = permission.get("FromPort", 0), permission.get("ToPort", 65535)
        for item in permission.get("IpRanges", []):
            source = str(ipaddress.ip_network(item["CidrIp"], strict=False))
            rules.append(Rule(*ports, source, item.get("Description", "")))
        for item in permission.get("Ipv6Ranges", []):
            source = str(ipaddress.ip_network(item["CidrIpv6"], strict=False))
            rules.append(Rule(*ports, source, item.get("Description", "")))
        for item in permission.get("UserIdGroupPairs", []):
            rules.append(Rule(*ports, item["GroupId"], item.get("Description", "")))
    return rules


def find_security_group(ec2: Any, name: str, vpc_id: str | None) -> dict | None:
    filters = [{"Name": "group-name", "Values": [name]}]
    if vpc_id:
        filters.append({"Name": "vpc-id", "Values": [vpc_id]})
    groups = ec2.describe_security_groups(Filters=filters)["SecurityGroups"]
    return groups[0] if groups else None


def ensure_security_group(ec2: Any, settings: Settings, vpc_id: str, cidr: str) -> str:
    what = f"security group {settings.group_name}"
    with step(what):
        group = find_security_group(ec2, settings.group_name, vpc_id)
        if group:
            require_ours(what, group.get("Tags"), settings.cluster)
            report(what, f"already exists ({group['GroupId']})")
        else:
            try:
                tags = [{"ResourceType": "security-group", "Tags": settings.tags(settings.group_name)}]
                group_id = ec2.create_security_group(
                    GroupName=settings.group_name, VpcId=vpc_id, TagSpecifications=tags,
                    Description=f"dynamic-workload cluster {settings.cluster}: endpoints and workers")["GroupId"]
                report(what, f"created ({group_id}) in {vpc_id}")
                # A new group has no ingress rules; not described again, as a describe right after the
                # create may not see it yet (EC2 is eventually consistent).
                group = {"GroupId": group_id, "IpPermissions": []}
            except ClientError as exc:
                if error_code(exc) != "InvalidGroup.Duplicate":  # created meanwhile: use that one
                    raise
                group = find_security_group(ec2, settings.group_name, vpc_id)
                if group is None:
                    raise SetupError(f"{what}: exists, but is not found yet; run setup again") from exc
        sync_ingress(ec2, group, settings, cidr)
    return group["GroupId"]


def sync_ingress(ec2: Any, group: dict, settings: Settings, cidr: str) -> None:
    """Authorizes only the missing rules; revokes the rules setup added earlier that are no longer
    wanted (another allowed CIDR or HTTP port); leaves rules added by hand alone, saying so."""
    what = f"security group {settings.group_name}"
    group_id = group["GroupId"]
    wanted = wanted_rules(settings.cluster, group_id, cidr, settings.http_port)
    current = current_rules(group)
    prefix = rule_prefix(settings.cluster)
    stale = [rule for rule in current if rule.description.startswith(prefix) and rule not in wanted]
    missing = [rule for rule in wanted if rule not in current]
    for rule in stale:
        try:
            ec2.revoke_security_group_ingress(GroupId=group_id, IpPermissions=[rule.permission()])
        except ClientError as exc:
            if error_code(exc) != "InvalidPermission.NotFound":
                raise
        report(what, f"revoked {rule} (no longer wanted)")
    for rule in missing:
        try:
            ec2.authorize_security_group_ingress(GroupId=group_id, IpPermissions=[rule.permission()])
            report(what, f"allowed {rule}")
        except ClientError as exc:
            if error_code(exc) != "InvalidPermission.Duplicate":  # added meanwhile: fine
                raise
            report(what, f"{rule} already allowed")
    if not stale and not missing:
        report(what, "ingress rules already up to date: " + "; ".join(str(rule) for rule in wanted))
    for rule in current:
        if rule not in wanted and rule not in stale:
            report(what, f"note: {rule} was not added by setup; left as it is")


# --- IAM ------------------------------------------------------------------------------------------


EC2_TRUST_POLICY = {
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}],
}


def endpoint_policy(*, cluster: str, region: str, partition: str, account: str, vpc_id: str,
                    security_group_id: str, key_name: str, worker_role_arn: str = "") -> dict:
    """The scaler's permissions on the endpoint instances (see the module docstring for why each)."""
    ec2 = f"arn:{partition}:ec2:{region}:{account}"
    statements: list[dict[str, Any]] = [
        {
            # Describe* actions support no resource-level permissions: "*" is the only resource
            # they accept. They only read.
            "Sid": "Describe",
            "Effect": "Allow",
            "Action": ["ec2:DescribeInstances", "ec2:DescribeImages", "ec2:DescribeSubnets",
                       "ec2:DescribeSecurityGroups"],
            "Resource": "*",
        },
        {
            # RunInstances is authorized against every resource it touches. Images have no account
            # in their ARN; the AMI is chosen by the operator (or SSM), so any image is allowed.
            "Sid": "RunInstancesClusterResources",
            "Effect": "Allow",
            "Action": "ec2:RunInstances",
            "Resource": [f"arn:{partition}:ec2:{region}::image/*",
                         f"{ec2}:key-pair/{key_name}",
                         f"{ec2}:security-group/{security_group_id}",
                         # the interface RunInstances creates; it lands in a subnet allowed below
                         f"{ec2}:network-interface/*"],
        },
        {
            "Sid": "RunInstancesInClusterVpc",
            "Effect": "Allow",
            "Action": "ec2:RunInstances",
            "Resource": f"{ec2}:subnet/*",
            "Condition": {"ArnEquals": {"ec2:Vpc": f"{ec2}:vpc/{vpc_id}"}},
        },
        {
            # New instances and volumes only if the request tags them as the cluster's.
            "Sid": "RunInstancesTaggedForCluster",
            "Effect": "Allow",
            "Action": "ec2:RunInstances",
            "Resource": [f"{ec2}:instance/*", f"{ec2}:volume/*"],
            "Condition": {"StringEquals": {f"aws:RequestTag/{TAG_CLUSTER}": cluster}},
        },
        {
            # Tagging at launch (TagSpecifications) is a CreateTags call; only as part of RunInstances.
            "Sid": "TagAtLaunch",
            "Effect": "Allow",
            "Action": "ec2:CreateTags",
            "Resource": [f"{ec2}:instance/*", f"{ec2}:volume/*"],
            "Condition": {"StringEquals": {"ec2:CreateAction": "RunInstances"}},
        },
        {
            # Retire workers and mark them ready: only instances that are already the cluster's.
            "Sid": "ManageClusterInstances",
            "Effect": "Allow",
            "Action": ["ec2:TerminateInstances", "ec2:CreateTags"],
            "Resource": f"{ec2}:instance/*",
            "Condition": {"StringEquals": {f"ec2:ResourceTag/{TAG_CLUSTER}": cluster}},
        },
        {
            # The latest Amazon Linux AMI id is a public SSM parameter; public parameters' ARNs
            # carry no account.
            "Sid": "LatestAmiParameter",
            "Effect": "Allow",
            "Action": "ssm:GetParameter",
            "Resource": f"arn:{partition}:ssm:*::parameter/aws/service/*",
        },
    ]
    if worker_role_arn:
        statements.append({
            "Sid": "PassWorkerRole",
            "Effect": "Allow",
            "Action": "iam:PassRole",
            "Resource": worker_role_arn,
            "Condition": {"StringEquals": {"iam:PassedToService": "ec2.amazonaws.com"}},
        })
    return {"Version": "2012-10-17", "Statement": statements}


def get_or_none(call: Callable[..., dict], key: str, **kwargs: Any) -> dict | None:
    try:
        return call(**kwargs)[key]
    except ClientError as exc:
        if error_code(exc) == "NoSuchEntity":
            return None
        raise


def as_document(value: str | dict) -> dict:
    """boto3 hands back IAM policy documents decoded; be tolerant of the raw (URL-encoded) form too."""
    if isinstance(value, dict):
        return value
    return json.loads(urllib.parse.unquote(value))


def ensure_role(iam: Any, settings: Settings) -> str:
    what = f"IAM role {settings.role_name}"
    with step(what):
        role = get_or_none(iam.get_role, "Role", RoleName=settings.role_name)
        if role:
            require_ours(what, role.get("Tags"), settings.cluster)
            if as_document(role.get("AssumeRolePolicyDocument", {})) != EC2_TRUST_POLICY:
                iam.update_assume_role_policy(RoleName=settings.role_name,
                                              PolicyDocument=json.dumps(EC2_TRUST_POLICY))
                report(what, "trust policy reset to EC2 only")
            report(what, "already exists")
            return role["Arn"]
        try:
            role = iam.create_role(
                RoleName=settings.role_name, AssumeRolePolicyDocument=json.dumps(EC2_TRUST_POLICY),
                Tags=settings.tags(settings.role_name, "endpoint"),
                Description=f"dynamic-workload {settings.cluster}: the endpoints' scaler launches and "
                            f"terminates the cluster's workers")["Role"]
        except ClientError as exc:
            if error_code(exc) != "EntityAlreadyExists":
                raise
            role = iam.get_role(RoleName=settings.role_name)["Role"]  # created meanwhile
        report(what, "created")
        return role["Arn"]


def worker_role_arn(iam: Any, settings: Settings) -> str:
    """The workers' role, if someone made one for the cluster (setup does not: workers hold no
    AWS credentials). Only then do the endpoints get iam:PassRole, and only for that role."""
    with step(f"IAM role {settings.worker_role_name}"):
        role = get_or_none(iam.get_role, "Role", RoleName=settings.worker_role_name)
    if not role:
        return ""
    if tag_value(role.get("Tags")) != settings.cluster:
        report(f"IAM role {settings.worker_role_name}", f"not tagged {TAG_CLUSTER}={settings.cluster}: ignored")
        return ""
    report(f"IAM role {settings.worker_role_name}", "exists: the endpoints may pass it to workers (iam:PassRole)")
    return role["Arn"]


def ensure_role_policy(iam: Any, settings: Settings, document: dict) -> None:
    what = f"IAM role {settings.role_name}, inline policy {POLICY_NAME}"
    with step(what):
        existing = get_or_none(iam.get_role_policy, "PolicyDocument", RoleName=settings.role_name,
                               PolicyName=POLICY_NAME)
        if existing is not None and as_document(existing) == document:
            report(what, "already up to date")
            return
        iam.put_role_policy(RoleName=settings.role_name, PolicyName=POLICY_NAME, PolicyDocument=json.dumps(document))
        report(what, "written" if existing is None else "updated")


def ensure_instance_profile(iam: Any, settings: Settings) -> str:
    what = f"IAM instance profile {settings.profile_name}"
    with step(what):
        profile = get_or_none(iam.get_instance_profile, "InstanceProfile", InstanceProfileName=settings.profile_name)
        if profile:
            # GetInstanceProfile returns the tags (moto lacks ListInstanceProfileTags).
            require_ours(what, profile.get("Tags"), settings.cluster)
            report(what, "already exists")
        else:
            try:
                iam.create_instance_profile(InstanceProfileName=settings.profile_name,
                                            Tags=settings.tags(settings.profile_name, "endpoint"))
                report(what, "created")
            except ClientError as exc:
                if error_code(exc) != "EntityAlreadyExists":
                    raise
            iam.get_waiter("instance_profile_exists").wait(InstanceProfileName=settings.profile_name,
                                                           WaiterConfig={"Delay": 1, "MaxAttempts": 30})
            profile = iam.get_instance_profile(InstanceProfileName=settings.profile_name)["InstanceProfile"]
        roles = [role["RoleName"] for role in profile.get("Roles", [])]
        if settings.role_name in roles:
            report(what, f"already holds role {settings.role_name}")
        elif roles:  # a profile holds at most one role
            raise SetupError(f"{what} holds role {roles[0]}, not {settings.role_name}: remove that role from it "
                             f"(`aws iam remove-role-from-instance-profile`) and run setup again")
        else:
            try:
                iam.add_role_to_instance_profile(InstanceProfileName=settings.profile_name,
                                                 RoleName=settings.role_name)
            except ClientError as exc:
                if error_code(exc) != "LimitExceeded":  # added meanwhile
                    raise
            report(what, f"role {settings.role_name} added")
        return profile["Arn"]


# --- setup ----------------------------------------------------------------------------------------


def setup(args: argparse.Namespace) -> None:
    state_file = Path(args.state_file)
    state = load_state(state_file)
    if state.get("cluster", args.cluster) != args.cluster:
        raise UsageError(f"the state file {state_file} belongs to cluster {state['cluster']}, not {args.cluster}")
    region = resolve_region(args, state)
    cidr = resolve_allowed_cidr(args, state)  # before anything is created: a bad CIDR changes nothing
    settings = Settings(cluster=args.cluster, region=region, aws_dir=Path(args.aws_dir), state_file=state_file,
                        http_port=args.http_port, key_type=args.key_type)
    print(f"AWS setup of cluster {settings.cluster} in {region} (state file {state_file})", flush=True)
    ec2, iam = make_clients(region)

    def record(**values: Any) -> None:
        # Saved after every step, so a later failure still leaves a record of what exists.
        state.update(values, updated_at=utc_now())
        save_state(state_file, state)

    key_pair = ensure_key_pair(ec2, settings)
    state.setdefault("created_at", utc_now())
    record(cluster=settings.cluster, region=region, key_name=settings.key_name, key_path=str(settings.key_path),
           key_pair_id=key_pair.get("KeyPairId", ""))
    vpc_id, subnet_ids = default_vpc(ec2, region)
    record(vpc_id=vpc_id, subnet_ids=subnet_ids)
    group_id = ensure_security_group(ec2, settings, vpc_id, cidr)
    record(security_group_id=group_id, allowed_cidr=cidr, http_port=settings.http_port)
    role_arn = ensure_role(iam, settings)
    record(endpoint_role=settings.role_name, endpoint_role_arn=role_arn)
    partition, account = role_arn.split(":")[1], role_arn.split(":")[4]
    passable = worker_role_arn(iam, settings)
    ensure_role_policy(iam, settings, endpoint_policy(
        cluster=settings.cluster, region=region, partition=partition, account=account, vpc_id=vpc_id,
        security_group_id=group_id, key_name=settings.key_name, worker_role_arn=passable))
    profile_arn = ensure_instance_profile(iam, settings)
    record(endpoint_instance_profile=settings.profile_name, endpoint_instance_profile_arn=profile_arn)
    print(f"AWS setup of cluster {settings.cluster} complete: recorded in {state_file}. "
          f"Next: ./deploy.sh aws", flush=True)


# --- destroy --------------------------------------------------------------------------------------


def remove_instance_profile(iam: Any, cluster: str, name: str) -> None:
    what = f"IAM instance profile {name}"
    with step(what):
        profile = get_or_none(iam.get_instance_profile, "InstanceProfile", InstanceProfileName=name)
        if profile is None:
            report(what, "already gone")
            return
        if tag_value(profile.get("Tags")) != cluster:
            report(what, f"not tagged {TAG_CLUSTER}={cluster}: left alone")
            return
        for role in profile.get("Roles", []):
            try:
                iam.remove_role_from_instance_profile(InstanceProfileName=name, RoleName=role["RoleName"])
            except ClientError as exc:
                if error_code(exc) != "NoSuchEntity":
                    raise
            report(what, f"role {role['RoleName']} removed from it")
        try:
            iam.delete_instance_profile(InstanceProfileName=name)
        except ClientError as exc:
            if error_code(exc) != "NoSuchEntity":
                raise
        report(what, "deleted")


def remove_role(iam: Any, cluster: str, name: str) -> None:
    what = f"IAM role {name}"
    with step(what):
        role = get_or_none(iam.get_role, "Role", RoleName=name)
        if role is None:
            report(what, "already gone")
            return
        if tag_value(role.get("Tags")) != cluster:
            report(what, f"not tagged {TAG_CLUSTER}={cluster}: left alone")
            return
        try:
            iam.delete_role_policy(RoleName=name, PolicyName=POLICY_NAME)
            report(what, f"inline policy {POLICY_NAME} deleted")
        except ClientError as exc:
            if error_code(exc) != "NoSuchEntity":
                raise
        try:
            iam.delete_role(RoleName=name)
        except ClientError as exc:
            if error_code(exc) == "DeleteConflict":
                raise SetupError(f"{what}: {exc} -- it holds policies or instance profiles setup did not add; "
                                 f"remove those and run --destroy again") from exc
            if error_code(exc) != "NoSuchEntity":
                raise
        report(what, "deleted")


def delete_security_group(ec2: Any, what: str, group_id: str, timeout: float = SG_DELETE_TIMEOUT,
                          sleep: Callable[[float], None] = time.sleep,
                          clock: Callable[[], float] = time.monotonic) -> None:
    """Instances being terminated still hold the group for a while (DependencyViolation): retry
    with backoff for up to `timeout` seconds before giving up."""
    deadline = clock() + timeout
    delay = 2.0
    while True:
        try:
            ec2.delete_security_group(GroupId=group_id)
            report(what, f"deleted ({group_id})")
            return
        except ClientError as exc:
            code = error_code(exc)
            if code == "InvalidGroup.NotFound":
                report(what, "already gone")
                return
            if code != "DependencyViolation":
                raise
            if clock() + delay > deadline:
                raise SetupError(
                    f"{what} ({group_id}) is still in use after {timeout:.0f}s, by instances or network interfaces "
                    f"of the cluster: terminate those first (`./deploy.sh aws --destroy` does), then run "
                    f"--destroy again") from exc
        report(what, f"still in use (instances shutting down?); retrying in {delay:.0f}s")
        sleep(delay)
        delay = min(delay * 2, 15.0)


def remove_security_group(ec2: Any, cluster: str, name: str, vpc_id: str | None,
                          timeout: float = SG_DELETE_TIMEOUT) -> None:
    what = f"security group {name}"
    with step(what):
        group = find_security_group(ec2, name, vpc_id)
        if group is None:
            report(what, "already gone")
            return
        if tag_value(group.get("Tags")) != cluster:
            report(what, f"{group['GroupId']} is not tagged {TAG_CLUSTER}={cluster}: left alone")
            return
        delete_security_group(ec2, what, group["GroupId"], timeout)


def remove_key_pair(ec2: Any, cluster: str, name: str, pem: Path) -> None:
    what = f"key pair {name}"
    with step(what):
        existing = find_key_pair(ec2, name)
        if existing and tag_value(existing.get("Tags")) != cluster:
            report(what, f"not tagged {TAG_CLUSTER}={cluster}: left alone, and so is {pem}")
            return
        if existing:
            # By name: moto ignores KeyPairId here. The tag check above made sure it is ours.
            ec2.delete_key_pair(KeyName=name)
            report(what, f"deleted ({existing.get('KeyPairId', '?')})")
        else:
            report(what, "already gone")
    pem.with_name(pem.name + ".tmp").unlink(missing_ok=True)  # left by a run killed while saving the key
    if pem.exists():
        pem.unlink()
        report(what, f"private key {pem} deleted")


def destroy(args: argparse.Namespace, sg_timeout: float = SG_DELETE_TIMEOUT) -> None:
    state_file = Path(args.state_file)
    state = load_state(state_file)
    if state.get("cluster", args.cluster) != args.cluster:
        raise UsageError(f"the state file {state_file} belongs to cluster {state['cluster']}, not {args.cluster}")
    region = resolve_region(args, state)
    settings = Settings(cluster=args.cluster, region=region, aws_dir=Path(args.aws_dir), state_file=state_file,
                        http_port=args.http_port, key_type=args.key_type)
    print(f"removing what AWS setup created for cluster {settings.cluster} in {region}"
          f"{'' if state else f' (no state file {state_file}: looking resources up by name and tag)'}", flush=True)
    ec2, iam = make_clients(region)
    # The names are fixed per cluster; the record is preferred in case they ever change.
    remove_instance_profile(iam, settings.cluster, state.get("endpoint_instance_profile", settings.profile_name))
    remove_role(iam, settings.cluster, state.get("endpoint_role", settings.role_name))
    remove_security_group(ec2, settings.cluster, settings.group_name, state.get("vpc_id"), sg_timeout)
    remove_key_pair(ec2, settings.cluster, state.get("key_name", settings.key_name),
                    Path(state.get("key_path", settings.key_path)))
    if state_file.exists():
        state_file.unlink()
        report("state file", f"{state_file} deleted")
    print(f"cluster {settings.cluster}: everything AWS setup created is gone", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.destroy:
            destroy(args)
        else:
            setup(args)
    except UsageError as exc:
        print(f"aws setup: {exc}", file=sys.stderr, flush=True)
        return 2
    except SetupError as exc:
        again = "./setup.sh aws --destroy" if args.destroy else "./setup.sh aws"
        print(f"aws setup failed: {exc}\nFix the cause and run {again} again: what is done is kept, "
              f"the rest is completed.", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
