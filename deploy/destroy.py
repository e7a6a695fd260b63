"""Removing a cluster: `./deploy.sh aws --destroy` terminates its instances, then removes what
`./setup.sh aws` created; `./setup.sh aws --destroy` does the second part alone.

Instances are found by the cluster's tag and terminated the endpoints first (so that their
scalers launch nothing more), then the workers, until a listing finds none. Setup's resources
go in dependency order -- instance profile, role (inline policy first), security group
(retried while terminating instances still hold it), key pair and its private key, the state
file -- and only those with the cluster's names that carry its tag. Nothing is removed while
any instance needs them (the cluster's, or any other using its key pair or security group).
A destroy says which region it searched and what it removed; having found nothing there, it
looks for the cluster in the other regions, so that "nothing here" is never taken for "all
gone". On the way out of a failed or interrupted command, `left_running` says what of the
cluster still runs and bills.
"""

from __future__ import annotations

from typing import Any

import boto3

from cli.interrupts import parallel
from cloud.aws import API_ERRORS, Region, api_error_text, api_step, aws_config, client
from cloud.ec2 import (
    BILLED_STATES,
    Ec2Error,
    Tag,
    cluster_instances,
    describe,
    describe_instances,
    tag_filter,
    terminate_instances,
    wait_until,
)
from deploy.cluster import DESTROY_COMMAND, Settings, SetupError, announce, cluster_flag, report, step
from deploy.iam import remove_iam
from deploy.keypair import private_key_path, remove_key_pair
from deploy.network import SG_DELETE_TIMEOUT, find_security_group, remove_security_group


class SearchError(Exception):
    """A search across regions could not be made."""


# --- instances --------------------------------------------------------------------------------


def terminate_all(ec2: Any, cluster: str, role: str | None) -> list[str]:
    """Terminate the cluster's instances (of one role, or all) and wait until they are gone."""
    ids = [instance["InstanceId"] for instance in cluster_instances(ec2, cluster, role)]
    what = f"{role} instance(s)" if role else "instance(s)"
    if not ids:
        announce(f"no {what} of cluster {cluster} found")
        return []
    announce(f"terminating {len(ids)} {what} of cluster {cluster}: {', '.join(ids)}")
    terminate_instances(ec2, ids)
    wait_until(ec2, "terminated", ids, minutes=10)
    return ids


def terminate_cluster(ec2: Any, cluster: str) -> list[str]:
    """Every instance of the cluster, terminated and gone; their ids."""
    with api_step("terminating the cluster's instances", SetupError):
        try:
            # The endpoints first: their scalers' cron jobs could otherwise launch workers behind us.
            terminated = terminate_all(ec2, cluster, "endpoint")
            for _ in range(3):  # then the workers, until a listing finds none
                more = terminate_all(ec2, cluster, None)
                terminated += more
                if not more:
                    break
        except Ec2Error as exc:
            raise SetupError(str(exc)) from exc
    return terminated


def instances_in_the_way(ec2: Any, settings: Settings, group: dict | None) -> list[dict]:
    """Instances that need what destroy deletes, billed while they exist: the cluster's (by tag), and
    any other that uses its key pair or security group."""
    states = tag_filter("instance-state-name", *BILLED_STATES)
    found = {instance["InstanceId"]: instance for instance in cluster_instances(ec2, settings.cluster,
                                                                                  states=BILLED_STATES)}
    users = [[tag_filter("key-name", settings.key_name), states]]
    if group:
        users.append([tag_filter("instance.group-id", group["GroupId"]), states])
    for filters in users:
        found.update({instance["InstanceId"]: instance for instance in describe_instances(ec2, filters)})
    return list(found.values())


def refuse_while_instances_live(ec2: Any, settings: Settings, group: dict | None) -> None:
    """Nothing is deleted while an instance lives: the key pair is the only way into it, and the
    group and role are what it runs with."""
    with step(f"looking for instances of cluster {settings.cluster} in {settings.region}"):
        instances = instances_in_the_way(ec2, settings, group)
    if instances:
        raise SetupError(
            f"cluster {settings.cluster} still has {len(instances)} instance(s) in {settings.region}, running and "
            f"billing: {', '.join(describe(instance) for instance in instances)}. They need the key pair, security "
            f"group and role that --destroy deletes, so nothing was deleted. `{DESTROY_COMMAND}"
            f"{cluster_flag(settings.cluster)}` terminates them first and then removes the rest")


# --- what setup created -----------------------------------------------------------------------


def remove_resources(ec2: Any, iam: Any, settings: Settings, state: dict,
                     sg_timeout: float = SG_DELETE_TIMEOUT) -> list[str]:
    """Everything setup made for the cluster, after a check that no instance needs it; returns what
    was removed. The names are the cluster's fixed ones: nothing is deleted by a name from a file."""
    with step(f"security group {settings.group_name}"):
        group = find_security_group(ec2, settings.group_name, state.get("vpc_id"))
    refuse_while_instances_live(ec2, settings, group)
    removed = remove_iam(iam, settings)
    if remove_security_group(ec2, settings.cluster, group, settings.group_name, sg_timeout):
        removed.append(f"security group {settings.group_name}")
    removed += remove_key_pair(ec2, settings.cluster, settings.key_name, private_key_path(settings, state))
    if settings.state_file.exists():
        settings.state_file.unlink()
        report("state file", f"{settings.state_file} deleted")
        removed.append(f"state file {settings.state_file}")
    return removed


# --- what is found, what is left --------------------------------------------------------------


def destroy_summary(cluster: str, region: Region, removed: list[str], command: str) -> tuple[int, str]:
    """(exit status, the last word of a destroy): what it found where it looked; if nothing, where
    else the cluster is, so that "nothing here" is never taken for "all gone"."""
    searched = f"cluster {cluster} in region {region.name} (region from {region.source})"
    if removed:
        return 0, f"{searched}: removed {', '.join(removed)}; nothing of the cluster is left in {region.name}"
    try:
        elsewhere = found_elsewhere(cluster, region.name)
    except SearchError as exc:
        return 1, f"nothing found for {searched}, but {exc}: pass --region if the cluster is in another one"
    if not elsewhere:
        return 0, f"nothing found for {searched}, nor in any other region: there was nothing to remove"
    where = "; ".join(f"{name}: {', '.join(found)}" for name, found in sorted(elsewhere.items()))
    first = sorted(elsewhere)[0]
    return 1, (f"nothing found for {searched}. But cluster {cluster} has, in other regions, {where}. Run "
               f"`{command}{cluster_flag(cluster)} --region {first}` to remove it there")


def found_elsewhere(cluster: str, searched: str) -> dict[str, list[str]]:
    """The cluster's instances and key pair in the regions other than `searched`: a destroy that
    finds nothing where it looked says where the cluster is instead. SearchError if the regions
    cannot be listed: then nobody knows whether there is anything elsewhere."""
    session = boto3.session.Session()  # one session: the service model is loaded once, not per region
    try:
        regions = [entry["RegionName"] for entry in
                   session.client("ec2", region_name=searched, config=aws_config()).describe_regions()["Regions"]]
    except API_ERRORS as exc:
        raise SearchError(f"the other regions could not be searched: {api_error_text(exc)}") from exc
    # Clients are made here, one after the other (a session is not thread-safe); they are used in threads.
    clients = {region: session.client("ec2", region_name=region, config=aws_config(quick=True))
               for region in regions if region != searched}

    def look(region: str) -> tuple[str, list[str]]:
        ec2 = clients[region]
        try:
            found = [describe(instance) for instance in cluster_instances(ec2, cluster, states=BILLED_STATES)]
            pairs = ec2.describe_key_pairs(Filters=[tag_filter("key-name", f"{cluster}-key"),
                                                    tag_filter(f"tag:{Tag.CLUSTER}", cluster)])["KeyPairs"]
        except API_ERRORS:  # a region this account cannot use
            return region, []
        return region, found + [f"key pair {pair['KeyName']}" for pair in pairs]

    return {region: found for region, found in parallel(look, clients) if found}


def left_running(cluster: str, region: str, remedy: str) -> str:
    """What of the cluster still runs (and bills), asked of EC2 quickly, and how to remove it."""
    try:
        instances = cluster_instances(client("ec2", region, quick=True), cluster, states=BILLED_STATES)
    except API_ERRORS as exc:
        return (f"Could not list the instances of cluster {cluster} in {region} ({api_error_text(exc)}); any that "
                f"run are billed. {remedy}")
    if not instances:
        return f"No instance of cluster {cluster} runs in {region}."
    return (f"{len(instances)} instance(s) of cluster {cluster} in {region} are running and billing: "
            f"{', '.join(describe(instance) for instance in instances)}. {remedy}")
