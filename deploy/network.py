"""The cluster's network: the allowed address range, the default VPC and its subnets, and the
security group `<cluster>-sg` that endpoints and workers share.

The group lets the endpoints' port and SSH in from one allowed CIDR only (your own address,
normally), and the same two ports from the group itself: the endpoints' port for workers ->
endpoints and endpoint <-> endpoint, SSH for the scalers -> workers. Nothing else is open. The
rules setup adds carry the description prefix "dw:<cluster> "; a
re-run with another allowed CIDR or HTTP port revokes those and adds the new ones. Rules added
by hand are kept. A CIDR that spans a large part of the internet is refused unless
--allow-anywhere; one nobody on the internet connects from is refused or warned about.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from botocore.exceptions import ClientError

from cloud.aws import error_code
from deploy.cluster import DESTROY_COMMAND, Settings, SetupError, UsageError, ours_to_remove, report, require_ours, step

CHECKIP_URL = "https://checkip.amazonaws.com"
SG_DELETE_TIMEOUT = 60.0  # seconds to wait for terminating instances to let go of the security group


# --- the allowed CIDR -------------------------------------------------------------------------


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


# --- VPC and subnets --------------------------------------------------------------------------


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


# --- security group ---------------------------------------------------------------------------


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
        # Within the cluster only what it uses: workers and the peer reach the endpoints' port (HTTPS with
        # TLS on), the scalers reach the workers' SSH (provisioning, and the probe of a silent worker).
        Rule(http_port, http_port, group_id, prefix + "endpoints' port within the cluster"),
        Rule(22, 22, group_id, prefix + "SSH within the cluster"),
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
