"""`./setup.sh aws`: the one-time AWS preparation of a cluster, safe to re-run.

What it creates, all named after the cluster (default "dw") and tagged dw:cluster=<cluster>:
the key pair `<cluster>-key` (deploy/keypair.py), the security group `<cluster>-sg` in the
region's default VPC (deploy/network.py), and the endpoints' IAM role and instance profile
`<cluster>-endpoint` with the scaler's inline policy (deploy/iam.py).

Everything it made is recorded in a state file (JSON, mode 0600, default
`<aws-dir>/<cluster>.json`) that `./deploy.sh aws` and the scalers read. Each step looks before
it acts, so a re-run creates only what is missing and completes an earlier run that failed
half-way; the record is saved after every step.

`--destroy` removes what setup created (deploy/destroy.py); it refuses, deleting nothing,
while any instance needs it: `./deploy.sh aws --destroy` terminates them first.

The cluster name, the region and the state file follow the rules of cloud/aws.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from cli.interrupts import Interrupted, exit_now, stop_on_signals
from cli.settings import Setting, add_settings, check_settings, choice, text, whole
from cloud.aws import CLUSTER_SETTING, REGION_SETTING, ClusterUsageError, read_state
from deploy.cluster import (
    AWS_DIR_SETTING,
    STATE_FILE_SETTING,
    SetupError,
    UsageError,
    cluster_region,
    make_clients,
    save_state,
    settings_for,
    utc_now,
)
from deploy.destroy import destroy_summary, remove_resources
from deploy.iam import (
    check_role_region,
    endpoint_policy,
    ensure_instance_profile,
    ensure_role,
    ensure_role_policy,
    worker_role_arn,
)
from deploy.keypair import ensure_key_pair
from deploy.network import SG_DELETE_TIMEOUT, default_vpc, ensure_security_group, resolve_allowed_cidr

SETTINGS: dict[str, Setting] = {
    "cluster": CLUSTER_SETTING,
    "region": REGION_SETTING,
    "allowed_cidr": Setting("DW_ALLOWED_CIDR", "", text,
                            "who may reach the HTTP port and SSH, normally your public address as /32; default: "
                            "discovered via checkip.amazonaws.com if DW_DISCOVER_IP=1, else the one an earlier run "
                            "recorded"),
    "http_port": Setting("DW_HTTP_PORT", "5000", whole(1, 65535), "the endpoints' HTTP port"),
    "key_type": Setting("DW_KEY_TYPE", "ed25519", choice("ed25519", "rsa"), "type of a new key pair"),
    "aws_dir": AWS_DIR_SETTING,
    "state_file": STATE_FILE_SETTING,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="./setup.sh aws",
        description="One-time AWS preparation for dynamic-workload: key pair, security group, IAM role and "
                    "instance profile of the endpoints. Safe to re-run: only what is missing is created.")
    add_settings(parser, SETTINGS)
    parser.add_argument("--allow-anywhere", action="store_true",
                        help="accept an --allowed-cidr that spans a large part of the internet (0.0.0.0/0, ::/0, "
                             "anything wider than a /8, or an IPv6 /32)")
    parser.add_argument("--destroy", action="store_true",
                        help="remove what setup created; refused while the cluster has instances (`./deploy.sh aws "
                             "--destroy` terminates them first)")
    args = parser.parse_args(argv)
    check_settings(parser, SETTINGS, args)
    args.state_file = args.state_file or f"{args.aws_dir}/{args.cluster}.json"
    return args


def setup(args: argparse.Namespace) -> int:
    state_file = Path(args.state_file)
    state = read_state(state_file)
    region = cluster_region(args, state)
    cidr = resolve_allowed_cidr(args, state)  # before anything is created: a bad CIDR changes nothing
    settings = settings_for(args, region.name)
    print(f"AWS setup of cluster {settings.cluster} in {region.name} (region from {region.source}; state file "
          f"{state_file})", flush=True)
    ec2, iam = make_clients(region.name)
    check_role_region(iam, settings)

    def record(**values: Any) -> None:
        # Saved after every step, so a later failure still leaves a record of what exists.
        state.update(values, updated_at=utc_now())
        save_state(state_file, state)

    key_pair = ensure_key_pair(ec2, settings)
    state.setdefault("created_at", utc_now())
    record(cluster=settings.cluster, region=region.name, key_name=settings.key_name,
           key_path=str(settings.key_path), key_pair_id=key_pair.get("KeyPairId", ""))
    vpc_id, subnet_ids = default_vpc(ec2, region.name)
    record(vpc_id=vpc_id, subnet_ids=subnet_ids)
    group_id = ensure_security_group(ec2, settings, vpc_id, cidr)
    record(security_group_id=group_id, allowed_cidr=cidr, http_port=settings.http_port)
    role_arn = ensure_role(iam, settings)
    record(endpoint_role=settings.role_name, endpoint_role_arn=role_arn)
    partition, account = role_arn.split(":")[1], role_arn.split(":")[4]
    passable = worker_role_arn(iam, settings)
    ensure_role_policy(iam, settings, endpoint_policy(
        cluster=settings.cluster, region=region.name, partition=partition, account=account, vpc_id=vpc_id,
        security_group_id=group_id, key_name=settings.key_name, worker_role_arn=passable))
    profile_arn = ensure_instance_profile(iam, settings)
    record(endpoint_instance_profile=settings.profile_name, endpoint_instance_profile_arn=profile_arn)
    print(f"AWS setup of cluster {settings.cluster} complete: recorded in {state_file}. "
          f"Next: ./deploy.sh aws", flush=True)
    return 0


def destroy(args: argparse.Namespace, sg_timeout: float = SG_DELETE_TIMEOUT) -> int:
    state_file = Path(args.state_file)
    state = read_state(state_file)
    region = cluster_region(args, state)
    settings = settings_for(args, region.name)
    record = f"state file {state_file}" if state else f"no state file {state_file}: looking up by name and tag"
    print(f"removing what AWS setup created for cluster {settings.cluster} in region {region.name} (region from "
          f"{region.source}; {record})", flush=True)
    ec2, iam = make_clients(region.name)
    removed = remove_resources(ec2, iam, settings, state, sg_timeout)
    status, summary = destroy_summary(settings.cluster, region, removed, "./setup.sh aws --destroy")
    print(summary, flush=True)
    return status


def interrupted_message(args: argparse.Namespace, exc: Interrupted) -> str:
    if args.destroy:
        return (f"stopped by {exc.name}: the destroy of cluster {args.cluster} is incomplete; what is left is "
                f"removed by `./setup.sh aws --destroy` run again")
    return (f"stopped by {exc.name}: the setup of cluster {args.cluster} is incomplete; what exists is recorded in "
            f"{args.state_file}. Setup creates nothing billed by the hour (a key pair, a security group, an IAM role "
            f"and profile): `./setup.sh aws` completes it, `./setup.sh aws --destroy` removes it")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stop_on_signals()
    try:
        return destroy(args) if args.destroy else setup(args)
    except (UsageError, ClusterUsageError) as exc:
        print(f"aws setup: {exc}", file=sys.stderr, flush=True)
        return 2
    except SetupError as exc:
        if args.destroy:
            after = "Fix the cause and run ./setup.sh aws --destroy again: what is left is removed then."
        else:
            after = (f"Fix the cause and run ./setup.sh aws again: what is done is kept (recorded in "
                     f"{args.state_file}), the rest is completed. Setup creates nothing billed by the hour; "
                     f"`./setup.sh aws --destroy` removes what it made.")
        print(f"aws setup failed: {exc}\n{after}", file=sys.stderr, flush=True)
        return 1
    except Interrupted as exc:
        print(interrupted_message(args, exc), file=sys.stderr, flush=True)
        exit_now(exc.exit_status)
        return exc.exit_status


if __name__ == "__main__":
    sys.exit(main())
