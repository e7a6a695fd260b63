"""Workers on a fixed list of existing hosts (own servers, no cloud), started over SSH.

A host is "launched" by provisioning and starting the worker service on it, and
"terminated" by stopping that service; the machine itself stays. The two endpoints' scalers
split the host list like the worker cap -- scaler 0 uses hosts 0, 2, 4..., scaler 1 hosts
1, 3, 5... -- so they never start a worker on the same host. A worker that goes idle exits
and runs no exit action here: these machines are not ours to power off.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

from cloud.ssh import HostKeyPins, SshTarget
from cron.providers import Machine, ProviderError
from cron.provision import ProvisionError, WorkerInstall, provision_worker, stop_worker, worker_running

log = logging.getLogger(__name__)


@dataclass
class SshProvider:
    hosts: Sequence[str]
    endpoint_index: int  # this scaler's share: hosts endpoint_index, endpoint_index + 2, ...
    owner: str
    user: str
    key_path: Path
    install: WorkerInstall
    pins: HostKeyPins
    _free: list[str] = field(default_factory=list)  # this scaler's hosts that answered without a worker

    def __post_init__(self) -> None:
        self.hosts = list(self.hosts)
        self.own_hosts = self.hosts[self.endpoint_index::2]

    def _target(self, host: str) -> SshTarget:
        return SshTarget(host, host, self.user, self.key_path)

    def _probe(self, host: str) -> bool | None:
        """True: worker running; False: host answers, no worker; None: host unreachable."""
        try:
            return worker_running(self._target(host), self.pins, self.install.service)
        except ProvisionError as exc:
            log.warning("host %s unreachable: %s", host, exc)
            return None

    def list(self) -> list[Machine]:
        with ThreadPoolExecutor(max_workers=8) as pool:
            states = dict(zip(self.hosts, pool.map(self._probe, self.hosts), strict=True))
        self._free = [host for host in self.own_hosts if states[host] is False]
        now = time.time()
        return [Machine(host, self.owner if host in self.own_hosts else "peer", now, ready=True, address=host)
                for host, running in states.items() if running]

    def launch(self, count: int, owner: str, intent: str) -> list[Machine]:
        if not self._free:
            self.list()
        chosen, self._free = self._free[:count], self._free[count:]
        if len(chosen) < count:
            log.warning("only %d of this scaler's hosts are free for the %d worker(s) wanted", len(chosen), count)
        return [Machine(host, owner, time.time(), ready=False, address=host) for host in chosen]

    def provision(self, machine: Machine) -> Machine:
        took = provision_worker(self._target(machine.machine_id), self.pins,
                                replace(self.install, worker_id=machine.machine_id))
        log.info("worker running on %s after %.2fs", machine.machine_id, took)
        return replace(machine, ready=True)

    def terminate(self, machines: Sequence[Machine], reason: str) -> None:
        for machine in machines:
            log.info("stopping the worker on %s: %s", machine.machine_id, reason)
            try:
                stop_worker(self._target(machine.machine_id), self.pins, self.install.service)
            except ProvisionError as exc:
                raise ProviderError(f"stopping the worker on {machine.machine_id} failed: {exc}") from exc
