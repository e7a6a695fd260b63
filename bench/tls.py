"""What TLS costs: the same endpoint build with and without HTTPS, measured in one run, alternating.

Two endpoints run side by side on loopback, one plain (A), one with a certificate of the cluster
CA (B; deploy/cluster_ca.py). Each round measures A, then B (the next round B, then A):

* enqueue throughput: wrk, 16 kept-alive connections, 16 KiB payloads (as bench/enqueue.sh), and the
  endpoint's CPU time per enqueue meanwhile (its processes' user + system time: less noisy than the
  rate on a shared machine);
* enqueue with a new connection per request (a TLS handshake each, as one curl per job costs);
* per-job overhead: the worker's own client (worker/client.py, TLS checked against the CA) claims
  one job and posts its result, back to back on one kept-alive connection.

    usage: .venv/bin/python -m bench.tls [ROUNDS] [SECONDS] [JOBS]
"""

from __future__ import annotations

import contextlib
import http.client
import re
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

from bench._endpoint import WORKER_KEY, cpu_seconds, group_pids, running_endpoint
from cli.tls import client_context
from deploy.cluster_ca import ensure_ca, issue, write_private
from worker.client import EndpointClient

PAYLOAD = 16 * 1024
FRESH = 200  # enqueues on a new connection each, per round


@contextlib.contextmanager
def endpoints() -> Iterator[tuple[dict[str, str], str, dict[str, int]]]:
    """({"plain": url, "tls": url}, the CA file, {"plain": pid, "tls": pid} of each server's process group)."""
    with tempfile.TemporaryDirectory(prefix="dw-bench-tls-") as directory:
        folder = Path(directory)
        ca, _ = ensure_ca(folder / "ca.pem", folder / "ca-key.pem", "bench")
        pem = issue(ca, ["127.0.0.1"])
        write_private(folder / "cert.pem", pem.certificate)
        write_private(folder / "key.pem", pem.key)
        tls_args = ("--tls-cert", str(folder / "cert.pem"), "--tls-key", str(folder / "key.pem"))
        with running_endpoint() as (plain, plain_process, _), \
                running_endpoint(*tls_args, ca_file=str(folder / "ca.pem")) as (secure, tls_process, _):
            yield ({"plain": plain, "tls": secure}, str(folder / "ca.pem"),
                   {"plain": plain_process.pid, "tls": tls_process.pid})


def group_cpu(pgid: int) -> float:
    return sum(cpu_seconds(pid) for pid in group_pids(pgid))


def wrk_enqueues(url: str, seconds: float, body_file: Path, pgid: int) -> tuple[float, float]:
    """(durable enqueues per second from 16 kept-alive connections (wrk: C, little client CPU), the server's
    CPU microseconds per enqueue)."""
    script = body_file.with_suffix(".lua")
    script.write_text(f'wrk.method = "PUT"\nlocal f = io.open("{body_file}", "rb"); wrk.body = f:read("*a"); '
                      f'f:close()\nwrk.headers["Content-Type"] = "application/octet-stream"\n')
    cpu_before = group_cpu(pgid)
    out = subprocess.run(["wrk", "-t2", "-c16", f"-d{seconds:g}s", "-s", str(script),
                          f"{url}/enqueue?iterations=1000"], capture_output=True, text=True, check=True).stdout
    cpu = group_cpu(pgid) - cpu_before
    if "Non-2xx" in out or "Socket errors" in out:
        raise RuntimeError(f"wrk saw errors:\n{out}")
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    return rate, cpu / requests * 1e6


def connection(url: str, context: ssl.SSLContext) -> http.client.HTTPConnection:
    parts = urlsplit(url)
    if parts.scheme == "https":
        return http.client.HTTPSConnection(parts.hostname, parts.port, timeout=10, context=context)
    return http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)


def enqueue(conn: http.client.HTTPConnection, payload: bytes) -> None:
    conn.request("PUT", "/enqueue?iterations=1", body=payload, headers={"Content-Type": "application/octet-stream"})
    response = conn.getresponse()
    response.read()
    assert response.status == 200, response.status


def fresh_connection_enqueues(url: str, ca_file: str, count: int) -> float:
    """Mean ms per enqueue, each on a new connection (with TLS: a full handshake each, certificate checked)."""
    context = client_context(ca_file)
    took = []
    for index in range(count):
        started = time.perf_counter()
        conn = connection(url, context)
        enqueue(conn, b"job %d" % index)
        conn.close()
        took.append(time.perf_counter() - started)
    return statistics.mean(took) * 1000


def job_overhead(url: str, ca_file: str, jobs: int) -> tuple[float, float]:
    """(mean, p50) ms per job: enqueue `jobs`, then claim one and post its result, back to back."""
    conn = connection(url, client_context(ca_file))
    for index in range(jobs):
        enqueue(conn, b"x%d" % index)
    conn.close()
    client = EndpointClient(url, WORKER_KEY, "bench-worker", ca_file=ca_file)
    per_job = []
    for _ in range(jobs):
        started = time.perf_counter()
        answer = client.claim(max_jobs=1)
        (job,) = answer.jobs
        assert client.submit([(job, "0" * 128, 0.0)]) == ["done"]
        per_job.append(time.perf_counter() - started)
    client.close()
    return statistics.mean(per_job) * 1000, statistics.median(per_job) * 1000


def main(rounds: int = 3, seconds: float = 8, jobs: int = 500) -> None:
    figures: dict[str, dict[str, list[float]]] = {
        kind: {"wrk": [], "cpu": [], "fresh": [], "fresh_cpu": [], "job_mean": [], "job_p50": []}
        for kind in ("plain", "tls")}
    with endpoints() as (urls, ca_file, groups), tempfile.TemporaryDirectory() as scratch:
        body = Path(scratch) / "payload"
        body.write_bytes(bytes(range(256)) * (PAYLOAD // 256))
        for index in range(rounds):
            order = ("plain", "tls") if index % 2 == 0 else ("tls", "plain")
            for kind in order:
                url = urls[kind]
                rate, cpu = wrk_enqueues(url, seconds, body, groups[kind])
                figures[kind]["wrk"].append(rate)
                figures[kind]["cpu"].append(cpu)
                cpu_before = group_cpu(groups[kind])
                figures[kind]["fresh"].append(fresh_connection_enqueues(url, ca_file, FRESH))
                figures[kind]["fresh_cpu"].append((group_cpu(groups[kind]) - cpu_before) / FRESH * 1e6)
                mean, p50 = job_overhead(url, ca_file, jobs)
                figures[kind]["job_mean"].append(mean)
                figures[kind]["job_p50"].append(p50)
            print(f"round {index + 1}: " + "; ".join(
                f"{kind}: {figures[kind]['wrk'][-1]:.0f} enq/s ({figures[kind]['cpu'][-1]:.0f} us CPU each), "
                f"fresh conn {figures[kind]['fresh'][-1]:.2f} ms, job {figures[kind]['job_mean'][-1]:.2f} ms"
                for kind in ("plain", "tls")), flush=True)

    def span(values: list[float], digits: int = 2) -> str:
        return f"{min(values):.{digits}f}-{max(values):.{digits}f} (median {statistics.median(values):.{digits}f})"

    plain, tls = figures["plain"], figures["tls"]
    ratios = [b / a for a, b in zip(plain["wrk"], tls["wrk"], strict=True)]
    print(f"\n{rounds} rounds alternating, wrk {seconds:g}s with 16 connections and {PAYLOAD // 1024} KiB payloads, "
          f"{jobs} jobs per overhead run")
    print(f"enqueue throughput, kept-alive:  plain {span(plain['wrk'], 0)}/s   TLS {span(tls['wrk'], 0)}/s   "
          f"TLS/plain {span(ratios)}")
    print(f"  the endpoint's CPU per enqueue: plain {span(plain['cpu'], 0)} us   TLS {span(tls['cpu'], 0)} us   "
          f"TLS/plain {span([b / a for a, b in zip(plain['cpu'], tls['cpu'], strict=True)])}")
    print(f"enqueue, new connection each:    plain {span(plain['fresh'])} ms   TLS {span(tls['fresh'])} ms")
    print(f"  the endpoint's CPU per enqueue: plain {span(plain['fresh_cpu'], 0)} us   "
          f"TLS {span(tls['fresh_cpu'], 0)} us")
    print(f"per job (claim + result):        plain mean {span(plain['job_mean'])} ms, p50 {span(plain['job_p50'])}"
          f"   TLS mean {span(tls['job_mean'])} ms, p50 {span(tls['job_p50'])}")


if __name__ == "__main__":
    given = sys.argv[1:]
    main(int(given[0]) if given else 3, float(given[1]) if len(given) > 1 else 8,
         int(given[2]) if len(given) > 2 else 500)
