"""How many slow clients an endpoint withstands: N connections send a request's headers with
`Content-Length: 100` and no body, then /stats, an enqueue and a worker claim are timed.

Each count runs against a fresh endpoint with the default settings (16 threads, 1024
connections, 30 s body time limit). A request that gets no answer within 10 s counts as
starved.
    usage: .venv/bin/python -m bench.slow_clients [N ...]   (default 16 100 500 1000 1100)
"""

from __future__ import annotations

import contextlib
import socket
import sys
import time
import urllib.error
import urllib.request

from bench._endpoint import WORKER_KEY, running_endpoint

SLOW_HEAD = (b"PUT /enqueue?iterations=1 HTTP/1.1\r\nHost: bench\r\nContent-Type: application/octet-stream\r\n"
             b"Content-Length: 100\r\n\r\n")


def timed(request: urllib.request.Request | str) -> str:
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            status = str(answer.status)
    except urllib.error.HTTPError as exc:
        status = str(exc.code)
    except OSError:
        return "no answer within 10 s"
    return f"{status} in {(time.perf_counter() - started) * 1000:.1f} ms"


def measure(count: int) -> None:
    with running_endpoint() as (url, _, _):
        port = int(url.rsplit(":", 1)[1])
        slow = []
        for _ in range(count):
            sock = socket.socket()
            sock.setblocking(False)  # past the server's connection limit, connect() waits in the listen queue
            sock.connect_ex(("127.0.0.1", port))
            slow.append(sock)
        time.sleep(1)
        for sock in slow:
            sock.setblocking(True)
            sock.settimeout(5)
            with contextlib.suppress(OSError):  # one the server never accepted
                sock.sendall(SLOW_HEAD)
        time.sleep(1)
        enqueue = urllib.request.Request(f"{url}/enqueue?iterations=1", data=b"x" * 64, method="PUT",
                                         headers={"Content-Type": "application/octet-stream"})
        claim = urllib.request.Request(f"{url}/internal/claim", data=b'{"worker": "bench"}', method="POST",
                                       headers={"Authorization": f"Bearer {WORKER_KEY}"})
        print(f"{count:5d} slow connections:  /stats {timed(url + '/stats')}   enqueue {timed(enqueue)}   "
              f"claim {timed(claim)}", flush=True)
        for sock in slow:
            sock.close()


def main(counts: list[int]) -> None:
    for count in counts:
        measure(count)


if __name__ == "__main__":
    main([int(arg) for arg in sys.argv[1:]] or [16, 100, 500, 1000, 1100])
