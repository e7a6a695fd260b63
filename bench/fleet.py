"""A simulated fleet on two real endpoints: what an idle fleet and a draining one cost them.

N simulated workers (default 1,000, 2 slots each) run the worker's own dispatcher
(worker/dispatch.py: one claim per endpoint that waits for work, batched claims, lease renewals,
batched results, over worker/client.py) in a few simulator processes (bench/_simfleet.py); their
slots do not hash, a job "runs" for `iterations` milliseconds and its result is SHA-512 of its
payload. The endpoints' CPU is read from /proc of their processes, apart from the simulators' and
this process's own. Phases, in one run:

0. the endpoints alone (their own upkeep: the store's maintenance every second), IDLE_S seconds;
1. no fleet: a client enqueues a probe job and pulls results, each 10 times a second, timed;
2. the fleet starts and waits; its CPU over IDLE_S seconds, with no client;
3. the same client on the idle fleet: its latencies, and each probe's enqueue to claim;
4. a burst per job length (0.01 s, 1 s, 60 s by default), drained by the fleet with the client
   still at work: the endpoints' CPU, requests by route, claim round trips, the drain time;
5. the fleet stops; the client alone again (no fleet, after);
6. the accounting: every job enqueued was run once, completed once and pulled once, with the
   simulation's result, and the counts agree (the simulators', the endpoints' files and metrics).

From the figures, the fleet size at which an endpoint saturates for each job length (assumption:
an endpoint serves at most one core's worth, its app being one Python process).

    usage: .venv/bin/python -m bench.fleet [--workers 1000] [--processes 4] [--durations 0.01,1,60] ...
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import os
import random
import sqlite3
import statistics
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bench._endpoint import WORKER_KEY, cpu_seconds, free_port, group_pids, running_endpoint
from bench._simfleet import SLOTS, SimulatorSettings, simulated_result, simulator
from worker.client import STORED

PROBE_ITERATIONS = 1  # a probe job runs 1 ms; burst jobs are told apart by their length
ENDPOINT_CORES = 1.0  # what one endpoint serves at most: its app is one Python process (one GIL)
BURST_CLIENTS = 16


@dataclass(frozen=True)
class FleetSettings:
    workers: int = 1000
    processes: int = 4
    durations: tuple[float, ...] = (0.01, 1.0, 60.0)
    idle_s: float = 20.0
    client_s: float = 20.0
    client_rate: float = 10.0  # enqueues (and pulls) per second by the client
    burst_work_s: float = 5.0  # a burst gives each slot this much work (at least one job, at most max_burst jobs)
    max_burst: int = 10_000
    claim_wait: float = 20.0
    start_spread_s: float = 20.0  # workers start over this long, so that their waits end at different times
    endpoint_args: tuple[str, ...] = ()  # more flags for both endpoints (they override the defaults here)
    wrong_every: int = 0  # simulators return a wrong result every Nth job (to check the accounting)
    settle_timeout_s: float = 120.0


def percentile(values: Sequence[float], share: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def ms(values: Sequence[float]) -> str:
    if not values:
        return "none"
    return (f"p50 {1000 * statistics.median(values):.1f} p95 {1000 * percentile(values, 0.95):.1f} "
            f"p99 {1000 * percentile(values, 0.99):.1f} ms (n={len(values)})")


# -- the endpoints -----------------------------------------------------------------------------

@dataclass
class Endpoint:
    node: str
    url: str
    pgid: int
    db: Path

    def cpu(self) -> float:
        return sum(cpu_seconds(pid) for pid in group_pids(self.pgid))

    def get(self, path: str) -> bytes:
        parts = urlsplit(self.url)
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
        try:
            conn.request("GET", path)
            return conn.getresponse().read()
        finally:
            conn.close()

    def stats(self) -> dict[str, Any]:
        return json.loads(self.get("/stats"))

    def requests_by_route(self) -> Counter[str]:
        """Requests answered so far, by route (the endpoint's own count, GET /metrics)."""
        counts: Counter[str] = Counter()
        for line in self.get("/metrics").decode().splitlines():
            if line.startswith("dw_http_request_duration_seconds_count{"):
                labels, value = line.rsplit(" ", 1)
                route = labels.split('route="', 1)[1].split('"', 1)[0]
                counts[route] += int(float(value))
        return counts


@contextmanager
def endpoint_pair(settings: FleetSettings) -> Iterator[list[Endpoint]]:
    """Endpoints a and b, peers of each other, with room for the fleet's connections (a claimer and a
    keeper per worker) and waiting claims (one per worker)."""
    ports = {"a": free_port(), "b": free_port()}
    sized = ("--max-connections", str(max(1024, 2 * settings.workers + 256)),
             "--max-waiting-claims", str(max(512, settings.workers + 64)))
    with ExitStack() as stack:
        pair = []
        for node, peer in (("a", "b"), ("b", "a")):
            url, process, directory = stack.enter_context(running_endpoint(
                "--peer", f"http://127.0.0.1:{ports[peer]}", *sized, *settings.endpoint_args, port=ports[node],
                node=node))
            pair.append(Endpoint(node, url, process.pid, directory / f"{node}.sqlite3"))
        yield pair


# -- the fleet ---------------------------------------------------------------------------------

COUNTS = ("requests", "failures", "answers", "claims", "runs")
FINAL = ("in_flight", "unposted", "still_running")


def merge(tallies: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The simulators' tallies as one (bench/_simfleet.py's Tally.snapshot, and the final one's extras)."""
    merged: dict[str, Any] = {name: Counter() for name in COUNTS}
    merged.update({"seconds": {}, "job_claims": [], **{name: 0 for name in FINAL}})
    for tally in tallies:
        for name in COUNTS:
            merged[name].update(tally.get(name, {}))
        for path, seconds in tally["seconds"].items():
            merged["seconds"].setdefault(path, []).extend(seconds)
        merged["job_claims"] += tally["job_claims"]
        for name in FINAL:
            merged[name] += tally.get(name, 0)
    return merged


def since(after: dict[str, Any], before: dict[str, Any]) -> dict[str, Any]:
    """A window's tally: the counts since `before`, the round trips of `after`."""
    return {**after, **{name: after[name] - before[name] for name in COUNTS}}


class Fleet:
    """The simulator processes, each running its share of the workers."""

    def __init__(self, settings: FleetSettings, urls: Sequence[str]) -> None:
        context = multiprocessing.get_context("spawn")
        ids = [f"sim-{index:05d}" for index in range(settings.workers)]
        self.pipes, self.processes = [], []
        for share in range(settings.processes):
            ours, theirs = context.Pipe()
            process = context.Process(target=simulator, daemon=True, args=(theirs, SimulatorSettings(
                tuple(urls), WORKER_KEY, tuple(ids[share::settings.processes]), settings.claim_wait,
                settings.wrong_every, settings.start_spread_s)))
            process.start()
            theirs.close()
            self.pipes.append(ours)
            self.processes.append(process)
        for pipe in self.pipes:
            if not pipe.poll(120 + settings.start_spread_s) or pipe.recv() != "started":
                raise RuntimeError("a simulator did not start")

    def cpu(self) -> float:
        return sum(cpu_seconds(process.pid) for process in self.processes if process.pid)

    def snapshot(self) -> dict[str, Any]:
        for pipe in self.pipes:
            pipe.send("snapshot")
        return merge([pipe.recv() for pipe in self.pipes])

    def stop(self) -> dict[str, Any]:
        for pipe in self.pipes:
            pipe.send("stop")
        final = merge([pipe.recv() for pipe in self.pipes if pipe.poll(180)])
        for process in self.processes:
            process.join(30)
            if process.is_alive():
                process.kill()
        return final


# -- clients -----------------------------------------------------------------------------------

@dataclass
class Book:
    """Every job this bench enqueued and every result it pulled."""

    expected: dict[str, bytes] = field(default_factory=dict)
    pulled: dict[str, str] = field(default_factory=dict)
    pulled_twice: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def enqueued(self, work_id: str, payload: bytes) -> None:
        with self.lock:
            self.expected[work_id] = payload

    def took(self, results: list[dict[str, str]]) -> None:
        with self.lock:
            for result in results:
                if result["id"] in self.pulled:
                    self.pulled_twice.append(result["id"])
                self.pulled[result["id"]] = result["result"]


class Client:
    """A client of both endpoints, one kept-alive connection to each."""

    def __init__(self, endpoints: Sequence[Endpoint], book: Book) -> None:
        self.book = book
        self.conns = [http.client.HTTPConnection(urlsplit(e.url).hostname, urlsplit(e.url).port, timeout=30)
                      for e in endpoints]

    def call(self, index: int, method: str, path: str, body: bytes = b"") -> tuple[bytes, float]:
        started = time.perf_counter()
        conn = self.conns[index]
        try:
            conn.request(method, path, body=body, headers={"Content-Type": "application/octet-stream"})
            response = conn.getresponse()
            data = response.read()
        except (OSError, http.client.HTTPException):
            conn.close()
            raise
        if response.status != 200:
            raise RuntimeError(f"{method} {path}: HTTP {response.status}: {data[:200]!r}")
        return data, time.perf_counter() - started

    def enqueue(self, index: int, payload: bytes, iterations: int) -> tuple[str, float]:
        data, seconds = self.call(index, "PUT", f"/enqueue?iterations={iterations}", payload)
        work_id = json.loads(data)["id"]
        self.book.enqueued(work_id, payload)
        return work_id, seconds

    def pull(self, index: int, top: int = 100) -> tuple[int, float]:
        data, seconds = self.call(index, "POST", f"/pullCompleted?top={top}")
        results = json.loads(data)
        self.book.took(results)
        return len(results), seconds

    def close(self) -> None:
        for conn in self.conns:
            conn.close()


class ClientLoad:
    """A user meanwhile: an enqueue of a probe job and a pull, `rate` times a second each, alternating
    between the endpoints, each timed."""

    def __init__(self, endpoints: Sequence[Endpoint], book: Book, rate: float, name: str) -> None:
        self.client = Client(endpoints, book)
        self.rate, self.name = rate, name
        self.enqueue_s: list[float] = []
        self.pull_s: list[float] = []
        self.probes: list[str] = []
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        turn = 0
        while not self.stop_event.is_set():
            work_id, seconds = self.client.enqueue(turn % 2, f"{self.name} {turn}".encode(), PROBE_ITERATIONS)
            self.probes.append(work_id)
            self.enqueue_s.append(seconds)
            self.stop_event.wait(random.uniform(0.25, 0.75) / self.rate)
            self.pull_s.append(self.client.pull(turn % 2)[1])
            self.stop_event.wait(random.uniform(0.25, 0.75) / self.rate)
            turn += 1

    def stop(self) -> ClientLoad:
        self.stop_event.set()
        self.thread.join()
        self.client.close()
        return self


def enqueue_burst(endpoints: Sequence[Endpoint], book: Book, jobs: int, iterations: int) -> None:
    def share(client_index: int) -> None:
        client = Client(endpoints, book)
        for number in range(client_index, jobs, BURST_CLIENTS):
            client.enqueue(number % 2, f"burst {iterations} {number}".encode(), iterations)
        client.close()

    with ThreadPoolExecutor(BURST_CLIENTS) as pool:
        list(pool.map(share, range(BURST_CLIENTS)))


# -- measuring -----------------------------------------------------------------------------------

@dataclass
class Window:
    """What the endpoints, the simulators and this process spent over a phase, and the requests answered."""

    seconds: float
    endpoint_cpu: list[float]  # CPU seconds per second, per endpoint
    simulator_cpu: float
    bench_cpu: float
    routes: Counter[str]  # requests per second by route, both endpoints
    fleet: dict[str, Any]  # what the simulated workers did meanwhile

    @property
    def endpoints_cpu(self) -> float:
        return sum(self.endpoint_cpu)


class Meter:
    def __init__(self, endpoints: Sequence[Endpoint], fleet: Fleet | None) -> None:
        self.endpoints, self.fleet = endpoints, fleet
        self.mark()

    def mark(self) -> None:
        self.tally = self.fleet.snapshot() if self.fleet else merge([])  # the round trips start again here
        self.routes = sum((endpoint.requests_by_route() for endpoint in self.endpoints), Counter())
        self.cpu = [endpoint.cpu() for endpoint in self.endpoints]
        self.simulator_cpu = self.fleet.cpu() if self.fleet else 0.0
        self.bench_cpu = time.process_time()
        self.started = time.monotonic()

    def window(self) -> Window:
        seconds = time.monotonic() - self.started
        cpu = [(endpoint.cpu() - before) / seconds for endpoint, before in zip(self.endpoints, self.cpu, strict=True)]
        simulator_cpu = ((self.fleet.cpu() - self.simulator_cpu) / seconds) if self.fleet else 0.0
        bench_cpu = (time.process_time() - self.bench_cpu) / seconds
        fleet = since(self.fleet.snapshot(), self.tally) if self.fleet else merge([])
        routes = sum((endpoint.requests_by_route() for endpoint in self.endpoints), Counter()) - self.routes
        return Window(seconds, cpu, simulator_cpu, bench_cpu, Counter({route: count / seconds
                                                                       for route, count in routes.items()}), fleet)


def describe(window: Window) -> str:
    routes = ", ".join(f"{route} {rate:.1f}" for route, rate in sorted(window.routes.items()) if rate >= 0.05)
    lines = [f"endpoints' CPU {100 * window.endpoints_cpu:.1f} % of a core (a {100 * window.endpoint_cpu[0]:.1f}, "
             f"b {100 * window.endpoint_cpu[1]:.1f}); simulators {100 * window.simulator_cpu:.0f} %, this "
             f"process {100 * window.bench_cpu:.0f} %, over {window.seconds:.1f} s",
             f"requests/s by route: {routes or 'none'}"]
    fleet = window.fleet
    if fleet["job_claims"]:
        lines.append(f"claims that brought jobs (round trip): {ms(fleet['job_claims'])}, "
                     f"{fleet['claims']['jobs'] / len(fleet['job_claims']):.1f} jobs each; given back at once "
                     f"(no lane free): {fleet['claims']['released']}")
    if fleet["seconds"].get("/internal/results"):
        lines.append(f"results posted: {ms(fleet['seconds']['/internal/results'])}")
    failures = {path: count for path, count in fleet["failures"].items() if count}
    if failures or fleet["claims"]["unwaited"]:
        lines.append(f"failed requests: {failures or 'none'}; claims not let wait: {fleet['claims']['unwaited']}")
    return "\n    ".join(lines)


def claim_delays(endpoints: Sequence[Endpoint], ids: Sequence[str]) -> list[float]:
    """Enqueue to claim of each item (from the data files); inf: never claimed."""
    delays = []
    for endpoint in endpoints:
        db = sqlite3.connect(f"file:{endpoint.db}?mode=ro", uri=True)
        mine = [work_id for work_id in ids if work_id.startswith(f"{endpoint.node}-")]
        for start in range(0, len(mine), 500):
            chunk = mine[start:start + 500]
            marks = ",".join("?" * len(chunk))
            rows = db.execute(f"SELECT created_at, claimed_at FROM work_items WHERE id IN ({marks})", chunk).fetchall()
            delays += [claimed - created if claimed else float("inf") for created, claimed in rows]
        db.close()
    return delays


@dataclass(frozen=True)
class Span:
    """A burst's items as the data files tell: when they were enqueued, claimed and completed."""

    items: int
    first_created: float
    last_created: float
    last_completed: float
    claim_delays: list[float]  # enqueue to claim
    runs: list[float]  # claim to completion

    @property
    def drain_s(self) -> float:
        return self.last_completed - self.first_created


def burst_span(endpoints: Sequence[Endpoint], iterations: int) -> Span:
    """The burst of jobs of `iterations` (every other job is shorter or longer), from the data files."""
    rows: list[tuple[float, float, float]] = []
    for endpoint in endpoints:
        db = sqlite3.connect(f"file:{endpoint.db}?mode=ro", uri=True)
        rows += db.execute("SELECT created_at, claimed_at, completed_at FROM work_items WHERE iterations = ?",
                           (iterations,)).fetchall()
        db.close()
    created = [row[0] for row in rows]
    return Span(len(rows), min(created), max(created), max(row[2] or 0.0 for row in rows),
                [(row[1] or float("inf")) - row[0] for row in rows],
                [(row[2] or float("inf")) - (row[1] or 0.0) for row in rows])


def wait_drained(endpoints: Sequence[Endpoint], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(stats["pending"] == 0 and stats["running"] == 0 for stats in (e.stats() for e in endpoints)):
            return
        time.sleep(0.25)
    raise RuntimeError(f"the fleet did not drain the queue within {timeout:g} s")


def wait_waiting(endpoints: Sequence[Endpoint], workers: int, timeout: float) -> int:
    """Until (nearly) every worker's claim waits at each endpoint; returns the smaller count."""
    deadline = time.monotonic() + timeout
    waiting = 0
    while time.monotonic() < deadline:
        waiting = min(endpoint.stats()["waiting_claims"] for endpoint in endpoints)
        if waiting >= 0.98 * workers:
            break
        time.sleep(0.5)
    return waiting


# -- the run ---------------------------------------------------------------------------------------

@dataclass
class Burst:
    duration_s: float
    span: Span
    window: Window
    client: ClientLoad

    @property
    def jobs(self) -> int:
        return self.span.items

    @property
    def drain_s(self) -> float:
        return self.span.drain_s

    @property
    def endpoint_cpu_per_job(self) -> float:
        return self.window.endpoints_cpu * self.window.seconds / self.jobs


@dataclass
class FleetReport:
    settings: FleetSettings
    lines: list[str] = field(default_factory=list)
    alone: Window | None = None  # the endpoints with neither fleet nor client
    idle: Window | None = None
    bursts: list[Burst] = field(default_factory=list)
    idle_client: ClientLoad | None = None
    no_fleet: list[ClientLoad] = field(default_factory=list)  # before and after
    problems: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    def say(self, line: str, echo: bool) -> None:
        self.lines.append(line)
        if echo:
            print(line, flush=True)


def burst_max(values: Sequence[float]) -> str:
    return f"{1000 * max(values):.0f} ms" if values else "none"


def client_phase(endpoints: Sequence[Endpoint], book: Book, settings: FleetSettings, name: str) -> ClientLoad:
    load = ClientLoad(endpoints, book, settings.client_rate, name)
    time.sleep(settings.client_s)
    return load.stop()


def run_burst(endpoints: Sequence[Endpoint], fleet: Fleet, book: Book, settings: FleetSettings,
              duration: float) -> Burst:
    iterations = max(1, round(duration * 1000))
    slots = settings.workers * SLOTS
    jobs = max(slots, min(settings.max_burst, int(slots * settings.burst_work_s / duration)))
    meter = Meter(endpoints, fleet)
    load = ClientLoad(endpoints, book, settings.client_rate, f"during {duration:g}")
    enqueue_burst(endpoints, book, jobs, iterations)
    wait_drained(endpoints, timeout=120 + 3 * jobs * duration / slots)
    window = meter.window()
    load.stop()
    return Burst(duration, burst_span(endpoints, iterations), window, load)


def collect_everything(endpoints: Sequence[Endpoint], book: Book, timeout: float = 60.0) -> None:
    client = Client(endpoints, book)
    deadline = time.monotonic() + timeout
    turn = 0
    while len(book.pulled) < len(book.expected) and time.monotonic() < deadline:
        if client.pull(turn % 2, 1000)[0] == 0:
            time.sleep(0.1)
        turn += 1
    client.close()


def account(report: FleetReport, endpoints: Sequence[Endpoint], book: Book, final: dict[str, Any],
            routes: Counter[str], left_pending: int) -> None:
    """Every job enqueued while the fleet ran (or before) ran once, completed once, was pulled once, with
    the simulation's result; the `left_pending` enqueued after the fleet stopped are pending, never
    claimed. The counts of the simulators, the data files and the endpoints' metrics agree."""
    problems = report.problems
    expected, pulled, runs = book.expected, book.pulled, final["runs"]
    missing = [work_id for work_id in expected if work_id not in pulled]
    unknown = [work_id for work_id in pulled if work_id not in expected]
    wrong = [work_id for work_id, result in pulled.items()
             if work_id in expected and result != simulated_result(expected[work_id])]
    twice = [work_id for work_id, count in runs.items() if count != 1]
    not_run = [work_id for work_id in expected if work_id not in runs]
    for what, ids in (("never pulled", missing), ("pulled but never enqueued", unknown),
                      ("pulled with a result other than the simulation's", wrong), ("pulled twice", book.pulled_twice),
                      ("run more than once", twice), ("never run", not_run)):
        if ids:
            problems.append(f"{len(ids)} job(s) {what}, e.g. {', '.join(sorted(ids)[:3])}")
    stored = final["answers"].get(STORED, 0)
    others = {answer: count for answer, count in final["answers"].items() if answer != STORED}
    rows = Counter()
    for endpoint in endpoints:
        db = sqlite3.connect(f"file:{endpoint.db}?mode=ro", uri=True)
        rows.update(dict(db.execute("SELECT state || ':' || attempts, count(*) FROM work_items GROUP BY 1")))
        db.close()
    report.counts = {"enqueued": len(expected), "pulled": len(pulled), "runs": sum(runs.values()),
                     "jobs_claimed": final["claims"]["jobs"] - final["claims"].get("released", 0),
                     "jobs_given_back": final["claims"].get("released", 0), "results_stored": stored,
                     "rows_completed_first_attempt": rows.get("completed:1", 0),
                     "results_posts_sent": final["requests"].get("/internal/results", 0),
                     "results_posts_answered": routes.get("/internal/results", 0)}
    counts = report.counts
    for name in ("pulled", "runs", "jobs_claimed", "results_stored", "rows_completed_first_attempt"):
        if counts[name] != counts["enqueued"]:
            problems.append(f"{name} {counts[name]} != enqueued {counts['enqueued']}")
    if others:
        problems.append(f"results not stored: {others}")
    if sum(rows.values()) != len(expected) + left_pending or rows.get("pending:0", 0) != left_pending:
        problems.append(f"the data files hold {dict(rows)} (state:attempts), {len(expected)} jobs were enqueued "
                        f"for the fleet and {left_pending} after it stopped")
    if counts["results_posts_sent"] != counts["results_posts_answered"]:
        problems.append(f"the simulators posted results {counts['results_posts_sent']} times, the endpoints "
                        f"answered {counts['results_posts_answered']}")
    for name in ("in_flight", "unposted", "still_running"):
        if final.get(name):
            problems.append(f"{final[name]} job(s) {name.replace('_', ' ')} when the fleet stopped")


def run_fleet(settings: FleetSettings, echo: bool = True) -> FleetReport:
    report = FleetReport(settings)
    say = lambda line: report.say(line, echo)  # noqa: E731
    book = Book()
    with endpoint_pair(settings) as endpoints:
        routes_at_start = sum((endpoint.requests_by_route() for endpoint in endpoints), Counter())
        say(f"{settings.workers} simulated workers of {SLOTS} slots in {settings.processes} processes, two endpoints "
            f"(load average {os.getloadavg()[0]:.1f})")
        meter = Meter(endpoints, None)
        time.sleep(settings.idle_s)
        report.alone = meter.window()
        say(f"no fleet, no client: {describe(report.alone)}")
        before = client_phase(endpoints, book, settings, "no fleet before")
        say(f"no fleet (before): enqueue {ms(before.enqueue_s)}; pullCompleted {ms(before.pull_s)}")
        started = time.monotonic()
        fleet = Fleet(settings, [endpoint.url for endpoint in endpoints])
        waiting = wait_waiting(endpoints, settings.workers, settings.settle_timeout_s)
        say(f"fleet started in {time.monotonic() - started:.1f} s; claims waiting at each endpoint: {waiting}")
        time.sleep(2)
        meter = Meter(endpoints, fleet)
        time.sleep(settings.idle_s)
        report.idle = meter.window()
        say(f"idle fleet: {describe(report.idle)}")
        idle = client_phase(endpoints, book, settings, "idle fleet")
        time.sleep(1.0)  # the last probe is claimed
        delays = claim_delays(endpoints, idle.probes)
        say(f"idle fleet, client meanwhile: enqueue {ms(idle.enqueue_s)}; pullCompleted {ms(idle.pull_s)}; "
            f"enqueue to claim {ms(delays)}")
        for duration in settings.durations:
            burst = run_burst(endpoints, fleet, book, settings, duration)
            report.bursts.append(burst)
            slots = settings.workers * SLOTS
            say(f"burst of {burst.jobs} jobs of {duration:g} s: drained in {burst.drain_s:.1f} s (the fleet's "
                f"{slots} slots alone: {burst.jobs * duration / slots:.1f} s), {burst.jobs / burst.drain_s:.0f} jobs/s "
                f"(the fleet could run {slots / duration:.0f}/s); endpoints' CPU per job "
                f"{1000 * burst.endpoint_cpu_per_job:.2f} ms\n    enqueued over "
                f"{burst.span.last_created - burst.span.first_created:.1f} s; enqueue to claim "
                f"{ms(burst.span.claim_delays)}, max {burst_max(burst.span.claim_delays)}; claim to result "
                f"{ms(burst.span.runs)}\n    {describe(burst.window)}\n    client meanwhile: "
                f"enqueue {ms(burst.client.enqueue_s)}; pullCompleted {ms(burst.client.pull_s)}")
        final = fleet.stop()
        after = client_phase(endpoints, book, settings, "no fleet after")
        say(f"no fleet (after): enqueue {ms(after.enqueue_s)}; pullCompleted {ms(after.pull_s)}")
        report.idle_client, report.no_fleet = idle, [before, after]
        for work_id in after.probes:  # enqueued with no fleet: they stay pending
            del book.expected[work_id]
        collect_everything(endpoints, book)
        routes = sum((endpoint.requests_by_route() for endpoint in endpoints), Counter()) - routes_at_start
        account(report, endpoints, book, final, routes, len(after.probes))
    say(f"accounting: {report.counts}; " + ("every count adds up" if not report.problems
                                             else "PROBLEMS: " + "; ".join(report.problems)))
    saturation(report, say)
    return report


def saturation(report: FleetReport, say: Any) -> None:
    """The fleet size at which one endpoint would spend ENDPOINT_CORES, per job length: each endpoint serves
    half the jobs (workers x slots / length per second, at the CPU per job measured in that burst) and
    half of every idle worker's claims (the idle fleet's CPU per worker)."""
    if report.idle is None:
        return
    workers = report.settings.workers
    alone = report.alone.endpoints_cpu if report.alone else 0.0
    idle_per_worker = max(0.0, report.idle.endpoints_cpu - alone) / 2 / workers  # per endpoint
    say(f"saturation (assumed: an endpoint serves at most {ENDPOINT_CORES:g} core; idle cost "
        f"{1e6 * idle_per_worker:.1f} µs/s per worker per endpoint):")
    for burst in report.bursts:
        per_worker = SLOTS / (2 * burst.duration_s) * burst.endpoint_cpu_per_job + idle_per_worker
        peak = max(burst.window.endpoint_cpu)
        say(f"  jobs of {burst.duration_s:g} s: about {ENDPOINT_CORES / per_worker:,.0f} workers per endpoint pair "
            f"(measured here with {workers}: busiest endpoint at {100 * peak:.0f} % of a core, "
            f"{burst.jobs / burst.drain_s:.0f} of the fleet's {workers * SLOTS / burst.duration_s:.0f} jobs/s)")


def parse(argv: Sequence[str] | None = None) -> FleetSettings:
    parser = argparse.ArgumentParser(prog="python -m bench.fleet", description=__doc__.split("\n")[0])
    defaults = FleetSettings()
    parser.add_argument("--workers", type=int, default=defaults.workers)
    parser.add_argument("--processes", type=int, default=defaults.processes, help="simulator processes")
    parser.add_argument("--durations", default="0.01,1,60", help="job lengths of the bursts, seconds")
    parser.add_argument("--idle-s", type=float, default=defaults.idle_s)
    parser.add_argument("--client-s", type=float, default=defaults.client_s)
    parser.add_argument("--client-rate", type=float, default=defaults.client_rate)
    parser.add_argument("--burst-work-s", type=float, default=defaults.burst_work_s)
    parser.add_argument("--max-burst", type=int, default=defaults.max_burst)
    parser.add_argument("--claim-wait", type=float, default=defaults.claim_wait)
    parser.add_argument("--start-spread-s", type=float, default=defaults.start_spread_s)
    parser.add_argument("--endpoint-arg", action="append", default=[],
                        help="a flag for both endpoints, e.g. --endpoint-arg=--max-waiting-claims=512 (repeat)")
    args = parser.parse_args(argv)
    durations = tuple(float(value) for value in args.durations.split(",") if value.strip())
    return FleetSettings(args.workers, args.processes, durations, args.idle_s, args.client_s, args.client_rate,
                         args.burst_work_s, args.max_burst, args.claim_wait, args.start_spread_s,
                         tuple(args.endpoint_arg))


if __name__ == "__main__":
    result = run_fleet(parse())
    raise SystemExit(1 if result.problems else 0)
