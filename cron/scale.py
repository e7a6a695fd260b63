"""One scaling run for this endpoint's host: `python -m cron.scale`.

Installed as a crontab entry every minute on each endpoint host; `--every S` repeats the run
in-process (what `./deploy.sh local` uses). A run holds an exclusive lock, so two runs on
one host never overlap. Each run:

1. lists the cluster's workers (whoever launched them);
2. reconciles: terminates workers that did not become ready within --ready-deadline, and
   ready workers that neither endpoint has heard from for --silence-deadline (while the peer
   does not answer, see Scaler.verdict); resumes the provisioning of its own workers that a
   killed earlier run left unprovisioned;
3. reads this endpoint's queue and its own circuit breaker from the endpoint's /stats, and the
   peer's queue from the peer's (both with the scaler key, which also lists the workers heard from);
4. asks the policy (cron/policy.py) how many workers to launch, limited by the circuit
   breaker, then launches and provisions them; a worker that fails provisioning is
   terminated at once;
5. posts the decision, and what became of each launch, to its endpoint (cron/state.py), which
   records it and shows it in GET /stats and on its dashboard.

Every setting is checked before the run does anything (cron/config.py; `./deploy.sh aws` takes
the knobs it hands to the hosts from the same table). Ctrl-C or SIGTERM ends a run at once, and a failed
run ends, with a log line that says which instances it leaves running and how to end them.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import secrets
import socket
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from cli.interrupts import Interrupted, exit_now, parallel, stop_on_signals
from cli.tls import urlopen
from cloud.aws import API_ERRORS, ClusterUsageError, check_state_cluster, read_state, resolve_region
from cloud.ssh import HostKeyPins
from cron.config import parse_args
from cron.fleet_report import report_fleet
from cron.instance_types import mean_slots
from cron.policy import ClusterView, Decision, EndpointLoad, Policy, decide
from cron.providers import Machine, Provider, ProviderError
from cron.providers.local import LocalProvider
from cron.provision import WorkerInstall
from cron.state import Breaker, EndpointUnreachable, RunRecord, ScalerState, reset_breaker
from endpoint.secret import read_secret, scaler_key, worker_key

log = logging.getLogger("cron.scale")

class SettingsError(Exception):
    """A file the settings name is missing or unusable; the scaler did nothing."""


def cluster_secret(args: argparse.Namespace) -> str:
    try:
        return read_secret(args.secret_file)
    except OSError as exc:
        raise SettingsError(f"cannot read the cluster secret from {args.secret_file} ({exc.strerror}): pass "
                            f"--secret-file (DW_SECRET_FILE), the file ./deploy.sh created") from exc


def worker_install(args: argparse.Namespace) -> WorkerInstall:
    key = worker_key(cluster_secret(args))
    return WorkerInstall(endpoints=tuple(args.endpoints), worker_key=key, worker_id="",
                         idle_timeout=args.idle_timeout, processes=args.worker_processes,
                         service=args.worker_service, exit_command=args.worker_exit_command,
                         python=args.remote_python, kernel=args.worker_kernel, ca_certificate=ca_certificate(args))


def ca_certificate(args: argparse.Namespace) -> str:
    """The CA the workers are to check the endpoints against, read before any launch."""
    if not args.tls_ca:
        return ""
    try:
        return Path(args.tls_ca).read_text()
    except OSError as exc:
        raise SettingsError(f"cannot read the CA certificate {args.tls_ca} ({exc.strerror}): pass --tls-ca "
                            f"(DW_TLS_CA), the file ./deploy.sh wrote") from exc


def make_provider(args: argparse.Namespace) -> Provider:
    state_dir = Path(args.state_dir)
    if args.provider == "local":
        return LocalProvider(state_dir / "workers", args.endpoints, lambda: worker_key(cluster_secret(args)),
                             processes_per_worker=args.slots_per_worker, idle_timeout=args.idle_timeout,
                             log_dir=state_dir / "log", kernel=args.worker_kernel, tls_ca=args.tls_ca)
    pins = HostKeyPins(state_dir / "known_hosts.json")
    if args.provider == "ssh":
        from cron.providers.ssh import SshProvider

        hosts = [host.strip() for host in args.ssh_hosts.split(",") if host.strip()]
        return SshProvider(hosts, args.endpoint_index, args.node_id, args.ssh_user, Path(args.ssh_key),
                           worker_install(args), pins)
    return ec2_provider(args, pins)


def ec2_provider(args: argparse.Namespace, pins: HostKeyPins) -> Provider:
    """Everything about the cluster comes from setup's state file, checked before any API call."""
    from cloud.ec2 import Launch
    from cron.providers.ec2 import Ec2Provider, Ec2Settings

    setup = read_state(args.aws_state)
    if not setup:
        raise SettingsError(f"no state file {args.aws_state}: pass --aws-state (DW_AWS_STATE), the file "
                            f"./setup.sh aws wrote")
    check_state_cluster(setup, args.cluster, args.aws_state)
    missing = [key for key in ("key_name", "security_group_id") if not setup.get(key)]
    if missing or not (args.ssh_key or setup.get("key_path")):
        raise SettingsError(f"the state file {args.aws_state} lacks {', '.join(missing) or 'key_path'}: run "
                            f"./setup.sh aws again")
    region = resolve_region(args.region, setup.get("region", ""), args.aws_state)
    test_addresses = [address.strip() for address in args.test_ssh_addresses.split(",") if address.strip()]
    settings = Ec2Settings(
        launch=Launch.from_state(setup, args.cluster, region.name), key_path=Path(args.ssh_key or setup["key_path"]),
        instance_types=tuple(args.instance_types), market=args.market, spot_fallback=args.spot_fallback != "none",
        metadata_url=args.worker_metadata_url, ami=args.ami, ssh_user=args.ssh_user, ssh_timeout=args.ready_deadline,
        test_addresses=tuple(test_addresses[args.endpoint_index::2]))
    return Ec2Provider(settings, lambda: worker_install(args), pins, args.node_id)


def make_policy(args: argparse.Namespace) -> Policy:
    return Policy(
        scale_after_s=args.scale_after,
        target_drain_s=args.target_drain,
        max_workers=args.max_workers,
        endpoint_index=args.endpoint_index,
        max_launch_per_tick=args.max_launch_per_tick,
        slots_per_worker=args.slots_per_worker,
        default_job_duration_s=args.default_job_duration,
    )


@contextmanager
def exclusive_run(lock_path: Path) -> Iterator[bool]:
    """True inside if this process holds the host's scaler lock, False if another run does."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as lock_file:
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def fetch_stats(url: str, key: str, workers_within: float = 0, timeout: float = 3.0, ca_file: str = "") -> dict | None:
    """An endpoint's /stats with the details (the workers it heard from, the breaker's last error) that the
    scaler key opens."""
    query = f"?workers_within={max(1, int(workers_within))}" if workers_within else ""
    request = urllib.request.Request(f"{url.rstrip('/')}/stats{query}", headers={"Authorization": f"Bearer {key}"})
    try:
        with urlopen(request, timeout, ca_file) as response:
            return json.loads(response.read())
    except (OSError, ValueError) as exc:
        log.warning("%s/stats unreachable: %s", url, exc)
        return None


def load_of(stats: dict) -> EndpointLoad:
    return EndpointLoad(pending=stats["pending"], oldest_pending_age_s=stats["oldest_pending_age_s"],
                        recent_jobs=stats.get("recent_jobs", 0),
                        recent_job_duration_s=stats.get("recent_job_duration_s"),
                        recent_window_s=stats.get("recent_window_s", 600.0),
                        recent_arrivals=stats.get("recent_arrivals", 0),
                        recent_arrivals_pending=stats.get("recent_arrivals_pending", 0),
                        arrival_window_s=stats.get("arrival_window_s", 60.0), running=stats.get("running", 0))


def cluster_view(own_stats: dict, peer_stats: dict | None, fleet: Fleet, node_id: str) -> ClusterView:
    """What the policy sees. A worker in doubt (see Scaler.verdict) is no capacity for this
    endpoint's queue, but it runs and bills: it still counts against its scaler's share."""
    machines = fleet.machines
    return ClusterView(
        endpoints=(load_of(own_stats),) + ((load_of(peer_stats),) if peer_stats else ()),
        peer_reachable=peer_stats is not None,
        workers_ready=sum(machine.ready and machine.machine_id not in fleet.in_doubt for machine in machines),
        workers_booting=sum(not machine.ready for machine in machines),
        own_workers=sum(machine.owner == node_id for machine in machines),
        peer_workers=sum(machine.owner != node_id for machine in machines),
        reported_slots_per_worker=reported_capacity(machines, [own_stats] + ([peer_stats] if peer_stats else [])),
    )


def reported_capacity(machines: list[Machine], answers: list[dict]) -> float | None:
    """The mean of the jobs at once that the fleet's workers reported to either endpoint (the
    workers list of /stats with the peer key), None if none has reported yet."""
    reported: dict[str, int] = {}
    for stats in answers:
        for worker in stats.get("workers", []):
            if worker.get("capacity"):
                reported[worker["id"]] = max(reported.get(worker["id"], 0), int(worker["capacity"]))
    capacities = [reported[machine.machine_id] for machine in machines if machine.machine_id in reported]
    return sum(capacities) / len(capacities) if capacities else None


@dataclass(frozen=True)
class Hearing:
    """Seconds since an endpoint last heard from each worker, from the endpoints that answered."""

    seconds_since: dict[str, float]
    from_both: bool  # False: the peer did not answer; this is this endpoint's view alone
    # Workers that said they are leaving (a Spot interruption; endpoint/departures.py), from either endpoint.
    leaving: dict[str, Leaving] = field(default_factory=dict)


@dataclass(frozen=True)
class Leaving:
    reason: str
    left: bool  # it gave back or finished its jobs and exited
    seconds_left: float  # until its instance is taken


def leaving_of(answers: list[dict]) -> dict[str, Leaving]:
    """What the endpoints heard of workers leaving; a worker that left at either one has left."""
    found: dict[str, Leaving] = {}
    for stats in answers:
        for worker_id, said in stats.get("leaving", {}).items():
            earlier = found.get(worker_id)
            found[worker_id] = Leaving(said["reason"], said["left"] or bool(earlier and earlier.left),
                                       min(said["seconds_left"], earlier.seconds_left if earlier else float("inf")))
    return found


@dataclass(frozen=True)
class Fleet:
    """The cluster's workers after reconcile, and those of them in doubt (not counted as capacity)."""

    machines: list[Machine]
    in_doubt: frozenset[str] = frozenset()


# What reconcile does with a worker. GONE: it is leaving (a Spot interruption), so it counts neither
# as capacity nor against the cap, and is left to finish what it can before its instance is taken.
KEEP, PROVISION, TERMINATE, PROBE, GONE = "keep", "provision", "terminate", "probe", "gone"


def host_answers(machine: Machine, timeout: float = 3.0) -> bool:
    """Whether the worker's host accepts a connection on its SSH port from here. A local worker
    (no address) runs on this machine."""
    if not machine.address:
        return True
    try:
        with socket.create_connection((machine.address, 22), timeout=timeout):
            return True
    except OSError:
        return False


class Scaler:
    def __init__(self, args: argparse.Namespace, provider: Provider) -> None:
        self.args = args
        self.provider = provider
        self.policy = make_policy(args)
        self.breaker = Breaker(args.breaker_threshold, args.breaker_cooldown)
        self.key = scaler_key(cluster_secret(args))  # for the endpoints' /stats details and this run's record
        ca_certificate(args)  # a CA file that cannot be read is refused before the run does anything
        self.record = RunRecord(args.url, self.key, args.node_id, self.breaker, args.tls_ca)
        # What this run knows runs, for the report when it is interrupted or fails.
        self.known: list[Machine] = []
        self.listed: list[Machine] = []  # what the provider listed at the start of this run
        self.unprovisioned: dict[str, Machine] = {}
        self.launch_under_way = False

    def run_once(self) -> Decision:
        args = self.args
        window = args.partition_deadline + 60
        own_stats = fetch_stats(args.url, self.key, window, ca_file=args.tls_ca)
        peer_stats = fetch_stats(args.peer, self.key, window, ca_file=args.tls_ca) if args.peer else None
        self.record = RunRecord(args.url, self.key, args.node_id, self.breaker, args.tls_ca)
        self.known = self.listed = []  # until the listing: a run that fails before it reports nothing
        self.known = self.provider.list()
        self.listed = list(self.known)
        fleet = self.reconcile(self.known, self._hearing(own_stats, peer_stats))
        self.known = fleet.machines
        if own_stats is None:
            raise EndpointUnreachable(f"this endpoint ({args.url}) does not answer /stats, so its queue and the "
                                      f"circuit breaker are unknown: reconciled only, launched nothing")
        policy = replace(self.policy, slots_per_worker=self.slots_per_worker(fleet.machines))
        decision = decide(cluster_view(own_stats, peer_stats, fleet, args.node_id), policy)
        self.record_decision(decision, ScalerState.from_stats(own_stats), fleet)
        if self.record.fields["allowed"]:
            self.launch(self.record.fields["allowed"])
        self.record.flush()  # not after Ctrl-C: a stop does not wait for the endpoint
        return decision

    def report_fleet(self) -> None:
        """For the cost in /stats: what ran at the start of this run, and what it launched (also after
        a run that failed midway; never after a stop, which does not wait for the endpoint). To both
        endpoints: a worker that lived between two runs of one scaler is still in the other's listing."""
        seen = {machine.machine_id: machine for machine in self.listed + self.known}
        if not seen:
            return
        for url in [self.args.url] + ([self.args.peer] if self.args.peer else []):
            report_fleet(url, self.key, list(seen.values()), self.args.provider, self.args.tls_ca)

    def record_decision(self, decision: Decision, state: ScalerState, fleet: Fleet) -> None:
        """Limit the decision by the circuit breaker, log it and post it to the endpoint."""
        allowance, breaker, breaker_status = self.breaker.allowance(state)
        summary = decision.reason
        if allowance is not None:
            summary += f" [circuit breaker {breaker_status}]"
            log.warning("circuit breaker %s; last error: %s", breaker_status, state.last_error)
        log.info("decision: %s", summary)
        ready = sum(machine.ready for machine in fleet.machines)
        self.record.decided(summary, needed=decision.needed, decided=decision.launch,
                            allowed=decision.launch if allowance is None else min(decision.launch, allowance),
                            ready=ready, booting=len(fleet.machines) - ready, breaker=breaker)

    def slots_per_worker(self, machines: list[Machine]) -> float:
        """The jobs a worker runs at once, from the fleet's instance types (cron/instance_types.py), or on
        an empty fleet what a worker of the first type brings; off EC2, --slots-per-worker."""
        if self.args.provider != "ec2":
            return self.args.slots_per_worker
        types = [machine.instance_type for machine in machines] or self.args.instance_types[:1]
        return mean_slots(types, self.args.worker_processes, self.args.slots_per_worker)

    def _hearing(self, own: dict | None, peer_stats: dict | None) -> Hearing | None:
        """None unless this endpoint answered: without its view nothing is judged silent."""
        if own is None or "workers" not in own:
            return None
        answers = [own] + ([peer_stats] if peer_stats and "workers" in peer_stats else [])
        heard: dict[str, float] = {}
        for stats in answers:
            for worker in stats["workers"]:
                ago = worker["last_seen_s_ago"]
                heard[worker["id"]] = min(ago, heard.get(worker["id"], ago))
        return Hearing(heard, from_both=not self.args.peer or len(answers) == 2, leaving=leaving_of(answers))

    def verdict(self, machine: Machine, now: float, hearing: Hearing | None) -> tuple[str, str]:
        """What to do with one worker, and why.

        A worker that said it is leaving (its Spot instance is being taken) is GONE: neither capacity
        nor counted against the cap, so that a replacement is launched now; once it left (or its time
        is up) its instance is terminated. A ready worker that no endpoint heard from for
        --silence-deadline is dead or hung. While the
        peer does not answer, only this endpoint's view is there, and a live worker may be serving
        the peer alone (cut off from this host, not from the peer). Its host is asked then: if it
        answers here, so would its worker -- a worker that can reach this endpoint and says nothing
        is dead or hung (PROBE, then terminate). If it does not answer either, it is dead or on the
        peer's side of a partition: kept, but not counted as capacity for this endpoint's queue,
        which it does not serve either way, and terminated after --partition-deadline.
        """
        args = self.args
        age = now - machine.launched_at
        if not machine.ready:
            if age > args.ready_deadline:
                return TERMINATE, f"not ready {age:.0f}s after launch"
            return (PROVISION, "") if machine.owner == args.node_id else (KEEP, "")
        if hearing is None:
            return KEEP, ""
        # Only a Spot instance is taken back: any worker may say that it is leaving (they share the
        # worker key), but none can so have an On-Demand one terminated.
        leaving = hearing.leaving.get(machine.machine_id) if machine.market == "spot" else None
        if leaving is not None:
            if leaving.left or leaving.seconds_left <= 0:
                return TERMINATE, f"{leaving.reason}: its worker gave back or finished its jobs and left"
            return GONE, ""
        silent = min(age, hearing.seconds_since.get(machine.machine_id, age))
        if silent <= args.silence_deadline:
            return KEEP, ""
        if hearing.from_both:
            return TERMINATE, f"neither endpoint heard from it for over {args.silence_deadline:.0f}s"
        if silent > args.partition_deadline:
            return TERMINATE, (f"this endpoint has not heard from it for over {args.partition_deadline:.0f}s "
                               f"(--partition-deadline), nor its host from here, and the peer does not answer")
        return PROBE, f"this endpoint has not heard from it for {silent:.0f}s and the peer does not answer"

    def reconcile(self, machines: list[Machine], hearing: Hearing | None) -> Fleet:
        now = time.time()
        verdicts = {machine.machine_id: self.verdict(machine, now, hearing) for machine in machines}
        probed = [machine for machine in machines if verdicts[machine.machine_id][0] == PROBE]
        in_doubt = set()
        for machine, answers in zip(probed, parallel(host_answers, probed), strict=True):
            reason = verdicts[machine.machine_id][1]
            if answers:
                verdicts[machine.machine_id] = TERMINATE, f"{reason}, although its host answers here: dead or hung"
            else:
                in_doubt.add(machine.machine_id)
                log.warning("%s: %s, nor its host from here; not counted as capacity, terminated after "
                            "%.0fs (--partition-deadline) unless heard from", machine.machine_id, reason,
                            self.args.partition_deadline)
        kept = [machine for machine in machines if verdicts[machine.machine_id][0] in (KEEP, PROBE)]
        gone = [machine.machine_id for machine in machines if verdicts[machine.machine_id][0] == GONE]
        if gone:
            log.info("leaving (Spot interruption), counted as gone: %s", ", ".join(gone))
        for machine in machines:
            action, reason = verdicts[machine.machine_id]
            if action == TERMINATE and not self._terminate(machine, reason):
                kept.append(machine)  # still running as far as we know: it keeps counting against the cap
        unprovisioned = [machine for machine in machines if verdicts[machine.machine_id][0] == PROVISION]
        if unprovisioned:
            log.info("resuming provisioning of %s", ", ".join(machine.machine_id for machine in unprovisioned))
            kept += self.provision_all(unprovisioned)
        return Fleet(kept, frozenset(in_doubt))

    def _terminate(self, machine: Machine, reason: str) -> bool:
        try:
            self.provider.terminate([machine], reason)
        except ProviderError as exc:
            log.error("reconcile: %s", exc)
            return False
        self.record.terminated()
        return True

    def launch(self, count: int) -> None:
        # One intent per launch decision: EC2 turns it into the ClientToken, so a request retried
        # after a timeout returns the instances it already started instead of starting more. A run
        # killed midway needs no token: its instances carry our tags, and the next run counts them.
        intent = f"{self.args.cluster}-{self.args.node_id}-{secrets.token_hex(6)}"
        self.launch_under_way = True
        try:
            machines = self.provider.launch(count, self.args.node_id, intent)
        except ProviderError as exc:
            log.error("launch failed: %s", exc)
            self.record.failure("launch_failure", f"launch: {exc}")
            return
        finally:
            self.launch_under_way = False
        self.record.launched(len(machines))
        self.known += machines
        self.provision_all(machines)

    def provision_all(self, machines: list[Machine]) -> list[Machine]:
        """Provision in parallel; a machine that fails is terminated and counts against the breaker."""
        self.unprovisioned.update({machine.machine_id: machine for machine in machines})

        def attempt(machine: Machine) -> Machine | None:
            try:
                ready = self.provider.provision(machine)
            except Exception as exc:  # noqa: BLE001 -- any failure: terminate it, count it, go on
                log.error("provisioning %s failed: %s", machine.machine_id, exc)
                self.record.failure("provisioning_failure", f"provisioning {machine.machine_id}: {exc}")
                if not self._terminate(machine, "provisioning failed"):
                    return machine  # not terminated: it still counts against the cap
                self._forget(machine)
                return None
            self.record.success()
            self.unprovisioned.pop(machine.machine_id, None)
            return ready

        return [machine for machine in parallel(attempt, machines, self.args.provision_parallel)
                if machine is not None]

    def _forget(self, machine: Machine) -> None:
        self.unprovisioned.pop(machine.machine_id, None)
        self.known = [known for known in self.known if known.machine_id != machine.machine_id]

    def left_running(self) -> str:
        """What this scaler leaves running, for a run that is interrupted or fails."""
        parts = []
        if self.launch_under_way:
            parts.append("a launch request was under way: what it started carries the cluster's tags, and the next "
                         "run finds it")
        if self.unprovisioned:
            parts.append(f"launched by this run and not provisioned: {', '.join(sorted(self.unprovisioned))} (running "
                         f"and billing; the next run provisions them, or terminates them "
                         f"{self.args.ready_deadline:.0f}s after launch)")
        ids = sorted({machine.machine_id for machine in self.known})
        parts.append(f"{len(ids)} worker(s) of the cluster known to run: {', '.join(ids) or 'none'}")
        return "; ".join(parts) + (". `python -m cron.scale --terminate-all` with this run's settings terminates "
                                   "every worker of the cluster")


def run_loop(args: argparse.Namespace, scaler: Scaler) -> int:
    lock_path = Path(args.state_dir) / f"scale-{args.node_id}.lock"
    while True:
        with exclusive_run(lock_path) as holding:
            if not holding:
                log.info("another scaling run holds %s; skipping this one", lock_path)
            elif not run_guarded(scaler) and not args.every:
                return 1
        if not args.every:
            return 0
        time.sleep(args.every)


def run_guarded(scaler: Scaler) -> bool:
    """One run; a failure is logged with what keeps running, and must not end an --every loop."""
    succeeded = False
    try:
        scaler.run_once()
        succeeded = True
    except (ProviderError, EndpointUnreachable, *API_ERRORS) as exc:
        log.error("scaling run failed: %s. %s", exc, scaler.left_running())
    except Exception:  # noqa: BLE001 -- a bug: its traceback is what helps
        log.exception("scaling run failed. %s", scaler.left_running())
    scaler.report_fleet()
    return succeeded


def terminate_all(provider: Provider) -> int:
    machines = provider.list()
    provider.terminate(machines, "terminate-all requested")
    log.info("terminated %d worker(s)", len(machines))
    return 0


def run(args: argparse.Namespace, scaler_ref: list[Scaler]) -> int:
    if args.reset_breaker:
        try:
            reset_breaker(args.url, scaler_key(cluster_secret(args)), args.tls_ca)
        except EndpointUnreachable as exc:
            log.error("the circuit breaker was not reset: %s (the endpoint keeps the breaker: start it, or pass "
                      "its --url)", exc)
            return 1
        log.info("circuit breaker reset")
        return 0
    provider = make_provider(args)
    if args.terminate_all:
        return terminate_all(provider)
    scaler_ref.append(Scaler(args, provider))
    return run_loop(args, scaler_ref[0])


def main(argv: list[str] | None = None) -> int:
    os.umask(0o077)  # its lock, host keys, worker records and logs: owner-only
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s scaler: %(message)s")
    stop_on_signals()
    scaler: list[Scaler] = []  # once there is one: what it knows runs, for the reports
    try:
        return run(args, scaler)
    except (SettingsError, ClusterUsageError) as exc:
        log.error("%s", exc)
        return 2
    except ProviderError as exc:  # listing or terminating for --terminate-all
        log.error("%s", exc)
        return 1
    except Interrupted as exc:
        if scaler:
            left = scaler[0].left_running()
        elif args.terminate_all:
            left = "--terminate-all may not have terminated every worker: run it again"
        else:
            left = "this run launched nothing"
        log.warning("stopped by %s: %s", exc.name, left)
        exit_now(exc.exit_status)
        return exc.exit_status


if __name__ == "__main__":
    sys.exit(main())
