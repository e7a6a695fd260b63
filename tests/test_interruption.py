"""A Spot worker's interruption notice (worker/interruption.py), from a metadata service the test
runs on loopback (tests/fakeimds.py), with real endpoints and real worker processes.

On the notice the worker claims nothing more, finishes the job that can end before the
deadline, gives the other back at once (a release: no lease left to expire, no attempt used),
tells the endpoints it is leaving and then that it left, and exits; another worker completes
what it gave back, with exact results, and nothing is lost or done twice.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import requests
from fakeimds import NOTICE_PATH, metadata_service

from conftest import PEER_AUTH, WORKER_AUTH, Services, drain, reference, wait_for
from worker.interruption import Metadata, MetadataUnavailable, can_finish, parse_notice


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
    assert can_finish(3.0, 5.0)
    assert not can_finish(6.0, 5.0)
    assert not can_finish(None, 5.0)  # its speed not measured yet
    assert not can_finish(0.0, -1.0)  # the deadline passed


def leaving_at(endpoint_url: str) -> dict:
    return requests.get(f"{endpoint_url}/stats", headers=PEER_AUTH, timeout=10).json()["leaving"]


def test_an_interrupted_worker_finishes_what_it_can_and_gives_back_the_rest(services: Services,
                                                                             tmp_path: Path) -> None:
    a, b = services.endpoint_pair(extra_args=("--lease-seconds", "30"))
    # Sized for a Python loop of 1-2 M hashes per second on this machine: at the notice, the short
    # job (just started) has 1-2 s to go of the drain's 4-5 s, the long one 8-19 s.
    short, long = 2_000_000, 20_000_000
    expected = {a.enqueue(b"long job", long): reference(b"long job", long)}
    with metadata_service() as (url, service):
        spot = services.worker([a, b], worker_id="spot-1", processes=2, extra_args=(
            "--interruption-notices", "ec2-spot", "--metadata-url", url, "--notice-interval", "0.2",
            "--exit-command", f"touch {tmp_path / 'exit-ran'}"))
        wait_for(lambda: a.stats()["running"] == 1, 30, "the Spot worker to claim the long job")
        expected[a.enqueue(b"short job", short)] = reference(b"short job", short)
        long_id, short_id = list(expected)
        wait_for(lambda: a.stats()["running"] == 2, 30, "the Spot worker to claim the short job")
        assert service.notice_reads()  # it asks before any notice
        # The margin for posting is 20 s: the drain's deadline is 4-5 s from now (EC2 gives whole seconds).
        service.interrupt(25)
        noticed = time.monotonic()

        def long_job_back() -> bool:
            item = a.work(long_id).json()
            return item["state"] == "pending" and item["attempts"] == 0
        wait_for(long_job_back, 10, "the long job to be given back")
        given_back_after = time.monotonic() - noticed
        assert given_back_after < 5, given_back_after  # a release, not a 30 s lease left to expire
        leaving = leaving_at(a.url)["spot-1"]
        assert leaving["reason"] == "spot-interruption" and 0 < leaving["seconds_left"] <= 25
        assert spot.process is not None
        assert spot.process.wait(30) == 0  # it exits by itself, done
        assert (tmp_path / "exit-ran").exists()  # with its exit action (on EC2: the poweroff)
        short_item = a.work(short_id).json()
        assert short_item["state"] == "completed" and short_item["worker_id"] == "spot-1"
        for endpoint in (a, b):  # both heard that it left
            assert leaving_at(endpoint.url)["spot-1"]["left"] is True
        log = spot.log()
        assert "Spot interruption notice" in log and "cannot finish before the interruption" in log

    services.worker([a, b], worker_id="on-demand-1", processes=1)
    results = drain([a, b], expected=2, timeout=120)
    assert sorted(item["id"] for item in results) == sorted(expected)  # each once: nothing lost or twice
    assert {item["id"]: item["result"] for item in results} == expected
    long_item = a.work(long_id).json()
    assert long_item["worker_id"] == "on-demand-1" and long_item["attempts"] == 1  # the release cost none


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


def test_a_worker_not_told_it_runs_on_spot_never_asks(services: Services) -> None:
    a = services.endpoint("a")
    with metadata_service() as (url, service):
        worker = services.worker([a], processes=1, extra_args=("--metadata-url", url, "--notice-interval", "0.1"))
        wait_for(lambda: a.stats()["workers_heard_from"] == 1, 20, "the worker to poll")
        time.sleep(0.5)
        assert service.notice_reads() == [] and not [read for read in service.reads if read[1] != NOTICE_PATH]
        assert worker.running()
