"""The scaler's settings: one table of flags with DW_* environment fallbacks (cli/settings.py).

`python -m cron.scale --help` shows them with their defaults. `./deploy.sh aws` takes the knobs
in HOST_KNOBS from this very table, checks them with its entries and hands them to the endpoint
hosts' scalers as the variables it names: a value the deploy accepts is one the scalers accept.
"""

from __future__ import annotations

import argparse
import re

from cli.settings import Setting, add_settings, check_settings, choice, seconds, text, whole
from cloud.aws import CLUSTER_SETTING, REGION_SETTING

# EC2's instance type names: c7i.large, m7i-flex.large, u-6tb1.metal.
INSTANCE_TYPE = re.compile(r"[a-z][a-z0-9-]*\.[a-z0-9]+")


def instance_type(value: str) -> str:
    value = value.strip()
    if not INSTANCE_TYPE.fullmatch(value):
        raise ValueError(f"must be EC2 instance type names such as c7i.large, not {value!r}")
    return value


instance_type.metavar = "TYPE"  # type: ignore[attr-defined]

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
    "endpoints": Setting("DW_ENDPOINTS", "", text, "an endpoint's URL as workers reach it, once per endpoint",
                         many=True),
    "tls_ca": Setting("DW_TLS_CA", "", text,
                      "CA certificate the endpoints' HTTPS is checked against, by this scaler and by its workers "
                      "(default: the system's CAs)"),
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
    "slots_per_worker": Setting("DW_SLOTS_PER_WORKER", "1", whole(1),
                                "jobs one worker runs at once (its vCPUs); ec2: of a type whose vCPUs are not known"),
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
    "provision_parallel": Setting("DW_PROVISION_PARALLEL", "32", whole(1),
                                  "workers provisioned at once (SSH sessions in parallel)"),
    # the workers
    "provider": Setting("DW_PROVIDER", "local", choice("local", "ssh", "ec2"), "where workers run: local, ssh or ec2"),
    "idle_timeout": Setting("DW_IDLE_TIMEOUT", "60", seconds(0), "seconds a worker waits for work before it exits"),
    "worker_processes": Setting("DW_WORKER_PROCESSES", "0", whole(0),
                                "jobs a worker runs at once; 0: one per core (local provider: --slots-per-worker)"),
    "worker_kernel": Setting("DW_WORKER_KERNEL", "auto", choice("auto", "avx512", "avx2", "scalar", "python"),
                             "the workers' hashing kernel: auto picks the fastest their CPU runs"),
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
    "instance_types": Setting("DW_INSTANCE_TYPES", "c7i.large", instance_type,
                              "ec2: the workers' instance types in order of preference (--instance-types "
                              "c7i.large,c6i.large works too); a type without room moves a launch to the next",
                              many=True),
    "market": Setting("DW_MARKET", "on-demand", choice("on-demand", "spot"), "ec2: the workers' market"),
    "spot_fallback": Setting("DW_SPOT_FALLBACK", "none", choice("none", "on-demand"),
                             "ec2 with --market spot: on-demand launches On-Demand what finds no Spot capacity in "
                             "any type"),
    "worker_metadata_url": Setting("DW_WORKER_METADATA_URL", "", text,
                                   "ec2: the instance metadata service as Spot workers reach it (default EC2's own)"),
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
              "breaker_cooldown", "idle_timeout", "worker_processes", "worker_exit_command", "instance_types",
              "market", "spot_fallback")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m cron.scale",
                                     description="One scaling run for this endpoint's host: `python -m cron.scale`.")
    add_settings(parser, SETTINGS)
    parser.add_argument("--terminate-all", action="store_true", help="terminate every worker of the cluster, then exit")
    parser.add_argument("--reset-breaker", action="store_true", help="close the circuit breaker, then exit")
    args = parser.parse_args(argv)
    check_settings(parser, SETTINGS, args)
    check_knobs(parser, args)
    if args.provider == "ec2" and not args.aws_state:
        parser.error("--provider ec2 needs --aws-state (DW_AWS_STATE): the state file of ./setup.sh aws")
    args.secret_file = args.secret_file or f"{args.state_dir}/secret"
    return args




def check_knobs(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """What no single entry can check, of the knobs the deploy hands over too."""
    check_deadlines(parser, args)
    check_instance_types(parser, args)


def check_instance_types(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """What no single entry can check: a list of types, each once, and a fallback only for Spot."""
    if not args.instance_types:
        parser.error("--instance-types needs at least one instance type")
    twice = sorted({name for name in args.instance_types if args.instance_types.count(name) > 1})
    if twice:
        parser.error(f"--instance-types names {', '.join(twice)} more than once")
    if args.spot_fallback != "none" and args.market != "spot":
        parser.error(f"--spot-fallback {args.spot_fallback} is for --market spot (the market is {args.market})")
    provider = getattr(args, "provider", "ec2")  # the deploy's workers are EC2 instances
    if args.market == "spot" and provider != "ec2":
        parser.error(f"--market spot is for --provider ec2 (the provider is {provider})")


def check_deadlines(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """What no single entry can check: the partition deadline is the longer one."""
    if args.partition_deadline < args.silence_deadline:
        parser.error(f"--partition-deadline ({args.partition_deadline:g}) must be at least --silence-deadline "
                     f"({args.silence_deadline:g})")
