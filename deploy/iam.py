"""The endpoints' IAM role and instance profile `<cluster>-endpoint`: the only AWS credentials in
the cluster (workers get no instance profile).

The role's inline policy `dw-scaler` allows what the scaler on the endpoints does, and nothing else:
  ec2:RunInstances        launch workers. Resources: any image (the AMI is Amazon Linux from SSM
                          or the operator's --ami); only this cluster's key pair and security
                          group; subnets of the cluster's VPC only; the new network interface;
                          and instances, volumes and Spot requests only when the request tags
                          them dw:cluster=<cluster>. A Spot launch (RunInstances with
                          InstanceMarketOptions) creates a one-time Spot request: the
                          spot-instances-request resource is all it needs beyond an On-Demand one.
  ec2:CreateTags          (a) as part of RunInstances only (ec2:CreateAction), to tag what it
                          launches; (b) on instances already tagged dw:cluster=<cluster>, to
                          mark workers ready (dw:ready).
  ec2:TerminateInstances  on instances tagged dw:cluster=<cluster> only: retire idle or broken workers.
  ec2:Describe{Instances,Images,Subnets,SecurityGroups}
                          read-only listing. EC2's Describe* actions support no resource-level
                          permissions, so these are granted on "*".
  ssm:GetParameter        the public parameter of the latest Amazon Linux AMI (/aws/service/...).
  iam:PassRole            only if a worker role `<cluster>-worker` (tagged for the cluster) exists;
                          by default there is none: workers hold no AWS credentials.

Spot needs the account's service-linked role AWSServiceRoleForEC2Spot, which EC2 creates at the
first Spot request only if the caller may (iam:CreateServiceLinkedRole). The endpoints are not
given that: `./deploy.sh aws --market spot` creates the role once, with the operator's credentials
(`ensure_spot_role`), and nothing ever deletes it (it is the account's, not the cluster's).

IAM is global and EC2 is not: the policy names the region, and a cluster name has one region
per account (`check_role_region`); destroy leaves a role that serves another region alone.
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Callable
from typing import Any

from botocore.exceptions import ClientError

from cloud.aws import error_code
from cloud.ec2 import Tag
from deploy.cluster import Settings, SetupError, UsageError, ours_to_remove, report, require_ours, step, tag_value

POLICY_NAME = "dw-scaler"

EC2_TRUST_POLICY = {
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}],
}


def endpoint_policy(*, cluster: str, region: str, partition: str, account: str, vpc_id: str,
                    security_group_id: str, key_name: str, worker_role_arn: str = "") -> dict:
    """The scaler's permissions on the endpoint instances (see the module docstring for why each)."""
    ec2 = f"arn:{partition}:ec2:{region}:{account}"
    statements: list[dict[str, Any]] = [
        {
            # Describe* actions support no resource-level permissions: "*" is the only resource
            # they accept. They only read.
            "Sid": "Describe",
            "Effect": "Allow",
            "Action": ["ec2:DescribeInstances", "ec2:DescribeImages", "ec2:DescribeSubnets",
                       "ec2:DescribeSecurityGroups"],
            "Resource": "*",
        },
        {
            # RunInstances is authorized against every resource it touches. Images have no account
            # in their ARN; the AMI is chosen by the operator (or SSM), so any image is allowed.
            "Sid": "RunInstancesClusterResources",
            "Effect": "Allow",
            "Action": "ec2:RunInstances",
            "Resource": [f"arn:{partition}:ec2:{region}::image/*",
                         f"{ec2}:key-pair/{key_name}",
                         f"{ec2}:security-group/{security_group_id}",
                         # the interface RunInstances creates; it lands in a subnet allowed below
                         f"{ec2}:network-interface/*"],
        },
        {
            "Sid": "RunInstancesInClusterVpc",
            "Effect": "Allow",
            "Action": "ec2:RunInstances",
            "Resource": f"{ec2}:subnet/*",
            "Condition": {"ArnEquals": {"ec2:Vpc": f"{ec2}:vpc/{vpc_id}"}},
        },
        {
            # New instances, volumes and Spot requests only if the request tags them as the cluster's.
            "Sid": "RunInstancesTaggedForCluster",
            "Effect": "Allow",
            "Action": "ec2:RunInstances",
            "Resource": [f"{ec2}:instance/*", f"{ec2}:volume/*", f"{ec2}:spot-instances-request/*"],
            "Condition": {"StringEquals": {f"aws:RequestTag/{Tag.CLUSTER}": cluster}},
        },
        {
            # Tagging at launch (TagSpecifications) is a CreateTags call; only as part of RunInstances.
            "Sid": "TagAtLaunch",
            "Effect": "Allow",
            "Action": "ec2:CreateTags",
            "Resource": [f"{ec2}:instance/*", f"{ec2}:volume/*", f"{ec2}:spot-instances-request/*"],
            "Condition": {"StringEquals": {"ec2:CreateAction": "RunInstances"}},
        },
        {
            # Retire workers and mark them ready: only instances that are already the cluster's.
            "Sid": "ManageClusterInstances",
            "Effect": "Allow",
            "Action": ["ec2:TerminateInstances", "ec2:CreateTags"],
            "Resource": f"{ec2}:instance/*",
            "Condition": {"StringEquals": {f"ec2:ResourceTag/{Tag.CLUSTER}": cluster}},
        },
        {
            # The latest Amazon Linux AMI id is a public SSM parameter; public parameters' ARNs
            # carry no account.
            "Sid": "LatestAmiParameter",
            "Effect": "Allow",
            "Action": "ssm:GetParameter",
            "Resource": f"arn:{partition}:ssm:*::parameter/aws/service/*",
        },
    ]
    if worker_role_arn:
        statements.append({
            "Sid": "PassWorkerRole",
            "Effect": "Allow",
            "Action": "iam:PassRole",
            "Resource": worker_role_arn,
            "Condition": {"StringEquals": {"iam:PassedToService": "ec2.amazonaws.com"}},
        })
    return {"Version": "2012-10-17", "Statement": statements}


SPOT_SERVICE = "spot.amazonaws.com"
SPOT_ROLE_NAME = "AWSServiceRoleForEC2Spot"
SPOT_ROLE_PATH = f"/aws-service-role/{SPOT_SERVICE}/"  # where IAM keeps it, whatever its name


def ensure_spot_role(iam: Any) -> None:
    """The account's Spot service-linked role, created if missing (once per account, with the
    operator's credentials): EC2 refuses Spot requests without it from callers, like the
    endpoints, that may not create it themselves."""
    what = f"IAM service-linked role {SPOT_ROLE_NAME}"
    with step(what):
        if iam.list_roles(PathPrefix=SPOT_ROLE_PATH)["Roles"]:
            report(what, "exists (the account's: Spot instances may be launched)")
            return
        try:
            iam.create_service_linked_role(AWSServiceName=SPOT_SERVICE)
        except ClientError as exc:
            # Made meanwhile: IAM says "has been taken in this account" (InvalidInput), or EntityAlreadyExists.
            if error_code(exc) != "EntityAlreadyExists" and "taken" not in str(exc):
                raise
        report(what, "created for the account, once: EC2 needs it for Spot instances; nothing deletes it")


def get_or_none(call: Callable[..., dict], key: str, **kwargs: Any) -> dict | None:
    try:
        return call(**kwargs)[key]
    except ClientError as exc:
        if error_code(exc) == "NoSuchEntity":
            return None
        raise


def adoptable(what: str, cluster: str, call: Callable[..., dict], key: str, **kwargs: Any) -> dict | None:
    """The resource, if there is one and it is the cluster's; SetupError if it is someone else's."""
    resource = get_or_none(call, key, **kwargs)
    if resource:
        require_ours(what, resource.get("Tags"), cluster)
    return resource


def as_document(value: str | dict) -> dict:
    """boto3 hands back IAM policy documents decoded; be tolerant of the raw (URL-encoded) form too."""
    if isinstance(value, dict):
        return value
    return json.loads(urllib.parse.unquote(value))


def ensure_role(iam: Any, settings: Settings) -> str:
    what = f"IAM role {settings.role_name}"
    with step(what):
        role = adoptable(what, settings.cluster, iam.get_role, "Role", RoleName=settings.role_name)
        if role:
            if as_document(role.get("AssumeRolePolicyDocument", {})) != EC2_TRUST_POLICY:
                iam.update_assume_role_policy(RoleName=settings.role_name,
                                              PolicyDocument=json.dumps(EC2_TRUST_POLICY))
                report(what, "trust policy reset to EC2 only")
            report(what, "already exists")
            return role["Arn"]
        try:
            role = iam.create_role(
                RoleName=settings.role_name, AssumeRolePolicyDocument=json.dumps(EC2_TRUST_POLICY),
                Tags=settings.tags(settings.role_name, "endpoint"),
                Description=f"dynamic-workload {settings.cluster}: the endpoints' scaler launches and "
                            f"terminates the cluster's workers")["Role"]
        except ClientError as exc:
            if error_code(exc) != "EntityAlreadyExists":
                raise
            role = iam.get_role(RoleName=settings.role_name)["Role"]  # created meanwhile
        report(what, "created")
        return role["Arn"]


def role_region(iam: Any, settings: Settings) -> str:
    """The region the cluster's IAM role serves, read from the policy setup wrote for it ("" if none).
    IAM is global, EC2 is not: one cluster name has one region per account."""
    with step(f"IAM role {settings.role_name}, inline policy {POLICY_NAME}"):
        document = get_or_none(iam.get_role_policy, "PolicyDocument", RoleName=settings.role_name,
                               PolicyName=POLICY_NAME)
    for statement in as_document(document or {}).get("Statement", []):
        resource = statement.get("Resource")
        if statement.get("Sid") == "ManageClusterInstances" and isinstance(resource, str):
            return resource.split(":")[3]
    return ""


def check_role_region(iam: Any, settings: Settings) -> None:
    serving = role_region(iam, settings)
    if serving and serving != settings.region:
        raise UsageError(f"cluster {settings.cluster} already exists in {serving} (its IAM role {settings.role_name} "
                         f"serves that region; IAM names are global): use another --cluster for a cluster in "
                         f"{settings.region}, or --region {serving}")


def worker_role_arn(iam: Any, settings: Settings) -> str:
    """The workers' role, if someone made one for the cluster (setup does not: workers hold no
    AWS credentials). Only then do the endpoints get iam:PassRole, and only for that role."""
    with step(f"IAM role {settings.worker_role_name}"):
        role = get_or_none(iam.get_role, "Role", RoleName=settings.worker_role_name)
    if not role:
        return ""
    if tag_value(role.get("Tags")) != settings.cluster:
        report(f"IAM role {settings.worker_role_name}", f"not tagged {Tag.CLUSTER}={settings.cluster}: ignored")
        return ""
    report(f"IAM role {settings.worker_role_name}", "exists: the endpoints may pass it to workers (iam:PassRole)")
    return role["Arn"]


def ensure_role_policy(iam: Any, settings: Settings, document: dict) -> None:
    what = f"IAM role {settings.role_name}, inline policy {POLICY_NAME}"
    with step(what):
        existing = get_or_none(iam.get_role_policy, "PolicyDocument", RoleName=settings.role_name,
                               PolicyName=POLICY_NAME)
        if existing is not None and as_document(existing) == document:
            report(what, "already up to date")
            return
        iam.put_role_policy(RoleName=settings.role_name, PolicyName=POLICY_NAME, PolicyDocument=json.dumps(document))
        report(what, "written" if existing is None else "updated")


def ensure_instance_profile(iam: Any, settings: Settings) -> str:
    what = f"IAM instance profile {settings.profile_name}"
    with step(what):
        # GetInstanceProfile returns the tags (moto lacks ListInstanceProfileTags).
        profile = adoptable(what, settings.cluster, iam.get_instance_profile, "InstanceProfile",
                            InstanceProfileName=settings.profile_name)
        if profile:
            report(what, "already exists")
        else:
            try:
                iam.create_instance_profile(InstanceProfileName=settings.profile_name,
                                            Tags=settings.tags(settings.profile_name, "endpoint"))
                report(what, "created")
            except ClientError as exc:
                if error_code(exc) != "EntityAlreadyExists":
                    raise
            iam.get_waiter("instance_profile_exists").wait(InstanceProfileName=settings.profile_name,
                                                           WaiterConfig={"Delay": 1, "MaxAttempts": 30})
            profile = iam.get_instance_profile(InstanceProfileName=settings.profile_name)["InstanceProfile"]
        roles = [role["RoleName"] for role in profile.get("Roles", [])]
        if settings.role_name in roles:
            report(what, f"already holds role {settings.role_name}")
        elif roles:  # a profile holds at most one role
            raise SetupError(f"{what} holds role {roles[0]}, not {settings.role_name}: remove that role from it "
                             f"(`aws iam remove-role-from-instance-profile`) and run setup again")
        else:
            try:
                iam.add_role_to_instance_profile(InstanceProfileName=settings.profile_name,
                                                 RoleName=settings.role_name)
            except ClientError as exc:
                if error_code(exc) != "LimitExceeded":  # added meanwhile
                    raise
            report(what, f"role {settings.role_name} added")
        return profile["Arn"]


# --- removal ----------------------------------------------------------------------------------


def remove_ours(what: str, cluster: str, find: Callable[[], dict | None], delete: Callable[[dict], None]) -> bool:
    """Looks the resource up and deletes it if it is the cluster's (else says why it stays)."""
    with step(what):
        resource = find()
        if not ours_to_remove(what, resource, cluster):
            return False
        delete(resource)
        report(what, "deleted")
        return True


def remove_instance_profile(iam: Any, cluster: str, name: str) -> bool:
    what = f"IAM instance profile {name}"

    def delete(profile: dict) -> None:
        for role in profile.get("Roles", []):
            ignore_missing(iam.remove_role_from_instance_profile, "NoSuchEntity",
                           InstanceProfileName=name, RoleName=role["RoleName"])
            report(what, f"role {role['RoleName']} removed from it")
        ignore_missing(iam.delete_instance_profile, "NoSuchEntity", InstanceProfileName=name)

    return remove_ours(what, cluster, lambda: get_or_none(iam.get_instance_profile, "InstanceProfile",
                                                          InstanceProfileName=name), delete)


def remove_role(iam: Any, cluster: str, name: str) -> bool:
    what = f"IAM role {name}"

    def delete(role: dict) -> None:
        if ignore_missing(iam.delete_role_policy, "NoSuchEntity", RoleName=name, PolicyName=POLICY_NAME):
            report(what, f"inline policy {POLICY_NAME} deleted")
        try:
            ignore_missing(iam.delete_role, "NoSuchEntity", RoleName=name)
        except ClientError as exc:
            if error_code(exc) == "DeleteConflict":
                raise SetupError(f"{what}: {exc} -- it holds policies or instance profiles setup did not add; "
                                 f"remove those and run --destroy again") from exc
            raise

    return remove_ours(what, cluster, lambda: get_or_none(iam.get_role, "Role", RoleName=name), delete)


def ignore_missing(call: Callable[..., Any], missing: str, **kwargs: Any) -> bool:
    """The call; False if AWS says that what it acts on is not there (gone meanwhile)."""
    try:
        call(**kwargs)
    except ClientError as exc:
        if error_code(exc) != missing:
            raise
        return False
    return True


def remove_iam(iam: Any, settings: Settings) -> list[str]:
    """The role and profile, unless they serve the cluster in another region (IAM is global)."""
    serving = role_region(iam, settings)
    if serving and serving != settings.region:
        report(f"IAM role and instance profile {settings.role_name}", f"serve cluster {settings.cluster} in "
                                                                        f"{serving}, not {settings.region}: left alone")
        return []
    removed = []
    if remove_instance_profile(iam, settings.cluster, settings.profile_name):
        removed.append(f"IAM instance profile {settings.profile_name}")
    if remove_role(iam, settings.cluster, settings.role_name):
        removed.append(f"IAM role {settings.role_name}")
    return removed
