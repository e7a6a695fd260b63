"""EC2 for the cluster, one way for the scaler's workers and the deploy's endpoints alike: the
tags that say whose an instance is, listings by those tags, the launch, termination and waits.

Every instance and its volume carry dw:cluster and dw:role (endpoint or worker); endpoints
also dw:node (a or b), workers dw:owner (the endpoint whose scaler launched them) and, once
provisioned, dw:ready. Tag filters take exact values only: EC2 would read `*` and `?` in one
as wildcards and match another cluster's instances.

A launch (`Launch.run`, `Launch.run_offers`) uses setup's key pair, security group and subnets
(`Launch`), requires IMDSv2, tags at launch, and goes down an ordered list of offers -- an
instance type in a market, On-Demand or Spot (one-time, terminated on interruption) -- and
subnets: a shortage of one type in one zone, or of Spot capacity, moves it to the next subnet,
then to the next offer, at once; throttling and passing faults are retried with backoff. Its
client token comes from the caller's launch decision (`intent`), the offer and the subnet: a
request retried after a timeout returns the instances it already started instead of starting more.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from botocore.exceptions import ClientError

from cloud.aws import API_ERRORS, api_error_text, client, cluster_name, error_code

log = logging.getLogger(__name__)



class Tag:
    """The tags that say whose an instance is."""

    CLUSTER = "dw:cluster"
    ROLE = "dw:role"  # endpoint or worker
    NODE = "dw:node"  # an endpoint's node id: a or b
    OWNER = "dw:owner"  # a worker's: the node whose scaler launched it
    INTENT = "dw:intent"  # the launch decision it came from
    READY = "dw:ready"  # a worker's, once provisioned: when
    TEST_ADDRESS = "dw:test-address"  # TEST ONLY: the fake instance's SSH address


# Every state an instance that still exists can be in; "billed" leaves out the ones on their way out.
LIVE_STATES = ("pending", "running", "stopping", "stopped", "shutting-down")
BILLED_STATES = ("pending", "running", "stopping", "stopped")
IMDS_V2_ONLY = {"HttpTokens": "required", "HttpEndpoint": "enabled", "HttpPutResponseHopLimit": 1}
DEFAULT_AMI_PARAMETER = "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64"
ON_DEMAND, SPOT = "on-demand", "spot"
MARKETS = (ON_DEMAND, SPOT)
# A one-time Spot request, ended with its instance; no maximum price: EC2 caps it at the On-Demand price.
SPOT_MARKET_OPTIONS = {"MarketType": "spot",
                       "SpotOptions": {"SpotInstanceType": "one-time", "InstanceInterruptionBehavior": "terminate"}}
# No room for this request in this zone: the next subnet, then the next offer. Unsupported: the type
# is not offered in the subnet's zone; SpotMaxPriceTooLow: Spot costs more than On-Demand there now.
CAPACITY_ERRORS = {"InsufficientInstanceCapacity", "InsufficientCapacity", "InsufficientHostCapacity",
                   "UnfulfillableCapacity", "Unsupported", "SpotMaxPriceTooLow", "InsufficientFreeAddressesInSubnet"}
# The account's Spot quota is used up: no Spot request of any type or zone helps, On-Demand may.
SPOT_QUOTA_ERRORS = {"MaxSpotInstanceCountExceeded"}
# Not worth retrying: the account or request is wrong, not the moment.
_FATAL_LAUNCH_ERRORS = {"InstanceLimitExceeded", "VcpuLimitExceeded", "InvalidParameterValue",
                        "InvalidParameterCombination", "UnauthorizedOperation", "InvalidAMIID.NotFound",
                        "InvalidKeyPair.NotFound", "InvalidGroup.NotFound", "IdempotentParameterMismatch",
                        "AuthFailure.ServiceLinkedRoleCreationNotPermitted"}
# What to do about an error that is the account's setup, not this launch.
_REMEDIES = {"AuthFailure.ServiceLinkedRoleCreationNotPermitted":
             "the account has no Spot service-linked role yet: run ./deploy.sh aws --market spot once, or "
             "`aws iam create-service-linked-role --aws-service-name spot.amazonaws.com`"}


class Ec2Error(Exception):
    """A launch, an image lookup or a termination failed; the message says which and why."""


# --- tags and listings -----------------------------------------------------------------------------


def tag_filter(key: str, *values: str) -> dict[str, Any]:
    """An EC2 filter on exact values: never one with a wildcard in it."""
    for value in values:
        if "*" in value or "?" in value:
            raise ValueError(f"refusing to filter on {key}={value!r}: EC2 would take * and ? as wildcards")
    return {"Name": key, "Values": list(values)}


def instance_filters(cluster: str, role: str | None = None, states: tuple[str, ...] = LIVE_STATES) -> list[dict]:
    filters = [tag_filter(f"tag:{Tag.CLUSTER}", cluster_name(cluster)), tag_filter("instance-state-name", *states)]
    if role:
        filters.append(tag_filter(f"tag:{Tag.ROLE}", role))
    return filters


def describe_instances(ec2: Any, filters: list[dict]) -> list[dict]:
    instances = []
    for page in ec2.get_paginator("describe_instances").paginate(Filters=filters):
        for reservation in page["Reservations"]:
            instances += reservation["Instances"]
    return instances


def cluster_instances(ec2: Any, cluster: str, role: str | None = None,
                      states: tuple[str, ...] = LIVE_STATES) -> list[dict]:
    return describe_instances(ec2, instance_filters(cluster, role, states))


def tags_of(resource: dict) -> dict[str, str]:
    return {tag["Key"]: tag["Value"] for tag in resource.get("Tags", [])}


def tag_list(tags: Mapping[str, str]) -> list[dict[str, str]]:
    """Tags as the EC2 and IAM APIs take them."""
    return [{"Key": key, "Value": value} for key, value in tags.items()]


def describe(instance: dict) -> str:
    """`i-0abc (endpoint a, running)`."""
    tags = tags_of(instance)
    role = " ".join(part for part in (tags.get(Tag.ROLE, "untagged"), tags.get(Tag.NODE, "")) if part)
    return f"{instance['InstanceId']} ({role}, {instance['State']['Name']})"


def tag_instance(ec2: Any, instance_id: str, key: str, value: str) -> None:
    try:
        ec2.create_tags(Resources=[instance_id], Tags=tag_list({key: value}))
    except API_ERRORS as exc:
        raise Ec2Error(f"tagging {instance_id} {key} failed: {api_error_text(exc)}") from exc


# --- launch ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Launch:
    """Where the cluster's instances start: what setup made for them (its state file)."""

    cluster: str
    region: str
    key_name: str
    security_group_id: str
    subnet_ids: tuple[str, ...] = ()
    attempts: int = 4

    @classmethod
    def from_state(cls, state: dict, cluster: str, region: str) -> Launch:
        return cls(cluster=cluster, region=region, key_name=state["key_name"],
                   security_group_id=state["security_group_id"], subnet_ids=tuple(state.get("subnet_ids", ())))

    def run(self, ec2: Any, *, image: str, instance_type: str, count: int, tags: dict[str, str], intent: str,
            shutdown_behavior: str, instance_profile_arn: str = "") -> list[dict]:
        """RunInstances of one On-Demand instance type for this cluster (see `run_offers`)."""
        return self.run_offers(ec2, image=image, offers=(Offer(instance_type),), count=count, tags=tags,
                               intent=intent, shutdown_behavior=shutdown_behavior,
                               instance_profile_arn=instance_profile_arn).instances

    def run_offers(self, ec2: Any, *, image: str, offers: Sequence[Offer], count: int, tags: dict[str, str],
                   intent: str, shutdown_behavior: str, instance_profile_arn: str = "") -> Launched:
        """`count` instances of the first offer that has room for all of them, trying each subnet in
        turn; Ec2Error (naming every shortage met) when none has. Each offer and subnet is a request
        of its own, with a client token derived from `intent`."""
        tagged = tag_list({Tag.CLUSTER: self.cluster, **tags})
        passed_over: list[str] = []
        spot_quota_reached = False
        for offer in offers:
            if offer.market == SPOT and spot_quota_reached:
                continue
            for subnet in self.subnet_ids or ("",):
                request = launch_request(offer, image=image, count=count, tagged=tagged, key_name=self.key_name,
                                         security_group_id=self.security_group_id, subnet=subnet,
                                         shutdown_behavior=shutdown_behavior, token=client_token(
                                             intent, f"{offer.market}/{offer.instance_type}/{subnet}"),
                                         instance_profile_arn=instance_profile_arn)
                try:
                    return Launched(self._request(ec2, request), offer, tuple(passed_over))
                except _Shortage as shortage:
                    where = f"{offer} in {subnet or 'the default subnet'}"
                    passed_over.append(f"{where}: {shortage.code}")
                    log.warning("no room for %d instance(s) of %s (%s); trying the next", count, where, shortage.code)
                    if shortage.code in SPOT_QUOTA_ERRORS:
                        spot_quota_reached = True
                        break
        raise Ec2Error(f"launching {count} instance(s) failed: no capacity in any offer: {'; '.join(passed_over)}")

    def _request(self, ec2: Any, request: dict[str, Any]) -> list[dict]:
        """One RunInstances request, retried as the same request (token included) after throttling and
        passing faults: if a first try did start instances, EC2 answers a retry with them, not more."""
        error: Exception | None = None
        for attempt in range(self.attempts):
            try:
                return ec2.run_instances(**request)["Instances"]
            except ClientError as exc:
                code = error_code(exc)
                if code in CAPACITY_ERRORS or code in SPOT_QUOTA_ERRORS:
                    raise _Shortage(code) from exc
                error = exc
                if code in _FATAL_LAUNCH_ERRORS or attempt + 1 == self.attempts:
                    break
                wait = min(30.0, 2.0 * 2**attempt)
                log.warning("launch attempt %d failed (%s); retrying in %.0fs", attempt + 1, code, wait)
                time.sleep(wait)
            except API_ERRORS as exc:  # not worth retrying here: botocore has retried what it can
                error = exc
                break
        remedy = _REMEDIES.get(error_code(error), "") if isinstance(error, ClientError) else ""
        raise Ec2Error(f"launching {request['MaxCount']} instance(s) failed: "
                       f"{api_error_text(error) if error else '?'}" + (f" ({remedy})" if remedy else ""))


@dataclass(frozen=True)
class Offer:
    """An instance type in a market, as a launch asks EC2 for it."""

    instance_type: str
    market: str = ON_DEMAND

    def __str__(self) -> str:
        return f"{self.instance_type} ({self.market})"


def offers_for(instance_types: Sequence[str], market: str, spot_fallback: bool) -> tuple[Offer, ...]:
    """The offers of a launch in the order tried: every type in the chosen market, then, with the
    fallback, every type On-Demand."""
    chosen = tuple(Offer(instance_type, market) for instance_type in instance_types)
    if market == SPOT and spot_fallback:
        chosen += tuple(Offer(instance_type, ON_DEMAND) for instance_type in instance_types)
    return chosen


@dataclass(frozen=True)
class Launched:
    instances: list[dict]
    offer: Offer  # the one that had room
    passed_over: tuple[str, ...] = ()  # the shortages met before it: "c7i.large (spot) in subnet-1: ..."


class _Shortage(Exception):
    """No room for this request: the launch moves on to the next subnet or offer."""

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


def launch_request(offer: Offer, *, image: str, count: int, tagged: list[dict[str, str]], key_name: str,
                   security_group_id: str, subnet: str, shutdown_behavior: str, token: str,
                   instance_profile_arn: str) -> dict[str, Any]:
    """RunInstances' parameters: tagged at launch (a Spot request too), IMDSv2 required."""
    specifications = [{"ResourceType": "instance", "Tags": tagged}, {"ResourceType": "volume", "Tags": tagged}]
    request: dict[str, Any] = {
        "ImageId": image, "InstanceType": offer.instance_type, "MinCount": count, "MaxCount": count,
        "KeyName": key_name, "SecurityGroupIds": [security_group_id],
        "InstanceInitiatedShutdownBehavior": shutdown_behavior, "MetadataOptions": IMDS_V2_ONLY,
        "TagSpecifications": specifications, "ClientToken": token,
    }
    if offer.market == SPOT:
        request["InstanceMarketOptions"] = SPOT_MARKET_OPTIONS
        specifications.append({"ResourceType": "spot-instances-request", "Tags": tagged})
    if subnet:
        request["SubnetId"] = subnet
    if instance_profile_arn:
        request["IamInstanceProfile"] = {"Arn": instance_profile_arn}
    return request


def market_of(instance: dict) -> str:
    """Spot or On-Demand, as EC2 describes the instance."""
    return SPOT if instance.get("InstanceLifecycle") == "spot" else ON_DEMAND


def client_token(intent: str, where: str) -> str:
    """Same launch decision, offer and subnet, same token: EC2 then starts no second set of instances."""
    return hashlib.sha256(f"{intent}/{where}".encode()).hexdigest()[:64]


def image(ami: str, region: str) -> str:
    """`ami`, else the latest Amazon Linux 2023 of the region, from SSM's public parameter."""
    if ami:
        return ami
    try:
        return client("ssm", region).get_parameter(Name=DEFAULT_AMI_PARAMETER)["Parameter"]["Value"]
    except API_ERRORS as exc:
        raise Ec2Error(f"looking up the AMI in SSM ({DEFAULT_AMI_PARAMETER}) failed: {api_error_text(exc)}") from exc


# --- termination and waits -------------------------------------------------------------------------


def terminate_instances(ec2: Any, instance_ids: Sequence[str]) -> None:
    """TerminateInstances, in the batches of at most 100 that it takes."""
    ids = list(instance_ids)
    try:
        for start in range(0, len(ids), 100):
            ec2.terminate_instances(InstanceIds=ids[start:start + 100])
    except API_ERRORS as exc:
        raise Ec2Error(f"terminating {', '.join(ids)} failed: {api_error_text(exc)}") from exc


def wait_until(ec2: Any, state: str, instance_ids: Sequence[str], minutes: float = 5.0) -> None:
    """Until every instance is `state` (running, stopped, terminated), asking every 5 s."""
    ec2.get_waiter(f"instance_{state}").wait(InstanceIds=list(instance_ids),
                                             WaiterConfig={"Delay": 5, "MaxAttempts": int(minutes * 12)})
