"""Workers as EC2 instances, launched with boto3 (cloud/ec2.py) and provisioned over SSH.

Every instance carries the tags dw:cluster, dw:role=worker and dw:owner (the endpoint whose
scaler launched it, whose share of the cap it uses); its volume (and its Spot request) carries
them too. Instances are launched with InstanceInitiatedShutdownBehavior=terminate, so a worker
that powers off when idle is gone for good, with IMDSv2 required, and with no instance profile:
workers hold no AWS credentials. A provisioned instance gets the tag dw:ready.

A launch tries the instance types in the order given, in the chosen market (On-Demand or Spot),
and with the Spot fallback every type On-Demand after that (cloud/ec2.py, `offers_for`); the
shortages it met on the way are logged, and are no failure if an offer had room. A Spot
worker is told to watch for its interruption notice (worker/interruption.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

from cloud.aws import API_ERRORS, api_error_text, client
from cloud.ec2 import (
    ON_DEMAND,
    SPOT,
    Ec2Error,
    Launch,
    Tag,
    cluster_instances,
    image,
    market_of,
    offers_for,
    tag_instance,
    tags_of,
    terminate_instances,
)
from cloud.ssh import HostKeyPins, SshError, SshTarget, wait_for_ssh
from cron.providers import Machine, ProviderError
from cron.provision import WorkerInstall, provision_worker

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Ec2Settings:
    launch: Launch  # setup's key pair, security group and subnets
    key_path: Path
    instance_types: tuple[str, ...] = ("c7i.large",)  # in order of preference
    market: str = ON_DEMAND
    spot_fallback: bool = False  # a Spot launch that finds no room in any type is made On-Demand
    metadata_url: str = ""  # the instance metadata service as Spot workers reach it ("": the worker's default)
    ami: str = ""  # empty: the latest Amazon Linux 2023 from SSM's public parameter
    ssh_user: str = "ec2-user"
    ssh_timeout: float = 300.0  # from launch until SSH answers
    # Test-only: SSH addresses handed to new instances in turn instead of their private IP
    # (the tests' "instances" are sshd processes in network namespaces). Each scaler gets its
    # own part of the pool, so two launching at once never collide. Never set in production.
    test_addresses: tuple[str, ...] = ()


@contextmanager
def _provider_errors() -> Iterator[None]:
    """EC2's and SSH's failures as the providers' error, which the scaler handles and counts."""
    try:
        yield
    except (Ec2Error, SshError) as exc:
        raise ProviderError(str(exc)) from exc


class Ec2Provider:
    def __init__(self, settings: Ec2Settings, install: Callable[[], WorkerInstall], pins: HostKeyPins,
                 owner: str) -> None:
        """`install` is asked for at the first provisioning only: listing and terminating need no secret."""
        self.settings = settings
        self._install = install
        self.pins = pins
        self.owner = owner
        self.ec2 = client("ec2", settings.launch.region)

    def list(self) -> list[Machine]:
        try:
            instances = cluster_instances(self.ec2, self.settings.launch.cluster, "worker", ("pending", "running"))
        except API_ERRORS as exc:
            raise ProviderError(f"listing instances failed: {api_error_text(exc)}") from exc
        return [self._machine(instance) for instance in instances]

    def _machine(self, instance: dict) -> Machine:
        tags = tags_of(instance)
        address = tags.get(Tag.TEST_ADDRESS) or instance.get("PrivateIpAddress")
        return Machine(instance["InstanceId"], tags.get(Tag.OWNER, "?"), instance["LaunchTime"].timestamp(),
                       ready=Tag.READY in tags, address=address, instance_type=instance.get("InstanceType", ""),
                       market=market_of(instance))

    def _image(self) -> str:
        with _provider_errors():
            return image(self.settings.ami, self.settings.launch.region)

    def launch(self, count: int, owner: str, intent: str) -> list[Machine]:
        tags = {Tag.ROLE: "worker", Tag.OWNER: owner, Tag.INTENT: intent,
                "Name": f"{self.settings.launch.cluster}-worker"}
        offers = offers_for(self.settings.instance_types, self.settings.market, self.settings.spot_fallback)
        with _provider_errors():
            launched = self.settings.launch.run_offers(self.ec2, image=self._image(), offers=offers, count=count,
                                                       tags=tags, intent=intent, shutdown_behavior="terminate")
        machines = [self._machine(instance) for instance in launched.instances]
        passed = f", after no room for: {'; '.join(launched.passed_over)}" if launched.passed_over else ""
        log.info("launched %s as %s%s", ", ".join(machine.machine_id for machine in machines), launched.offer, passed)
        return self._assign_test_addresses(machines, owner)

    def _assign_test_addresses(self, machines: list[Machine], owner: str) -> list[Machine]:
        if not self.settings.test_addresses:
            return machines
        taken = {machine.address for machine in self.list()}
        free = [address for address in self.settings.test_addresses if address not in taken]
        assigned = []
        for machine, address in zip(machines, free, strict=False):
            self._tag(machine, Tag.TEST_ADDRESS, address)
            assigned.append(replace(machine, address=address))
        return assigned + machines[len(assigned):]

    def provision(self, machine: Machine) -> Machine:
        if not machine.address:
            raise ProviderError(f"{machine.machine_id} has no address to reach it at")
        # The ready deadline counts from the launch, to the second.
        deadline = self.settings.ssh_timeout
        remaining = deadline - (time.time() - machine.launched_at)
        if remaining <= 0:
            raise ProviderError(f"{machine.machine_id} is not ready within {deadline:.0f}s of the launch "
                                f"(--ready-deadline)")
        with _provider_errors():
            waited = wait_for_ssh(machine.address, timeout=remaining,
                                  what=f"within {deadline:.0f}s of the launch (--ready-deadline)")
        target = SshTarget(machine.machine_id, machine.address, self.settings.ssh_user, self.settings.key_path)
        # An EC2 worker is ours to end: its idle exit powers it off, which terminates it. A Spot
        # worker watches for its interruption notice.
        install = replace(self._install(), worker_id=machine.machine_id, poweroff_on_idle=True,
                          spot=machine.market == SPOT, metadata_url=self.settings.metadata_url)
        took = provision_worker(target, self.pins, install)
        self._tag(machine, Tag.READY, datetime.now(timezone.utc).isoformat(timespec="seconds"))
        log.info("provisioned %s at %s: SSH answered after %.1fs, worker running %.2fs later",
                 machine.machine_id, machine.address, waited, took)
        return replace(machine, ready=True)

    def terminate(self, machines: Sequence[Machine], reason: str) -> None:
        ids = [machine.machine_id for machine in machines]
        if not ids:
            return
        log.info("terminating %s: %s", ", ".join(ids), reason)
        with _provider_errors():
            terminate_instances(self.ec2, ids)
        self.pins.forget(ids)

    def _tag(self, machine: Machine, key: str, value: str) -> None:
        with _provider_errors():
            tag_instance(self.ec2, machine.machine_id, key, value)
