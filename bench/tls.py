"""What TLS costs: the same endpoint build with and without HTTPS, measured in one run, alternating.

Two endpoints run side by side on loopback, one plain (A), one with a certificate of the cluster
CA (B; deploy/cluster_ca.py). Each round measures A, then B (the next round B, then A):

* enqueue throughput: wrk, 16 kept-alive connections, 16 KiB payloads (as bench/enqueue.sh);
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

from bench._endpoint import WORKER_KEY, running_endpoint
from cli.tls import client_context
from deploy.cluster_ca import ensure_ca, issue, write_private
from worker.client import EndpointClient

PAYLOAD = 16 * 1024


@contextlib.contextmanager
def endpoints() -> Iterator[tuple[dict[str, str], str]]:
    """({"plain": url, "tls": url}, the CA file)."""
    with tempfile.TemporaryDirectory(prefix="dw-bench-tls-") as directory:
        folder = Path(directory)
        ca, _ = ensure_ca(folder / "ca.pem", folder / "ca-key.pem", "bench")
        pem = issue(ca, ["127.0.0.1"])
        write_private(folder / "cert.pem", pem.certificate)
        write_private(folder / "key.pem", pem.key)
        tls_args = ("--tls-cert", str(folder / "cert.pem"), "--tls-key", str(folder / "key.pem"))
        with running_endpoint() as (plain, _, _), \
                running_endpoint(*tls_args, ca_file=str(folder / "ca.pem")) as (secure, _, _):
            yield {"plain": plain, "tls": secure}, str(folder / "ca.pem")


def wrk_enqueues(url: str, seconds: float, body_file: Path) -> float:
    """Durable enqueues per second from 16 kept-alive connections (wrk: C, little client CPU)."""
    script = body_file.with_suffix(".lua")
    script.write_text(f'wrk.method = "PUT"\nlocal f = io.open("{body_file}", "rb"); wrk.body = f:read("*a"); '
                      f'f:close()\nwrk.headers["Content-Type"] = "application/octet-stream"\n')
    out = subprocess.run(["wrk", "-t2", "-c16", f"-d{seconds:g}s", "-s", str(script),
                          f"{url}/enqueue?iterations=1000"], capture_output=True, text=True, check=True).stdout
    if "Non-2xx" in out or "Socket errors" in out:
        raise RuntimeError(f"wrk saw errors:\n{out}")
    return float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))


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
    figures: dict[str, dict[str, list[float]]] = {kind: {"wrk": [], "fresh": [], "job_mean": [], "job_p50": []}
                                                   for kind in ("plain", "tls")}
    with endpoints() as (urls, ca_file), tempfile.TemporaryDirectory() as scratch:
        body = Path(scratch) / "payload"
        body.write_bytes(bytes(range(256)) * (PAYLOAD // 256))
        for index in range(rounds):
            order = ("plain", "tls") if index % 2 == 0 else ("tls", "plain")
            for kind in order:
                url = urls[kind]
                figures[kind]["wrk"].append(wrk_enqueues(url, seconds, body))
                figures[kind]["fresh"].append(fresh_connection_enqueues(url, ca_file, 200))
                mean, p50 = job_overhead(url, ca_file, jobs)
                figures[kind]["job_mean"].append(mean)
                figures[kind]["job_p50"].append(p50)
            print(f"round {index + 1}: " + "; ".join(
                f"{kind}: {figures[kind]['wrk'][-1]:.0f} enq/s, fresh conn {figures[kind]['fresh'][-1]:.2f} ms, "
                f"job {figures[kind]['job_mean'][-1]:.2f} ms" for kind in ("plain", "tls")), flush=True)

    def span(values: list[float], digits: int = 2) -> str:
        return f"{min(values):.{digits}f}-{max(values):.{digits}f} (median {statistics.median(values):.{digits}f})"

    plain, tls = figures["plain"], figures["tls"]
    ratios = [b / a for a, b in zip(plain["wrk"], tls["wrk"], strict=True)]
    print(f"\n{rounds} rounds alternating, wrk {seconds:g}s with 16 connections and {PAYLOAD // 1024} KiB payloads, "
          f"{jobs} jobs per overhead run")
    print(f"enqueue throughput, kept-alive:  plain {span(plain['wrk'], 0)}/s   TLS {span(tls['wrk'], 0)}/s   "
          f"TLS/plain {span(ratios)}")
    print(f"enqueue, new connection each:    plain {span(plain['fresh'])} ms   TLS {span(tls['fresh'])} ms")
    print(f"per job (claim + result):        plain mean {span(plain['job_mean'])} ms, p50 {span(plain['job_p50'])}"
          f"   TLS mean {span(tls['job_mean'])} ms, p50 {span(tls['job_p50'])}")


if __name__ == "__main__":
    given = sys.argv[1:]
    main(int(given[0]) if given else 3, float(given[1]) if len(given) > 1 else 8,
         int(given[2]) if len(given) > 2 else 500)
