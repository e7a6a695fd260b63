"""What setup, deploy and destroy know of a cluster alike: the names of its resources (all made
from the cluster's name and tagged dw:cluster=<cluster>), its region (the rule of cloud/aws.py),
setup's record (the state file, written here, read by cloud/aws.py), and how a step reports.

A resource of a cluster's name is the cluster's only if it carries the cluster's tag: setup
adopts nothing else (`require_ours`), and destroy removes nothing else (`ours_to_remove`).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import boto3

from cli.settings import Setting
from cloud.aws import CLUSTER_SETTING, Region, api_step, aws_config, check_state_cluster, resolve_region
from cloud.ec2 import Tag, tag_list, tags_of

DESTROY_COMMAND = "./deploy.sh aws --destroy"
AWS_DIR_SETTING = Setting("DW_AWS_DIR", "var/aws", str, "where setup keeps the private key and the state file")
STATE_FILE_SETTING = Setting("DW_AWS_STATE", "", str,
                             "the record of what setup created (default <aws-dir>/<cluster>.json)")


class SetupError(Exception):
    """A step of setup or destroy failed; the message says which and what to do about it."""


class UsageError(SetupError):
    """The command line (or environment) is wrong; nothing was changed."""


@dataclass(frozen=True)
class Settings:
    """A cluster as setup and destroy see it: where it is, and the names of what it has."""

    cluster: str
    region: str
    aws_dir: Path
    state_file: Path
    http_port: int = 5000
    key_type: str = "ed25519"

    # What the cluster's resources are named: all after the cluster.
    key_name = property(lambda self: f"{self.cluster}-key")
    group_name = property(lambda self: f"{self.cluster}-sg")
    role_name = property(lambda self: f"{self.cluster}-endpoint")  # the endpoints' role...
    profile_name = role_name  # ... and their instance profile
    worker_role_name = property(lambda self: f"{self.cluster}-worker")

    @property
    def key_path(self) -> Path:
        return (self.aws_dir / f"{self.key_name}.pem").absolute()

    def tags(self, name: str, role: str = "") -> list[dict[str, str]]:
        tags = {Tag.CLUSTER: self.cluster, "Name": name}
        if role:  # which part of the cluster uses it, where that is one part
            tags[Tag.ROLE] = role
        return tag_list(tags)


def settings_for(args: argparse.Namespace, region: str) -> Settings:
    return Settings(cluster=args.cluster, region=region, aws_dir=Path(args.aws_dir), state_file=Path(args.state_file),
                    http_port=getattr(args, "http_port", 5000), key_type=getattr(args, "key_type", "ed25519"))


def cluster_region(args: argparse.Namespace, state: dict) -> Region:
    """The one region rule (cloud/aws.py); a cluster stays in the region its state file records."""
    check_state_cluster(state, args.cluster, args.state_file)
    return resolve_region(args.region, state.get("region", ""), args.state_file)


def cluster_flag(cluster: str) -> str:
    return "" if cluster == CLUSTER_SETTING.default else f" --cluster {cluster}"


# --- the state file ---------------------------------------------------------------------------


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def save_state(path: Path, state: dict) -> None:
    """Write-to-temp-then-rename: a reader sees the old or the new record, never half of one.
    mkstemp creates the file 0600; the record names the private key, which is nobody else's business."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "w") as file:
            json.dump(state, file, indent=2, sort_keys=True)
            file.write("\n")
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, 0o600)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


# --- steps and what they report ---------------------------------------------------------------


def announce(message: str) -> None:
    """A step of the deploy begins."""
    print(f"==> {message}", flush=True)


def report(what: str, outcome: str) -> None:
    print(f"{what}: {outcome}", flush=True)


def step(what: str) -> AbstractContextManager[None]:
    """Turns an AWS error into a SetupError that names the step it happened in."""
    return api_step(what, SetupError)


def make_clients(region: str) -> tuple[Any, Any]:
    # AWS_ENDPOINT_URL (the tests' moto server) is honoured by botocore itself.
    session = boto3.session.Session(region_name=region)
    return session.client("ec2", config=aws_config()), session.client("iam", config=aws_config())


def tag_value(tags: list[dict] | None, key: str = Tag.CLUSTER) -> str | None:
    return tags_of({"Tags": tags or []}).get(key)


def require_ours(what: str, tags: list[dict] | None, cluster: str) -> None:
    """Setup adopts an existing resource only if it made it: same name is not enough."""
    found = tag_value(tags)
    if found != cluster:
        tagged = f"tagged {Tag.CLUSTER}={found}" if found else f"not tagged {Tag.CLUSTER}"
        raise SetupError(f"{what} exists but is {tagged}, so this setup did not create it for cluster "
                         f"{cluster} and will not take it over: remove or rename it, or choose another --cluster")


def ours_to_remove(what: str, resource: dict | None, cluster: str, label: str = "") -> bool:
    """Whether destroy may remove `resource`: it exists, and carries this cluster's tag."""
    if resource is None:
        report(what, "none found")
        return False
    if tag_value(resource.get("Tags")) != cluster:
        report(what, f"{label}not tagged {Tag.CLUSTER}={cluster}: left alone")
        return False
    return True
