"""The scaling policy: how many workers to launch now. A pure function, no I/O.

Queue-driven scaling the way AWS recommends it ("backlog per instance"): the workers needed
are the ones that drain the whole backlog within a target time, given how long jobs take
and how many jobs a worker runs at once -- on top of the workers the stream of arriving jobs
keeps busy (by Little's law, arrivals per second x job duration slots; arrivals counted over
the last minute, so a rising stream is seen before a queue builds up, and those still pending
counted once, in the backlog). Workers still booting count as capacity.

The cluster-wide maximum is split between the endpoints' scalers: each may own at most its
share, so the sum can never exceed the maximum, even when both scalers run in the same
second or cannot reach each other. Every scaler sizes for the cluster-wide backlog. When the
peer answers (so its scaler presumably runs too), what is missing is split between the two the
same way as the cap -- endpoint 0 takes the odd one -- and a scaler also takes the peer's part
when the peer's share is used up; when the peer is silent, it launches all that is missing.
Either way no scaler goes past its own share.

Hysteresis: the backlog counts only once the oldest item has waited `scale_after_s` -- before
that, workers that are there may well take it in a moment. Two cases do not wait: a cluster
with no worker at all (nobody else will ever take the item, so waiting only adds latency,
and the launch costs the same later), and arrivals that alone need more workers than there
are (the queue is about to grow). With nothing pending and no worker, nothing is launched,
whatever arrived lately.

Busy slots: the jobs running now hold their slots. When every slot is busy and the oldest item
has still waited `scale_after_s`, the fleet is too small whatever the measured mean says -- the
mean may come from earlier, shorter jobs (it took 0.1 ms while a 21 s job held the only slot) --
so at least one worker more than there are is needed, within the cap. Workers still booting
have free slots: while one boots, this does not add another.

The policy never shrinks the fleet -- workers leave by
themselves after `idle_timeout` without work, so a short lull does not tear down capacity
that the next burst needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class EndpointLoad:
    """What one endpoint reports about its queue."""

    pending: int
    oldest_pending_age_s: float
    recent_jobs: int = 0  # jobs completed in the last recent_window_s: their mean duration sizes the fleet
    recent_job_duration_s: float | None = None
    recent_window_s: float = 600.0
    recent_arrivals: int = 0  # items enqueued in the last arrival_window_s: the stream to keep up with
    recent_arrivals_pending: int = 0  # of those, the ones still pending (they are in `pending` too)
    arrival_window_s: float = 60.0
    running: int = 0  # items leased to a worker now: each holds one slot


@dataclass(frozen=True)
class ClusterView:
    endpoints: tuple[EndpointLoad, ...]  # this endpoint first, then the peer if it answered
    peer_reachable: bool
    workers_ready: int  # cluster-wide, whoever launched them
    workers_booting: int  # launched, not yet ready: already capacity on the way
    own_workers: int  # launched by this scaler (ready or booting), counted against its share
    peer_workers: int = 0  # launched by the peer's scaler
    # Jobs a worker runs at once, as the fleet's workers report it (processes x lanes of their
    # hashing kernel), averaged over those that reported; None before any did.
    reported_slots_per_worker: float | None = None


@dataclass(frozen=True)
class Policy:
    scale_after_s: float = 30.0  # launch only once the oldest item has waited this long
    target_drain_s: float = 30.0  # size the fleet to drain the backlog within this time
    max_workers: int = 4  # cluster-wide, across both scalers
    endpoint_index: int = 0  # 0 or 1: which share of max_workers is this scaler's
    max_launch_per_tick: int = 4
    slots_per_worker: int = 1  # jobs a worker runs at once until workers report theirs (ClusterView)
    default_job_duration_s: float = 1.0  # until jobs have been measured


@dataclass(frozen=True)
class Decision:
    launch: int
    needed: int  # cluster-wide workers the backlog calls for
    reason: str


def split_cap(max_workers: int, endpoint_index: int, endpoint_count: int = 2) -> int:
    """This endpoint's share of the cluster-wide maximum; the shares add up to it exactly."""
    base, extra = divmod(max_workers, endpoint_count)
    return base + (1 if endpoint_index < extra else 0)


def job_duration(endpoints: tuple[EndpointLoad, ...], default: float) -> float:
    """Mean recent job duration across endpoints, weighted by how many jobs each measured."""
    measured = [(e.recent_jobs, e.recent_job_duration_s) for e in endpoints
                if e.recent_jobs and e.recent_job_duration_s]
    jobs = sum(count for count, _ in measured)
    if not jobs:
        return default
    return sum(count * duration for count, duration in measured) / jobs


def arrival_rate(endpoints: tuple[EndpointLoad, ...], *, taken_only: bool = False) -> float:
    """Jobs enqueued per second lately, across endpoints; with `taken_only`, only those a worker
    has taken already -- the rest are in the backlog, and must not be counted twice."""
    return sum((e.recent_arrivals - (e.recent_arrivals_pending if taken_only else 0)) / e.arrival_window_s
               for e in endpoints if e.arrival_window_s > 0)


def slots_per_worker(view: ClusterView, policy: Policy) -> float:
    """The capacity the workers report, else the configured one."""
    return view.reported_slots_per_worker or float(policy.slots_per_worker)


def workers_needed(backlog: int, duration_s: float, policy: Policy, arrivals_per_s: float = 0.0,
                   slots: float | None = None) -> int:
    """Workers that keep up with `arrivals_per_s` and also finish `backlog` jobs of
    `duration_s` within the target time, each running `slots` jobs at once (default the policy's)."""
    backlog = max(backlog, 0)
    if backlog == 0 and arrivals_per_s <= 0:
        return 0
    duration_s = max(duration_s, 1e-6)
    stream_slots = arrivals_per_s * duration_s
    # A job runs on one slot: the backlog can use at most one slot per job, however short the target.
    drain_slots = min(float(backlog), backlog * duration_s / policy.target_drain_s)
    # Less a hair, so that an exact whole number of workers is not rounded up by float error.
    workers = math.ceil((stream_slots + drain_slots) / (slots or policy.slots_per_worker) - 1e-9)
    return min(policy.max_workers, max(1, workers))


def busy_floor(view: ClusterView, policy: Policy) -> tuple[int, str]:
    """The workers needed because every slot is busy while the backlog has waited past the threshold
    (the caller checks the wait): one more than there are, within the cap; 0 while a slot is free."""
    current = view.workers_ready + view.workers_booting
    running = sum(e.running for e in view.endpoints)
    slots = math.ceil(current * slots_per_worker(view, policy) - 1e-9)
    if current == 0 or running < slots:
        return 0, ""
    floor = min(policy.max_workers, current + 1)
    return floor, f", but all {slots} slot(s) are busy ({running} running): {floor} needed"


def decide(view: ClusterView, policy: Policy) -> Decision:
    backlog = sum(e.pending for e in view.endpoints)
    oldest = max((e.oldest_pending_age_s for e in view.endpoints if e.pending), default=0.0)
    current = view.workers_ready + view.workers_booting
    if backlog == 0 and current == 0:
        return Decision(0, 0, "no pending work")  # what arrived lately was done by workers since gone

    duration = job_duration(view.endpoints, policy.default_job_duration_s)
    if backlog and (oldest >= policy.scale_after_s or current == 0):
        # Recent arrivals still pending are part of the backlog: a burst is not also a stream.
        rate = arrival_rate(view.endpoints, taken_only=True)
        needed = workers_needed(backlog, duration, policy, rate, slots_per_worker(view, policy))
        sizing = (f"{backlog} pending x {duration:.3g}s needs {needed} worker(s) to drain in "
                  f"{policy.target_drain_s:.0f}s" + (f" beside {rate:.3g} jobs/s arriving" if rate > 0 else ""))
        floor, busy = busy_floor(view, policy)
        if floor > needed:
            needed, sizing = floor, sizing + busy
    else:
        # The backlog does not count yet, but arrivals that alone need more workers than there are
        # will build a queue: launch for them now rather than after the threshold.
        rate = arrival_rate(view.endpoints)
        needed = workers_needed(0, duration, policy, rate, slots_per_worker(view, policy))
        waited = (f"oldest item has waited {oldest:.0f}s, under the {policy.scale_after_s:.0f}s threshold"
                  if backlog else "nothing pending")
        stream = f"{rate:.3g} jobs/s arriving x {duration:.3g}s needs {needed} worker(s)"
        if needed <= current:
            return Decision(0, needed, waited + (f"; {stream}, {current} there" if rate > 0 else ""))
        sizing = f"{waited}, but {stream}"
    sizing += f"; {view.workers_ready} ready, {view.workers_booting} booting"
    if view.reported_slots_per_worker:
        sizing += f", {view.reported_slots_per_worker:.3g} jobs at once per worker as reported"
    missing = needed - current
    if missing <= 0:
        return Decision(0, needed, f"{sizing}: enough")

    own_cap = split_cap(policy.max_workers, policy.endpoint_index)
    if view.peer_reachable:
        my_part = split_cap(missing, policy.endpoint_index)
        peer_headroom = max(0, policy.max_workers - own_cap - view.peer_workers)
        my_part += max(0, (missing - my_part) - peer_headroom)
    else:
        my_part = missing
    headroom = own_cap - view.own_workers
    launch = max(0, min(my_part, headroom, policy.max_launch_per_tick))
    if launch == 0:
        return Decision(0, needed, f"{sizing}: the peer launches the rest, or this scaler's share of the cap"
                                   f" ({own_cap}) is in use")
    return Decision(launch, needed, f"{sizing}: launching {launch}")
