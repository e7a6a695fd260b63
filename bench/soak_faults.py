"""The soak's faults, injected at random moments into the cluster that bench/soak_cluster.py started.

Two streams: worker faults (a supervisor or a single slot SIGKILLed) at random moments, and the other
kinds one at a time, dealt from a shuffled deck so that each kind comes up in turn: an endpoint's
process group SIGKILLed (deploy's supervision restarts it), an endpoint SIGSTOPped for longer than the
lease and then continued, a scaler SIGKILLed while it is running, the link between the endpoints cut
(held connections, or every connection reset) and restored, an endpoint's disk filled and freed.
Every fault is undone by `stop()`, whatever happened: stopped groups continued, the link restored,
the disks freed.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from bench.soak_cluster import NODES, Cluster, Worker, cpu_ticks

KINDS = {
    "worker_supervisor": "SIGKILL of a worker's supervisor",
    "worker_slot": "SIGKILL of a single worker slot",
    "endpoint_kill": "SIGKILL of an endpoint's process group",
    "endpoint_stop": "SIGSTOP of an endpoint past the lease, then SIGCONT",
    "scaler_kill": "SIGKILL of a scaler while it runs",
    "link_cut": "link between the endpoints cut, then restored",
    "disk_full": "an endpoint's disk filled, then freed",
}
WORKER_KINDS = ("worker_supervisor", "worker_slot")
CLUSTER_KINDS = ("endpoint_kill", "endpoint_stop", "scaler_kill", "link_cut", "disk_full")
STABLE_RUN_S = 65.0  # deploy's supervisor resets its back-off after a run of 60 s: kill an endpoint no sooner


@dataclass(frozen=True)
class Injected:
    kind: str
    at: float  # time.time()
    held_s: float
    detail: str


class Faults:
    def __init__(self, cluster: Cluster, rng: random.Random, *, gap_s: float, hold_s: float, worker_gap_s: float,
                 say: Callable[[str], None], large_uploads: Callable[[str], None] = lambda node: None) -> None:
        self.cluster = cluster
        self.large_uploads = large_uploads  # sent to an endpoint whose disk is full: writes that need room
        self.rng = rng
        self.gap_s = gap_s
        self.hold_s = hold_s
        self.worker_gap_s = worker_gap_s
        self.say = say
        self.injected: list[Injected] = []
        self.skipped: Counter[str] = Counter()  # "kind: why" -> times
        self.unavailable: dict[str, str] = {}  # kind -> why it cannot be injected here at all
        if cluster.no_disks_reason:
            self.unavailable["disk_full"] = cluster.no_disks_reason
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.frozen: set[int] = set()
        self.last_kill: dict[str, float] = {}
        self.threads = [threading.Thread(target=self._cluster_faults, name="faults", daemon=True),
                        threading.Thread(target=self._worker_faults, name="worker-faults", daemon=True)]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def stop(self) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(timeout=180)
        self.restore()

    def restore(self) -> None:
        """Undo whatever fault may still be in place (idempotent)."""
        with self.lock:
            frozen, self.frozen = self.frozen, set()
        for pgid in frozen:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGCONT)
        for proxy in self.cluster.proxies.values():
            proxy.restore()
        for disk in self.cluster.disks.values():
            disk.free()

    # --- the two streams ------------------------------------------------------------------------------

    def _cluster_faults(self) -> None:
        deck: list[str] = []
        first = True
        while not self.stopping.wait(self.rng.uniform(0.25, 0.75) * self.gap_s if first else
                                     self.rng.uniform(0.5, 1.5) * self.gap_s):
            first = False
            if not deck:
                deck = [kind for kind in CLUSTER_KINDS if kind not in self.unavailable]
                self.rng.shuffle(deck)
            kind = deck.pop(0)
            if not self._inject(kind):
                deck.append(kind)  # its turn again later

    def _worker_faults(self) -> None:
        turn = 0
        while not self.stopping.wait(self.rng.uniform(0.5, 1.5) * self.worker_gap_s):
            turn += self._inject(WORKER_KINDS[turn % 2])

    def _inject(self, kind: str) -> bool:
        started = time.time()
        try:
            outcome = getattr(self, f"_{kind}")()
        except Exception as exc:  # noqa: BLE001 -- a fault that could not be made is a skip, said so; the soak goes on
            outcome = f"failed: {exc!r}"
        if isinstance(outcome, str):
            self.skipped[f"{KINDS[kind]}: {outcome}"] += 1
            return False
        held_s, detail = outcome
        with self.lock:
            self.injected.append(Injected(kind, started, held_s, detail))
        self.say(f"fault: {KINDS[kind]} ({detail})")
        return True

    # --- the faults: each returns (seconds held, what was done), or why it was not injected -------------

    def _worker_supervisor(self) -> tuple[float, str] | str:
        workers = self.cluster.workers()
        if not workers:
            return "no worker running"
        busy = self._busiest({worker.pid: worker for worker in workers})
        os.kill(busy.pid, signal.SIGKILL)
        return 0.0, f"worker {busy.worker_id}, pid {busy.pid}"

    def _worker_slot(self) -> tuple[float, str] | str:
        slots = {slot: worker for worker in self.cluster.workers() for slot in self.cluster.slots_of(worker)}
        if not slots:
            return "no worker slot running"
        slot = self._busiest({pid: pid for pid in slots})
        os.kill(slot, signal.SIGKILL)
        return 0.0, f"slot pid {slot} of worker {slots[slot].worker_id}"

    def _busiest(self, candidates: dict[int, Worker | int]) -> Worker | int:
        """The candidate (by pid) that used the most CPU over a moment: likely one with a job."""
        before = {pid: cpu_ticks(pid) or 0 for pid in candidates}
        time.sleep(0.3)
        return candidates[max(candidates, key=lambda pid: (cpu_ticks(pid) or 0) - before[pid])]

    def _endpoint_kill(self) -> tuple[float, str] | str:
        now = time.monotonic()
        nodes = [node for node in NODES if now - self.last_kill.get(node, -STABLE_RUN_S) >= STABLE_RUN_S]
        if not nodes:
            return f"both endpoints were killed less than {STABLE_RUN_S:g} s ago"
        node = self.rng.choice(nodes)
        group = self.cluster.service_group("endpoint", node)
        if group is None:
            return f"endpoint {node} not running"
        os.killpg(group, signal.SIGKILL)
        self.last_kill[node] = time.monotonic()
        killed = time.monotonic()
        while self.cluster.stats(node, timeout=1) is None and time.monotonic() - killed < 120:
            time.sleep(0.2)
        return time.monotonic() - killed, f"endpoint {node}, answering again after {time.monotonic() - killed:.1f} s"

    def _endpoint_stop(self) -> tuple[float, str] | str:
        node = self.rng.choice(NODES)
        group = self.cluster.service_group("endpoint", node)
        if group is None:
            return f"endpoint {node} not running"
        lease_s = self.cluster.lease_s
        held_s = lease_s + self.rng.uniform(2, max(2.0, lease_s))
        with self.lock:
            self.frozen.add(group)
        os.killpg(group, signal.SIGSTOP)
        try:
            time.sleep(held_s)  # not cut short by a stop: longer than the lease is the point
        finally:
            with self.lock:
                self.frozen.discard(group)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGCONT)
        return held_s, f"endpoint {node} for {held_s:.1f} s (lease {lease_s:g} s)"

    def _scaler_kill(self) -> tuple[float, str] | str:
        node = self.rng.choice(NODES)
        group = self.cluster.service_group("cron.scale", node)
        if group is None:
            return f"scaler {node} not running"
        # Mid-run: when it uses CPU (a decision under way), not while it sleeps between runs.
        before, deadline, running = cpu_ticks(group), time.monotonic() + 2 * self.cluster.every_s + 2, False
        while time.monotonic() < deadline and not running:
            time.sleep(0.005)
            running = cpu_ticks(group) != before
        os.killpg(group, signal.SIGKILL)
        return 0.0, f"scaler {node}, {'during a decision' if running else 'between decisions'}"

    def _link_cut(self) -> tuple[float, str] | str:
        mode = self.rng.choice(("blackhole", "refuse"))
        held_s = self.rng.uniform(0.5, 1.5) * self.hold_s
        for proxy in self.cluster.proxies.values():
            proxy.cut(mode)
        try:
            self.stopping.wait(held_s)
        finally:
            for proxy in self.cluster.proxies.values():
                proxy.restore()
        how = "connections held, nothing passes" if mode == "blackhole" else "connections reset"
        return held_s, f"{how}, {held_s:.1f} s"

    def _disk_full(self) -> tuple[float, str] | str:
        node = self.rng.choice(NODES)
        disk = self.cluster.disks[node]
        held_s = self.rng.uniform(0.5, 1.5) * self.hold_s
        filled = disk.fill()
        said_full = False
        try:
            # Writes into room the data file and its WAL already have need no more: large uploads need it.
            self.large_uploads(node)
            until = time.monotonic() + held_s
            while not self.stopping.wait(min(0.5, max(0.0, until - time.monotonic()))) and time.monotonic() < until:
                said_full = said_full or bool((self.cluster.stats(node, timeout=1) or {}).get("disk_full"))
        finally:
            disk.free()
        return held_s, (f"endpoint {node}'s disk, {filled / 2**20:.0f} MiB of filler, {held_s:.1f} s; /stats "
                        f"{'said' if said_full else 'never said'} disk_full")
