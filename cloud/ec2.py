"""EC2 for the cluster, one way for the scaler's workers and the deploy's endpoints alike: the
tags that say whose an instance is, listings by those tags, the launch, termination and waits.

Every instance and its volume carry dw:cluster and dw:role (endpoint or worker); endpoints
also dw:node (a or b), workers dw:owner (the endpoint whose scaler launched them) and, once
provisioned, dw:ready. Tag filters take exact values only: EC2 would read `*` and `?` in one
as wildcards and match another cluster's instances.

A launch (`Launch.run`) uses setup's key pair, security group and subnets (`Launch`), requires
IMDSv2, tags at launch, and is retried with backoff on capacity errors (the next subnet) and
throttling. Its client token comes from the caller's launch decision (`intent`): a request
retried after a timeout returns the instances it already started instead of starting more.
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
_CAPACITY_ERRORS = {"InsufficientInstanceCapacity", "InsufficientCapacity", "Unsupported"}
# Not worth retrying: the account or request is wrong, not the moment.
_FATAL_LAUNCH_ERRORS = {"InstanceLimitExceeded", "VcpuLimitExceeded", "InvalidParameterValue",
                        "InvalidParameterCombination", "UnauthorizedOperation", "InvalidAMIID.NotFound",
                        "InvalidKeyPair.NotFound", "InvalidGroup.NotFound", "IdempotentParameterMismatch"}


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
        """RunInstances for this cluster, retried with backoff on capacity errors (trying each
        subnet in turn) and throttling, with a client token derived from `intent`."""
        tagged = tag_list({Tag.CLUSTER: self.cluster, **tags})
        subnets = self.subnet_ids or ("",)
        error: Exception | None = None
        subnet_index = 0
        for attempt in range(self.attempts):
            subnet = subnets[subnet_index % len(subnets)]
            request: dict[str, Any] = {
                "ImageId": image, "InstanceType": instance_type, "MinCount": count, "MaxCount": count,
                "KeyName": self.key_name, "SecurityGroupIds": [self.security_group_id],
                "InstanceInitiatedShutdownBehavior": shutdown_behavior,
                "MetadataOptions": IMDS_V2_ONLY,
                "TagSpecifications": [{"ResourceType": "instance", "Tags": tagged},
                                      {"ResourceType": "volume", "Tags": tagged}],
                "ClientToken": client_token(intent, subnet),
            }
            if subnet:
                request["SubnetId"] = subnet
            if instance_profile_arn:
                request["IamInstanceProfile"] = {"Arn": instance_profile_arn}
            try:
                return ec2.run_instances(**request)["Instances"]
            except ClientError as exc:
                code = error_code(exc)
                error = exc
                if code in _FATAL_LAUNCH_ERRORS or attempt + 1 == self.attempts:
                    break
                if code in _CAPACITY_ERRORS:
                    # A shortage is often per zone: the next subnet, a new request and so a new token.
                    # Any other error is retried as the same request, token included: if the first
                    # try did start instances, EC2 answers the retry with them instead of more.
                    subnet_index += 1
                wait = min(30.0, 2.0 * 2**attempt)
                log.warning("launch attempt %d failed (%s); retrying in %.0fs", attempt + 1, code, wait)
                time.sleep(wait)
            except API_ERRORS as exc:  # not worth retrying here: botocore has retried what it can
                error = exc
                break
        raise Ec2Error(f"launching {count} instance(s) failed: {api_error_text(error) if error else '?'}")


def client_token(intent: str, subnet_id: str) -> str:
    """Same launch decision and subnet, same token: EC2 then starts no second set of instances."""
    return hashlib.sha256(f"{intent}/{subnet_id}".encode()).hexdigest()[:64]


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
