"""One scaling decision for this endpoint's host: `python -m cron.scale`.

Installed as a crontab entry every minute on each endpoint host; `--every S` repeats the run
in-process (what `./deploy.sh local` uses). A run takes an exclusive lock first, so two runs
on one host never overlap. Steps: read this endpoint's SQLite and the peer's /stats, list
the cluster's workers, ask the policy how many to launch, launch and provision them.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import signal
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cron.policy import ClusterView, Decision, EndpointLoad, Policy, decide
from cron.providers import Node, Provider, ProviderError
from cron.providers.local import LocalProvider
from endpoint.store import open_read_only, read_stats

log = logging.getLogger("cron.scale")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ.get
    parser = argparse.ArgumentParser(prog="python -m cron.scale", description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--node-id", default=env("DW_NODE_ID", "a"), help="this endpoint's id [DW_NODE_ID]")
    add("--db", default=env("DW_DB", ""), help="this endpoint's SQLite file [DW_DB] (default var/<node-id>.sqlite3)")
    add("--peer", default=env("DW_PEER_URL", ""), help="the other endpoint's base URL, for its /stats [DW_PEER_URL]")
    add("--endpoint", action="append", dest="endpoints",
        help="endpoint URL workers connect to, once per endpoint [DW_ENDPOINTS, comma-separated]")
    add("--endpoint-index", type=int, default=env("DW_ENDPOINT_INDEX", "0"),
        help="0 or 1: which share of --max-workers this scaler owns [DW_ENDPOINT_INDEX]")
    add("--provider", default=env("DW_PROVIDER", "local"), choices=["local"], help="[DW_PROVIDER]")
    add("--secret-file", default=env("DW_SECRET_FILE", "var/secret"), help="[DW_SECRET_FILE]")
    add("--state-dir", default=env("DW_STATE_DIR", "var"), help="lock, local worker records, logs [DW_STATE_DIR]")
    add("--max-workers", type=int, default=env("DW_MAX_WORKERS", "4"),
        help="cluster-wide maximum, across both endpoints' scalers [DW_MAX_WORKERS]")
    add("--scale-after", type=float, default=env("DW_SCALE_AFTER", "30"),
        help="launch once the oldest pending item has waited this long, seconds [DW_SCALE_AFTER]")
    add("--target-drain", type=float, default=env("DW_TARGET_DRAIN", "120"),
        help="size the fleet to drain the backlog within this many seconds [DW_TARGET_DRAIN]")
    add("--max-launch-per-tick", type=int, default=env("DW_MAX_LAUNCH_PER_TICK", "4"),
        help="[DW_MAX_LAUNCH_PER_TICK]")
    add("--slots-per-worker", type=int, default=env("DW_SLOTS_PER_WORKER", "1"),
        help="jobs one worker runs at once (its cores) [DW_SLOTS_PER_WORKER]")
    add("--default-job-duration", type=float, default=env("DW_DEFAULT_JOB_DURATION", "1"),
        help="assumed job duration before any was measured, seconds [DW_DEFAULT_JOB_DURATION]")
    add("--idle-timeout", type=float, default=env("DW_IDLE_TIMEOUT", "60"),
        help="workers exit after this long without work [DW_IDLE_TIMEOUT]")
    add("--every", type=float, default=0.0, help="repeat every S seconds instead of running once")
    add("--terminate-all", action="store_true", help="terminate every worker of the cluster, then exit")
    add("--log-level", default=env("DW_LOG_LEVEL", "INFO"), help="[DW_LOG_LEVEL]")
    args = parser.parse_args(argv)
    if not args.endpoints:
        args.endpoints = [url.strip() for url in env("DW_ENDPOINTS", "").split(",") if url.strip()]
    args.db = args.db or f"{args.state_dir}/{args.node_id}.sqlite3"
    return args


def make_provider(args: argparse.Namespace) -> Provider:
    state_dir = Path(args.state_dir)
    return LocalProvider(state_dir / "workers", args.endpoints, Path(args.secret_file),
                         processes_per_worker=args.slots_per_worker, idle_timeout=args.idle_timeout,
                         log_dir=state_dir / "log")


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


def load_of(stats: dict) -> EndpointLoad:
    return EndpointLoad(
        pending=stats["pending"],
        oldest_pending_age_s=stats["oldest_pending_age_s"],
        recent_jobs=stats.get("recent_jobs", 0),
        recent_job_duration_s=stats.get("recent_job_duration_s"),
    )


def peer_stats(peer_url: str, timeout: float = 3.0) -> dict | None:
    try:
        with urllib.request.urlopen(f"{peer_url.rstrip('/')}/stats", timeout=timeout) as response:
            return json.loads(response.read())
    except (OSError, ValueError) as exc:
        log.warning("peer %s unreachable: %s", peer_url, exc)
        return None


def observe(args: argparse.Namespace, nodes: list[Node]) -> ClusterView:
    conn = open_read_only(args.db)
    try:
        own = read_stats(conn, args.node_id)
    finally:
        conn.close()
    peer = peer_stats(args.peer) if args.peer else None
    loads = (load_of(own),) + ((load_of(peer),) if peer else ())
    return ClusterView(
        endpoints=loads,
        peer_reachable=peer is not None,
        workers_ready=sum(node.ready for node in nodes),
        workers_booting=sum(not node.ready for node in nodes),
        own_workers=sum(node.owner == args.node_id for node in nodes),
        peer_workers=sum(node.owner != args.node_id for node in nodes),
    )


def run_once(args: argparse.Namespace, provider: Provider, policy: Policy) -> Decision:
    nodes = provider.list()
    decision = decide(observe(args, nodes), policy)
    log.info("decision: %s", decision.reason)
    if decision.launch:
        intent = f"{args.node_id}-{int(time.time())}"
        try:
            for node in provider.launch(decision.launch, args.node_id, intent):
                provider.provision(node)
        except ProviderError as exc:
            log.error("launch failed: %s", exc)
    return decision


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s scaler: %(message)s")
    provider = make_provider(args)
    if args.terminate_all:
        nodes = provider.list()
        provider.terminate(nodes, "terminate-all requested")
        log.info("terminated %d worker(s)", len(nodes))
        return 0
    policy = make_policy(args)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    lock_path = Path(args.state_dir) / f"scale-{args.node_id}.lock"
    while True:
        with exclusive_run(lock_path) as holding:
            if holding:
                try:
                    run_once(args, provider, policy)
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
