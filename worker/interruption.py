"""Spot interruption notices, for a worker on an EC2 Spot instance.

EC2 warns a Spot instance about two minutes before it takes it back: from then on the instance
metadata's `spot/instance-action` answers `{"action": "terminate", "time": "<UTC>"}` (404 until
then). The metadata service is asked the IMDSv2 way, with a session token from
`PUT /latest/api/token` sent along with every read, every `notice_interval` seconds, from a
thread of the supervisor (`Watcher`), only when the worker is told it runs on Spot
(`--interruption-notices ec2-spot`, which the ec2 provider sets on its Spot workers).

On a notice the worker drains (worker/dispatch.py, worker/slot.py): it calls off its waiting
claims and claims nothing more, finishes the jobs it can finish before the deadline less
`MARGIN_S` (the time to post their results), gives the others back at once (a batched release,
so the attempt does not count and another worker takes the item now, not when the lease
expires), posts what it finished, and exits. It tells both endpoints that it is
leaving and, at the end, that it left (`announce`): their scalers count it as gone, launch a
replacement if the work needs one, and terminate the instance once it left.

Standard library only, like the rest of the worker.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

from worker.client import EndpointClient, EndpointDown, Rejected

log = logging.getLogger("worker")

TOKEN_PATH = "/latest/api/token"
NOTICE_PATH = "/latest/meta-data/spot/instance-action"
TOKEN_TTL_S = 21_600  # IMDSv2's longest; renewed well before it ends
NOTICE_WARNING_S = 120.0  # EC2's warning, assumed when a notice's time cannot be read
# Results posted and jobs released before the instance goes: two HTTP timeouts of the worker's client.
MARGIN_S = 20.0
HTTP_TIMEOUT_S = 2.0  # the metadata service answers at once, or is not there
LEAVING_TIMEOUT_S = 3.0
# No metadata service (not EC2, or IMDS disabled): said once a minute, not every few seconds.
COMPLAINT_INTERVAL_S = 60.0
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # link-local: never through a proxy


class MetadataUnavailable(Exception):
    """The instance metadata service did not answer as IMDSv2 does."""


@dataclass(frozen=True)
class Notice:
    action: str  # terminate (what the cluster's Spot requests ask for), stop or hibernate
    deadline: float  # unix seconds: when EC2 takes the instance

    def seconds_left(self, now: float | None = None) -> float:
        return self.deadline - (time.time() if now is None else now)


def parse_notice(body: bytes, now: float) -> Notice:
    """A notice as EC2 words it; one whose time cannot be read is taken to leave EC2's two minutes."""
    try:
        fields = json.loads(body)
        action = str(fields.get("action", "terminate"))
        stamp = str(fields["time"]).replace("Z", "+00:00")
        deadline = datetime.fromisoformat(stamp).timestamp()
    except (ValueError, KeyError, TypeError, AttributeError):
        log.warning("interruption notice %r: its time cannot be read; taking EC2's %.0fs", body[:200],
                    NOTICE_WARNING_S)
        return Notice("terminate", now + NOTICE_WARNING_S)
    return Notice(action, deadline)


class Metadata:
    """The instance metadata service, IMDSv2: a session token, then reads that carry it."""

    def __init__(self, base_url: str, timeout: float = HTTP_TIMEOUT_S) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self._token = ""
        self._token_until = 0.0  # monotonic

    def notice(self) -> Notice | None:
        """The interruption notice, or None while there is none."""
        for fresh in (False, True):
            status, body = self._get(NOTICE_PATH, self._session_token(renew=fresh))
            if status == 401 and not fresh:  # the token expired (or the service restarted): a new one
                continue
            if status == 404:
                return None
            if status == 200:
                return parse_notice(body, time.time())
            raise MetadataUnavailable(f"{self.base_url}{NOTICE_PATH}: HTTP {status}")
        raise MetadataUnavailable(f"{self.base_url}{NOTICE_PATH}: the session token is refused")

    def _session_token(self, renew: bool) -> str:
        if renew or not self._token or time.monotonic() >= self._token_until:
            request = urllib.request.Request(f"{self.base_url}{TOKEN_PATH}", method="PUT", data=b"", headers={
                "X-aws-ec2-metadata-token-ttl-seconds": str(TOKEN_TTL_S)})
            status, body = self._open(request)
            if status != 200 or not body.strip():
                raise MetadataUnavailable(f"{self.base_url}{TOKEN_PATH}: HTTP {status}")
            self._token = body.decode("ascii", "replace").strip()
            self._token_until = time.monotonic() + TOKEN_TTL_S / 2
        return self._token

    def _get(self, path: str, token: str) -> tuple[int, bytes]:
        return self._open(urllib.request.Request(f"{self.base_url}{path}",
                                                 headers={"X-aws-ec2-metadata-token": token}))

    def _open(self, request: urllib.request.Request) -> tuple[int, bytes]:
        try:
            with _NO_PROXY.open(request, timeout=self.timeout) as response:
                return response.status, response.read(4096)
        except urllib.error.HTTPError as exc:
            return exc.code, b""
        except (OSError, ValueError) as exc:
            raise MetadataUnavailable(f"{request.full_url}: {exc}") from exc


class Watcher:
    """Asks for a notice every `interval` seconds, from a thread, until one comes or `stop` is set."""

    def __init__(self, metadata: Metadata, interval: float, on_notice: Callable[[Notice], None],
                 stop: threading.Event) -> None:
        self.metadata = metadata
        self.interval = interval
        self.on_notice = on_notice
        self.stop = stop
        self.thread = threading.Thread(target=self._run, name="interruption-watcher", daemon=True)

    def start(self) -> None:
        log.info("watching %s%s for a Spot interruption notice every %gs", self.metadata.base_url, NOTICE_PATH,
                 self.interval)
        self.thread.start()

    def _run(self) -> None:
        complained = -math.inf
        while not self.stop.is_set():
            try:
                notice = self.metadata.notice()
            except MetadataUnavailable as exc:
                if time.monotonic() - complained >= COMPLAINT_INTERVAL_S:
                    log.warning("no interruption notices can be read (retrying every %gs): %s", self.interval, exc)
                    complained = time.monotonic()
                notice = None
            if notice is not None:
                log.warning("Spot interruption notice: %s in %.0fs; claiming nothing more", notice.action,
                            notice.seconds_left())
                self.on_notice(notice)
                return
            self.stop.wait(self.interval)


def can_finish(seconds_to_go: float | None, seconds_left: float) -> bool:
    """A job that will end before the drain's deadline is finished; one that is not known to (its
    speed not measured yet) is given back."""
    return seconds_to_go is not None and seconds_to_go <= seconds_left


def seconds_to_go(iterations: int, remaining: int, elapsed: float) -> float | None:
    """A job's time to go at its speed so far in its lane (`remaining` of the `iterations - 1` steps
    after the first hash); None before it has made measurable progress."""
    done = iterations - 1 - remaining
    if done <= 0 or elapsed <= 0:
        return None
    return remaining * elapsed / done


def announce(endpoints: Sequence[str], worker_key: str, worker_id: str, notice: Notice, left: bool,
             ca_file: str = "") -> None:
    """Tell every endpoint that this worker is leaving (or has left), so that its scaler counts it as
    gone and, once it left, terminates its instance. Best effort: without it, the scaler learns it
    when the instance is gone, or after its silence deadline."""
    for url in endpoints:
        client = EndpointClient(url, worker_key, worker_id, timeout=LEAVING_TIMEOUT_S, ca_file=ca_file)
        try:
            client.leaving("spot-interruption", left, notice.seconds_left())
        except (EndpointDown, Rejected) as exc:
            log.warning("could not tell %s that this worker is %s: %s", url, "gone" if left else "leaving", exc)
        finally:
            client.close()
