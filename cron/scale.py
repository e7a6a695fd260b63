"""One scaling run for this endpoint's host: `python -m cron.scale`.

Installed as a crontab entry every minute on each endpoint host; `--every S` repeats the run
in-process (what `./deploy.sh local` uses). A run holds an exclusive lock, so two runs on
one host never overlap. Each run:

1. lists the cluster's workers (whoever launched them);
2. reconciles: terminates workers that did not become ready within --ready-deadline, and
   ready workers that neither endpoint has heard from for --silence-deadline; resumes the
   provisioning of its own workers that a killed earlier run left unprovisioned;
3. reads this endpoint's queue from its SQLite file and the peer's from its /stats;
4. asks the policy (cron/policy.py) how many workers to launch, limited by the circuit
   breaker, then launches and provisions them; a worker that fails provisioning is
   terminated at once;
5. records the decision and the breaker in the endpoint's SQLite file, for GET /stats.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import math
import os
import secrets
import signal
import sys
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from cron.policy import ClusterView, Decision, EndpointLoad, Policy, decide
from cron.providers import Node, Provider, ProviderError
from cron.providers.local import LocalProvider
from cron.provision import HostKeyPins, WorkerInstall
from cron.state import Breaker, StateStore
from endpoint.secret import peer_key, read_secret, worker_key
from endpoint.store import open_read_only, read_stats

log = logging.getLogger("cron.scale")


# The numeric settings' lower bounds: (minimum, whether the minimum itself is allowed).
BOUNDS: dict[str, tuple[float, bool]] = {
    "max_workers": (0, True), "scale_after": (0, True), "target_drain": (0, False), "max_launch_per_tick": (0, True),
    "slots_per_worker": (1, True), "default_job_duration": (0, False), "ready_deadline": (0, False),
    "silence_deadline": (0, False), "breaker_threshold": (1, True), "breaker_cooldown": (0, True),
    "idle_timeout": (0, False), "worker_processes": (0, True), "every": (0, True),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ.get
    parser = argparse.ArgumentParser(prog="python -m cron.scale", description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--node-id", default=env("DW_NODE_ID", "a"), help="this endpoint's id [DW_NODE_ID]")
    add("--endpoint-index", type=int, default=env("DW_ENDPOINT_INDEX", "0"), choices=[0, 1],
        help="which share of --max-workers (and of an ssh host list) is this scaler's [DW_ENDPOINT_INDEX]")
    add("--db", default=env("DW_DB", ""),
        help="this endpoint's SQLite file [DW_DB] (default <state-dir>/<node>.sqlite3)")
    add("--url", default=env("DW_SELF_URL", "http://127.0.0.1:5000"),
        help="this endpoint's URL, for the workers it has seen [DW_SELF_URL]")
    add("--peer", default=env("DW_PEER_URL", ""), help="the other endpoint's URL, for its /stats [DW_PEER_URL]")
    add("--endpoint", action="append", dest="endpoints",
        help="endpoint URL as workers reach it, once per endpoint [DW_ENDPOINTS, comma-separated]")
    add("--state-dir", default=env("DW_STATE_DIR", "var"), help="lock, host keys, local workers [DW_STATE_DIR]")
    add("--secret-file", default=env("DW_SECRET_FILE", ""),
        help="the cluster secret; workers get the worker key derived from it [DW_SECRET_FILE] "
             "(default <state-dir>/secret)")
    # policy
    add("--max-workers", type=int, default=env("DW_MAX_WORKERS", "4"),
        help="cluster-wide maximum, across both endpoints' scalers [DW_MAX_WORKERS]")
    add("--scale-after", type=float, default=env("DW_SCALE_AFTER", "30"),
        help="launch once the oldest pending item has waited this many seconds [DW_SCALE_AFTER]")
    add("--target-drain", type=float, default=env("DW_TARGET_DRAIN", "30"),
        help="size the fleet to drain the backlog within this many seconds [DW_TARGET_DRAIN]")
    add("--max-launch-per-tick", type=int, default=env("DW_MAX_LAUNCH_PER_TICK", "4"), help="[DW_MAX_LAUNCH_PER_TICK]")
    add("--slots-per-worker", type=int, default=env("DW_SLOTS_PER_WORKER", "1"),
        help="jobs one worker runs at once, i.e. its cores [DW_SLOTS_PER_WORKER]")
    add("--default-job-duration", type=float, default=env("DW_DEFAULT_JOB_DURATION", "1"),
        help="assumed job duration until jobs have been measured, seconds [DW_DEFAULT_JOB_DURATION]")
    # reconcile and breaker
    add("--ready-deadline", type=float, default=env("DW_READY_DEADLINE", "300"),
        help="terminate a worker not ready this many seconds after launch [DW_READY_DEADLINE]")
    add("--silence-deadline", type=float, default=env("DW_SILENCE_DEADLINE", "180"),
        help="terminate a ready worker neither endpoint has heard from for this long [DW_SILENCE_DEADLINE]")
    add("--breaker-threshold", type=int, default=env("DW_BREAKER_THRESHOLD", "3"),
        help="consecutive launch/provisioning failures that stop launching [DW_BREAKER_THRESHOLD]")
    add("--breaker-cooldown", type=float, default=env("DW_BREAKER_COOLDOWN", "600"),
        help="seconds between trial launches while the breaker is open [DW_BREAKER_COOLDOWN]")
    # workers
    add("--provider", default=env("DW_PROVIDER", "local"), choices=["local", "ssh", "ec2"], help="[DW_PROVIDER]")
    add("--idle-timeout", type=float, default=env("DW_IDLE_TIMEOUT", "60"),
        help="workers exit after this long without work [DW_IDLE_TIMEOUT]")
    add("--worker-processes", type=int, default=env("DW_WORKER_PROCESSES", "0"),
        help="jobs a worker runs at once; 0: one per core (local provider: --slots-per-worker) [DW_WORKER_PROCESSES]")
    add("--worker-service", default=env("DW_WORKER_SERVICE", "systemd"), choices=["systemd", "process"],
        help="how ssh/ec2 workers run: a systemd unit, or a detached process for hosts without systemd "
             "[DW_WORKER_SERVICE]")
    add("--worker-exit-command", default=env("DW_WORKER_EXIT_COMMAND", ""),
        help="with --worker-service process: run after an idle exit [DW_WORKER_EXIT_COMMAND]")
    add("--ssh-user", default=env("DW_SSH_USER", "ec2-user"), help="[DW_SSH_USER]")
    add("--ssh-key", default=env("DW_SSH_KEY", ""), help="private key for SSH to workers [DW_SSH_KEY]")
    add("--remote-python", default=env("DW_REMOTE_PYTHON", "python3"), help="[DW_REMOTE_PYTHON]")
    add("--ssh-hosts", default=env("DW_SSH_HOSTS", ""), help="ssh provider: comma-separated hosts [DW_SSH_HOSTS]")
    add("--cluster", default=env("DW_CLUSTER", "dw"), help="ec2: the cluster tag [DW_CLUSTER]")
    add("--region", default=env("AWS_REGION", env("AWS_DEFAULT_REGION", "us-east-1")), help="[AWS_REGION]")
    add("--aws-state", default=env("DW_AWS_STATE", ""),
        help="ec2: state file of ./setup.sh aws (key pair, security group, subnets) [DW_AWS_STATE]")
    add("--instance-type", default=env("DW_INSTANCE_TYPE", "c7i.large"), help="[DW_INSTANCE_TYPE]")
    add("--ami", default=env("DW_AMI", ""), help="ec2: image id; default: latest Amazon Linux 2023 [DW_AMI]")
    add("--test-ssh-addresses", default=env("DW_TEST_SSH_ADDRESSES", ""),
        help="TEST ONLY: SSH addresses given to new instances instead of their IPs [DW_TEST_SSH_ADDRESSES]")
    # modes
    add("--every", type=float, default=0.0, help="repeat every S seconds instead of running once")
    add("--terminate-all", action="store_true", help="terminate every worker of the cluster, then exit")
    add("--reset-breaker", action="store_true", help="close the circuit breaker, then exit")
    add("--log-level", default=env("DW_LOG_LEVEL", "INFO"), help="[DW_LOG_LEVEL]")
    args = parser.parse_args(argv)
    for name, (minimum, inclusive) in BOUNDS.items():
        value = getattr(args, name)
        if not math.isfinite(value) or value < minimum or (value == minimum and not inclusive):
            parser.error(f"--{name.replace('_', '-')} must be {'at least' if inclusive else 'more than'} "
                         f"{minimum:g}, not {value}")
    if not args.endpoints:
        args.endpoints = [url.strip() for url in env("DW_ENDPOINTS", "").split(",") if url.strip()]
    args.db = args.db or f"{args.state_dir}/{args.node_id}.sqlite3"
    args.secret_file = args.secret_file or f"{args.state_dir}/secret"
    return args


def worker_install(args: argparse.Namespace) -> WorkerInstall:
    key = worker_key(read_secret(args.secret_file))
    return WorkerInstall(endpoints=tuple(args.endpoints), secret=key, worker_id="",
                         idle_timeout=args.idle_timeout, processes=args.worker_processes,
                         service=args.worker_service, exit_command=args.worker_exit_command,
                         python=args.remote_python)


def make_provider(args: argparse.Namespace) -> Provider:
    state_dir = Path(args.state_dir)
    if args.provider == "local":
        return LocalProvider(state_dir / "workers", args.endpoints, lambda: worker_key(read_secret(args.secret_file)),
                             processes_per_worker=args.slots_per_worker, idle_timeout=args.idle_timeout,
                             log_dir=state_dir / "log")
    pins = HostKeyPins(state_dir / "known_hosts.json")
    if args.provider == "ssh":
        from cron.providers.ssh import SshProvider

        hosts = [host.strip() for host in args.ssh_hosts.split(",") if host.strip()]
        return SshProvider(hosts, args.endpoint_index, args.node_id, args.ssh_user, Path(args.ssh_key),
                           worker_install(args), pins)
    from cron.providers.ec2 import Ec2Provider, Ec2Settings

    setup = json.loads(Path(args.aws_state).read_text()) if args.aws_state else {}
    test_addresses = [address.strip() for address in args.test_ssh_addresses.split(",") if address.strip()]
    settings = Ec2Settings(
        cluster=args.cluster, region=setup.get("region", args.region), key_name=setup.get("key_name", ""),
        key_path=Path(args.ssh_key or setup.get("key_path", "")),
        security_group_id=setup.get("security_group_id", ""), subnet_ids=tuple(setup.get("subnet_ids", ())),
        instance_type=args.instance_type, ami=args.ami, ssh_user=args.ssh_user, ssh_timeout=args.ready_deadline,
        test_addresses=tuple(test_addresses[args.endpoint_index::2]))
    return Ec2Provider(settings, worker_install(args), pins, args.node_id)


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
    """An endpoint's /stats with the details (the workers it heard from) that the peer key opens."""
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


class Scaler:
    def __init__(self, args: argparse.Namespace, provider: Provider) -> None:
        self.args = args
        self.provider = provider
        self.policy = make_policy(args)
        self.breaker = Breaker(args.breaker_threshold, args.breaker_cooldown)
        self.state = StateStore(args.db, args.node_id, self.breaker)
        self.endpoint_key = peer_key(read_secret(args.secret_file))  # for the endpoints' /stats details

    def run_once(self) -> Decision:
        args = self.args
        own_stats = self._own_queue()
        peer_stats = fetch_stats(args.peer, self.endpoint_key, args.silence_deadline + 60) if args.peer else None
        nodes = self.reconcile(self.provider.list(), self._workers_heard_from(peer_stats))
        view = ClusterView(
            endpoints=(load_of(own_stats),) + ((load_of(peer_stats),) if peer_stats else ()),
            peer_reachable=peer_stats is not None,
            workers_ready=sum(node.ready for node in nodes),
            workers_booting=sum(not node.ready for node in nodes),
            own_workers=sum(node.owner == args.node_id for node in nodes),
            peer_workers=sum(node.owner != args.node_id for node in nodes),
        )
        decision = decide(view, self.policy)
        state = self.state.load()
        allowance, breaker_status = self.breaker.allowance(state, time.time())
        launch = decision.launch if allowance is None else min(decision.launch, allowance)
        summary = decision.reason
        if allowance is not None:
            summary += f" [circuit breaker {breaker_status}]"
            log.warning("circuit breaker %s; last error: %s", breaker_status, state.last_error)
        log.info("decision: %s", summary)
        self.state.record_run(summary, breaker_open=allowance == 0)
        if launch:
            self.launch(launch)
        return decision

    def _own_queue(self) -> dict:
        conn = open_read_only(self.args.db)
        try:
            return read_stats(conn, self.args.node_id)
        finally:
            conn.close()

    def _workers_heard_from(self, peer_stats: dict | None) -> dict[str, float] | None:
        """Seconds since either endpoint last heard from each worker, over a window longer than
        the silence deadline; None unless every endpoint answered: a worker busy with a long job
        talks to one endpoint only, and must not look silent because that one did not answer."""
        own = fetch_stats(self.args.url, self.endpoint_key, self.args.silence_deadline + 60)
        answers = [own] + ([peer_stats] if self.args.peer else [])
        if any(stats is None or "workers" not in stats for stats in answers):
            return None
        heard: dict[str, float] = {}
        for stats in answers:
            for worker in stats["workers"]:
                ago = worker["last_seen_s_ago"]
                heard[worker["id"]] = min(ago, heard.get(worker["id"], ago))
        return heard

    def reconcile(self, nodes: list[Node], heard_from: dict[str, float] | None) -> list[Node]:
        now = time.time()
        silence = self.args.silence_deadline
        doomed: list[tuple[Node, str]] = []
        unprovisioned: list[Node] = []
        kept: list[Node] = []
        for node in nodes:
            age = now - node.launched_at
            if not node.ready and age > self.args.ready_deadline:
                doomed.append((node, f"not ready {age:.0f}s after launch"))
            elif not node.ready and node.owner == self.args.node_id:
                unprovisioned.append(node)  # launched by an earlier run of ours that did not finish
            elif (node.ready and heard_from is not None and age > silence
                  and heard_from.get(node.node_id, float("inf")) > silence):
                doomed.append((node, f"neither endpoint heard from it for over {silence:.0f}s"))
            else:
                kept.append(node)
        for node, reason in doomed:
            try:
                self.provider.terminate([node], reason)
            except ProviderError as exc:
                log.error("reconcile: %s", exc)
                kept.append(node)  # still running as far as we know: it keeps counting against the cap
        if unprovisioned:
            log.info("resuming provisioning of %s", ", ".join(node.node_id for node in unprovisioned))
            kept += self.provision_all(unprovisioned)
        return kept

    def launch(self, count: int) -> None:
        # One intent per launch decision: EC2 turns it into the ClientToken, so a request retried
        # after a timeout returns the instances it already started instead of starting more. A run
        # killed midway needs no token: its instances carry our tags, and the next run counts them.
        intent = f"{self.args.cluster}-{self.args.node_id}-{secrets.token_hex(6)}"
        try:
            nodes = self.provider.launch(count, self.args.node_id, intent)
        except ProviderError as exc:
            log.error("launch failed: %s", exc)
            self.state.record_failure(f"launch: {exc}")
            return
        self.provision_all(nodes)

    def provision_all(self, nodes: list[Node]) -> list[Node]:
        """Provision in parallel; a node that fails is terminated and counts against the breaker."""
        def attempt(node: Node) -> Node | None:
            try:
                ready = self.provider.provision(node)
            except Exception as exc:  # noqa: BLE001 -- any failure: terminate it, count it, go on
                log.error("provisioning %s failed: %s", node.node_id, exc)
                self.state.record_failure(f"provisioning {node.node_id}: {exc}")
                try:
                    self.provider.terminate([node], "provisioning failed")
                except ProviderError as terminate_error:
                    log.error("%s", terminate_error)
                    return node  # not terminated: it still counts against the cap
                return None
            self.state.record_success()
            return ready

        with ThreadPoolExecutor(max_workers=min(8, len(nodes)) or 1) as pool:
            return [node for node in pool.map(attempt, nodes) if node is not None]


def main(argv: list[str] | None = None) -> int:
    os.umask(0o077)  # its lock, host keys, worker records and logs: owner-only
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s scaler: %(message)s")
    if args.reset_breaker:
        StateStore(args.db, args.node_id).reset_breaker()
        log.info("circuit breaker reset")
        return 0
    provider = make_provider(args)
    if args.terminate_all:
        nodes = provider.list()
        provider.terminate(nodes, "terminate-all requested")
        log.info("terminated %d worker(s)", len(nodes))
        return 0
    scaler = Scaler(args, provider)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    lock_path = Path(args.state_dir) / f"scale-{args.node_id}.lock"
    while True:
        with exclusive_run(lock_path) as holding:
            if holding:
                try:
                    scaler.run_once()
                except Exception:  # noqa: BLE001 -- one failed run must not end the --every loop
                    log.exception("scaling run failed")
                    if not args.every:
                        return 1
            else:
                log.info("another scaling run holds %s; skipping this one", lock_path)
        if not args.every:
            return 0
        time.sleep(args.every)


if __name__ == "__main__":
    sys.exit(main())
