"""`./setup.sh aws` (cron.aws_setup) against moto's server: what it creates, that re-runs change
nothing or exactly what changed, what it refuses, and that --destroy removes its own resources
and nothing else. The module runs as the subprocess setup.sh starts; the assertions look at
"AWS" (moto) through boto3.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError
from cloudhosts import MotoServer

from conftest import REPO
from cron import aws_setup

PYTHON = sys.executable
CIDR = "203.0.113.7/32"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
               "AWS_EC2_METADATA_DISABLED": "true"}
STATE_KEYS = {"cluster", "region", "vpc_id", "subnet_ids", "security_group_id", "allowed_cidr", "http_port",
              "key_name", "key_path", "endpoint_role", "endpoint_instance_profile", "endpoint_instance_profile_arn",
              "created_at", "updated_at"}
# Talk to the local moto server directly, whatever proxy the environment names.
LOCAL = urllib.request.build_opener(urllib.request.ProxyHandler({}))


# --- moto's server, one per module, reset before every test ------------------------------------


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    server = MotoServer(tmp_path_factory.mktemp("moto"))
    try:
        yield server
    finally:
        server.stop()


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

    def client(self, service: str) -> Any:
        return boto3.client(service, endpoint_url=self.url, region_name="us-east-1", aws_access_key_id="testing",
                            aws_secret_access_key="testing")

    def env(self, **extra: str) -> dict[str, str]:
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
        return env

    def run(self, *args: str, expect: int | None = 0, **env: str) -> subprocess.CompletedProcess[str]:
        completed = subprocess.run([PYTHON, "-m", "cron.aws_setup", *args], cwd=REPO, env=self.env(**env),
                                   capture_output=True, text=True, timeout=90)
        if expect is not None:
            assert completed.returncode == expect, (f"exit {completed.returncode}, expected {expect}:\n"
                                                    f"{completed.stdout}\n{completed.stderr}")
        return completed

    def setup(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
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
def aws(moto: MotoServer, tmp_path: Path) -> Aws:
    moto.reset()
    return Aws(moto.url, tmp_path)


def ingress(group: dict) -> set[tuple[str, int, int, str]]:
    rules = set()
    for permission in group["IpPermissions"]:
        key = permission["IpProtocol"], permission.get("FromPort", -1), permission.get("ToPort", -1)
        rules |= {(*key, item["CidrIp"]) for item in permission.get("IpRanges", [])}
        rules |= {(*key, item["CidrIpv6"]) for item in permission.get("Ipv6Ranges", [])}
        rules |= {(*key, item["GroupId"]) for item in permission.get("UserIdGroupPairs", [])}
    return rules


def expected_rules(group_id: str, cidr: str = CIDR, port: int = 5000) -> set[tuple[str, int, int, str]]:
    return {("tcp", port, port, cidr), ("tcp", 22, 22, cidr), ("tcp", 0, 65535, group_id)}


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
    monkeypatch.setattr(aws_setup.urllib.request, "urlopen", answer)
    monkeypatch.delenv("DW_DISCOVER_IP", raising=False)
    with pytest.raises(aws_setup.UsageError, match="--allowed-cidr"):
        aws_setup.resolve_allowed_cidr(args, {})
    assert asked == []
    assert aws_setup.resolve_allowed_cidr(args, {"allowed_cidr": CIDR}) == CIDR  # a re-run keeps the record

    monkeypatch.setenv("DW_DISCOVER_IP", "1")
    assert aws_setup.resolve_allowed_cidr(args, {}) == "198.51.100.23/32"
    assert asked == [("https://checkip.amazonaws.com", 3)]

    def unreachable(url: str, timeout: float) -> FakeResponse:
        raise OSError("timed out")

    monkeypatch.setattr(aws_setup.urllib.request, "urlopen", unreachable)
    with pytest.raises(aws_setup.UsageError, match="--allowed-cidr"):
        aws_setup.resolve_allowed_cidr(args, {})


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
    pair = {"GroupId": group_id, "Description": "dw:dw all TCP within the cluster"}
    aws.ec2.revoke_security_group_ingress(GroupId=group_id, IpPermissions=[
        {"IpProtocol": "tcp", "FromPort": 0, "ToPort": 65535, "UserIdGroupPairs": [pair]}])

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
    for kind in ("instance", "volume"):
        condition = by_resource[f"arn:aws:ec2:us-east-1:123456789012:{kind}/*"]["Condition"]
        assert condition == {"StringEquals": {"aws:RequestTag/dw:cluster": "dw"}}
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
    trust = json.dumps(aws_setup.EC2_TRUST_POLICY)
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
    aws_setup.delete_security_group(ec2, "security group dw-sg", "sg-1", timeout=60, sleep=sleep, clock=lambda: now[0])
    assert ec2.calls == 4 and sleeps == [2.0, 4.0, 8.0]

    now[0], sleeps[:] = 0.0, []
    with pytest.raises(aws_setup.SetupError, match="still in use"):
        aws_setup.delete_security_group(FakeEc2(busy=1000), "security group dw-sg", "sg-1", timeout=60,
                                        sleep=sleep, clock=lambda: now[0])
    assert 45 <= sum(sleeps) <= 60
