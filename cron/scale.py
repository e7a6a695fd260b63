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

Every setting is checked before the run does anything (SETTINGS; `./deploy.sh aws` takes the
knobs in HOST_KNOBS from the same table). Ctrl-C or SIGTERM ends a run at once, and a failed
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
from dataclasses import dataclass
from pathlib import Path

from cron.cluster import (
    API_ERRORS,
    CLUSTER_SETTING,
    REGION_SETTING,
    ClusterUsageError,
    check_state_cluster,
    read_state,
    resolve_region,
)
from cron.interrupts import Interrupted, exit_now, parallel, stop_on_signals
from cron.policy import ClusterView, Decision, EndpointLoad, Policy, decide
from cron.providers import Node, Provider, ProviderError
from cron.providers.local import LocalProvider
from cron.provision import HostKeyPins, WorkerInstall
from cron.settings import Setting, add_settings, check_settings, choice, seconds, text, whole
from cron.state import Breaker, EndpointUnreachable, RunRecord, ScalerState, reset_breaker
from endpoint.secret import read_secret, scaler_key, worker_key

log = logging.getLogger("cron.scale")

# An endpoint lists the workers it heard from within at most a day (GET /stats?workers_within=).
LONGEST_DEADLINE = 86_400 - 120

# name -> setting; `python -m cron.scale --help` shows them with their defaults.
SETTINGS: dict[str, Setting] = {
    # this endpoint and its peer
    "node_id": Setting("DW_NODE_ID", "a", text, "this endpoint's id"),
    "endpoint_index": Setting("DW_ENDPOINT_INDEX", "0", whole(0, 1),
                              "which share of --max-workers (and of an ssh host list) is this scaler's: 0 or 1"),
    "url": Setting("DW_SELF_URL", "http://127.0.0.1:5000", text,
                   "this endpoint's URL: its /stats, and where the scaler posts its runs"),
    "peer": Setting("DW_PEER_URL", "", text, "the other endpoint's URL, for its /stats"),
    "state_dir": Setting("DW_STATE_DIR", "var", text, "lock, host keys, local workers"),
    "secret_file": Setting("DW_SECRET_FILE", "", text,
                           "the cluster secret; workers get the worker key derived from it "
                           "(default <state-dir>/secret)"),
    # the policy
    "max_workers": Setting("DW_MAX_WORKERS", "4", whole(0), "cluster-wide maximum, across both endpoints' scalers"),
    "scale_after": Setting("DW_SCALE_AFTER", "30", seconds(0, inclusive=True),
                           "seconds the oldest pending item waits before the backlog counts (not on an empty cluster)"),
    "target_drain": Setting("DW_TARGET_DRAIN", "30", seconds(0), "seconds to drain the backlog in"),
    "max_launch_per_tick": Setting("DW_MAX_LAUNCH_PER_TICK", "4", whole(0), "launches per run; 0: reconcile only"),
    "slots_per_worker": Setting("DW_SLOTS_PER_WORKER", "1", whole(1), "jobs one worker runs at once (its vCPUs)"),
    "default_job_duration": Setting("DW_DEFAULT_JOB_DURATION", "1", seconds(0),
                                    "seconds a job is assumed to take until jobs were measured"),
    # reconcile and the circuit breaker
    "ready_deadline": Setting("DW_READY_DEADLINE", "300", seconds(0),
                              "terminate a worker not ready this many seconds after launch"),
    "silence_deadline": Setting("DW_SILENCE_DEADLINE", "180", seconds(0, maximum=LONGEST_DEADLINE),
                                "terminate a ready worker neither endpoint heard from for this many seconds"),
    "partition_deadline": Setting("DW_PARTITION_DEADLINE", "900", seconds(0, maximum=LONGEST_DEADLINE),
                                  "while the peer does not answer: terminate a ready worker this endpoint did "
                                  "not hear from for this many seconds, and whose host does not answer either"),
    "breaker_threshold": Setting("DW_BREAKER_THRESHOLD", "3", whole(1),
                                 "consecutive launch/provisioning failures that stop launching"),
    "breaker_cooldown": Setting("DW_BREAKER_COOLDOWN", "600", seconds(0, inclusive=True),
                                "seconds between trial launches while the breaker is open"),
    # the workers
    "provider": Setting("DW_PROVIDER", "local", choice("local", "ssh", "ec2"), "where workers run: local, ssh or ec2"),
    "idle_timeout": Setting("DW_IDLE_TIMEOUT", "60", seconds(0), "seconds a worker waits for work before it exits"),
    "worker_processes": Setting("DW_WORKER_PROCESSES", "0", whole(0),
                                "jobs a worker runs at once; 0: one per core (local provider: --slots-per-worker)"),
    "worker_service": Setting("DW_WORKER_SERVICE", "systemd", choice("systemd", "process"),
                              "how ssh/ec2 workers run: a systemd unit, or a detached process (hosts without systemd)"),
    "worker_exit_command": Setting("DW_WORKER_EXIT_COMMAND", "", text,
                                   "with --worker-service process: run after an idle exit"),
    "ssh_user": Setting("DW_SSH_USER", "ec2-user", text, "the login on the hosts reached over SSH"),
    "ssh_key": Setting("DW_SSH_KEY", "", text, "ssh and ec2: private key for SSH to workers (ec2: default setup's)"),
    "remote_python": Setting("DW_REMOTE_PYTHON", "python3", text, "the Python (3.9 or newer) that runs the workers"),
    "ssh_hosts": Setting("DW_SSH_HOSTS", "", text, "ssh: comma-separated worker hosts"),
    "cluster": CLUSTER_SETTING,
    "region": REGION_SETTING,
    "aws_state": Setting("DW_AWS_STATE", "", text, "ec2 (required there): the state file of ./setup.sh aws"),
    "instance_type": Setting("DW_INSTANCE_TYPE", "c7i.large", text, "ec2: the workers' instance type"),
    "ami": Setting("DW_AMI", "", text, "ec2: image id (default: the latest Amazon Linux 2023)"),
    "test_ssh_addresses": Setting("DW_TEST_SSH_ADDRESSES", "", text,
                                  "TEST ONLY: SSH addresses given to new instances instead of their IPs"),
    "log_level": Setting("DW_LOG_LEVEL", "INFO", choice("DEBUG", "INFO", "WARNING", "ERROR", fold=str.upper),
                         "DEBUG, INFO, WARNING or ERROR"),
    "every": Setting("", "0", seconds(0, inclusive=True), "repeat every S seconds instead of running once (0: once)"),
}
# The knobs `./deploy.sh aws` takes with these very entries and hands to the endpoint hosts' scalers.
HOST_KNOBS = ("max_workers", "scale_after", "target_drain", "max_launch_per_tick", "slots_per_worker",
              "default_job_duration", "ready_deadline", "silence_deadline", "partition_deadline", "breaker_threshold",
              "breaker_cooldown", "idle_timeout", "worker_processes", "worker_exit_command", "instance_type")


class SettingsError(Exception):
    """A file the settings name is missing or unusable; the scaler did nothing."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m cron.scale", description=__doc__.splitlines()[0])
    add_settings(parser, SETTINGS)
    parser.add_argument("--endpoint", action="append", dest="endpoints", metavar="URL",
                        help="an endpoint's URL as workers reach it, once per endpoint [DW_ENDPOINTS, comma-separated]")
    parser.add_argument("--terminate-all", action="store_true", help="terminate every worker of the cluster, then exit")
    parser.add_argument("--reset-breaker", action="store_true", help="close the circuit breaker, then exit")
    args = parser.parse_args(argv)
    check_settings(parser, SETTINGS, args)
    if args.partition_deadline < args.silence_deadline:
        parser.error(f"--partition-deadline ({args.partition_deadline:g}) must be at least --silence-deadline "
                     f"({args.silence_deadline:g})")
    if args.provider == "ec2" and not args.aws_state:
        parser.error("--provider ec2 needs --aws-state (DW_AWS_STATE): the state file of ./setup.sh aws")
    if not args.endpoints:
        args.endpoints = [url.strip() for url in os.environ.get("DW_ENDPOINTS", "").split(",") if url.strip()]
    args.secret_file = args.secret_file or f"{args.state_dir}/secret"
    return args


def cluster_secret(args: argparse.Namespace) -> str:
    try:
        return read_secret(args.secret_file)
    except OSError as exc:
        raise SettingsError(f"cannot read the cluster secret from {args.secret_file} ({exc.strerror}): pass "
                            f"--secret-file (DW_SECRET_FILE), the file ./deploy.sh created") from exc


def worker_install(args: argparse.Namespace) -> WorkerInstall:
    key = worker_key(cluster_secret(args))
    return WorkerInstall(endpoints=tuple(args.endpoints), secret=key, worker_id="",
                         idle_timeout=args.idle_timeout, processes=args.worker_processes,
                         service=args.worker_service, exit_command=args.worker_exit_command,
                         python=args.remote_python)


def make_provider(args: argparse.Namespace) -> Provider:
    state_dir = Path(args.state_dir)
    if args.provider == "local":
        return LocalProvider(state_dir / "workers", args.endpoints, lambda: worker_key(cluster_secret(args)),
                             processes_per_worker=args.slots_per_worker, idle_timeout=args.idle_timeout,
                             log_dir=state_dir / "log")
    pins = HostKeyPins(state_dir / "known_hosts.json")
    if args.provider == "ssh":
        from cron.providers.ssh import SshProvider

        hosts = [host.strip() for host in args.ssh_hosts.split(",") if host.strip()]
        return SshProvider(hosts, args.endpoint_index, args.node_id, args.ssh_user, Path(args.ssh_key),
                           worker_install(args), pins)
    return ec2_provider(args, pins)


def ec2_provider(args: argparse.Namespace, pins: HostKeyPins) -> Provider:
    """Everything about the cluster comes from setup's state file, checked before any API call."""
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
        cluster=args.cluster, region=region.name, key_name=setup["key_name"],
        key_path=Path(args.ssh_key or setup["key_path"]), security_group_id=setup["security_group_id"],
        subnet_ids=tuple(setup.get("subnet_ids", ())), instance_type=args.instance_type, ami=args.ami,
        ssh_user=args.ssh_user, ssh_timeout=args.ready_deadline,
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


def fetch_stats(url: str, key: str, workers_within: float = 0, timeout: float = 3.0) -> dict | None:
    """An endpoint's /stats with the details (the workers it heard from, the breaker's last error) that the
    scaler key opens."""
    query = f"?workers_within={max(1, int(workers_within))}" if workers_within else ""
    request = urllib.request.Request(f"{url.rstrip('/')}/stats{query}", headers={"Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
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
    nodes = fleet.nodes
    return ClusterView(
        endpoints=(load_of(own_stats),) + ((load_of(peer_stats),) if peer_stats else ()),
        peer_reachable=peer_stats is not None,
        workers_ready=sum(node.ready and node.node_id not in fleet.in_doubt for node in nodes),
        workers_booting=sum(not node.ready for node in nodes),
        own_workers=sum(node.owner == node_id for node in nodes),
        peer_workers=sum(node.owner != node_id for node in nodes),
    )


@dataclass(frozen=True)
class Hearing:
    """Seconds since an endpoint last heard from each worker, from the endpoints that answered."""

    seconds_since: dict[str, float]
    from_both: bool  # False: the peer did not answer; this is this endpoint's view alone


@dataclass(frozen=True)
class Fleet:
    """The cluster's workers after reconcile, and those of them in doubt (not counted as capacity)."""

    nodes: list[Node]
    in_doubt: frozenset[str] = frozenset()


# What reconcile does with a worker.
KEEP, PROVISION, TERMINATE, PROBE = "keep", "provision", "terminate", "probe"


def host_answers(node: Node, timeout: float = 3.0) -> bool:
    """Whether the worker's host accepts a connection on its SSH port from here. A local worker
    (no address) runs on this machine."""
    if not node.address:
        return True
    try:
        with socket.create_connection((node.address, 22), timeout=timeout):
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
        self.record = RunRecord(args.url, self.key, args.node_id, self.breaker)
        # What this run knows runs, for the report when it is interrupted or fails.
        self.known: list[Node] = []
        self.unprovisioned: dict[str, Node] = {}
        self.launch_under_way = False

    def run_once(self) -> Decision:
        args = self.args
        window = args.partition_deadline + 60
        own_stats = fetch_stats(args.url, self.key, window)
        peer_stats = fetch_stats(args.peer, self.key, window) if args.peer else None
        self.record = RunRecord(args.url, self.key, args.node_id, self.breaker)
        try:
            self.known = self.provider.list()
            fleet = self.reconcile(self.known, self._hearing(own_stats, peer_stats))
            self.known = fleet.nodes
            if own_stats is None:
                raise EndpointUnreachable(f"this endpoint ({args.url}) does not answer /stats, so its queue and "
                                          f"the circuit breaker are unknown: reconciled only, launched nothing")
            decision = decide(cluster_view(own_stats, peer_stats, fleet, args.node_id), self.policy)
            self.record_decision(decision, ScalerState.from_stats(own_stats), fleet)
            if self.record.fields["allowed"]:
                self.launch(self.record.fields["allowed"])
        finally:
            self.record.flush()
        return decision

    def record_decision(self, decision: Decision, state: ScalerState, fleet: Fleet) -> None:
        """Limit the decision by the circuit breaker, log it and post it to the endpoint."""
        allowance, breaker, breaker_status = self.breaker.allowance(state)
        summary = decision.reason
        if allowance is not None:
            summary += f" [circuit breaker {breaker_status}]"
            log.warning("circuit breaker %s; last error: %s", breaker_status, state.last_error)
        log.info("decision: %s", summary)
        ready = sum(node.ready for node in fleet.nodes)
        self.record.decided(summary, needed=decision.needed, decided=decision.launch,
                            allowed=decision.launch if allowance is None else min(decision.launch, allowance),
                            ready=ready, booting=len(fleet.nodes) - ready, breaker=breaker)

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
        return Hearing(heard, from_both=not self.args.peer or len(answers) == 2)

    def verdict(self, node: Node, now: float, hearing: Hearing | None) -> tuple[str, str]:
        """What to do with one worker, and why.

        A ready worker that no endpoint heard from for --silence-deadline is dead or hung. While the
        peer does not answer, only this endpoint's view is there, and a live worker may be serving
        the peer alone (cut off from this host, not from the peer). Its host is asked then: if it
        answers here, so would its worker -- a worker that can reach this endpoint and says nothing
        is dead or hung (PROBE, then terminate). If it does not answer either, it is dead or on the
        peer's side of a partition: kept, but not counted as capacity for this endpoint's queue,
        which it does not serve either way, and terminated after --partition-deadline.
        """
        args = self.args
        age = now - node.launched_at
        if not node.ready:
            if age > args.ready_deadline:
                return TERMINATE, f"not ready {age:.0f}s after launch"
            return (PROVISION, "") if node.owner == args.node_id else (KEEP, "")
        if hearing is None:
            return KEEP, ""
        silent = min(age, hearing.seconds_since.get(node.node_id, age))
        if silent <= args.silence_deadline:
            return KEEP, ""
        if hearing.from_both:
            return TERMINATE, f"neither endpoint heard from it for over {args.silence_deadline:.0f}s"
        if silent > args.partition_deadline:
            return TERMINATE, (f"this endpoint has not heard from it for over {args.partition_deadline:.0f}s "
                               f"(--partition-deadline), nor its host from here, and the peer does not answer")
        return PROBE, f"this endpoint has not heard from it for {silent:.0f}s and the peer does not answer"

    def reconcile(self, nodes: list[Node], hearing: Hearing | None) -> Fleet:
        now = time.time()
        verdicts = {node.node_id: self.verdict(node, now, hearing) for node in nodes}
        probed = [node for node in nodes if verdicts[node.node_id][0] == PROBE]
        in_doubt = set()
        for node, answers in zip(probed, parallel(host_answers, probed), strict=True):
            reason = verdicts[node.node_id][1]
            if answers:
                verdicts[node.node_id] = TERMINATE, f"{reason}, although its host answers here: dead or hung"
            else:
                in_doubt.add(node.node_id)
                log.warning("%s: %s, nor its host from here; not counted as capacity, terminated after "
                            "%.0fs (--partition-deadline) unless heard from", node.node_id, reason,
                            self.args.partition_deadline)
        kept = [node for node in nodes if verdicts[node.node_id][0] in (KEEP, PROBE)]
        for node in nodes:
            action, reason = verdicts[node.node_id]
            if action == TERMINATE and not self._terminate(node, reason):
                kept.append(node)  # still running as far as we know: it keeps counting against the cap
        unprovisioned = [node for node in nodes if verdicts[node.node_id][0] == PROVISION]
        if unprovisioned:
            log.info("resuming provisioning of %s", ", ".join(node.node_id for node in unprovisioned))
            kept += self.provision_all(unprovisioned)
        return Fleet(kept, frozenset(in_doubt))

    def _terminate(self, node: Node, reason: str) -> bool:
        try:
            self.provider.terminate([node], reason)
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
            nodes = self.provider.launch(count, self.args.node_id, intent)
        except ProviderError as exc:
            log.error("launch failed: %s", exc)
            self.record.failure("launch_failure", f"launch: {exc}")
            return
        finally:
            self.launch_under_way = False
        self.record.launched(len(nodes))
        self.known += nodes
        self.provision_all(nodes)

    def provision_all(self, nodes: list[Node]) -> list[Node]:
        """Provision in parallel; a node that fails is terminated and counts against the breaker."""
        self.unprovisioned.update({node.node_id: node for node in nodes})

        def attempt(node: Node) -> Node | None:
            try:
                ready = self.provider.provision(node)
            except Exception as exc:  # noqa: BLE001 -- any failure: terminate it, count it, go on
                log.error("provisioning %s failed: %s", node.node_id, exc)
                self.record.failure("provisioning_failure", f"provisioning {node.node_id}: {exc}")
                if not self._terminate(node, "provisioning failed"):
                    return node  # not terminated: it still counts against the cap
                self._forget(node)
                return None
            self.record.success()
            self.unprovisioned.pop(node.node_id, None)
            return ready

        return [node for node in parallel(attempt, nodes) if node is not None]

    def _forget(self, node: Node) -> None:
        self.unprovisioned.pop(node.node_id, None)
        self.known = [known for known in self.known if known.node_id != node.node_id]

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
        ids = sorted({node.node_id for node in self.known})
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
    try:
        scaler.run_once()
    except (ProviderError, EndpointUnreachable, *API_ERRORS) as exc:
        log.error("scaling run failed: %s. %s", exc, scaler.left_running())
        return False
    except Exception:  # noqa: BLE001 -- a bug: its traceback is what helps
        log.exception("scaling run failed. %s", scaler.left_running())
        return False
    return True


def terminate_all(provider: Provider) -> int:
    nodes = provider.list()
    provider.terminate(nodes, "terminate-all requested")
    log.info("terminated %d worker(s)", len(nodes))
    return 0


def run(args: argparse.Namespace, scaler_ref: list[Scaler]) -> int:
    if args.reset_breaker:
        try:
            reset_breaker(args.url, scaler_key(cluster_secret(args)))
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
