"""The soak's clients and what they saw: enqueues in the four client forms of the prior art (query
`buffer` with a capitalised `Iterations`, multipart `-F data=@file`, urlencoded `-d data=...`, raw
`--data-binary`), each sent by curl itself for a share of requests and by a Python client for the
rest, and pullCompleted at both endpoints at once, with and without delivery tokens.

Every answer is recorded (History): which enqueues were acknowledged with which id, which were
refused, which have an unknown outcome, and every result that pullCompleted handed out.

Job lengths: short jobs (up to SHORT_ITERATIONS) carry payloads of their own; longer ones all hash
one shared text payload, each with an iteration count no other job has, so that their reference
results come from one hash chain (bench/soak_check.py) instead of hours of hashing.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import random
import secrets
import subprocess
import threading
import time
import urllib.parse
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

FORMS = ("buffer", "multipart", "urlencoded", "raw")
SHORT_ITERATIONS = 1000
TEXT_ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~"
REQUEST_TIMEOUT_S = 15.0
RETRY_WINDOW_S = 120.0  # how long a client with an Idempotency-Key or a delivery token keeps repeating
BAD_REQUESTS = ("iterations 0", "iterations +10", "empty payload", "idempotency key with a space", "data twice")


@dataclass(frozen=True)
class Answer:
    status: int | None  # None: no answer (the reason in `failure`)
    body: bytes = b""
    failure: str = ""
    replayed: bool = False

    def json(self) -> object:
        try:
            return json.loads(self.body)
        except ValueError:
            return None

    def not_stored(self) -> bool:
        document = self.json()
        return self.status in (503, 507) and isinstance(document, dict) and document.get("outcome") == "not_stored"

    def label(self) -> str:
        """How the soak's table names this answer: the status and its outcome, or why there was none."""
        if self.status is None:
            return f"no answer ({self.failure})"
        document = self.json()
        if isinstance(document, dict):
            detail = document.get("reason") or document.get("outcome") or ""
            return f"{self.status} {detail}".rstrip()
        return f"{self.status}" if self.body else f"{self.status} (empty body)"


def send(base_url: str, method: str, target: str, body: bytes = b"", headers: dict[str, str] | None = None,
         timeout: float = REQUEST_TIMEOUT_S) -> Answer:
    """One request on a connection of its own (no stale kept-alive connection to a restarted endpoint)."""
    host, port = urllib.parse.urlsplit(base_url).netloc.split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        connection.request(method, target, body=body, headers={"Content-Length": str(len(body)), **(headers or {})})
        response = connection.getresponse()
        return Answer(response.status, response.read(), replayed=response.getheader("Idempotent-Replayed") == "true"
                      or response.getheader("Delivery-Replayed") == "true")
    except TimeoutError:
        return Answer(None, failure="timeout")
    except ConnectionRefusedError:
        return Answer(None, failure="refused")
    except (OSError, http.client.HTTPException) as exc:
        return Answer(None, failure=f"cut: {type(exc).__name__}")
    finally:
        connection.close()


# --- what the clients saw -----------------------------------------------------------------------------


@dataclass
class Job:
    """One payload enqueued by one client: acknowledged, refused (nothing may be stored), or unknown."""

    serial: int
    node: str
    form: str
    client: str  # "python" or "curl"
    payload: bytes
    iterations: int
    key: str | None = None
    bad: str = ""  # a deliberately invalid request (one of BAD_REQUESTS)
    answers: list[str] = field(default_factory=list)
    outcome: str = "sending"  # acknowledged | refused | unknown
    work_id: str | None = None
    sent_at: float = 0.0
    acknowledged_at: float | None = None


@dataclass(frozen=True)
class Received:
    work_id: str
    result: str
    at: float
    node: str
    token: str | None
    client: str


class History:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.jobs: list[Job] = []
        self.received: list[Received] = []
        self.errors: Counter[tuple[str, str]] = Counter()  # (operation, answer) -> count
        self.lost_pull_answers = 0  # pulls without a token whose answer never came: the at-most-once window
        self.tokens: dict[str, tuple[str, bool]] = {}  # delivery token -> (node, answered with a 200)
        self.pulls = 0

    def add_job(self, job: Job) -> None:
        with self.lock:
            job.serial = len(self.jobs)
            self.jobs.append(job)

    def error(self, operation: str, answer: Answer) -> None:
        with self.lock:
            self.errors[(operation, answer.label())] += 1

    def acknowledged(self) -> list[Job]:
        with self.lock:
            return [job for job in self.jobs if job.outcome == "acknowledged"]

    def received_ids(self) -> set[str]:
        with self.lock:
            return {item.work_id for item in self.received}


# --- the clients --------------------------------------------------------------------------------------


def multipart(payload: bytes) -> tuple[bytes, str]:
    boundary = secrets.token_hex(16)
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"data\"; filename=\"dummy\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + payload + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def python_request(job: Job) -> tuple[str, bytes, dict[str, str]]:
    """The request target, body and headers of a job in its form, as a Python client sends it."""
    headers = {"Idempotency-Key": job.key} if job.key else {}
    count = f"iterations={job.iterations}"
    if job.bad == "iterations 0":
        count = "iterations=0"
    elif job.bad == "iterations +10":
        count = "iterations=%2B10"
    elif job.bad == "idempotency key with a space":
        headers["Idempotency-Key"] = "has a space"
    if job.form == "buffer":
        return f"/enqueue?buffer={urllib.parse.quote(job.payload)}&I{count[1:]}", b"", headers
    if job.form == "multipart":
        body, content_type = multipart(job.payload)
        return f"/enqueue?{count}", body, {**headers, "Content-Type": content_type}
    if job.form == "urlencoded":
        body = b"data=" + job.payload + (b"&data=" + job.payload if job.bad == "data twice" else b"")
        return f"/enqueue?{count}", body, {**headers, "Content-Type": "application/x-www-form-urlencoded"}
    return f"/enqueue?{count}", job.payload, {**headers, "Content-Type": "application/octet-stream"}


def curl_enqueue_command(job: Job, url: str, payload_file: Path) -> list[str]:
    """The prior art's own commands (host and port adapted), with what it takes to read their answer."""
    answer = ["-s", "-S", "--max-time", f"{REQUEST_TIMEOUT_S:g}", "-w", "\n%{http_code}"]
    if job.form == "buffer":
        return ["curl", "--location", "--request", "PUT",
                f"{url}/enqueue?buffer={urllib.parse.quote(job.payload)}&Iterations={job.iterations}", *answer]
    if job.form == "multipart":
        return ["curl", f"{url}/enqueue?iterations={job.iterations}", "-F", f"data=@{payload_file}", "-X", "PUT",
                *answer]
    if job.form == "urlencoded":
        return ["curl", "-X", "PUT", f"{url}/enqueue?iterations={job.iterations}", "-d",
                f"data={job.payload.decode()}", *answer]
    return ["curl", "-X", "PUT", f"{url}/enqueue?iterations={job.iterations}", "--data-binary", f"@{payload_file}",
            *answer]


CURL_FAILURES = {7: "refused", 28: "timeout", 52: "cut: empty reply", 56: "cut: receive failure"}


def run_curl(command: list[str]) -> Answer:
    try:
        done = subprocess.run(command, capture_output=True, timeout=REQUEST_TIMEOUT_S + 10, check=False)
    except subprocess.TimeoutExpired:
        return Answer(None, failure="timeout")
    if done.returncode != 0:
        return Answer(None, failure=CURL_FAILURES.get(done.returncode, f"curl exit {done.returncode}"))
    body, _, status = done.stdout.rpartition(b"\n")
    return Answer(int(status), body)


class Load:
    """Enqueues arriving at `rate` per second (a Poisson stream) and pullers at both endpoints."""

    def __init__(self, urls: dict[str, str], history: History, rng: random.Random, workdir: Path, *, rate: float,
                 curl_share: float, max_iterations: int, pullers_per_node: int = 2) -> None:
        self.urls = urls
        self.history = history
        self.rng = rng
        self.rng_lock = threading.Lock()
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.rate = rate
        self.curl_share = curl_share
        self.max_iterations = max_iterations
        self.run_id = secrets.token_hex(4)
        self.shared_payload = f"soak-{self.run_id}-the-payload-of-every-longer-job".encode()
        self.used_iterations: set[int] = set()
        self.enqueuing = threading.Event()
        self.pulling = threading.Event()
        self.abandoned = threading.Event()  # the soak was interrupted: no client repeats anything
        self.pool = ThreadPoolExecutor(max_workers=24, thread_name_prefix="enqueue")
        self.threads: list[threading.Thread] = []
        self.pullers_per_node = pullers_per_node
        self.pull_deadline = float("inf")  # when repeating tokens stops (monotonic), set at the end

    # --- choices ---

    def new_job(self, node: str | None = None, client: str | None = None) -> Job:
        with self.rng_lock:
            rng = self.rng
            node = node or rng.choice(("a", "b"))
            client = client or ("curl" if rng.random() < self.curl_share else "python")
            bad = rng.choice(BAD_REQUESTS) if client == "python" and rng.random() < 0.02 else ""
            form = "raw" if bad == "empty payload" else "urlencoded" if bad == "data twice" else rng.choice(FORMS)
            iterations = rng.randint(1, SHORT_ITERATIONS) if bad else self._iterations(rng)
            tag = f"soak-{self.run_id}-{secrets.token_hex(6)}"  # no two payloads alike but the shared one
            if bad == "empty payload":
                payload = b""
            elif iterations > SHORT_ITERATIONS:
                payload = self.shared_payload
            elif form in ("buffer", "urlencoded"):
                payload = (tag + "-" + "".join(rng.choices(TEXT_ALPHABET, k=rng.randint(0, 2000)))).encode()
            else:
                size = 100_000 if rng.random() < 0.2 else rng.randint(0, 16_384)
                payload = tag.encode() + b"\n" + rng.randbytes(size)  # a newline: never a well-formed form
            key = secrets.token_urlsafe(16) if client == "python" and rng.random() < 0.8 else None
        job = Job(0, node, form, client, payload, iterations, key, bad)
        self.history.add_job(job)
        return job

    def large_uploads(self, node: str, count: int = 4, size: int = 3 * 2**20) -> None:
        """A few uploads of `size` bytes to one endpoint at once (a Python client with a key, raw bodies)."""
        for _ in range(count):
            job = Job(0, node, "raw", "python", f"soak-{self.run_id}-{secrets.token_hex(6)}\n".encode()
                      + secrets.token_bytes(size), 1, secrets.token_urlsafe(16))
            self.history.add_job(job)
            with contextlib.suppress(RuntimeError):  # the pool shut down meanwhile
                self.pool.submit(self._enqueue, job)

    def _iterations(self, rng: random.Random) -> int:
        band = rng.random()
        if band < 0.30:
            return 1
        if band < 0.50:
            return rng.randint(2, 100)
        if band < 0.65:
            return rng.randint(101, SHORT_ITERATIONS)
        top = self.max_iterations
        low, high = ((SHORT_ITERATIONS + 1, min(100_000, top)) if band < 0.85 else
                     (min(100_001, top), min(1_000_000, top)) if band < 0.95 else (min(1_000_001, top), top))
        iterations = rng.randint(low, max(low, high))
        while iterations in self.used_iterations:  # one job per iteration count: one reference each
            iterations += 1
        self.used_iterations.add(iterations)
        return iterations

    # --- running ---

    def start(self) -> None:
        self.enqueuing.set()
        self.pulling.set()
        self.threads.append(threading.Thread(target=self._arrivals, name="arrivals", daemon=True))
        for node in self.urls:
            for index in range(self.pullers_per_node):
                self.threads.append(threading.Thread(target=self._puller, args=(node, "python"),
                                                     name=f"puller-{node}-{index}", daemon=True))
            self.threads.append(threading.Thread(target=self._puller, args=(node, "curl"), name=f"curl-{node}",
                                                 daemon=True))
        for thread in self.threads:
            thread.start()

    def stop_enqueues(self) -> None:
        self.enqueuing.clear()
        self.pool.shutdown(wait=True)

    def abandon(self) -> None:
        """Every client stops at its next turn, repeats included (the soak was interrupted)."""
        self.abandoned.set()
        self.enqueuing.clear()
        self.pull_deadline = 0.0
        self.pulling.clear()

    def stop_pulls(self, grace_s: float = 60.0) -> None:
        self.pull_deadline = time.monotonic() + grace_s
        self.pulling.clear()
        for thread in self.threads:
            thread.join()

    def _arrivals(self) -> None:
        while self.enqueuing.is_set():
            with self.rng_lock:
                gap = self.rng.expovariate(self.rate)
            time.sleep(gap)
            if self.enqueuing.is_set():
                with contextlib.suppress(RuntimeError):  # the pool shut down meanwhile
                    self.pool.submit(self._enqueue, self.new_job())

    def _enqueue(self, job: Job, chain: int = 0) -> None:
        """Send a job until it is acknowledged, refused or its outcome stays unknown. After a refusal whose
        answer says nothing was stored, a client sends its payload anew (a new job), at most 3 times."""
        (self._enqueue_curl if job.client == "curl" else self._enqueue_python)(job)
        if job.outcome == "refused" and not job.bad and chain < 3 and self.enqueuing.is_set():
            other = "b" if job.node == "a" else "a"
            time.sleep(1)
            self._enqueue(self.new_job(node=other, client=job.client), chain + 1)

    def _answered(self, job: Job, answer: Answer) -> None:
        """Record one answer and what it makes of the job. A refusal after an answer that left the outcome
        unknown leaves it unknown: the earlier request may have been stored."""
        job.answers.append(answer.label())
        if answer.status == 200:
            document = answer.json()
            if isinstance(document, dict) and isinstance(document.get("id"), str):
                job.work_id, job.acknowledged_at, job.outcome = document["id"], time.time(), "acknowledged"
                return
        self.history.error("enqueue", answer)
        refused = answer.failure == "refused" or (  # no connection, so no request: nothing stored
            answer.status is not None and (400 <= answer.status < 500 or answer.not_stored()))
        if not refused:
            job.outcome = "unknown"  # a 504, another 5xx, a 200 without an id, or no answer: it may be stored
        elif job.outcome != "unknown":
            job.outcome = "refused"

    def _enqueue_python(self, job: Job) -> None:
        """With an Idempotency-Key, repeated at the same endpoint until it is acknowledged, refused for good
        (a 4xx; a 507 unless an earlier answer left it unknown), or the retry window is over."""
        job.sent_at = time.time()
        deadline = time.monotonic() + RETRY_WINDOW_S
        target, body, headers = python_request(job)
        while True:
            answer = send(self.urls[job.node], "PUT", target, body, headers)
            self._answered(job, answer)
            final = answer.status is not None and 400 <= answer.status < 500
            if (job.outcome == "acknowledged" or not job.key or final or time.monotonic() > deadline
                    or self.abandoned.is_set()):
                return
            if job.outcome == "refused" and answer.status == 507:
                return  # nothing stored; the client goes to the other endpoint
            time.sleep(5 if answer.status == 507 else 1)

    def _enqueue_curl(self, job: Job) -> None:
        job.sent_at = time.time()
        payload_file = self.workdir / f"dummy-{job.serial}"
        payload_file.write_bytes(job.payload)
        try:
            self._answered(job, run_curl(curl_enqueue_command(job, self.urls[job.node], payload_file)))
        finally:
            payload_file.unlink(missing_ok=True)

    # --- pulls ---

    def _puller(self, node: str, client: str) -> None:
        while self.pulling.is_set():
            with self.rng_lock:
                top = self.rng.choice((1, 3, 5, 20, 100))
                token = secrets.token_urlsafe(18) if self.rng.random() < 0.5 else None
                pause = self.rng.uniform(0.2, 1.0)
                if client != "python":
                    client = self.rng.choice(("curl", "curl --location"))
            got = self.pull(node, top, token, client)
            time.sleep(0.05 if got else pause)

    def pull(self, node: str, top: int, token: str | None, client: str) -> int:
        """One pull; with a token, repeated until it is answered with a 200 (or the token expired)."""
        operation = "pull with a token" if token else "pull"
        if token:
            with self.history.lock:
                self.history.tokens[token] = (node, False)
        target = f"/pullCompleted?top={top}" + (f"&delivery={token}" if token else "")
        while True:
            answer = self._pull_once(node, target, client)
            items = answer.json() if answer.status == 200 else None
            if isinstance(items, list):
                self._received(node, token, client, items)
                return len(items)
            self.history.error(operation, answer)
            if not token:
                with self.history.lock:
                    self.history.lost_pull_answers += 1
                return 0
            if answer.status == 410 or time.monotonic() > self.pull_deadline:
                return 0
            time.sleep(1)

    def _pull_once(self, node: str, target: str, client: str) -> Answer:
        url = self.urls[node]
        answer = ["-s", "-S", "--max-time", f"{REQUEST_TIMEOUT_S:g}", "-w", "\n%{http_code}"]
        if client == "curl --location":  # prior art A
            return run_curl(["curl", "--location", "--request", "POST", f"{url}{target}", *answer])
        if client == "curl":  # prior art C and D
            return run_curl(["curl", "-X", "POST", f"{url}{target}", *answer])
        return send(url, "POST", target)

    def _received(self, node: str, token: str | None, client: str, items: list) -> None:
        now = time.time()
        with self.history.lock:
            self.history.pulls += 1
            if token:
                self.history.tokens[token] = (node, True)
            for item in items:
                document = item if isinstance(item, dict) else {}
                self.history.received.append(Received(str(document.get("id")), str(document.get("result")), now,
                                                      node, token, client))
