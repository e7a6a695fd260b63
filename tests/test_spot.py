"""Spot workers across several instance types: moto for the EC2 API, everything after it real.

moto never runs out of capacity, so the capacity errors are injected at the boto3 client, by a
botocore event hook on it (RunInstancesFaults): the request is recorded and, for the offers the
test names, answered with EC2's error instead of reaching moto. The code under test -- the
launch (cloud/ec2.py), the provider, the scaler and its circuit breaker -- is not replaced.
Where instances are provisioned, they are fake hosts (tests/fakehosts.py: sshd in network
namespaces), as in tests/test_scale.py, whose fixtures these tests share.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from typing import Any

import pytest
import requests
from botocore.exceptions import ClientError
from fakeaws import (
    aws_fixture,  # noqa: F401 -- fixture "aws"
    moto_server_fixture,  # noqa: F401 -- fixture "moto_server"
)
from fakehosts import HostNetwork, host_network_fixture  # noqa: F401 -- fixture "host_network"
from fakeimds import metadata_service
from test_scale import (
    AMI,
    CLUSTER,
    GONE,
    LIVE,
    Cloud,
    Scalers,
    cloud,  # noqa: F401 -- fixture "cloud"
    cluster_instances,
    enqueue_backlog,
    fake_hosts,
    host_at,
    scalers,  # noqa: F401 -- fixture "scalers"
    tags_of,
)

from cloud.ec2 import ON_DEMAND, SPOT, Ec2Error, Launch, Offer, offers_for
from cloud.ssh import REMOTE_DIR_NAME
from conftest import WORKER_AUTH, Services, drain, reference, wait_for
from cron.config import parse_args
from cron.instance_types import slots_of, vcpus
from cron.scale import Scaler, make_provider

TYPES = ("c7i.large", "c6i.large", "c7a.large", "m7i.large")


class RunInstancesFaults:
    """Errors injected at a boto3 EC2 client by a botocore event hook: every RunInstances request is
    recorded (its parameters as the caller built them), and the ones `decide` names an error code
    for are answered with that error, as EC2 would, instead of reaching moto."""

    def __init__(self, ec2: Any, decide: Callable[[dict[str, Any]], str | None]) -> None:
        self.decide = decide
        self.requests: list[dict[str, Any]] = []
        ec2.meta.events.register("before-parameter-build.ec2.RunInstances", self._hook)

    def _hook(self, params: dict[str, Any], **_: Any) -> None:
        self.requests.append(copy.deepcopy(params))
        code = self.decide(params)
        if code:
            raise ClientError({"Error": {"Code": code, "Message": f"(injected by the test) {code}"}}, "RunInstances")

    def tried(self) -> list[tuple[str, str, str]]:
        """(type, market, subnet) of each request, in order."""
        return [(request["InstanceType"], market_of_request(request), request.get("SubnetId", ""))
                for request in self.requests]


def market_of_request(request: dict[str, Any]) -> str:
    return SPOT if request.get("InstanceMarketOptions", {}).get("MarketType") == "spot" else ON_DEMAND


def no_room_for(*offers: tuple[str, str], code: str = "InsufficientInstanceCapacity") -> Callable[[dict], str | None]:
    """EC2's answer when these (type, market) offers have no room, in any subnet."""
    return lambda request: code if (request["InstanceType"], market_of_request(request)) in offers else None


@pytest.fixture
def launch(cloud: Cloud) -> Launch:  # noqa: F811 -- the fixture of the same name
    """setup's record with two of moto's default subnets (two zones)."""
    subnets = [subnet["SubnetId"] for subnet in cloud.ec2.describe_subnets()["Subnets"]][:2]
    state = json.loads(cloud.aws_state.read_text())
    return Launch.from_state({**state, "subnet_ids": subnets}, CLUSTER, "us-east-1")


def run(launch: Launch, ec2: Any, offers: tuple[Offer, ...], count: int = 1) -> Any:
    return launch.run_offers(ec2, image=AMI, offers=offers, count=count, intent="test-intent",
                             tags={"dw:role": "worker", "dw:owner": "a"}, shutdown_behavior="terminate")


def test_spot_launches_carry_the_market_options_tags_and_metadata_options(cloud: Cloud, launch: Launch) -> None:  # noqa: F811
    faults = RunInstancesFaults(cloud.ec2, lambda _: None)
    launched = run(launch, cloud.ec2, offers_for(["c7i.large"], SPOT, spot_fallback=False), count=2)
    assert launched.offer == Offer("c7i.large", SPOT) and launched.passed_over == ()
    (request,) = faults.requests
    assert request["InstanceMarketOptions"] == {"MarketType": "spot", "SpotOptions": {
        "SpotInstanceType": "one-time", "InstanceInterruptionBehavior": "terminate"}}
    assert request["MetadataOptions"]["HttpTokens"] == "required"
    assert request["InstanceInitiatedShutdownBehavior"] == "terminate"
    assert len(request["ClientToken"]) == 64 and (request["MinCount"], request["MaxCount"]) == (2, 2)
    tagged = {spec["ResourceType"]: {tag["Key"]: tag["Value"] for tag in spec["Tags"]}
              for spec in request["TagSpecifications"]}
    assert set(tagged) == {"instance", "volume", "spot-instances-request"}
    assert all(tags == {"dw:cluster": CLUSTER, "dw:role": "worker", "dw:owner": "a"} for tags in tagged.values())
    # What moto recorded of the instances themselves.
    for instance in cluster_instances(cloud.ec2, LIVE):
        assert instance["InstanceLifecycle"] == "spot"
        assert instance["InstanceType"] == "c7i.large"
        assert instance["MetadataOptions"]["HttpTokens"] == "required"
        assert tags_of(instance)["dw:owner"] == "a"
        attribute = cloud.ec2.describe_instance_attribute(InstanceId=instance["InstanceId"],
                                                          Attribute="instanceInitiatedShutdownBehavior")
        assert attribute["InstanceInitiatedShutdownBehavior"]["Value"] == "terminate"
    assert len(cluster_instances(cloud.ec2, LIVE)) == 2


def test_on_demand_launches_carry_no_market_options(cloud: Cloud, launch: Launch) -> None:  # noqa: F811
    faults = RunInstancesFaults(cloud.ec2, lambda _: None)
    run(launch, cloud.ec2, offers_for(["c7i.large"], ON_DEMAND, spot_fallback=False))
    (request,) = faults.requests
    assert "InstanceMarketOptions" not in request
    assert {spec["ResourceType"] for spec in request["TagSpecifications"]} == {"instance", "volume"}
    (instance,) = cluster_instances(cloud.ec2, LIVE)
    assert "InstanceLifecycle" not in instance


def test_capacity_errors_move_the_launch_down_the_types_and_subnets_then_on_demand(cloud: Cloud,  # noqa: F811
                                                                                   launch: Launch) -> None:
    first, second = launch.subnet_ids
    no_spot = {(name, SPOT) for name in TYPES}

    def decide(request: dict[str, Any]) -> str | None:
        if request["InstanceType"] == "c7a.large" and request.get("SubnetId") == first:
            return "Unsupported"  # not offered in the first zone
        if request["InstanceType"] == "m7i.large":
            return "SpotMaxPriceTooLow"
        return "InsufficientInstanceCapacity" if (request["InstanceType"], market_of_request(request)) in no_spot \
            else None

    faults = RunInstancesFaults(cloud.ec2, decide)
    launched = run(launch, cloud.ec2, offers_for(TYPES, SPOT, spot_fallback=True), count=2)
    expected = [(name, SPOT, subnet) for name in TYPES for subnet in (first, second)]
    assert faults.tried() == [*expected, ("c7i.large", ON_DEMAND, first)]
    assert launched.offer == Offer("c7i.large", ON_DEMAND)
    assert len(launched.passed_over) == 8
    assert f"c7a.large (spot) in {first}: Unsupported" in launched.passed_over
    # Each offer and subnet is a request of its own: its own client token.
    assert len({request["ClientToken"] for request in faults.requests}) == len(faults.requests)
    live = cluster_instances(cloud.ec2, LIVE)
    assert len(live) == 2 and {instance["InstanceType"] for instance in live} == {"c7i.large"}
    assert all("InstanceLifecycle" not in instance for instance in live)


def test_a_type_short_in_one_zone_launches_in_the_next(cloud: Cloud, launch: Launch) -> None:  # noqa: F811
    first, second = launch.subnet_ids
    faults = RunInstancesFaults(cloud.ec2, lambda request: "InsufficientInstanceCapacity"
                                if request.get("SubnetId") == first else None)
    launched = run(launch, cloud.ec2, offers_for(TYPES, SPOT, spot_fallback=True))
    assert faults.tried() == [("c7i.large", SPOT, first), ("c7i.large", SPOT, second)]
    assert launched.offer == Offer("c7i.large", SPOT)
    (instance,) = cluster_instances(cloud.ec2, LIVE)
    assert instance["SubnetId"] == second and instance["InstanceLifecycle"] == "spot"


def test_the_spot_quota_used_up_goes_straight_to_on_demand(cloud: Cloud, launch: Launch) -> None:  # noqa: F811
    faults = RunInstancesFaults(cloud.ec2, no_room_for(*((name, SPOT) for name in TYPES),
                                                       code="MaxSpotInstanceCountExceeded"))
    launched = run(launch, cloud.ec2, offers_for(TYPES, SPOT, spot_fallback=True))
    # No other Spot type or zone can help: the first On-Demand offer is next.
    assert faults.tried() == [("c7i.large", SPOT, launch.subnet_ids[0]), ("c7i.large", ON_DEMAND, launch.subnet_ids[0])]
    assert launched.offer == Offer("c7i.large", ON_DEMAND)


def test_without_the_fallback_no_spot_capacity_fails_the_launch_naming_every_shortage(cloud: Cloud,  # noqa: F811
                                                                                      launch: Launch) -> None:
    faults = RunInstancesFaults(cloud.ec2, no_room_for(*((name, SPOT) for name in TYPES)))
    with pytest.raises(Ec2Error) as failure:
        run(launch, cloud.ec2, offers_for(TYPES, SPOT, spot_fallback=False))
    assert len(faults.requests) == len(TYPES) * 2
    assert all(market_of_request(request) == SPOT for request in faults.requests)
    for name in TYPES:
        assert f"{name} (spot) in {launch.subnet_ids[1]}: InsufficientInstanceCapacity" in str(failure.value)
    assert cluster_instances(cloud.ec2, LIVE) == []


def test_an_error_of_the_request_itself_is_no_reason_to_try_other_types(cloud: Cloud, launch: Launch) -> None:  # noqa: F811
    faults = RunInstancesFaults(cloud.ec2, lambda _: "AuthFailure.ServiceLinkedRoleCreationNotPermitted")
    with pytest.raises(Ec2Error) as failure:
        run(launch, cloud.ec2, offers_for(TYPES, SPOT, spot_fallback=True))
    assert len(faults.requests) == 1
    assert "create-service-linked-role --aws-service-name spot.amazonaws.com" in str(failure.value)


def test_throttling_retries_the_same_request_with_the_same_token(cloud: Cloud, launch: Launch) -> None:  # noqa: F811
    answers = iter(["RequestLimitExceeded"])
    faults = RunInstancesFaults(cloud.ec2, lambda _: next(answers, None))
    run(launch, cloud.ec2, offers_for(TYPES, SPOT, spot_fallback=True))
    first, retry = faults.requests
    assert first == retry  # the token too: had the first started instances, EC2 would answer with them


# --- the scaler: the circuit breaker ----------------------------------------------------------------

def in_process_scaler(scalers: Scalers, node: Any, addresses: list[str], monkeypatch: pytest.MonkeyPatch,  # noqa: F811
                      **flags: object) -> Scaler:
    """The scaler of `python -m cron.scale`, run in this process so that its EC2 client can be given
    the test's fault hook; everything else as the command line of tests/test_scale.py makes it."""
    for name, value in scalers.cloud.env.items():
        monkeypatch.setenv(name, value)
    args = parse_args(scalers.command(node, addresses=addresses, **flags)[3:])
    return Scaler(args, make_provider(args))


@pytest.mark.parametrize("fallback", ["on-demand", "none"])
def test_capacity_errors_the_fallback_absorbed_do_not_count_toward_the_breaker(
        fallback: str, services: Services, host_network: HostNetwork, cloud: Cloud,  # noqa: F811
        scalers: Scalers, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    a = services.endpoint("a", host=host_network.gateway)
    enqueue_backlog(a, 2)
    (host,) = fake_hosts(host_network, 1, cloud.public_key)
    # The command line of tests/test_scale.py names t3.micro first; these follow it.
    scaler = in_process_scaler(scalers, a, [host.address], monkeypatch, market="spot", spot_fallback=fallback,
                               instance_types=",".join(TYPES), breaker_threshold=1)
    types = ("t3.micro", *TYPES)
    assert scaler.provider.settings.instance_types == types
    faults = RunInstancesFaults(scaler.provider.ec2, no_room_for(*((name, SPOT) for name in types)))
    scaler.run_once()
    state = a.stats()["scaler"]  # the breaker as the scaler's record left it at its endpoint
    if fallback == "none":  # no capacity anywhere: a failure, which at a threshold of 1 opens the breaker
        assert state["consecutive_failures"] == 1 and "no capacity in any offer" in state["last_error"]
        assert state["breaker_open"] is True
        assert cluster_instances(cloud.ec2, LIVE) == []
        return
    assert state["consecutive_failures"] == 0, state["last_error"]  # absorbed: the breaker stays closed
    assert state["breaker_open"] is False
    assert [request[:2] for request in faults.tried()] == [(name, SPOT) for name in types] + [("t3.micro", ON_DEMAND)]
    (instance,) = cluster_instances(cloud.ec2, LIVE)
    assert "dw:ready" in tags_of(instance) and instance["InstanceType"] == "t3.micro"
    env = (host.root_dir / REMOTE_DIR_NAME / "worker.env").read_text()
    assert "DW_INTERRUPTION_NOTICES" not in env  # On-Demand: nothing to watch for


# --- an interruption, end to end through the scaler ---------------------------------------------------

def test_an_interrupted_spot_worker_gives_back_its_job_and_the_scaler_replaces_it(
        services: Services, host_network: HostNetwork, cloud: Cloud, scalers: Scalers) -> None:  # noqa: F811
    a = services.endpoint("a", host=host_network.gateway, extra_args=("--lease-seconds", "30"))
    iterations = 25_000_000  # 12-30 s of hashing: still running when the notice comes (asked every 5 s)
    expected = {a.enqueue(b"spot job", iterations): reference(b"spot job", iterations)}
    hosts = fake_hosts(host_network, 1, cloud.public_key)  # the replacement reuses it: a new instance there
    addresses = [host.address for host in hosts]
    with metadata_service(host_network.gateway) as (url, metadata):
        options = {"addresses": addresses, "market": "spot", "worker_metadata_url": url, "max_workers": 1}
        run = scalers.run(a, **options)
        (spot,) = cluster_instances(cloud.ec2, LIVE)
        assert spot["InstanceLifecycle"] == "spot", run.log()
        first = host_at(hosts, tags_of(spot)["dw:test-address"])
        env = (first.root_dir / REMOTE_DIR_NAME / "worker.env").read_text()
        assert "DW_INTERRUPTION_NOTICES=ec2-spot" in env and f"DW_METADATA_URL={url}" in env
        wait_for(lambda: a.stats()["running"] == 1, 30, "the Spot worker to claim the job")
        wait_for(lambda: metadata.notice_reads(first.address), 10, "the Spot worker to ask for a notice")
        (work_id,) = expected
        metadata.interrupt(30, first.address)  # a drain of 10 s at most: the job cannot end in time
        wait_for(lambda: a.work(work_id).json()["state"] == "pending", 10, "the job to be given back")
        wait_for(lambda: a.stats()["leaving"].get(spot["InstanceId"], {}).get("left"), 20,
                 "the Spot worker to say it left")
        assert a.work(work_id).json()["attempts"] == 0  # released: the attempt does not count
        metadata.calm(first.address)  # its fake host may serve the replacement: a new instance, no notice

        # The next run sees it gone: terminated, and its capacity replaced within the cap of 1.
        run = scalers.run(a, **options)
        assert spot["InstanceId"] in {i["InstanceId"] for i in cluster_instances(cloud.ec2, GONE)}, run.log()
        (replacement,) = cluster_instances(cloud.ec2, LIVE)
        assert replacement["InstanceId"] != spot["InstanceId"]
        assert "its worker gave back or finished its jobs and left" in run.log()
        results = drain([a], expected=1, timeout=120)
        assert {item["id"]: item["result"] for item in results} == expected
        assert a.work(work_id).json()["worker_id"] == replacement["InstanceId"]
        time.sleep(0.5)
        assert a.pull(10) == []  # nothing twice
    # Both Spot instances are in the cost the endpoint reports, from their launch on.
    (spot_usage,) = a.stats(public=True)["usage"]["last_hour"]["by_type"]
    assert (spot_usage["market"], spot_usage["instance_type"]) == ("spot", "t3.micro")
    since_first = time.time() - spot["LaunchTime"].timestamp()
    since_second = time.time() - replacement["LaunchTime"].timestamp()
    assert since_first - 10 < spot_usage["worker_seconds"] <= since_first + since_second + 1
    assert spot_usage["usd_per_hour"] == pytest.approx(0.0104 * 0.4)


@pytest.mark.parametrize("market", ["spot", "on-demand"])
def test_a_leaving_spot_worker_counts_neither_as_capacity_nor_against_the_cap(
        market: str, services: Services, host_network: HostNetwork, cloud: Cloud,  # noqa: F811
        scalers: Scalers) -> None:  # noqa: F811
    a = services.endpoint("a", host=host_network.gateway)
    enqueue_backlog(a, 2)
    hosts = fake_hosts(host_network, 4, cloud.public_key)  # scaler a takes every other address: two
    options = {"addresses": [host.address for host in hosts], "max_workers": 1, "market": market}
    scalers.run(a, **options)
    (first,) = cluster_instances(cloud.ec2, LIVE)
    # Its notice says 90 s: it still works, but a replacement is launched now, within the cap.
    said = {"worker": first["InstanceId"], "reason": "spot-interruption", "seconds_left": 90, "left": False}
    assert requests.post(f"{a.url}/internal/leaving", headers=WORKER_AUTH, json=said, timeout=10).status_code == 200
    run = scalers.run(a, **options)
    live = {instance["InstanceId"] for instance in cluster_instances(cloud.ec2, LIVE)}
    if market == "on-demand":  # any worker may say it of any other: an On-Demand one is not taken back
        assert live == {first["InstanceId"]} and "counted as gone" not in run.log()
        requests.post(f"{a.url}/internal/leaving", headers=WORKER_AUTH, json={**said, "left": True}, timeout=10)
        scalers.run(a, **options)
        assert {instance["InstanceId"] for instance in cluster_instances(cloud.ec2, LIVE)} == live
        return
    assert len(live) == 2 and first["InstanceId"] in live, run.log()
    assert "counted as gone" in run.log()


# --- the slots each type brings ----------------------------------------------------------------------

def test_the_vcpus_of_a_type_are_its_slots_until_workers_report_theirs() -> None:
    assert [vcpus(name) for name in ("c7i.large", "m7i.xlarge", "c6a.4xlarge", "r7i.medium")] == [2, 4, 16, 1]
    assert [vcpus(name) for name in ("t3.micro", "t2.micro", "t3.2xlarge", "c7i.metal-24xl")] == [2, 1, 8, None]
    assert slots_of("c7i.xlarge", worker_processes=0, configured=1) == 4
    assert slots_of("c7i.xlarge", worker_processes=3, configured=1) == 3  # --worker-processes decides
    assert slots_of("c7i.metal-24xl", worker_processes=0, configured=5) == 5  # unknown: the configured one


def test_the_scaler_sizes_the_fleet_by_the_slots_of_its_types(cloud: Cloud, scalers: Scalers,  # noqa: F811
                                                              services: Services, monkeypatch: pytest.MonkeyPatch,
                                                              host_network: HostNetwork) -> None:  # noqa: F811
    a = services.endpoint("a", host=host_network.gateway)
    enqueue_backlog(a, 8, iterations=1000)
    # 8 pending jobs of 1 s to drain in 1 s: 8 slots. Decide only (no launch): 0 per tick.
    flags = {"max_workers": 8, "max_launch_per_tick": 0, "worker_processes": 0, "slots_per_worker": 1}
    addresses = ["10.231.0.10"]  # never used: nothing is launched
    scaler = in_process_scaler(scalers, a, addresses, monkeypatch, instance_types="c7i.xlarge", **flags)
    assert scaler.provider.settings.instance_types == ("t3.micro", "c7i.xlarge")  # test_scale's t3.micro first
    assert scaler.run_once().needed == 4  # an empty fleet: what the first type, t3.micro (2 vCPUs), brings

    # Two ready workers of 8 vCPUs each: 16 slots, so one worker is enough.
    tags = [{"Key": key, "Value": value} for key, value in {"dw:cluster": CLUSTER, "dw:role": "worker",
                                                          "dw:owner": "a", "dw:ready": "now"}.items()]
    cloud.ec2.run_instances(ImageId=AMI, InstanceType="c7i.2xlarge", MinCount=2, MaxCount=2,
                            TagSpecifications=[{"ResourceType": "instance", "Tags": tags}])
    assert scaler.run_once().needed == 1
    one_process = in_process_scaler(scalers, a, addresses, monkeypatch, **{**flags, "worker_processes": 1})
    assert one_process.run_once().needed == 8  # one job at a time per worker, whatever the type
