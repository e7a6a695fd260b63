"""`./setup.sh aws` (deploy.aws_setup) against moto's server: what it creates, that re-runs change
nothing or exactly what changed, what it refuses, and that --destroy removes its own resources
and nothing else. The module runs as the subprocess setup.sh starts; the assertions look at
"AWS" (moto) through boto3.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError
from fakeapi import BrokenApi
from fakeaws import MotoServer, moto_server_fixture  # noqa: F401 -- fixture "moto_server"

from conftest import REPO, wait_for
from deploy import aws_setup, cluster, iam, network

PYTHON = sys.executable
CIDR = "203.0.113.7/32"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
               "AWS_EC2_METADATA_DISABLED": "true"}
STATE_KEYS = {"cluster", "region", "vpc_id", "subnet_ids", "security_group_id", "allowed_cidr", "http_port",
              "key_name", "key_path", "endpoint_role", "endpoint_instance_profile", "endpoint_instance_profile_arn",
              "created_at", "updated_at"}
# Talk to the local moto server directly, whatever proxy the environment names.
LOCAL = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class Aws:
    """boto3 clients for the moto server, and the environment of a setup run against it."""

    def __init__(self, url: str, directory: Path) -> None:
        self.url = url
        self.directory = directory
        self.ec2 = self.client("ec2")
        self.iam = self.client("iam")
        self.aws_dir = directory / "aws"
        self.state_file = self.aws_dir / "dw.json"
        self.pem = self.aws_dir / "dw-key.pem"

    def client(self, service: str, region: str = "us-east-1") -> Any:
        return boto3.client(service, endpoint_url=self.url, region_name=region, aws_access_key_id="testing",
                            aws_secret_access_key="testing")

    def env(self, **extra: str | None) -> dict[str, str]:
        """The run's environment; an `extra` of None removes that variable."""
        env = {name: value for name, value in os.environ.items() if not name.startswith(("AWS_", "DW_"))}
        env.update(CREDENTIALS)
        env.update({
            "AWS_ENDPOINT_URL": self.url,
            # no ~/.aws profile of whoever runs the tests plays a part
            "AWS_CONFIG_FILE": str(self.directory / "no-aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(self.directory / "no-aws-credentials"),
            "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
            # nothing goes into the checkout's var/
            "DW_AWS_DIR": str(self.aws_dir), "DW_AWS_STATE": str(self.state_file),
        })
        env.update(extra)
        return {name: value for name, value in env.items() if value is not None}

    def run(self, *args: str, expect: int | None = 0, **env: str | None) -> subprocess.CompletedProcess[str]:
        completed = subprocess.run([PYTHON, "-m", "deploy.aws_setup", *args], cwd=REPO, env=self.env(**env),
                                   capture_output=True, text=True, timeout=90)
        if expect is not None:
            assert completed.returncode == expect, (f"exit {completed.returncode}, expected {expect}:\n"
                                                    f"{completed.stdout}\n{completed.stderr}")
        return completed

    def setup(self, *args: str, **env: str | None) -> subprocess.CompletedProcess[str]:
        return self.run("--allowed-cidr", CIDR, *args, **env)

    # what exists
    def default_vpc(self) -> str:
        return self.ec2.describe_vpcs(Filters=[{"Name": "is-default", "Values": ["true"]}])["Vpcs"][0]["VpcId"]

    def key_pairs(self) -> list[dict]:
        return self.ec2.describe_key_pairs()["KeyPairs"]

    def groups(self, name: str | None = None) -> list[dict]:
        groups = self.ec2.describe_security_groups()["SecurityGroups"]
        return [group for group in groups if group["GroupName"] != "default" and name in (None, group["GroupName"])]

    def roles(self) -> list[str]:
        return [role["RoleName"] for role in self.iam.list_roles()["Roles"]]

    def profiles(self) -> list[dict]:
        return self.iam.list_instance_profiles()["InstanceProfiles"]

    def policy(self, role: str = "dw-endpoint") -> dict:
        document = self.iam.get_role_policy(RoleName=role, PolicyName="dw-scaler")["PolicyDocument"]
        return document if isinstance(document, dict) else json.loads(document)

    def state(self) -> dict:
        return json.loads(self.state_file.read_text())

    def nothing_created(self) -> None:
        assert self.key_pairs() == []
        assert self.groups() == []
        assert self.roles() == []
        assert self.profiles() == []
        assert not self.state_file.exists()
        assert not self.pem.exists()


@pytest.fixture
def aws(moto_server: MotoServer, tmp_path: Path) -> Aws:
    """moto's server of the session (tests/fakeaws.py), reset: every test starts from nothing."""
    moto_server.reset()
    return Aws(moto_server.url, tmp_path)


def ingress(group: dict) -> set[tuple[str, int, int, str]]:
    rules = set()
    for permission in group["IpPermissions"]:
        key = permission["IpProtocol"], permission.get("FromPort", -1), permission.get("ToPort", -1)
        rules |= {(*key, item["CidrIp"]) for item in permission.get("IpRanges", [])}
        rules |= {(*key, item["CidrIpv6"]) for item in permission.get("Ipv6Ranges", [])}
        rules |= {(*key, item["GroupId"]) for item in permission.get("UserIdGroupPairs", [])}
    return rules


def expected_rules(group_id: str, cidr: str = CIDR, port: int = 5000) -> set[tuple[str, int, int, str]]:
    return {("tcp", port, port, cidr), ("tcp", 22, 22, cidr), ("tcp", port, port, group_id), ("tcp", 22, 22, group_id)}


def tags(resource: dict) -> dict[str, str]:
    return {tag["Key"]: tag["Value"] for tag in resource.get("Tags", [])}


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


# --- setup ---------------------------------------------------------------------------------------


def test_setup_twice_creates_everything_once(aws: Aws) -> None:
    first = aws.setup()
    assert "key pair dw-key: created" in first.stdout
    state = aws.state()
    second = aws.setup()
    assert "key pair dw-key: already exists" in second.stdout
    assert "security group dw-sg: already exists" in second.stdout
    assert "allowed" not in second.stdout  # no rule added the second time

    (key_pair,) = aws.key_pairs()
    assert key_pair["KeyName"] == "dw-key" and tags(key_pair)["dw:cluster"] == "dw"
    assert mode(aws.pem) == 0o600
    assert aws.pem.read_text().startswith("-----BEGIN")

    (group,) = aws.groups()
    assert group["GroupName"] == "dw-sg" and group["VpcId"] == aws.default_vpc()
    assert tags(group)["dw:cluster"] == "dw"
    assert ingress(group) == expected_rules(group["GroupId"])

    assert aws.roles() == ["dw-endpoint"]
    assert aws.iam.list_role_policies(RoleName="dw-endpoint")["PolicyNames"] == ["dw-scaler"]
    assert tags(aws.iam.get_role(RoleName="dw-endpoint")["Role"]) == {
        "dw:cluster": "dw", "dw:role": "endpoint", "Name": "dw-endpoint"}
    (profile,) = aws.profiles()
    assert profile["InstanceProfileName"] == "dw-endpoint"
    assert [role["RoleName"] for role in profile["Roles"]] == ["dw-endpoint"]
    assert tags(profile)["dw:cluster"] == "dw"

    assert mode(aws.state_file) == 0o600
    again = aws.state()
    assert again.keys() >= STATE_KEYS
    assert again["created_at"] == state["created_at"]
    subnets = aws.ec2.describe_subnets(Filters=[{"Name": "default-for-az", "Values": ["true"]}])["Subnets"]
    assert sorted(again["subnet_ids"]) == sorted(subnet["SubnetId"] for subnet in subnets)
    assert {key: again[key] for key in STATE_KEYS - {"created_at", "updated_at", "subnet_ids"}} == {
        "cluster": "dw", "region": "us-east-1", "vpc_id": aws.default_vpc(), "security_group_id": group["GroupId"],
        "allowed_cidr": CIDR, "http_port": 5000, "key_name": "dw-key", "key_path": str(aws.pem),
        "endpoint_role": "dw-endpoint", "endpoint_instance_profile": "dw-endpoint",
        "endpoint_instance_profile_arn": profile["Arn"]}
    assert not list(aws.aws_dir.glob("*.tmp")), "a temporary file was left behind"


def test_changed_allowed_cidr_replaces_the_old_rules(aws: Aws) -> None:
    aws.setup()
    group_id = aws.state()["security_group_id"]
    # a rule added by hand is not setup's to remove
    aws.ec2.authorize_security_group_ingress(GroupId=group_id, IpPermissions=[
        {"IpProtocol": "tcp", "FromPort": 443, "ToPort": 443, "IpRanges": [{"CidrIp": "192.0.2.0/24"}]}])

    output = aws.run("--allowed-cidr", "198.51.100.0/24", "--http-port", "8080").stdout
    assert "revoked tcp 5000 from 203.0.113.7/32" in output
    (group,) = aws.groups()
    assert ingress(group) == expected_rules(group_id, "198.51.100.0/24", 8080) | {("tcp", 443, 443, "192.0.2.0/24")}
    assert aws.state()["allowed_cidr"] == "198.51.100.0/24" and aws.state()["http_port"] == 8080

    # without --allowed-cidr a re-run keeps the recorded one
    aws.run("--http-port", "8080")
    (group,) = aws.groups()
    assert ingress(group) == expected_rules(group_id, "198.51.100.0/24", 8080) | {("tcp", 443, 443, "192.0.2.0/24")}


@pytest.mark.parametrize(("args", "env", "message"), [
    (["--allowed-cidr", "0.0.0.0/0"], {}, "--allow-anywhere"),
    (["--allowed-cidr", "::/0"], {}, "--allow-anywhere"),
    (["--allowed-cidr", "10.0.0.300/32"], {}, "is not a valid CIDR"),
    ([], {"DW_ALLOWED_CIDR": "my-laptop"}, "is not a valid CIDR"),
    ([], {}, "no allowed CIDR"),
])
def test_refused_cidrs_create_nothing(aws: Aws, args: list[str], env: dict[str, str], message: str) -> None:
    completed = aws.run(*args, expect=None, **env)
    assert completed.returncode != 0
    assert message in completed.stderr
    assert "Traceback" not in completed.stderr
    if not args and not env:
        assert "--allowed-cidr" in completed.stderr  # says what to pass
    aws.nothing_created()


class FakeResponse:
    def __init__(self, body: bytes) -> None:
        self.body = body

    def __enter__(self) -> FakeResponse:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def read(self, limit: int = -1) -> bytes:
        return self.body


def test_public_address_discovery_only_when_enabled(monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process, with urlopen replaced: the tests never reach out to the internet."""
    asked: list[tuple[str, float]] = []

    def answer(url: str, timeout: float) -> FakeResponse:
        asked.append((url, timeout))
        return FakeResponse(b"198.51.100.23\n")

    args = aws_setup.parse_args(["--cluster", "dw"])
    args.allowed_cidr = ""
    monkeypatch.setattr(network.urllib.request, "urlopen", answer)
    monkeypatch.delenv("DW_DISCOVER_IP", raising=False)
    with pytest.raises(cluster.UsageError, match="--allowed-cidr"):
        network.resolve_allowed_cidr(args, {})
    assert asked == []
    assert network.resolve_allowed_cidr(args, {"allowed_cidr": CIDR}) == CIDR  # a re-run keeps the record

    monkeypatch.setenv("DW_DISCOVER_IP", "1")
    assert network.resolve_allowed_cidr(args, {}) == "198.51.100.23/32"
    assert asked == [("https://checkip.amazonaws.com", 3)]

    def unreachable(url: str, timeout: float) -> FakeResponse:
        raise OSError("timed out")

    monkeypatch.setattr(network.urllib.request, "urlopen", unreachable)
    with pytest.raises(cluster.UsageError, match="--allowed-cidr"):
        network.resolve_allowed_cidr(args, {})


def test_anywhere_only_when_asked(aws: Aws) -> None:
    aws.run("--allowed-cidr", "0.0.0.0/0", "--allow-anywhere")
    (group,) = aws.groups()
    assert ingress(group) == expected_rules(group["GroupId"], "0.0.0.0/0")


def test_key_pair_without_its_private_key_is_not_replaced(aws: Aws) -> None:
    aws.setup()
    (key_pair,) = aws.key_pairs()
    aws.pem.unlink()
    completed = aws.setup(expect=1)
    assert f"its private key {aws.pem} is missing" in completed.stderr
    assert "delete the key pair" in completed.stderr and "restore" in completed.stderr
    assert [pair["KeyPairId"] for pair in aws.key_pairs()] == [key_pair["KeyPairId"]]
    assert not aws.pem.exists()


def test_resources_of_the_same_name_not_made_by_setup_are_not_taken_over(aws: Aws) -> None:
    aws.ec2.create_key_pair(KeyName="dw-key")
    completed = aws.setup(expect=1)
    assert "not tagged dw:cluster" in completed.stderr
    assert len(aws.key_pairs()) == 1 and aws.groups() == [] and aws.roles() == []


def test_rerun_completes_a_half_finished_setup(aws: Aws) -> None:
    aws.setup()
    group_id = aws.state()["security_group_id"]
    # as if the first run had stopped half-way
    aws.iam.remove_role_from_instance_profile(InstanceProfileName="dw-endpoint", RoleName="dw-endpoint")
    aws.iam.delete_instance_profile(InstanceProfileName="dw-endpoint")
    aws.iam.delete_role_policy(RoleName="dw-endpoint", PolicyName="dw-scaler")
    # (moto matches a group rule to revoke on its description too; EC2 does not)
    pair = {"GroupId": group_id, "Description": "dw:dw SSH within the cluster"}
    aws.ec2.revoke_security_group_ingress(GroupId=group_id, IpPermissions=[
        {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "UserIdGroupPairs": [pair]}])

    aws.setup()
    (group,) = aws.groups()
    assert ingress(group) == expected_rules(group_id)
    assert aws.policy()["Statement"]
    (profile,) = aws.profiles()
    assert [role["RoleName"] for role in profile["Roles"]] == ["dw-endpoint"]
    assert aws.state()["endpoint_instance_profile_arn"] == profile["Arn"]


# --- the endpoints' permissions ------------------------------------------------------------------


def statements_with(policy: dict, action: str) -> list[dict]:
    return [statement for statement in policy["Statement"] if action in as_list(statement["Action"])]


def as_list(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else value


def test_endpoint_policy_allows_only_what_the_scaler_needs(aws: Aws) -> None:
    aws.setup()
    policy = aws.policy()
    group_id = aws.state()["security_group_id"]
    assert all(statement["Effect"] == "Allow" for statement in policy["Statement"])
    actions = {action for statement in policy["Statement"] for action in as_list(statement["Action"])}
    assert not [action for action in actions if "*" in action]
    assert actions == {"ec2:RunInstances", "ec2:CreateTags", "ec2:TerminateInstances", "ec2:DescribeInstances",
                       "ec2:DescribeImages", "ec2:DescribeSubnets", "ec2:DescribeSecurityGroups", "ssm:GetParameter"}
    assert "iam:PassRole" not in actions  # there is no worker role: workers hold no credentials

    # only Describe* (which supports no resource-level permissions) on "*"
    for statement in policy["Statement"]:
        if "*" in as_list(statement["Resource"]):
            assert all(action.startswith("ec2:Describe") for action in as_list(statement["Action"]))

    (terminate,) = statements_with(policy, "ec2:TerminateInstances")
    assert terminate["Condition"] == {"StringEquals": {"ec2:ResourceTag/dw:cluster": "dw"}}
    assert as_list(terminate["Resource"]) == ["arn:aws:ec2:us-east-1:123456789012:instance/*"]

    for statement in statements_with(policy, "ec2:CreateTags"):
        assert statement["Condition"] in ({"StringEquals": {"ec2:ResourceTag/dw:cluster": "dw"}},
                                          {"StringEquals": {"ec2:CreateAction": "RunInstances"}})

    run = statements_with(policy, "ec2:RunInstances")
    by_resource = {resource: statement for statement in run for resource in as_list(statement["Resource"])}
    # A Spot launch's one-time request too, only tagged for the cluster; and no IAM write of any kind
    # (the account's Spot service-linked role is the deploy's to make, with the operator's credentials).
    for kind in ("instance", "volume", "spot-instances-request"):
        condition = by_resource[f"arn:aws:ec2:us-east-1:123456789012:{kind}/*"]["Condition"]
        assert condition == {"StringEquals": {"aws:RequestTag/dw:cluster": "dw"}}
    (tag_at_launch,) = [statement for statement in statements_with(policy, "ec2:CreateTags")
                        if statement["Condition"] == {"StringEquals": {"ec2:CreateAction": "RunInstances"}}]
    assert "arn:aws:ec2:us-east-1:123456789012:spot-instances-request/*" in as_list(tag_at_launch["Resource"])
    assert f"arn:aws:ec2:us-east-1:123456789012:security-group/{group_id}" in by_resource
    assert "arn:aws:ec2:us-east-1:123456789012:key-pair/dw-key" in by_resource
    subnet = by_resource["arn:aws:ec2:us-east-1:123456789012:subnet/*"]
    vpc_arn = f"arn:aws:ec2:us-east-1:123456789012:vpc/{aws.default_vpc()}"
    assert subnet["Condition"] == {"ArnEquals": {"ec2:Vpc": vpc_arn}}

    (ssm,) = statements_with(policy, "ssm:GetParameter")
    assert ssm["Resource"] == "arn:aws:ssm:*::parameter/aws/service/*"

    trust = aws.iam.get_role(RoleName="dw-endpoint")["Role"]["AssumeRolePolicyDocument"]
    trust = trust if isinstance(trust, dict) else json.loads(trust)
    assert trust["Statement"] == [{"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"},
                                   "Action": "sts:AssumeRole"}]


def test_pass_role_only_for_an_existing_worker_role(aws: Aws) -> None:
    trust = json.dumps(iam.EC2_TRUST_POLICY)
    arn = aws.iam.create_role(RoleName="dw-worker", AssumeRolePolicyDocument=trust,
                              Tags=[{"Key": "dw:cluster", "Value": "dw"}])["Role"]["Arn"]
    aws.setup()
    (pass_role,) = statements_with(aws.policy(), "iam:PassRole")
    assert pass_role["Resource"] == arn
    assert pass_role["Condition"] == {"StringEquals": {"iam:PassedToService": "ec2.amazonaws.com"}}


# --- destroy -------------------------------------------------------------------------------------


def test_destroy_removes_what_setup_created_and_nothing_else(aws: Aws) -> None:
    vpc_id = aws.default_vpc()
    unrelated_group = aws.ec2.create_security_group(GroupName="unrelated-sg", Description="not ours",
                                                    VpcId=vpc_id)["GroupId"]
    aws.ec2.create_key_pair(KeyName="unrelated-key")
    # a second cluster, set up the same way
    other_state = aws.aws_dir / "dw2.json"
    aws.setup("--cluster", "dw2", "--state-file", str(other_state))
    aws.setup()

    output = aws.run("--destroy").stdout
    assert "security group dw-sg: deleted" in output
    assert sorted(pair["KeyName"] for pair in aws.key_pairs()) == ["dw2-key", "unrelated-key"]
    assert sorted(group["GroupName"] for group in aws.groups()) == ["dw2-sg", "unrelated-sg"]
    assert aws.groups("unrelated-sg")[0]["GroupId"] == unrelated_group
    assert aws.roles() == ["dw2-endpoint"]
    assert [profile["InstanceProfileName"] for profile in aws.profiles()] == ["dw2-endpoint"]
    assert not aws.pem.exists() and not aws.state_file.exists()
    assert other_state.exists() and (aws.aws_dir / "dw2-key.pem").exists()

    again = aws.run("--destroy").stdout
    assert "none found" in again and "nothing found for cluster dw in region us-east-1" in again


def test_destroy_without_state_file_goes_by_name_and_tag(aws: Aws) -> None:
    aws.setup()
    aws.state_file.unlink()
    aws.run("--destroy")
    aws.nothing_created()

    # same names, but not tagged for the cluster: left alone
    aws.ec2.create_key_pair(KeyName="dw-key")
    aws.ec2.create_security_group(GroupName="dw-sg", Description="not ours", VpcId=aws.default_vpc())
    output = aws.run("--destroy").stdout
    assert "left alone" in output
    assert [pair["KeyName"] for pair in aws.key_pairs()] == ["dw-key"]
    assert [group["GroupName"] for group in aws.groups()] == ["dw-sg"]


class FakeEc2:
    """DeleteSecurityGroup refused with DependencyViolation `busy` times (moto never refuses it)."""

    def __init__(self, busy: int) -> None:
        self.busy = busy
        self.calls = 0

    def delete_security_group(self, GroupId: str) -> None:  # noqa: N803 (boto3's parameter name)
        self.calls += 1
        if self.calls <= self.busy:
            raise ClientError({"Error": {"Code": "DependencyViolation", "Message": "resource sg has a dependent"}},
                              "DeleteSecurityGroup")


def test_security_group_deletion_waits_for_terminating_instances() -> None:
    now = [0.0]
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        now[0] += seconds

    ec2 = FakeEc2(busy=3)
    network.delete_security_group(ec2, "security group dw-sg", "sg-1", timeout=60, sleep=sleep, clock=lambda: now[0])
    assert ec2.calls == 4 and sleeps == [2.0, 4.0, 8.0]

    now[0], sleeps[:] = 0.0, []
    with pytest.raises(cluster.SetupError, match="still in use"):
        network.delete_security_group(FakeEc2(busy=1000), "security group dw-sg", "sg-1", timeout=60,
                                        sleep=sleep, clock=lambda: now[0])
    assert 45 <= sum(sleeps) <= 60


# --- never what instances depend on, never another cluster, never the wrong region ----------------

AMI = "ami-12c6146b"  # one of moto's images


def launch(ec2: Any, count: int = 1, cluster: str = "dw", role: str = "worker", **request: Any) -> list[str]:
    """Instances "of" a cluster, as its deploy and scalers tag them."""
    tag_list = [{"Key": "dw:cluster", "Value": cluster}, {"Key": "dw:role", "Value": role}]
    reservation = ec2.run_instances(ImageId=AMI, MinCount=count, MaxCount=count, **request,
                                    TagSpecifications=[{"ResourceType": "instance", "Tags": tag_list}])
    return [instance["InstanceId"] for instance in reservation["Instances"]]


def live(ec2: Any, ids: list[str]) -> list[str]:
    reservations = ec2.describe_instances(InstanceIds=ids)["Reservations"]
    return [instance["InstanceId"] for reservation in reservations for instance in reservation["Instances"]
            if instance["State"]["Name"] in ("pending", "running")]


def everything_kept(aws: Aws) -> None:
    assert [pair["KeyName"] for pair in aws.key_pairs()] == ["dw-key"]
    assert len(aws.groups("dw-sg")) == 1
    assert aws.roles() == ["dw-endpoint"] and len(aws.profiles()) == 1
    assert aws.pem.exists() and aws.state_file.exists()


def test_destroy_refuses_while_instances_need_what_it_deletes(aws: Aws) -> None:
    aws.setup()
    group_id = aws.state()["security_group_id"]
    ours = launch(aws.ec2, 2, KeyName="dw-key", SecurityGroupIds=[group_id])
    # not tagged for the cluster, but reached with its key pair: deleting the key would lock it out
    by_key = launch(aws.ec2, 1, cluster="someone-else", KeyName="dw-key")

    completed = aws.run("--destroy", expect=1)
    for instance_id in ours + by_key:
        assert instance_id in completed.stderr
    assert "running and billing" in completed.stderr and "nothing was deleted" in completed.stderr
    assert "./deploy.sh aws --destroy" in completed.stderr  # the command that terminates them
    assert "gone" not in completed.stdout + completed.stderr
    everything_kept(aws)
    assert sorted(live(aws.ec2, ours + by_key)) == sorted(ours + by_key)  # and destroy terminated nothing

    aws.ec2.terminate_instances(InstanceIds=ours + by_key)
    done = aws.run("--destroy")
    assert "removed IAM instance profile dw-endpoint, IAM role dw-endpoint, security group dw-sg" in done.stdout
    aws.nothing_created()


def test_destroy_of_a_cluster_that_never_was_says_nothing_was_found(aws: Aws) -> None:
    completed = aws.run("--destroy", "--cluster", "never")
    assert "nothing found for cluster never in region us-east-1 (region from AWS_DEFAULT_REGION)" in completed.stdout
    assert "nor in any other region" in completed.stdout
    assert "gone" not in completed.stdout and "removed" not in completed.stdout


def test_setup_takes_the_region_of_the_aws_configuration(aws: Aws) -> None:
    config = aws.directory / "aws-config"
    config.write_text("[default]\nregion = eu-west-1\n")
    in_config = {"AWS_CONFIG_FILE": str(config), "AWS_DEFAULT_REGION": None}
    completed = aws.setup(**in_config)
    assert f"in eu-west-1 (region from profile default in {config}" in completed.stdout
    assert aws.state()["region"] == "eu-west-1"
    europe = aws.client("ec2", "eu-west-1")
    assert [pair["KeyName"] for pair in europe.describe_key_pairs()["KeyPairs"]] == ["dw-key"]
    assert aws.key_pairs() == []  # nothing in us-east-1

    # The cluster stays where its state file says: another --region is refused, and creates nothing.
    refused = aws.setup("--region", "us-east-1", expect=2, **in_config)
    assert "records region eu-west-1" in refused.stderr and "Traceback" not in refused.stderr
    assert aws.key_pairs() == []
    # Without the state file, the same cluster name in another region is refused too: IAM names are global.
    aws.state_file.rename(aws.directory / "moved.json")
    refused = aws.setup("--region", "us-east-1", expect=2)
    assert "already exists in eu-west-1" in refused.stderr
    assert aws.key_pairs() == [] and aws.groups() == []


def test_destroy_in_the_wrong_region_touches_nothing_and_says_where_the_cluster_is(aws: Aws) -> None:
    aws.setup("--region", "eu-west-1")
    europe = aws.client("ec2", "eu-west-1")
    instance_ids = launch(europe, 1, role="endpoint", KeyName="dw-key")
    aws.state_file.unlink()  # lost: destroy goes by the configured region, us-east-1

    completed = aws.run("--destroy", expect=1)
    output = completed.stdout
    assert "nothing found for cluster dw in region us-east-1 (region from AWS_DEFAULT_REGION)" in output
    assert f"eu-west-1: {instance_ids[0]} (endpoint, running), key pair dw-key" in output
    assert "./setup.sh aws --destroy --region eu-west-1" in output
    assert "serve cluster dw in eu-west-1, not us-east-1: left alone" in output
    assert "gone" not in output
    assert aws.roles() == ["dw-endpoint"] and len(aws.profiles()) == 1  # IAM is global: still the cluster's
    assert live(europe, instance_ids) == instance_ids
    assert len(europe.describe_key_pairs()["KeyPairs"]) == 1

    refused = aws.run("--destroy", "--region", "eu-west-1", expect=1)  # its instance still runs there
    assert instance_ids[0] in refused.stderr


@pytest.mark.parametrize("name", ["orp?", "*", "dw*", "a b", "-dw", "", "x" * 41, "dw/1"])
def test_cluster_names_are_checked_before_anything(aws: Aws, name: str) -> None:
    other = launch(aws.ec2, 1, cluster="orph")
    for args in (["--allowed-cidr", CIDR, f"--cluster={name}"], ["--destroy", f"--cluster={name}"]):
        completed = aws.run(*args, expect=2)
        assert "--cluster must be 1-40 letters, digits and dashes" in completed.stderr
        assert "Traceback" not in completed.stderr
    completed = aws.run("--allowed-cidr", CIDR, expect=2, DW_CLUSTER=name)  # the environment fallback too
    assert "(from DW_CLUSTER)" in completed.stderr or name == ""
    aws.nothing_created()
    assert live(aws.ec2, other) == other


@pytest.mark.parametrize(("cidr", "refused", "message"), [
    ("0.0.0.0/1", True, "2,147,483,648 addresses"),
    ("2001:db8::/16", True, "--allow-anywhere"),
    ("::1/128", True, "a loopback range"),
    ("127.0.0.0/8", True, "a loopback range"),
    ("169.254.0.0/16", True, "link-local"),
    ("224.0.0.1/32", True, "multicast"),
    ("0.0.0.0/32", True, "the unspecified address"),
    ("10.0.0.0/8", False, "a private range"),
    ("198.51.100.0/24", False, "a documentation example range"),
    ("8.0.0.0/12", False, "1,048,576 addresses"),
])
def test_broad_or_useless_cidrs_are_refused_or_warned_about(aws: Aws, cidr: str, refused: bool,
                                                             message: str) -> None:
    completed = aws.run("--allowed-cidr", cidr, expect=2 if refused else 0)
    assert message in completed.stderr
    assert "Traceback" not in completed.stderr
    if refused:
        aws.nothing_created()
    else:
        assert "warning: allowed CIDR" in completed.stderr and aws.state()["allowed_cidr"] == cidr


def test_an_api_that_answers_500_is_reported_not_crashed_on(aws: Aws) -> None:
    with BrokenApi("500") as api:
        completed = aws.setup(expect=1, AWS_ENDPOINT_URL=api.url, AWS_MAX_ATTEMPTS="2")
    assert api.requests >= 1
    assert "aws setup failed: " in completed.stderr
    assert "gave an answer that is not an API answer (Unable to parse response" in completed.stderr
    assert "Traceback" not in completed.stderr


def test_ctrl_c_stops_setup_at_once_and_says_what_exists(aws: Aws) -> None:
    with BrokenApi("hang") as api:
        process = subprocess.Popen(["./setup.sh", "aws", "--allowed-cidr", CIDR], cwd=REPO,
                                   env=aws.env(AWS_ENDPOINT_URL=api.url), stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        wait_for(lambda: api.requests >= 1, 30, "setup's first API call")
        process.send_signal(signal.SIGINT)
        started = time.monotonic()
        try:
            stdout, stderr = process.communicate(timeout=10)
        finally:
            process.kill()
        stopped_after = time.monotonic() - started
    assert process.returncode == 130, stderr
    assert stopped_after < 5, f"exited {stopped_after:.1f}s after SIGINT"
    assert "stopped by Ctrl-C: the setup of cluster dw is incomplete" in stderr
    assert "./setup.sh aws --destroy` removes it" in stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr


def test_help_shows_the_defaults() -> None:
    completed = subprocess.run([PYTHON, "-m", "deploy.aws_setup", "--help"], cwd=REPO, capture_output=True, text=True,
                               timeout=30)
    for shown in ("[DW_CLUSTER, default dw]", "[DW_HTTP_PORT, default 5000]", "[DW_KEY_TYPE, default ed25519]",
                  "[DW_AWS_DIR, default var/aws]", "--destroy", "--allow-anywhere"):
        assert shown in " ".join(completed.stdout.split()), completed.stdout
