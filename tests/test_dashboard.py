"""The dashboard (GET /, GET /details), GET /metrics and the scaler's record kept by its endpoint,
on real endpoints: what anybody sees and what only the operator key opens, an empty store, a peer
that is down, 100,000 items, the record's route and its circuit breaker across restarts."""

from __future__ import annotations

import base64
import re
import socket
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from conftest import PEER_AUTH, PYTHON, REPO, SCALER_AUTH, SECRET, WORKER_AUTH, Endpoint, Services, metric, wait_for
from endpoint.secret import operator_key, scaler_key

OPERATOR_KEY = operator_key(SECRET)
SCHEMA = (REPO / "schema.sql").read_text()


def basic(password: str, user: str = "operator") -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def put_run(endpoint: Endpoint, run_id: str, headers: dict[str, str] | None = None, **fields: Any) -> requests.Response:
    record = {"reason": "3 pending need 1 worker", "needed": 1, "decided": 1, "allowed": 1, "ready": 0,
              "booting": 0, "breaker": "closed", "breaker_threshold": 2, **fields}
    return requests.put(f"{endpoint.url}/internal/scaler/runs/{run_id}", json=record,
                        headers=SCALER_AUTH if headers is None else headers, timeout=10)


def failed_item(endpoint: Endpoint) -> str:
    """An item whose only lease expires (the endpoint runs with --lease-seconds 1 --max-attempts 1)."""
    work_id = endpoint.enqueue(b"doomed", 3)
    claimed = requests.post(f"{endpoint.url}/internal/claim", json={"worker": "worker-on-10.9.8.7"},
                            headers=WORKER_AUTH, timeout=10)
    assert claimed.status_code == 200 and claimed.headers["X-Work-Id"] == work_id, claimed.text
    wait_for(lambda: endpoint.work(work_id).json()["state"] == "failed", 15, "the lease to expire")
    return work_id


# -- what anybody sees, and what only the operator key opens ------------------------------------


def test_details_need_the_operator_key_and_no_other_key_opens_them(services: Services) -> None:
    a, b = services.endpoint_pair(extra_args=("--lease-seconds", "1", "--max-attempts", "1"))
    work_id = failed_item(a)
    assert put_run(a, "a-run-1", allowed=1, launched=1, events=[
        {"kind": "provisioning_failure", "message": "provisioning i-0abc: ssh 10.1.2.3:22 refused"}]).status_code == 200

    page = requests.get(f"{a.url}/", timeout=10)
    assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
    assert 'data-count="failed"><b>1</b>' in page.text
    assert "3 pending need 1 worker" in page.text  # the scaler's reasons are public, as in /stats
    for detail in (work_id, "worker-on-10.9.8.7", "10.1.2.3", "lease expired"):
        assert detail not in page.text, detail
    assert 'href="/details"' in page.text

    refused = requests.get(f"{a.url}/details", timeout=10)
    assert refused.status_code == 401
    assert refused.headers["WWW-Authenticate"].startswith('Basic realm="dynamic-workload operator"')
    assert work_id not in refused.text
    for wrong in (basic("wrong"), basic(scaler_key(SECRET)), basic(PEER_AUTH["Authorization"].split()[1]),
                  basic(WORKER_AUTH["Authorization"].split()[1]), PEER_AUTH, WORKER_AUTH, SCALER_AUTH,
                  {"Authorization": f"Bearer {OPERATOR_KEY}"}, {"Authorization": "Basic !!!not-base64"},
                  {"Authorization": "Basic " + base64.b64encode(OPERATOR_KEY.encode()).decode()}):  # no user part
        answer = requests.get(f"{a.url}/details", headers=wrong, timeout=10)
        assert answer.status_code == 401, (wrong, answer.status_code)
        assert work_id not in answer.text

    details = requests.get(f"{a.url}/details", headers=basic(OPERATOR_KEY, user="anyone"), timeout=10)
    assert details.status_code == 200, details.text
    assert details.headers["Cache-Control"] == "no-store"
    for detail in (work_id, "worker-on-10.9.8.7", "ssh 10.1.2.3:22 refused", "lease expired on each of 1 attempts"):
        assert detail in details.text, detail
    # The peer's part of the page, through the peer API: its details too, for the operator only.
    b_failed = failed_item(b)
    assert b_failed in requests.get(f"{a.url}/details", headers=basic(OPERATOR_KEY), timeout=10).text
    assert b_failed not in requests.get(f"{a.url}/", timeout=10).text


def test_the_operator_key_opens_no_internal_route_nor_the_details_of_stats(services: Services) -> None:
    a = services.endpoint("a")
    operator = {"Authorization": f"Bearer {OPERATOR_KEY}"}
    for method, path in (("POST", "/internal/claim"), ("POST", "/internal/peer/take-completed?top=1"),
                         ("GET", "/internal/peer/dashboard"), ("POST", "/internal/scaler/reset-breaker"),
                         ("PUT", "/internal/scaler/runs/x")):
        assert requests.request(method, f"{a.url}{path}", headers=operator, json={}, timeout=10).status_code == 403
    assert requests.get(f"{a.url}/stats", headers=operator, timeout=10).status_code == 403
    # ... while the scaler key opens /stats' details (the workers heard from, the breaker's last error).
    assert "workers" in requests.get(f"{a.url}/stats", headers=SCALER_AUTH, timeout=10).json()


def test_page_and_metrics_on_an_empty_store_and_with_the_peer_down(services: Services) -> None:
    a, b = services.endpoint_pair()
    page = requests.get(f"{a.url}/", timeout=10)
    assert page.status_code == 200
    assert 'id="endpoint-a"' in page.text and 'id="endpoint-b"' in page.text
    assert page.text.count("<svg") == 12  # three charts per window, two windows, two endpoints
    assert "<script" not in page.text and " src=" not in page.text and "url(" not in page.text  # nothing to fetch
    assert "default-src 'none'" in page.headers["Content-Security-Policy"]
    scraped = requests.get(f"{a.url}/metrics", timeout=10)
    assert scraped.status_code == 200 and scraped.headers["Content-Type"].startswith("text/plain")
    assert metric(scraped.text, "dw_items_enqueued_total", node="a") == 0
    assert metric(scraped.text, "dw_items", node="a", state="pending") == 0

    b.service.stop()
    page = requests.get(f"{a.url}/?refresh=5", timeout=10)
    assert page.status_code == 200
    assert 'content="5"' in page.text
    assert re.search(r'id="endpoint-(b|peer)">\s*<h2>endpoint (b|peer)</h2>\s*<p class="down"', page.text), page.text
    assert 'id="endpoint-a"' in page.text and page.text.count("<svg") == 6
    assert requests.get(f"{a.url}/metrics", timeout=10).status_code == 200
    assert requests.get(f"{a.url}/?refresh=0", timeout=10).status_code == 400


def test_counters_survive_a_restart_and_process_counters_start_again(services: Services) -> None:
    a = services.endpoint("a")
    for index in range(3):
        a.enqueue(b"item %d" % index, 2)
    before = requests.get(f"{a.url}/metrics", timeout=10).text
    assert metric(before, "dw_items_enqueued_total", node="a") == 3
    assert metric(before, "dw_http_request_duration_seconds_count", node="a", route="/enqueue", method="PUT",
                  status="200") == 3
    a.service.stop()
    a.restart()
    after = requests.get(f"{a.url}/metrics", timeout=10).text
    assert metric(after, "dw_items_enqueued_total", node="a") == 3  # from the store
    assert "route=\"/enqueue\"" not in after  # a process counter: this process has served no enqueue yet


def _fill(db: Path, items: int, sample_days: float) -> None:
    """A data file with `items` pending items and `sample_days` of per-minute samples, written before the
    endpoint starts (enqueueing 100,000 items over HTTP would take minutes)."""
    now = time.time()
    with sqlite3.connect(db) as conn:
        conn.executescript(SCHEMA)
        conn.execute("INSERT INTO meta (key, value) VALUES ('node_id', 'a')")
        conn.executemany("INSERT INTO work_items (seq, id, iterations, payload_bytes, created_at) "
                         "VALUES (?, ?, 1, 1, ?)",
                         ((seq, f"a-{seq:016x}", now - 3600 + seq * 0.01) for seq in range(1, items + 1)))
        conn.executemany("INSERT INTO payloads (seq, data) VALUES (?, x'00')", ((seq,) for seq in range(1, items + 1)))
        minutes = int(sample_days * 1440)
        durations = '{"job_run": [' + ",".join(["3"] * 19) + '], "time_to_result": [' + ",".join(["3"] * 19) + "]}"
        start = int(now // 60) * 60 - minutes * 60
        conn.executemany("INSERT INTO samples VALUES (?, ?, ?, 0, 0, ?, 0, 0, 1, ?)",
                         ((start + 60 * m, m * 10, m * 9, 1000, durations) for m in range(minutes)))


def test_page_and_metrics_with_100000_items_and_seven_days_of_samples(services: Services, tmp_path: Path) -> None:
    db = tmp_path / "a.sqlite3"
    _fill(db, 100_000, 7)
    a = services.endpoint("a", extra_args=("--db", str(db)))
    page = requests.get(f"{a.url}/", timeout=30)
    assert page.status_code == 200
    assert 'data-count="pending"><b>100000</b>' in page.text
    scraped = requests.get(f"{a.url}/metrics", timeout=30).text
    assert metric(scraped, "dw_items", node="a", state="pending") == 100_000
    assert metric(scraped, "dw_items_enqueued_total", node="a") == 100_000  # counted from the rows of an older file
    assert metric(scraped, "dw_oldest_pending_age_seconds", node="a") > 3000


# -- the scaler's record, owned by the endpoint --------------------------------------------------


@pytest.mark.parametrize(("fields", "message"), [
    ({"reason": ""}, "field 'reason'"),
    ({"needed": -1}, "field 'needed'"),
    ({"launched": True}, "field 'launched'"),
    ({"breaker": "ajar"}, "field 'breaker'"),
    ({"breaker_threshold": 0}, "breaker_threshold"),
    ({"events": [{"kind": "mystery"}]}, "each event"),
    ({"events": "launch_failure"}, "field 'events'"),
])
def test_a_bad_scaler_record_is_refused_and_changes_nothing(fields: dict[str, Any], message: str,
                                                            services: Services) -> None:
    a = services.endpoint("a")
    answer = put_run(a, "run-1", **fields)
    assert answer.status_code == 400 and message in answer.json()["error"], answer.text
    assert a.stats()["scaler"] is None
    assert put_run(a, "bad/id").status_code == 404
    assert put_run(a, "x" * 65).status_code == 400
    assert put_run(a, "run-1", headers=PEER_AUTH).status_code == 403  # the peer key is not the scaler's
    assert put_run(a, "run-1", headers=WORKER_AUTH).status_code == 403
    assert put_run(a, "run-1", headers={}).status_code == 401
    assert requests.put(f"{a.url}/internal/scaler/runs/r", data=b"{not json", headers=SCALER_AUTH,
                        timeout=10).status_code == 400
    assert a.stats()["scaler"] is None


def test_a_repeated_record_counts_each_failure_once_and_the_breaker_survives_a_restart(services: Services) -> None:
    a = services.endpoint("a")
    failure = {"kind": "launch_failure", "message": "launch: InsufficientInstanceCapacity"}
    for _ in range(3):  # the scaler repeats a post whose answer it did not get
        assert put_run(a, "run-1", events=[failure]).status_code == 200
    assert (a.stats()["scaler"]["consecutive_failures"], a.stats()["scaler"]["breaker_open"]) == (1, False)
    assert put_run(a, "run-2", events=[failure, failure]).status_code == 200
    scaler = a.stats()["scaler"]
    assert (scaler["consecutive_failures"], scaler["breaker_open"]) == (3, True)  # threshold 2: open
    assert "InsufficientInstanceCapacity" in scaler["last_error"]
    assert "last_error" not in a.stats(public=True)["scaler"]

    a.service.stop()
    a.restart()
    scaler = a.stats()["scaler"]
    assert (scaler["consecutive_failures"], scaler["breaker_open"]) == (3, True)
    scraped = requests.get(f"{a.url}/metrics", timeout=10).text
    assert metric(scraped, "dw_scaler_breaker_open", node="a") == 1
    assert metric(scraped, "dw_scaler_launch_failures_total", node="a") == 3
    assert metric(scraped, "dw_scaler_runs_total", node="a") == 2

    # A success closes it; so does --reset-breaker, which needs the endpoint up.
    assert put_run(a, "run-3", provisioned=1, events=[{"kind": "success"}]).status_code == 200
    assert a.stats()["scaler"]["consecutive_failures"] == 0
    assert put_run(a, "run-4", events=[failure, failure]).status_code == 200
    assert a.stats()["scaler"]["breaker_open"] is True
    secret_file = a.db.parent / "secret"
    secret_file.write_text(SECRET)
    reset = [PYTHON, "-m", "cron.scale", "--reset-breaker", "--url", a.url, "--secret-file", str(secret_file),
             "--state-dir", str(a.db.parent / "state")]
    done = subprocess.run(reset, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert (a.stats()["scaler"]["consecutive_failures"], a.stats()["scaler"]["breaker_open"]) == (0, False)
    a.service.stop()
    done = subprocess.run(reset, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "the circuit breaker was not reset" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_the_scaler_records_every_run_through_its_endpoint_and_opens_no_file_of_its(services: Services,
                                                                                     tmp_path: Path) -> None:
    """The endpoint's data file lives where the scaler could not guess it: the scaler needs none."""
    a = services.endpoint("a")  # its file: <tmp>/a.sqlite3
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET)
    state = tmp_path / "scaler-state"  # the old default of the scaler's --db was <state-dir>/a.sqlite3
    command = [PYTHON, "-m", "cron.scale", "--provider", "local", "--node-id", "a", "--url", a.url,
               "--endpoint", a.url, "--state-dir", str(state), "--secret-file", str(secret_file),
               "--max-launch-per-tick", "0"]
    for _ in range(2):
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
    assert not list(state.glob("*.sqlite3*"))
    assert a.stats()["scaler"]["last_decision"]
    with sqlite3.connect(a.db) as conn:
        runs = conn.execute("SELECT reason, needed, decided, allowed, breaker FROM scaler_runs").fetchall()
    assert len(runs) == 2 and all(run[4] == "closed" for run in runs), runs
    page = requests.get(f"{a.url}/", timeout=10).text
    assert page.count('<tr class="run">') == 2  # both runs in the decisions table


def test_a_scaler_whose_endpoint_is_down_reconciles_and_launches_nothing(services: Services, tmp_path: Path) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET)
    command = [PYTHON, "-m", "cron.scale", "--provider", "local", "--node-id", "a", "--url", "http://127.0.0.1:9",
               "--endpoint", "http://127.0.0.1:9", "--state-dir", str(tmp_path / "state"),
               "--secret-file", str(secret_file), "--scale-after", "0"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "does not answer /stats" in done.stderr and "launched nothing" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert not list((tmp_path / "state").glob("workers/local-*.json"))


def test_results_refused_are_counted_by_reason(services: Services) -> None:
    a = services.endpoint("a")
    work_id = a.enqueue(b"once", 1)
    claimed = requests.post(f"{a.url}/internal/claim", json={"worker": "w"}, headers=WORKER_AUTH, timeout=10)
    assert claimed.headers["X-Work-Id"] == work_id
    result = {"worker": "w", "result": "0" * 128, "duration_s": 0.01}
    for stored in (True, False, False):
        answer = requests.post(f"{a.url}/internal/work/{work_id}/result", json=result, headers=WORKER_AUTH, timeout=10)
        assert answer.json() == {"stored": stored}
    unknown = requests.post(f"{a.url}/internal/work/a-0000000000000000/result", json=result, headers=WORKER_AUTH,
                            timeout=10)
    assert unknown.status_code == 404
    scraped = requests.get(f"{a.url}/metrics", timeout=10).text
    assert metric(scraped, "dw_results_refused_total", node="a", reason="already_completed") == 2
    assert metric(scraped, "dw_results_refused_total", node="a", reason="no_such_item") == 1
    assert metric(scraped, "dw_items_completed_total", node="a") == 1
    assert metric(scraped, "dw_job_run_seconds_count", node="a") == 1


def test_a_peer_that_accepts_and_never_answers_does_not_hold_up_the_page(services: Services) -> None:
    with socket.socket() as silent:  # accepts connections (the kernel does) and never says a word
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        a = services.endpoint("a", peer_url=f"http://127.0.0.1:{silent.getsockname()[1]}")
        page = requests.get(f"{a.url}/", timeout=10)  # the peer is asked for 1 s at most
    assert page.status_code == 200 and 'id="endpoint-a"' in page.text
    assert '<p class="down"' in page.text and "timed out" in page.text
