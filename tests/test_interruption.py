"""A Spot worker's interruption notice (worker/interruption.py), from a metadata service the test
runs on loopback (tests/fakeimds.py), with real endpoints and real worker processes.

On the notice the worker claims nothing more, finishes the job that can end before the
deadline, gives the other back at once (a release: no lease left to expire, no attempt used),
tells the endpoints it is leaving and then that it left, and exits; another worker completes
what it gave back, with exact results, and nothing is lost or done twice.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest
import requests
from fakeimds import NOTICE_PATH, metadata_service

from conftest import PEER_AUTH, WORKER_AUTH, Services, drain, metric, reference, wait_for
from worker.interruption import Metadata, MetadataUnavailable, can_finish, parse_notice, seconds_to_go


def test_the_notice_is_read_the_imdsv2_way() -> None:
    with metadata_service() as (url, service):
        metadata = Metadata(url)
        assert metadata.notice() is None  # 404: no notice yet
        deadline = service.interrupt(100)
        notice = metadata.notice()
        assert notice is not None and notice.action == "terminate"
        assert abs(notice.deadline - int(deadline)) <= 1  # EC2 gives whole seconds
        service.expire_tokens()  # the token refused (401): a new one, and the read again
        assert metadata.notice() is not None
        # Every read carried a token, or was refused: 401 only for the expired one.
        assert service.notice_reads() == [404, 200, 401, 200]


def test_no_metadata_service_is_said_not_taken_for_no_notice(tmp_path: Path) -> None:
    with pytest.raises(MetadataUnavailable):
        Metadata("http://127.0.0.1:9", timeout=0.5).notice()  # the discard port: nothing listens


def test_a_notice_without_a_readable_time_leaves_ec2s_two_minutes() -> None:
    notice = parse_notice(b"not json", now=1000.0)
    assert (notice.action, notice.deadline) == ("terminate", 1120.0)
    assert parse_notice(b'{"action": "stop", "time": "2030-01-01T00:00:00Z"}', 0).deadline == 1893456000.0


def test_a_job_is_finished_only_if_it_is_known_to_end_in_time() -> None:
    assert seconds_to_go(1001, 1000, 0.5) is None  # nothing done yet past the first hash
    assert seconds_to_go(1001, 600, 2.0) == 3.0  # 400 steps in 2 s, 600 to go
    assert seconds_to_go(1001, 0, 2.0) == 0.0
    assert can_finish(3.0, 5.0)
    assert not can_finish(6.0, 5.0)
    assert not can_finish(None, 5.0)  # its speed not measured yet
    assert not can_finish(0.0, -1.0)  # the deadline passed


def hashes_per_second() -> float:
    """How fast this machine runs the Python kernel now (other tests share it): the jobs below are
    sized by it, so that which of them can end within a drain does not depend on the load."""
    digest, count, started = b"speed", 0, time.perf_counter()
    while time.perf_counter() - started < 0.3:
        for _ in range(10_000):
            digest = hashlib.sha512(digest).digest()
        count += 10_000
    return count / (time.perf_counter() - started)


def leaving_at(endpoint_url: str) -> dict:
    return requests.get(f"{endpoint_url}/stats", headers=PEER_AUTH, timeout=10).json()["leaving"]


def test_an_interrupted_worker_finishes_what_it_can_and_gives_back_the_rest(services: Services,
                                                                             tmp_path: Path) -> None:
    a, b = services.endpoint_pair(extra_args=("--lease-seconds", "60"))
    # The Python kernel (one lane per slot): at the notice, the short job (just started) has about
    # a second to go of the drain's 8-9 s, the long one about 25 s. The third slot is free: its
    # claims wait for work at both endpoints.
    speed = hashes_per_second()
    short, long = int(speed), int(30 * speed)
    expected = {a.enqueue(b"long job", long): reference(b"long job", long)}
    with metadata_service() as (url, service):
        spot = services.worker([a, b], worker_id="spot-1", processes=3, extra_args=(
            "--kernel", "python", "--interruption-notices", "ec2-spot", "--metadata-url", url,
            "--notice-interval", "0.2", "--exit-command", f"touch {tmp_path / 'exit-ran'}"))
        wait_for(lambda: a.stats()["running"] == 1, 30, "the Spot worker to claim the long job")
        expected[a.enqueue(b"short job", short)] = reference(b"short job", short)
        long_id, short_id = list(expected)
        wait_for(lambda: a.stats()["running"] == 2, 30, "the Spot worker to claim the short job")
        for endpoint in (a, b):
            wait_for(lambda endpoint=endpoint: endpoint.stats()["waiting_claims"] == 1, 30,
                     "the free slot's claims to wait for work")
        assert service.notice_reads()  # it asks before any notice
        # The margin for posting is 20 s: the drain's deadline is 8-9 s from now (EC2 gives whole seconds).
        service.interrupt(29)
        noticed = time.monotonic()

        def long_job_back() -> bool:
            item = a.work(long_id).json()
            return item["state"] == "pending" and item["attempts"] == 0
        wait_for(long_job_back, 10, "the long job to be given back")
        given_back_after = time.monotonic() - noticed
        assert given_back_after < 5, given_back_after  # a release, not a 60 s lease left to expire
        leaving = leaving_at(a.url)["spot-1"]
        assert leaving["reason"] == "spot-interruption" and 0 < leaving["seconds_left"] <= 29
        for endpoint in (a, b):  # its waiting claims were called off: no more claims
            assert endpoint.stats()["waiting_claims"] == 0
        late_id = a.enqueue(b"after the notice", 1000)  # no claim of the Spot worker takes it
        expected[late_id] = reference(b"after the notice", 1000)
        assert spot.process is not None
        assert spot.process.wait(30) == 0  # it exits by itself, done
        assert (tmp_path / "exit-ran").exists()  # with its exit action (on EC2: the poweroff)
        short_item = a.work(short_id).json()
        assert short_item["state"] == "completed" and short_item["worker_id"] == "spot-1", spot.log()
        late_item = a.work(late_id).json()
        assert late_item["state"] == "pending" and late_item["attempts"] == 0
        for endpoint in (a, b):  # both heard that it left
            assert leaving_at(endpoint.url)["spot-1"]["left"] is True
        log = spot.log()
        assert "Spot interruption notice" in log and "cannot finish before the interruption" in log

    services.worker([a, b], worker_id="on-demand-1", processes=1)
    results = drain([a, b], expected=3, timeout=120)
    assert sorted(item["id"] for item in results) == sorted(expected)  # each once: nothing lost or twice
    assert {item["id"]: item["result"] for item in results} == expected
    long_item = a.work(long_id).json()
    assert long_item["worker_id"] == "on-demand-1" and long_item["attempts"] == 1  # the release cost none


def test_a_job_with_no_lane_goes_back_and_the_one_in_the_lane_at_the_notice(services: Services) -> None:
    """A worker claims at both endpoints at once, at least one job each: with one lane, the second
    (a long job) is given back at once rather than wait in the worker for the lane. At a notice the
    one in the lane goes back too, as it cannot end in time."""
    a, b = services.endpoint_pair(extra_args=("--lease-seconds", "60"))
    iterations = int(20 * hashes_per_second())  # about 20 s each
    jobs = {a: a.enqueue(b"at a", iterations), b: b.enqueue(b"at b", iterations)}
    with metadata_service() as (url, service):
        spot = services.worker([a, b], worker_id="spot-2", processes=1, extra_args=(
            "--kernel", "python", "--interruption-notices", "ec2-spot", "--metadata-url", url,
            "--notice-interval", "0.2"))
        wait_for(lambda: a.stats()["running"] + b.stats()["running"] == 1
                 and a.stats()["workers_heard_from"] + b.stats()["workers_heard_from"] == 2, 30,
                 "one job claimed, both endpoints asked, one lane for both")

        def one_in_the_lane_one_back() -> bool:
            found = sorted((status["state"], status["attempts"])
                           for status in (endpoint.work(work_id).json() for endpoint, work_id in jobs.items()))
            return found == [("pending", 0), ("running", 1)]
        # Given back as it came (no lane free), or its claim called off as the other filled the lane.
        wait_for(one_in_the_lane_one_back, 10, "the second job to be given back")
        service.interrupt(29)  # the drain's deadline is 8-9 s away: neither job ends by then
        noticed = time.monotonic()

        def both_back() -> bool:
            return all(endpoint.work(work_id).json()["state"] == "pending" for endpoint, work_id in jobs.items())
        wait_for(both_back, 10, "both jobs to be given back")
        assert time.monotonic() - noticed < 4  # at once, not at the drain's deadline
        assert spot.process is not None and spot.process.wait(30) == 0
    assert [endpoint.work(work_id).json()["attempts"] for endpoint, work_id in jobs.items()] == [0, 0]
    log = spot.log()
    assert "cannot finish before the interruption" in log


def test_leaving_is_checked_like_every_worker_request(services: Services) -> None:
    a = services.endpoint("a")
    url = f"{a.url}/internal/leaving"
    good = {"worker": "w-1", "reason": "spot-interruption", "seconds_left": 90, "left": False}
    for bad in ({**good, "reason": "Spot Interruption"}, {**good, "seconds_left": -1},
                {**good, "seconds_left": True}, {**good, "left": "yes"}, {**good, "worker": "a b"}):
        response = requests.post(url, data=json.dumps(bad), headers=WORKER_AUTH, timeout=10)
        assert response.status_code == 400, (bad, response.text)
    assert requests.post(url, json=good, timeout=10).status_code == 401
    assert requests.post(url, json=good, headers=PEER_AUTH, timeout=10).status_code == 403
    assert a.stats()["leaving"] == {}
    assert requests.post(url, json=good, headers=WORKER_AUTH, timeout=10).status_code == 200
    assert requests.post(url, json={**good, "left": True}, headers=WORKER_AUTH, timeout=10).status_code == 200
    # A late "leaving" does not take back a "left".
    assert requests.post(url, json=good, headers=WORKER_AUTH, timeout=10).status_code == 200
    assert a.stats()["leaving"]["w-1"]["left"] is True
    public = a.stats(public=True)
    assert public["workers_leaving"] == 1 and "leaving" not in public  # counts, not names
    scraped = requests.get(f"{a.url}/metrics", timeout=10).text
    assert metric(scraped, "dw_workers_leaving") == 1
    assert metric(scraped, "dw_worker_departures_total", reason="spot-interruption") == 1  # one worker, said thrice


def test_a_worker_not_told_it_runs_on_spot_never_asks(services: Services) -> None:
    a = services.endpoint("a")
    with metadata_service() as (url, service):
        worker = services.worker([a], processes=1, extra_args=("--metadata-url", url, "--notice-interval", "0.1"))
        wait_for(lambda: a.stats()["workers_heard_from"] == 1, 20, "the worker to poll")
        time.sleep(0.5)
        assert service.notice_reads() == [] and not [read for read in service.reads if read[1] != NOTICE_PATH]
        assert worker.running()
