"""Where workers run. Every provider offers the same four operations (list, launch,
provision, terminate), in the manner of Ray's NodeProvider, so the scaler does not care
whether a worker is a local process, an existing server reached over SSH, or an EC2 instance.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


class ProviderError(Exception):
    """A launch, provisioning or termination step failed."""


@dataclass(frozen=True)
class Machine:
    """A worker machine: an EC2 instance, a host of the ssh provider, or a local worker process.
    (A node is an endpoint, a or b; its scaler is the machine's owner.)"""

    machine_id: str  # instance id, host name or local worker id; also the worker's id
    owner: str  # the endpoint whose scaler launched it (its share of the cap pays for it)
    launched_at: float  # unix seconds
    ready: bool  # provisioned: the worker was started and confirmed running
    address: str | None = None  # where SSH reaches it, for providers that use SSH
    instance_type: str = ""  # an EC2 instance's type ("" elsewhere)
    market: str = ""  # an EC2 instance's: on-demand or spot ("" elsewhere)


class Provider(Protocol):
    def list(self) -> list[Machine]:
        """This cluster's live workers, ready or still booting."""
        ...

    def launch(self, count: int, owner: str, intent: str) -> list[Machine]:
        """Start `count` machines. `intent` names this launch decision: retrying the same
        intent must not start more (EC2 turns it into ClientTokens)."""
        ...

    def provision(self, machine: Machine) -> Machine:
        """Install and start the worker, confirm it runs, and mark the machine ready."""
        ...

    def terminate(self, machines: Sequence[Machine], reason: str) -> None:
        ...
