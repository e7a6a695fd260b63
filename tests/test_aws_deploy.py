"""`./deploy.sh aws` against moto's server: it checks every setting before it launches
anything, never touches another cluster, looks in the right region, and a failure or a
Ctrl-C says which instances run and bill and how to remove them.

The scripts run as the user runs them (`./deploy.sh aws ...`, real processes); the
assertions look at "AWS" (moto) through boto3. Where a deploy must reach its endpoint
instances, they are fake hosts (network namespaces, tests/fakehosts.py) without an sshd,
i.e. instances whose SSH never answers.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fakeaws import (
    MotoServer,
    aws_fixture,  # noqa: F401 -- fixture "aws"
    moto_server_fixture,  # noqa: F401 -- fixture "moto_server"
)
from fakehosts import (
    HostNetwork,
    host_network_fixture,  # noqa: F401 -- fixture "host_network"
)

from conftest import PYTHON, REPO, wait_for

CLUSTER = "dwd"
AMI = "ami-12c6146b"  # one of moto's images
CIDR = "198.51.100.7/32"
LIVE = ("pending", "running")


class Aws:
    """The environment of a script run against moto, and what moto holds."""

    def __init__(self, moto: MotoServer, directory: Path) -> None:
        self.moto = moto
        self.directory = directory
        self.state_file = directory / "aws" / f"{CLUSTER}.json"

    def env(self, **extra: str | None) -> dict[str, str]:
        """The run's environment; an `extra` of None removes that variable."""
        env = {name: value for name, value in os.environ.items() if not name.startswith(("AWS_", "DW_"))}
        env.update(self.moto.env())
        env.pop("AWS_REGION")  # boto3 goes by AWS_DEFAULT_REGION; the scripts refuse the two disagreeing
        env.update({
            "AWS_CONFIG_FILE": str(self.directory / "no-aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(self.directory / "no-aws-credentials"),
            "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
            "DW_AWS_DIR": str(self.directory / "aws"), "DW_CLUSTER": CLUSTER, "DW_AMI": AMI,
            # Should a deploy get as far as SSH where a test does not expect it, it meets a loopback
            # address where nothing listens -- never the made-up public addresses of moto's instances.
            "DW_TEST_ENDPOINT_ADDRESSES": "127.0.0.2,127.0.0.3",
        })
        env.update(extra)
        return {name: value for name, value in env.items() if value is not None}

    def run(self, *args: str, expect: int | None = 0, timeout: float = 120,
            **env: str | None) -> subprocess.CompletedProcess[str]:
        completed = subprocess.run(list(args), cwd=REPO, env=self.env(**env), capture_output=True, text=True,
                                   timeout=timeout)
        if expect is not None:
            assert completed.returncode == expect, (f"{args}: exit {completed.returncode}, expected {expect}:\n"
                                                    f"{completed.stdout}\n{completed.stderr}")
        return completed

    def deploy(self, *args: str, **options: Any) -> subprocess.CompletedProcess[str]:
        return self.run("./deploy.sh", "aws", *args, **options)

    def setup(self, *args: str, **options: Any) -> subprocess.CompletedProcess[str]:
        return self.run(PYTHON, "-m", "deploy.aws_setup", "--allowed-cidr", CIDR, *args, **options)

    def ec2(self, region: str = "us-east-1") -> Any:
        import boto3

        return boto3.client("ec2", endpoint_url=self.moto.url, region_name=region, aws_access_key_id="testing",
                            aws_secret_access_key="testing")

    def instances(self, region: str = "us-east-1", states: tuple[str, ...] = LIVE) -> list[dict]:
        reservations = self.ec2(region).describe_instances(
            Filters=[{"Name": "instance-state-name", "Values": list(states)}])["Reservations"]
        return [instance for reservation in reservations for instance in reservation["Instances"]]

    def live_ids(self, region: str = "us-east-1") -> set[str]:
        return {instance["InstanceId"] for instance in self.instances(region)}


@pytest.fixture
def cloud(aws: dict[str, str], moto_server: MotoServer, tmp_path: Path) -> Aws:
    return Aws(moto_server, tmp_path)


def launch(ec2: Any, cluster: str, role: str, count: int = 1) -> set[str]:
    tags = [{"Key": "dw:cluster", "Value": cluster}, {"Key": "dw:role", "Value": role}]
    reservation = ec2.run_instances(ImageId=AMI, MinCount=count, MaxCount=count,
                                    TagSpecifications=[{"ResourceType": "instance", "Tags": tags}])
    return {instance["InstanceId"] for instance in reservation["Instances"]}


# --- every setting checked before anything is launched -------------------------------------------


@pytest.mark.parametrize(("args", "env", "problems"), [
    (["--max-workers", "abc", "--idle-timeout", "-5", "--scale-after", "banana"], {},
     ["--max-workers must be a whole number, not 'abc'", "--idle-timeout must be more than 0, not -5.0",
      "--scale-after must be a number of seconds, not 'banana'"]),
    ([], {"DW_MAX_WORKERS": "lots", "DW_BREAKER_THRESHOLD": "0"},
     ["--max-workers must be a whole number, not 'lots' (from DW_MAX_WORKERS)",
      "--breaker-threshold must be at least 1, not 0 (from DW_BREAKER_THRESHOLD)"]),
    (["--silence-deadline", "600", "--partition-deadline", "100"], {},
     ["--partition-deadline (100) must be at least --silence-deadline (600)"]),
    (["--ready-timeout", "nan", "--service", "docker", "--max-launch-per-tick", "1.5"], {},
     ["--ready-timeout must be more than 0, not nan", "--service must be one of systemd, process, not 'docker'",
      "--max-launch-per-tick must be a whole number, not '1.5'"]),
    (["--market", "cheap", "--instance-types", "c7i.large,BIG"], {"DW_SPOT_FALLBACK": "reserved"},
     ["--market must be one of on-demand, spot, not 'cheap'",
      "--instance-type must be EC2 instance type names such as c7i.large, not 'BIG'",
      "--spot-fallback must be one of none, on-demand, not 'reserved' (from DW_SPOT_FALLBACK)"]),
    (["--spot-fallback", "on-demand"], {}, ["--spot-fallback on-demand is for --market spot"]),
    (["--market", "spot", "--instance-types", "c7i.large,c6i.large,c7i.large"], {},
     ["--instance-types names c7i.large more than once"]),
])
def test_invalid_settings_launch_nothing(cloud: Aws, args: list[str], env: dict[str, str],
                                         problems: list[str]) -> None:
    cloud.setup()  # everything a deploy needs is there: only the settings can stop it
    completed = cloud.deploy(*args, expect=2, **env)
    assert completed.stderr.startswith("usage: ./deploy.sh aws"), completed.stderr
    for problem in problems:
        assert problem in completed.stderr
    assert "Traceback" not in completed.stderr
    assert cloud.instances() == []


def test_help_lists_the_scaler_knobs_with_their_defaults(cloud: Aws) -> None:
    shown = " ".join(cloud.deploy("--help").stdout.split())
    for expected in ("--max-workers N cluster-wide maximum, across both endpoints' scalers [DW_MAX_WORKERS, default 4]",
                     "[DW_SLOTS_PER_WORKER, default 2]", "[DW_MAX_LAUNCH_PER_TICK, default 4]",
                     "[DW_DEFAULT_JOB_DURATION, default 1]", "[DW_READY_DEADLINE, default 300]",
                     "[DW_SILENCE_DEADLINE, default 180]", "[DW_PARTITION_DEADLINE, default 900]",
                     "[DW_BREAKER_THRESHOLD, default 3]", "[DW_BREAKER_COOLDOWN, default 600]",
                     "[DW_READY_TIMEOUT, default 600]", "--market {on-demand,spot}", "[DW_MARKET, default on-",
                     "[DW_INSTANCE_TYPES, comma-separated, default c7i.large]", "[DW_SPOT_FALLBACK, default none]",
                     "--destroy"):
        assert expected in shown, shown


# --- never another cluster ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["orp?", "*"])
def test_wildcard_cluster_names_are_refused_and_touch_no_other_cluster(cloud: Aws, name: str) -> None:
    ec2 = cloud.ec2()
    others = launch(ec2, "orph", "endpoint", 2) | launch(ec2, "orph", "worker", 2)
    state = cloud.directory / "state.json"
    state.write_text('{"cluster": "orph", "region": "us-east-1", "key_name": "k", "key_path": "/dev/null", '
                     '"security_group_id": "sg-1"}')
    commands = [
        ["./deploy.sh", "aws", "--destroy", f"--cluster={name}"],
        ["./deploy.sh", "aws", f"--cluster={name}"],
        [PYTHON, "-m", "deploy.aws_setup", "--destroy", f"--cluster={name}"],
        [PYTHON, "-m", "cron.scale", "--provider", "ec2", "--aws-state", str(state), f"--cluster={name}",
         "--terminate-all"],
    ]
    for command in commands:
        completed = cloud.run(*command, expect=2)
        assert "--cluster must be 1-40 letters, digits and dashes" in completed.stderr, command
        assert "Traceback" not in completed.stderr
    completed = cloud.deploy("--destroy", expect=2, DW_CLUSTER=name)  # from the environment, the same
    assert "(from DW_CLUSTER)" in completed.stderr
    assert cloud.live_ids() == others


def test_destroy_of_a_similar_name_leaves_the_other_cluster_alone(cloud: Aws) -> None:
    others = launch(cloud.ec2(), "orph", "endpoint", 2)
    completed = cloud.deploy("--destroy", "--cluster", "orp")
    assert "nothing found for cluster orp in region us-east-1" in completed.stdout
    assert "gone" not in completed.stdout
    assert cloud.live_ids() == others


# --- the right region -----------------------------------------------------------------------------


def test_destroy_without_state_file_searches_the_configured_region(cloud: Aws) -> None:
    europe = launch(cloud.ec2("eu-west-1"), CLUSTER, "endpoint", 2) | launch(cloud.ec2("eu-west-1"), CLUSTER, "worker")
    config = cloud.directory / "aws-config"
    config.write_text("[default]\nregion = eu-west-1\n")
    completed = cloud.deploy("--destroy", AWS_CONFIG_FILE=str(config), AWS_DEFAULT_REGION=None)
    assert f"destroying cluster {CLUSTER} in region eu-west-1 (region from profile default in {config}" \
        in completed.stdout
    assert f"cluster {CLUSTER} in region eu-west-1" in completed.stdout and "removed 3 instance(s)" in completed.stdout
    assert cloud.live_ids("eu-west-1") == set()
    assert europe <= {instance["InstanceId"] for instance in cloud.instances("eu-west-1", ("terminated",))}


def test_destroy_in_the_wrong_region_says_where_the_cluster_is_and_terminates_nothing(cloud: Aws) -> None:
    europe = launch(cloud.ec2("eu-west-1"), CLUSTER, "endpoint", 2)
    here = launch(cloud.ec2(), "someone-else", "endpoint")
    completed = cloud.deploy("--destroy", expect=1)  # AWS_DEFAULT_REGION=us-east-1, no state file
    output = completed.stdout
    assert f"nothing found for cluster {CLUSTER} in region us-east-1 (region from AWS_DEFAULT_REGION)" in output
    assert f"./deploy.sh aws --destroy --cluster {CLUSTER} --region eu-west-1" in output
    assert all(instance_id in output for instance_id in europe)
    assert "gone" not in output
    assert cloud.live_ids("eu-west-1") == europe and cloud.live_ids() == here


def test_a_region_other_than_the_state_files_is_refused(cloud: Aws) -> None:
    cloud.setup()  # us-east-1
    completed = cloud.deploy("--region", "eu-west-1", expect=2)
    assert "records region us-east-1" in completed.stderr and "Traceback" not in completed.stderr
    assert cloud.instances() == [] and cloud.instances("eu-west-1") == []
    refused = cloud.deploy("--destroy", "--region", "eu-west-1", expect=2)
    assert "records region us-east-1" in refused.stderr


def test_an_unconfigured_region_is_refused(cloud: Aws) -> None:
    completed = cloud.deploy("--destroy", expect=2, AWS_DEFAULT_REGION=None)
    assert "no AWS region: pass --region" in completed.stderr
    disagreeing = cloud.deploy("--destroy", expect=2, AWS_REGION="eu-west-1")
    assert "AWS_REGION says eu-west-1, but boto3 uses us-east-1 (from AWS_DEFAULT_REGION)" in disagreeing.stderr


# --- a failed or interrupted deploy says what runs -------------------------------------------------


@pytest.fixture
def unreachable_endpoints(cloud: Aws, host_network: HostNetwork) -> dict[str, str]:
    """Set up, with endpoint instances whose SSH never answers: fake hosts without sshd."""
    hosts = [host_network.add_host(f"silent-{node}") for node in "ab"]
    cloud.setup()
    return {"DW_TEST_ENDPOINT_ADDRESSES": ",".join(host.address for host in hosts)}


class Lines:
    """A process's output, read as it comes."""

    def __init__(self, stream: Any) -> None:
        self.text = ""
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: Any) -> None:
        for line in stream:
            self.text += line

    def finish(self) -> str:
        self._thread.join(10)
        return self.text


@pytest.fixture
def started(cloud: Aws) -> Iterator[list[subprocess.Popen[str]]]:
    processes: list[subprocess.Popen[str]] = []
    try:
        yield processes
    finally:
        for process in processes:  # each leads a process group of its own
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)


def test_ctrl_c_stops_the_deploy_at_once_and_names_the_billing_instances(
        cloud: Aws, unreachable_endpoints: dict[str, str], started: list[subprocess.Popen[str]]) -> None:
    process = subprocess.Popen(["./deploy.sh", "aws"], cwd=REPO, env=cloud.env(**unreachable_endpoints),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    started.append(process)
    stdout, stderr = Lines(process.stdout), Lines(process.stderr)
    wait_for(lambda: stdout.text.count("waiting for SSH") == 2 or process.poll() is not None, 60,
             "the deploy to wait for the endpoints' SSH")
    time.sleep(1)
    process.send_signal(signal.SIGINT)
    signalled = time.monotonic()
    process.wait(30)
    stopped_after = time.monotonic() - signalled
    err = stderr.finish()
    assert process.returncode == 130, stdout.finish() + err
    assert stopped_after < 5, f"exited {stopped_after:.1f}s after SIGINT (the SSH wait is 600 s)"
    endpoints = {instance["InstanceId"] for instance in cloud.instances()}
    assert len(endpoints) == 2
    assert "stopped by Ctrl-C: the deploy did not finish." in err
    assert f"2 instance(s) of cluster {CLUSTER} in us-east-1 are running and billing" in err
    assert all(f"{instance_id} (endpoint " in err for instance_id in endpoints)
    assert f"`./deploy.sh aws --destroy --cluster {CLUSTER}` terminates them" in err
    assert "Or run the same command again: finished steps are kept" in err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err

    # and that command does remove them
    cloud.deploy("--destroy")
    assert cloud.instances() == []


def test_a_failed_deploy_names_the_billing_instances(cloud: Aws, unreachable_endpoints: dict[str, str]) -> None:
    started = time.monotonic()
    completed = cloud.deploy("--ready-timeout", "3", expect=1, **unreachable_endpoints)
    took = time.monotonic() - started
    endpoints = {instance["InstanceId"] for instance in cloud.instances()}
    assert "deploy failed: provisioning: SSH on" in completed.stderr
    assert "did not answer within 3s (--ready-timeout)" in completed.stderr
    assert f"2 instance(s) of cluster {CLUSTER} in us-east-1 are running and billing" in completed.stderr
    assert all(instance_id in completed.stderr for instance_id in endpoints) and len(endpoints) == 2
    assert "`./deploy.sh aws --destroy --cluster dwd` terminates them" in completed.stderr
    assert "Or fix the cause and run the same command again" in completed.stderr
    assert took < 60, f"the failed deploy took {took:.0f}s"  # its other endpoint's wait is not waited for
