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
names that carry the tag dw:cluster=<cluster>; anything else is left alone and reported. It
refuses, deleting nothing, while any instance needs these (the cluster's, or any other using
its key pair or security group): `./deploy.sh aws --destroy` terminates them first. A private
key goes only with its key pair, and an IAM role serving the cluster in another region stays.
It says which region it searched and what it removed; having found nothing, it looks for the
cluster in the other regions.

The cluster name, the region and the state file follow the rules of cloud/aws.py.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import boto3
from botocore.exceptions import ClientError

from cli.interrupts import Interrupted, deferred_signals, exit_now, stop_on_signals
from cli.settings import Setting, add_settings, check_settings, choice, text, whole
from cloud.aws import (
    AWS_DIR_SETTING,
    BILLED_STATES,
    CLUSTER_SETTING,
    REGION_SETTING,
    STATE_FILE_SETTING,
    TAG_CLUSTER,
    TAG_ROLE,
    ClusterUsageError,
    Region,
    SearchError,
    api_step,
    aws_config,
    check_state_cluster,
    cluster_instances,
    describe,
    describe_instances,
    error_code,
    found_elsewhere,
    read_state,
    resolve_region,
    tag_filter,
)

POLICY_NAME = "dw-scaler"
CHECKIP_URL = "https://checkip.amazonaws.com"
SG_DELETE_TIMEOUT = 60.0  # seconds to wait for terminating instances to let go of the security group
DESTROY_COMMAND = "./deploy.sh aws --destroy"


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
    http_port: int = 5000
    key_type: str = "ed25519"

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


SETTINGS: dict[str, Setting] = {
    "cluster": CLUSTER_SETTING,
    "region": REGION_SETTING,
    "allowed_cidr": Setting("DW_ALLOWED_CIDR", "", text,
                            "who may reach the HTTP port and SSH, normally your public address as /32; default: "
                            "discovered via checkip.amazonaws.com if DW_DISCOVER_IP=1, else the one an earlier run "
                            "recorded"),
    "http_port": Setting("DW_HTTP_PORT", "5000", whole(1, 65535), "the endpoints' HTTP port"),
    "key_type": Setting("DW_KEY_TYPE", "ed25519", choice("ed25519", "rsa"), "type of a new key pair"),
    "aws_dir": AWS_DIR_SETTING,
    "state_file": STATE_FILE_SETTING,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="./setup.sh aws",
        description="One-time AWS preparation for dynamic-workload: key pair, security group, IAM role and "
                    "instance profile of the endpoints. Safe to re-run: only what is missing is created.")
    add_settings(parser, SETTINGS)
    parser.add_argument("--allow-anywhere", action="store_true",
                        help="accept an --allowed-cidr that spans a large part of the internet (0.0.0.0/0, ::/0, "
                             "anything wider than a /8, or an IPv6 /32)")
    parser.add_argument("--destroy", action="store_true",
                        help="remove what setup created; refused while the cluster has instances (`./deploy.sh aws "
                             "--destroy` terminates them first)")
    args = parser.parse_args(argv)
    check_settings(parser, SETTINGS, args)
    args.state_file = args.state_file or f"{args.aws_dir}/{args.cluster}.json"
    return args


def settings_for(args: argparse.Namespace, region: str) -> Settings:
    return Settings(cluster=args.cluster, region=region, aws_dir=Path(args.aws_dir), state_file=Path(args.state_file),
                    http_port=getattr(args, "http_port", 5000), key_type=getattr(args, "key_type", "ed25519"))


def cluster_region(args: argparse.Namespace, state: dict) -> Region:
    """The one region rule (cloud/aws.py); a cluster stays in the region its state file records."""
    check_state_cluster(state, args.cluster, args.state_file)
    return resolve_region(args.region, state.get("region", ""), args.state_file)


# --- the allowed CIDR --------------------------------------------------------------------------

# Shorter prefixes span a large part of the internet: refused unless --allow-anywhere.
BROADEST_PREFIX = {4: 8, 6: 32}
# Ranges nobody on the internet connects from: a warning (a VPN or a machine in the VPC may).
PRIVATE_RANGES = [ipaddress.ip_network(text) for text in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16",
                                                           "100.64.0.0/10", "fc00::/7")]
DOCUMENTATION_RANGES = [ipaddress.ip_network(text) for text in ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24",
                                                                 "2001:db8::/32")]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def unusable(network: Network) -> str:
    """Why no connection to an EC2 instance can ever come from `network`, or ""."""
    for kind, test in (("a loopback range", network.is_loopback), ("link-local", network.is_link_local),
                       ("multicast", network.is_multicast), ("the unspecified address", network.is_unspecified),
                       ("a reserved range", network.is_reserved and network.prefixlen > 0)):
        if test:
            return kind
    return ""


def cidr_warning(network: Network) -> str:
    if any(network.subnet_of(private) for private in PRIVATE_RANGES if private.version == network.version):
        return "is a private range: only a VPN or a machine inside the VPC connects from there"
    if any(network.subnet_of(docs) for docs in DOCUMENTATION_RANGES if docs.version == network.version):
        return "is a documentation example range: nobody connects from there"
    if network.num_addresses > 65536:
        return f"opens SSH and the unauthenticated HTTP API to {network.num_addresses:,} addresses"
    return ""


def parse_cidr(text: str, allow_anywhere: bool, source: str) -> str:
    try:
        network = ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise UsageError(f"{source} {text!r} is not a valid CIDR (expected e.g. 203.0.113.7/32 or "
                         f"2001:db8::1/128)") from None
    if unusable(network):
        raise UsageError(f"{source} {network} is {unusable(network)}: no connection to an EC2 instance comes from "
                         f"there. Give your own public address, e.g. --allowed-cidr 198.51.100.7/32 (`curl "
                         f"{CHECKIP_URL}` shows it)")
    if network.prefixlen < BROADEST_PREFIX[network.version] and not allow_anywhere:
        raise UsageError(f"{source} {network} would open SSH and the endpoints' HTTP API (which has no "
                         f"authentication) to {network.num_addresses:,} addresses of the internet. Give your own "
                         f"address, e.g. --allowed-cidr 198.51.100.7/32, or pass --allow-anywhere if that is "
                         f"really meant")
    if str(network) != text.strip():
        print(f"allowed CIDR: {text.strip()} taken as {network}", flush=True)
    if cidr_warning(network):
        print(f"warning: allowed CIDR {network} {cidr_warning(network)}; your public address is what `curl "
              f"{CHECKIP_URL}` shows", file=sys.stderr, flush=True)
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


def step(what: str) -> AbstractContextManager[None]:
    """Turns an AWS error into a SetupError that names the step it happened in."""
    return api_step(what, SetupError)


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
    return session.client("ec2", config=aws_config()), session.client("iam", config=aws_config())


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
    # EC2 hands out the private key once: a Ctrl-C between the creation and the saving would leave a
    # key pair nobody can use, which blocks the next run. So the signal waits until the key is saved.
    with deferred_signals():
        with step(what):
            created = ec2.create_key_pair(KeyName=name, KeyType=settings.key_type, TagSpecifications=[
                {"ResourceType": "key-pair", "Tags": settings.tags(name)}])
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


def role_region(iam: Any, settings: Settings) -> str:
    """The region the cluster's IAM role serves, read from the policy setup wrote for it ("" if none).
    IAM is global, EC2 is not: one cluster name has one region per account."""
    with step(f"IAM role {settings.role_name}, inline policy {POLICY_NAME}"):
        document = get_or_none(iam.get_role_policy, "PolicyDocument", RoleName=settings.role_name,
                               PolicyName=POLICY_NAME)
    for statement in as_document(document or {}).get("Statement", []):
        resource = statement.get("Resource")
        if statement.get("Sid") == "ManageClusterInstances" and isinstance(resource, str):
            return resource.split(":")[3]
    return ""


def check_role_region(iam: Any, settings: Settings) -> None:
    serving = role_region(iam, settings)
    if serving and serving != settings.region:
        raise UsageError(f"cluster {settings.cluster} already exists in {serving} (its IAM role {settings.role_name} "
                         f"serves that region; IAM names are global): use another --cluster for a cluster in "
                         f"{settings.region}, or --region {serving}")


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


def setup(args: argparse.Namespace) -> int:
    state_file = Path(args.state_file)
    state = read_state(state_file)
    region = cluster_region(args, state)
    cidr = resolve_allowed_cidr(args, state)  # before anything is created: a bad CIDR changes nothing
    settings = settings_for(args, region.name)
    print(f"AWS setup of cluster {settings.cluster} in {region.name} (region from {region.source}; state file "
          f"{state_file})", flush=True)
    ec2, iam = make_clients(region.name)
    check_role_region(iam, settings)

    def record(**values: Any) -> None:
        # Saved after every step, so a later failure still leaves a record of what exists.
        state.update(values, updated_at=utc_now())
        save_state(state_file, state)

    key_pair = ensure_key_pair(ec2, settings)
    state.setdefault("created_at", utc_now())
    record(cluster=settings.cluster, region=region.name, key_name=settings.key_name,
           key_path=str(settings.key_path), key_pair_id=key_pair.get("KeyPairId", ""))
    vpc_id, subnet_ids = default_vpc(ec2, region.name)
    record(vpc_id=vpc_id, subnet_ids=subnet_ids)
    group_id = ensure_security_group(ec2, settings, vpc_id, cidr)
    record(security_group_id=group_id, allowed_cidr=cidr, http_port=settings.http_port)
    role_arn = ensure_role(iam, settings)
    record(endpoint_role=settings.role_name, endpoint_role_arn=role_arn)
    partition, account = role_arn.split(":")[1], role_arn.split(":")[4]
    passable = worker_role_arn(iam, settings)
    ensure_role_policy(iam, settings, endpoint_policy(
        cluster=settings.cluster, region=region.name, partition=partition, account=account, vpc_id=vpc_id,
        security_group_id=group_id, key_name=settings.key_name, worker_role_arn=passable))
    profile_arn = ensure_instance_profile(iam, settings)
    record(endpoint_instance_profile=settings.profile_name, endpoint_instance_profile_arn=profile_arn)
    print(f"AWS setup of cluster {settings.cluster} complete: recorded in {state_file}. "
          f"Next: ./deploy.sh aws", flush=True)
    return 0


# --- destroy --------------------------------------------------------------------------------------


def instances_in_the_way(ec2: Any, settings: Settings, group: dict | None) -> list[dict]:
    """Instances that need what destroy deletes, billed while they exist: the cluster's (by tag), and
    any other that uses its key pair or security group."""
    states = tag_filter("instance-state-name", *BILLED_STATES)
    found = {instance["InstanceId"]: instance for instance in cluster_instances(ec2, settings.cluster,
                                                                                  states=BILLED_STATES)}
    users = [[tag_filter("key-name", settings.key_name), states]]
    if group:
        users.append([tag_filter("instance.group-id", group["GroupId"]), states])
    for filters in users:
        found.update({instance["InstanceId"]: instance for instance in describe_instances(ec2, filters)})
    return list(found.values())


def refuse_while_instances_live(ec2: Any, settings: Settings, group: dict | None) -> None:
    """Nothing is deleted while an instance lives: the key pair is the only way into it, and the
    group and role are what it runs with."""
    with step(f"looking for instances of cluster {settings.cluster} in {settings.region}"):
        instances = instances_in_the_way(ec2, settings, group)
    if instances:
        raise SetupError(
            f"cluster {settings.cluster} still has {len(instances)} instance(s) in {settings.region}, running and "
            f"billing: {', '.join(describe(instance) for instance in instances)}. They need the key pair, security "
            f"group and role that --destroy deletes, so nothing was deleted. `{DESTROY_COMMAND}"
            f"{cluster_flag(settings.cluster)}` terminates them first and then removes the rest")


def cluster_flag(cluster: str) -> str:
    return "" if cluster == CLUSTER_SETTING.default else f" --cluster {cluster}"


def ours_to_remove(what: str, resource: dict | None, cluster: str, label: str = "") -> bool:
    """Whether destroy may remove `resource`: it exists, and carries this cluster's tag."""
    if resource is None:
        report(what, "none found")
        return False
    if tag_value(resource.get("Tags")) != cluster:
        report(what, f"{label}not tagged {TAG_CLUSTER}={cluster}: left alone")
        return False
    return True


def remove_instance_profile(iam: Any, cluster: str, name: str) -> bool:
    what = f"IAM instance profile {name}"
    with step(what):
        profile = get_or_none(iam.get_instance_profile, "InstanceProfile", InstanceProfileName=name)
        if not ours_to_remove(what, profile, cluster):
            return False
        for role in profile.get("Roles", []):
            ignore_missing(iam.remove_role_from_instance_profile, "NoSuchEntity",
                           InstanceProfileName=name, RoleName=role["RoleName"])
            report(what, f"role {role['RoleName']} removed from it")
        ignore_missing(iam.delete_instance_profile, "NoSuchEntity", InstanceProfileName=name)
        report(what, "deleted")
        return True


def ignore_missing(call: Callable[..., Any], missing: str, **kwargs: Any) -> bool:
    """The call; False if AWS says that what it acts on is not there (gone meanwhile)."""
    try:
        call(**kwargs)
    except ClientError as exc:
        if error_code(exc) != missing:
            raise
        return False
    return True


def remove_role(iam: Any, cluster: str, name: str) -> bool:
    what = f"IAM role {name}"
    with step(what):
        role = get_or_none(iam.get_role, "Role", RoleName=name)
        if not ours_to_remove(what, role, cluster):
            return False
        if ignore_missing(iam.delete_role_policy, "NoSuchEntity", RoleName=name, PolicyName=POLICY_NAME):
            report(what, f"inline policy {POLICY_NAME} deleted")
        try:
            ignore_missing(iam.delete_role, "NoSuchEntity", RoleName=name)
        except ClientError as exc:
            if error_code(exc) == "DeleteConflict":
                raise SetupError(f"{what}: {exc} -- it holds policies or instance profiles setup did not add; "
                                 f"remove those and run --destroy again") from exc
            raise
        report(what, "deleted")
        return True


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
                report(what, "gone meanwhile")
                return
            if code != "DependencyViolation":
                raise
            if clock() + delay > deadline:
                raise SetupError(
                    f"{what} ({group_id}) is still in use after {timeout:.0f}s, by instances or network interfaces "
                    f"of the cluster: terminate those first (`{DESTROY_COMMAND}` does), then run "
                    f"--destroy again") from exc
        report(what, f"still in use (instances shutting down?); retrying in {delay:.0f}s")
        sleep(delay)
        delay = min(delay * 2, 15.0)


def remove_security_group(ec2: Any, cluster: str, group: dict | None, name: str,
                          timeout: float = SG_DELETE_TIMEOUT) -> bool:
    what = f"security group {name}"
    if not ours_to_remove(what, group, cluster, f"{(group or {}).get('GroupId')} is "):
        return False
    with step(what):
        delete_security_group(ec2, what, group["GroupId"], timeout)
    return True


def remove_key_pair(ec2: Any, cluster: str, name: str, pem: Path) -> list[str]:
    what = f"key pair {name}"
    removed = []
    with step(what):
        existing = find_key_pair(ec2, name)
        if existing and tag_value(existing.get("Tags")) != cluster:
            report(what, f"not tagged {TAG_CLUSTER}={cluster}: left alone, and so is {pem}")
            return []
        if not existing:
            # The private key may be that of the key pair in another region: never deleted on a guess.
            report(what, "none found" + (f"; private key {pem} kept" if pem.exists() else ""))
            return []
        # By name: moto ignores KeyPairId here. The tag check above made sure it is ours.
        ec2.delete_key_pair(KeyName=name)
        report(what, f"deleted ({existing.get('KeyPairId', '?')})")
        removed.append(what)
    pem.with_name(pem.name + ".tmp").unlink(missing_ok=True)  # left by a run killed while saving the key
    if pem.exists():
        pem.unlink()
        report(what, f"private key {pem} deleted")
        removed.append(f"private key {pem}")
    return removed


def private_key_path(settings: Settings, state: dict) -> Path:
    """The recorded place of the private key (setup may have run with another --aws-dir), but only a
    file of the cluster's key name: a state file never makes destroy delete any other file."""
    recorded = Path(state.get("key_path", "") or settings.key_path)
    return recorded if recorded.name == settings.key_path.name else settings.key_path


def remove_resources(ec2: Any, iam: Any, settings: Settings, state: dict,
                     sg_timeout: float = SG_DELETE_TIMEOUT) -> list[str]:
    """Everything setup made for the cluster, after a check that no instance needs it; returns what
    was removed. The names are the cluster's fixed ones: nothing is deleted by a name from a file."""
    with step(f"security group {settings.group_name}"):
        group = find_security_group(ec2, settings.group_name, state.get("vpc_id"))
    refuse_while_instances_live(ec2, settings, group)
    removed = remove_iam(iam, settings)
    if remove_security_group(ec2, settings.cluster, group, settings.group_name, sg_timeout):
        removed.append(f"security group {settings.group_name}")
    removed += remove_key_pair(ec2, settings.cluster, settings.key_name, private_key_path(settings, state))
    if settings.state_file.exists():
        settings.state_file.unlink()
        report("state file", f"{settings.state_file} deleted")
        removed.append(f"state file {settings.state_file}")
    return removed


def remove_iam(iam: Any, settings: Settings) -> list[str]:
    """The role and profile, unless they serve the cluster in another region (IAM is global)."""
    serving = role_region(iam, settings)
    if serving and serving != settings.region:
        report(f"IAM role and instance profile {settings.role_name}", f"serve cluster {settings.cluster} in "
                                                                        f"{serving}, not {settings.region}: left alone")
        return []
    removed = []
    if remove_instance_profile(iam, settings.cluster, settings.profile_name):
        removed.append(f"IAM instance profile {settings.profile_name}")
    if remove_role(iam, settings.cluster, settings.role_name):
        removed.append(f"IAM role {settings.role_name}")
    return removed


def destroy_summary(cluster: str, region: Region, removed: list[str], command: str) -> tuple[int, str]:
    """(exit status, the last word of a destroy): what it found where it looked; if nothing, where
    else the cluster is, so that "nothing here" is never taken for "all gone"."""
    searched = f"cluster {cluster} in region {region.name} (region from {region.source})"
    if removed:
        return 0, f"{searched}: removed {', '.join(removed)}; nothing of the cluster is left in {region.name}"
    try:
        elsewhere = found_elsewhere(cluster, region.name)
    except SearchError as exc:
        return 1, f"nothing found for {searched}, but {exc}: pass --region if the cluster is in another one"
    if not elsewhere:
        return 0, f"nothing found for {searched}, nor in any other region: there was nothing to remove"
    where = "; ".join(f"{name}: {', '.join(found)}" for name, found in sorted(elsewhere.items()))
    first = sorted(elsewhere)[0]
    return 1, (f"nothing found for {searched}. But cluster {cluster} has, in other regions, {where}. Run "
               f"`{command}{cluster_flag(cluster)} --region {first}` to remove it there")


def destroy(args: argparse.Namespace, sg_timeout: float = SG_DELETE_TIMEOUT) -> int:
    state_file = Path(args.state_file)
    state = read_state(state_file)
    region = cluster_region(args, state)
    settings = settings_for(args, region.name)
    record = f"state file {state_file}" if state else f"no state file {state_file}: looking up by name and tag"
    print(f"removing what AWS setup created for cluster {settings.cluster} in region {region.name} (region from "
          f"{region.source}; {record})", flush=True)
    ec2, iam = make_clients(region.name)
    removed = remove_resources(ec2, iam, settings, state, sg_timeout)
    status, summary = destroy_summary(settings.cluster, region, removed, "./setup.sh aws --destroy")
    print(summary, flush=True)
    return status


def interrupted_message(args: argparse.Namespace, exc: Interrupted) -> str:
    if args.destroy:
        return (f"stopped by {exc.name}: the destroy of cluster {args.cluster} is incomplete; what is left is "
                f"removed by `./setup.sh aws --destroy` run again")
    return (f"stopped by {exc.name}: the setup of cluster {args.cluster} is incomplete; what exists is recorded in "
            f"{args.state_file}. Setup creates nothing billed by the hour (a key pair, a security group, an IAM role "
            f"and profile): `./setup.sh aws` completes it, `./setup.sh aws --destroy` removes it")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stop_on_signals()
    try:
        return destroy(args) if args.destroy else setup(args)
    except (UsageError, ClusterUsageError) as exc:
        print(f"aws setup: {exc}", file=sys.stderr, flush=True)
        return 2
    except SetupError as exc:
        if args.destroy:
            after = "Fix the cause and run ./setup.sh aws --destroy again: what is left is removed then."
        else:
            after = (f"Fix the cause and run ./setup.sh aws again: what is done is kept (recorded in "
                     f"{args.state_file}), the rest is completed. Setup creates nothing billed by the hour; "
                     f"`./setup.sh aws --destroy` removes what it made.")
        print(f"aws setup failed: {exc}\n{after}", file=sys.stderr, flush=True)
        return 1
    except Interrupted as exc:
        print(interrupted_message(args, exc), file=sys.stderr, flush=True)
        exit_now(exc.exit_status)
        return exc.exit_status


if __name__ == "__main__":
    sys.exit(main())
