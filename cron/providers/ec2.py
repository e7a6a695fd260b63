"""Workers as EC2 instances, launched with boto3 and provisioned over SSH.

Every instance carries the tags dw:cluster, dw:role=worker and dw:owner (the endpoint whose
scaler launched it, whose share of the cap it uses); its volume carries them too. Instances
are launched with InstanceInitiatedShutdownBehavior=terminate, so a worker that powers off
when idle is gone for good, with IMDSv2 required, and with no instance profile: workers
hold no AWS credentials. A provisioned instance gets the tag dw:ready.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import boto3
from botocore.exceptions import ClientError

from cloud.aws import API_ERRORS, api_error_text, aws_config, cluster_instances, ec2_client, error_code
from cron.providers import Node, ProviderError
from cron.provision import HostKeyPins, SshTarget, WorkerInstall, provision_worker, wait_for_ssh

log = logging.getLogger(__name__)

DEFAULT_AMI_PARAMETER = "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64"
_CAPACITY_ERRORS = {"InsufficientInstanceCapacity", "InsufficientCapacity", "Unsupported"}
# Not worth retrying: the account or request is wrong, not the moment.
_FATAL_LAUNCH_ERRORS = {"InstanceLimitExceeded", "VcpuLimitExceeded", "InvalidParameterValue",
                        "InvalidParameterCombination", "UnauthorizedOperation", "InvalidAMIID.NotFound",
                        "InvalidKeyPair.NotFound", "InvalidGroup.NotFound", "IdempotentParameterMismatch"}


@dataclass(frozen=True)
class Ec2Settings:
    cluster: str
    region: str
    key_name: str
    key_path: Path
    security_group_id: str
    subnet_ids: tuple[str, ...] = ()
    instance_type: str = "c7i.large"
    ami: str = ""  # empty: the latest Amazon Linux 2023 from SSM's public parameter
    ami_parameter: str = DEFAULT_AMI_PARAMETER
    ssh_user: str = "ec2-user"
    ssh_timeout: float = 300.0  # from launch until SSH answers
    launch_attempts: int = 4
    # Test-only: SSH addresses handed to new instances in turn instead of their private IP
    # (the tests' "instances" are sshd processes in network namespaces). Each scaler gets its
    # own part of the pool, so two launching at once never collide. Never set in production.
    test_addresses: tuple[str, ...] = ()


def client_token(intent: str, subnet_id: str) -> str:
    """Same launch decision and subnet, same token: EC2 then starts no second set of instances."""
    return hashlib.sha256(f"{intent}/{subnet_id}".encode()).hexdigest()[:64]


def run_instances(ec2: Any, settings: Ec2Settings, *, image: str, instance_type: str, count: int,
                  tags: dict[str, str], intent: str, shutdown_behavior: str,
                  instance_profile_arn: str = "") -> list[dict]:
    """RunInstances for this cluster, retried with backoff on capacity errors (trying each
    subnet in turn) and throttling, with a client token derived from `intent`."""
    tag_list = [{"Key": key, "Value": value} for key, value in tags.items()]
    subnets = settings.subnet_ids or ("",)
    error: Exception | None = None
    subnet_index = 0
    for attempt in range(settings.launch_attempts):
        subnet = subnets[subnet_index % len(subnets)]
        request: dict[str, Any] = {
            "ImageId": image, "InstanceType": instance_type, "MinCount": count, "MaxCount": count,
            "KeyName": settings.key_name, "SecurityGroupIds": [settings.security_group_id],
            "InstanceInitiatedShutdownBehavior": shutdown_behavior,
            "MetadataOptions": {"HttpTokens": "required", "HttpEndpoint": "enabled", "HttpPutResponseHopLimit": 1},
            "TagSpecifications": [{"ResourceType": "instance", "Tags": tag_list},
                                  {"ResourceType": "volume", "Tags": tag_list}],
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
            if code in _FATAL_LAUNCH_ERRORS or attempt + 1 == settings.launch_attempts:
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
    raise ProviderError(f"launching {count} instance(s) failed: {api_error_text(error) if error else '?'}")


def latest_ami(ssm: Any, parameter: str) -> str:
    try:
        return ssm.get_parameter(Name=parameter)["Parameter"]["Value"]
    except API_ERRORS as exc:
        raise ProviderError(f"looking up the AMI in SSM ({parameter}) failed: {api_error_text(exc)}") from exc


def ssm_client(region: str) -> Any:
    return boto3.session.Session(region_name=region).client("ssm", config=aws_config())


class Ec2Provider:
    def __init__(self, settings: Ec2Settings, install: Callable[[], WorkerInstall], pins: HostKeyPins,
                 owner: str) -> None:
        """`install` is asked for at the first provisioning only: listing and terminating need no secret."""
        self.settings = settings
        self._install = install
        self.pins = pins
        self.owner = owner
        self.ec2 = ec2_client(settings.region)
        self.ssm = ssm_client(settings.region)

    def list(self) -> list[Node]:
        try:
            instances = cluster_instances(self.ec2, self.settings.cluster, "worker", ("pending", "running"))
        except API_ERRORS as exc:
            raise ProviderError(f"listing instances failed: {api_error_text(exc)}") from exc
        return [self._node(instance) for instance in instances]

    def _node(self, instance: dict) -> Node:
        tags = {tag["Key"]: tag["Value"] for tag in instance.get("Tags", [])}
        address = tags.get("dw:test-address") or instance.get("PrivateIpAddress")
        return Node(instance["InstanceId"], tags.get("dw:owner", "?"), instance["LaunchTime"].timestamp(),
                    ready="dw:ready" in tags, address=address)

    def _image(self) -> str:
        return self.settings.ami or latest_ami(self.ssm, self.settings.ami_parameter)

    def launch(self, count: int, owner: str, intent: str) -> list[Node]:
        tags = {"dw:cluster": self.settings.cluster, "dw:role": "worker", "dw:owner": owner, "dw:intent": intent,
                "Name": f"{self.settings.cluster}-worker"}
        instances = run_instances(self.ec2, self.settings, image=self._image(), count=count, tags=tags,
                                  instance_type=self.settings.instance_type, intent=intent,
                                  shutdown_behavior="terminate")
        nodes = [self._node(instance) for instance in instances]
        log.info("launched %s", ", ".join(node.node_id for node in nodes))
        return self._assign_test_addresses(nodes, owner)

    def _assign_test_addresses(self, nodes: list[Node], owner: str) -> list[Node]:
        if not self.settings.test_addresses:
            return nodes
        taken = {node.address for node in self.list()}
        free = [address for address in self.settings.test_addresses if address not in taken]
        assigned = []
        for node, address in zip(nodes, free, strict=False):
            self._tag(node, "dw:test-address", address)
            assigned.append(replace(node, address=address))
        return assigned + nodes[len(assigned):]

    def provision(self, node: Node) -> Node:
        if not node.address:
            raise ProviderError(f"{node.node_id} has no address to reach it at")
        # The ready deadline counts from the launch, to the second.
        deadline = self.settings.ssh_timeout
        remaining = deadline - (time.time() - node.launched_at)
        if remaining <= 0:
            raise ProviderError(f"{node.node_id} is not ready within {deadline:.0f}s of the launch (--ready-deadline)")
        waited = wait_for_ssh(node.address, timeout=remaining,
                              what=f"within {deadline:.0f}s of the launch (--ready-deadline)")
        target = SshTarget(node.node_id, node.address, self.settings.ssh_user, self.settings.key_path)
        # An EC2 worker is ours to end: its idle exit powers it off, which terminates it.
        took = provision_worker(target, self.pins,
                                replace(self._install(), worker_id=node.node_id, poweroff_on_idle=True))
        self._tag(node, "dw:ready", datetime.now(timezone.utc).isoformat(timespec="seconds"))
        log.info("provisioned %s at %s: SSH answered after %.1fs, worker running %.2fs later",
                 node.node_id, node.address, waited, took)
        return replace(node, ready=True)

    def terminate(self, nodes: Sequence[Node], reason: str) -> None:
        ids = [node.node_id for node in nodes]
        if not ids:
            return
        log.info("terminating %s: %s", ", ".join(ids), reason)
        try:
            for start in range(0, len(ids), 100):
                self.ec2.terminate_instances(InstanceIds=ids[start:start + 100])
        except API_ERRORS as exc:
            raise ProviderError(f"terminating {', '.join(ids)} failed: {api_error_text(exc)}") from exc
        self.pins.forget(ids)

    def _tag(self, node: Node, key: str, value: str) -> None:
        try:
            self.ec2.create_tags(Resources=[node.node_id], Tags=[{"Key": key, "Value": value}])
        except API_ERRORS as exc:
            raise ProviderError(f"tagging {node.node_id} {key} failed: {api_error_text(exc)}") from exc
