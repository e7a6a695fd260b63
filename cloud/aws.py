"""What every AWS command (setup, deploy, the scaler) knows of a cluster alike: its name, its
region, setup's record of it, and how AWS is asked (clients, retries, errors).

- A cluster name is checked before anything else, against one strict pattern. EC2 tag filters
  treat `*` and `?` as wildcards, so a filter built from `orp?` would match cluster `orph`;
  no filter is ever built from a value that holds one (cloud/ec2.py).
- The region: `--region`, else the one the state file records, else the AWS configuration's
  (AWS_PROFILE, AWS_DEFAULT_REGION, ~/.aws/config), resolved by botocore as boto3 does. A
  `--region` that differs from the state file's is refused: the cluster is in the recorded one.
- Setup's record (the state file, JSON) is read here; it is written by deploy/cluster.py.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import botocore.session
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from botocore.parsers import ResponseParserError

from cli.settings import Setting

# Letters, digits and dashes; the name goes into IAM names (`<cluster>-endpoint`, at most 64).
CLUSTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,39}")
REGION_NAME = re.compile(r"[a-z]{2}(-[a-z]+)+-[0-9]{1,2}")
# What a failed or interrupted API call raises; a non-XML answer (an HTTP 500 from a proxy)
# is a parser error, which botocore does not count among its own.
API_ERRORS = (BotoCoreError, ClientError, ResponseParserError)
ACCESS_ERRORS = {"AccessDenied", "AccessDeniedException", "UnauthorizedOperation", "AuthFailure",
                 "InvalidClientTokenId", "SignatureDoesNotMatch", "ExpiredToken"}


class ClusterUsageError(ValueError):
    """The command line, the environment or the state file is wrong; nothing was changed."""


def cluster_name(value: str) -> str:
    if not CLUSTER_NAME.fullmatch(value):
        raise ValueError(f"must be 1-40 letters, digits and dashes, starting with a letter or digit, not {value!r}")
    return value


def region_name(value: str) -> str:
    value = value.strip()
    if value and not REGION_NAME.fullmatch(value):
        raise ValueError(f"must be an AWS region name such as us-east-1, not {value!r}")
    return value


# The settings every AWS command shares (see cli/settings.py).
CLUSTER_SETTING = Setting("DW_CLUSTER", "dw", cluster_name,
                          "the cluster: name prefix and dw:cluster tag of everything it has")
REGION_SETTING = Setting("", "", region_name,
                         "AWS region; default: the state file's, else the AWS configuration's "
                         "(AWS_PROFILE, AWS_DEFAULT_REGION, ~/.aws/config)")


# --- clients, errors -----------------------------------------------------------------------------


def aws_config(quick: bool = False) -> Config:
    """Retries and timeouts of every client here; `quick` for a report on the way out, which must
    not keep a Ctrl-C waiting. AWS_MAX_ATTEMPTS, where set, is honoured as botocore does."""
    if quick:
        return Config(retries={"max_attempts": 1, "mode": "standard"}, connect_timeout=2, read_timeout=4)
    attempts = int(os.environ.get("AWS_MAX_ATTEMPTS", "") or 6)
    return Config(retries={"max_attempts": attempts, "mode": "standard"}, connect_timeout=10, read_timeout=30)


def client(service: str, region: str, quick: bool = False) -> Any:
    # AWS_ENDPOINT_URL (the tests' moto server) is honoured by botocore itself.
    return boto3.session.Session(region_name=region).client(service, config=aws_config(quick))


def error_code(exc: Exception) -> str:
    return exc.response.get("Error", {}).get("Code", "") if isinstance(exc, ClientError) else ""


def api_error_text(exc: Exception) -> str:
    if isinstance(exc, ResponseParserError):
        # Its text is the whole unparsable body (an HTML error page): the first line says enough.
        first_line = str(exc).strip().splitlines()[0][:300].rstrip(":")
        return f"the AWS API (or something between it and here) gave an answer that is not an API answer ({first_line})"
    hint = ""
    if error_code(exc) in ACCESS_ERRORS:
        hint = " (the AWS credentials used here lack a permission this step needs, or are invalid)"
    return f"{exc}{hint}"


@contextmanager
def api_step(what: str, error: Callable[[str], Exception]) -> Iterator[None]:
    """Turns an AWS API error into `error`, naming the step it happened in."""
    try:
        yield
    except API_ERRORS as exc:
        raise error(f"{what}: {api_error_text(exc)}") from exc


# --- the region ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Region:
    name: str
    source: str  # where it came from, for the messages


def configured_region() -> Region:
    """The region boto3 would use: AWS_DEFAULT_REGION, else the profile's in the config file."""
    try:
        session = botocore.session.Session()
        region = session.get_config_variable("region") or ""
        profile = session.get_config_variable("profile") or "default"
        config_file = session.get_config_variable("config_file")
    except BotoCoreError as exc:  # e.g. AWS_PROFILE names a profile that is not there
        raise ClusterUsageError(f"reading the AWS configuration: {exc}") from exc
    source = "AWS_DEFAULT_REGION" if os.environ.get("AWS_DEFAULT_REGION") else f"profile {profile} in {config_file}"
    return Region(region, source)


def resolve_region(flag_value: str, recorded: str, state_file: str | Path) -> Region:
    if flag_value and recorded and flag_value != recorded:
        raise ClusterUsageError(
            f"--region {flag_value}, but the state file {state_file} records region {recorded}: the cluster is "
            f"there. Leave out --region, or use another --cluster / --state-file for a cluster in {flag_value}")
    if flag_value:
        return Region(flag_value, "--region")
    if recorded:
        return Region(recorded, f"the state file {state_file}")
    region = configured_region()
    if not region.name:
        raise ClusterUsageError("no AWS region: pass --region, or configure one (`aws configure set region "
                                "<region>`, or AWS_DEFAULT_REGION)")
    if not REGION_NAME.fullmatch(region.name):
        raise ClusterUsageError(f"the region {region.name!r} from {region.source} is not an AWS region name")
    other = os.environ.get("AWS_REGION", "")
    if other and other != region.name:
        raise ClusterUsageError(f"AWS_REGION says {other}, but boto3 uses {region.name} (from {region.source}): "
                                f"pass --region to say which")
    return region


# --- the state file ------------------------------------------------------------------------------


def read_state(path: str | Path) -> dict:
    """Setup's record, or {} if there is none."""
    path = Path(path)
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise ClusterUsageError(f"reading the state file {path}: {exc} (fix or remove it)") from exc
    if not isinstance(state, dict):
        raise ClusterUsageError(f"the state file {path} does not hold a JSON object (fix or remove it)")
    return state


def check_state_cluster(state: dict, cluster: str, path: str | Path) -> None:
    recorded = state.get("cluster", cluster)
    if recorded != cluster:
        raise ClusterUsageError(f"the state file {path} belongs to cluster {recorded}, not {cluster}")
