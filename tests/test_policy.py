"""Unit tests of the pure scaling policy (cron/policy.py) and of the settings the scaler takes for it: no
processes, no mocks."""

from __future__ import annotations

import math
import random
from dataclasses import replace

import pytest

from cron.policy import ClusterView, Decision, EndpointLoad, Policy, decide, job_duration, split_cap, workers_needed
from cron.scale import load_of, parse_args


def load(pending: int, age: float = 100.0, recent_jobs: int = 0, duration: float | None = None,
         arrivals: int = 0, arrivals_pending: int = 0, arrival_window: float = 60.0, running: int = 0) -> EndpointLoad:
    """By default nothing arrived lately and nothing runs, so the tests see the backlog sizing alone."""
    return EndpointLoad(pending=pending, oldest_pending_age_s=age, recent_jobs=recent_jobs,
                        recent_job_duration_s=duration, recent_arrivals=arrivals,
                        recent_arrivals_pending=arrivals_pending, arrival_window_s=arrival_window, running=running)


def view(*endpoints: EndpointLoad, peer_reachable: bool = True, ready: int = 0, booting: int = 0,
         own: int = 0, peer: int = 0) -> ClusterView:
    return ClusterView(endpoints=tuple(endpoints), peer_reachable=peer_reachable, workers_ready=ready,
                       workers_booting=booting, own_workers=own, peer_workers=peer)


# With these, one worker drains 2 slots x 100 s / 1 s = 200 jobs within the target.
POLICY = Policy(scale_after_s=30.0, target_drain_s=100.0, max_workers=8, endpoint_index=0,
                max_launch_per_tick=8, slots_per_worker=2, default_job_duration_s=1.0)


def policy(**changes: object) -> Policy:
    fields = {**POLICY.__dict__, **changes}
    return Policy(**fields)  # type: ignore[arg-type]


# --- threshold -------------------------------------------------------------------------------------------------


def test_no_launch_before_the_oldest_item_has_waited_the_threshold_even_with_a_big_backlog() -> None:
    # A worker is there (ready or booting): it may well take the backlog in a moment.
    for ready, booting in [(1, 0), (0, 1)]:
        decision = decide(view(load(10_000, age=29.0), load(10_000, age=5.0), ready=ready, booting=booting, own=1),
                          POLICY)
        assert decision == Decision(0, 0, "oldest item has waited 29s, under the 30s threshold")


def test_on_a_cluster_without_workers_pending_work_launches_at_once() -> None:
    # Nobody else will take it: waiting for the threshold would only add latency, the launch costs the same.
    for age in (0.0, 1.0, 29.0):
        decision = decide(view(load(1_000, age=age)), POLICY)
        assert (decision.needed, decision.launch) == (5, 3)  # 1000 x 1 s / (2 slots x 100 s); endpoint 0's 3 of 5
        assert decision.reason.startswith("1000 pending x 1s needs 5 worker(s) to drain in 100s; 0 ready, 0 booting")
    assert decide(view(load(1, age=0.0)), POLICY).launch == 1


def test_launches_once_the_oldest_item_has_waited_longer_than_the_threshold() -> None:
    decision = decide(view(load(1_000, age=30.5), load(0, age=0.0)), POLICY)
    assert decision.launch > 0
    assert decision.needed == 5  # 1000 jobs x 1 s / (2 slots x 100 s)
    assert "launching" in decision.reason


def test_an_item_that_has_waited_exactly_the_threshold_triggers_a_launch() -> None:
    assert decide(view(load(10, age=30.0)), POLICY).launch == 1


def test_no_launch_with_an_empty_queue() -> None:
    for endpoints in [(load(0, age=0.0),), (load(0, age=0.0), load(0, age=0.0)), (load(0, age=9_999.0),)]:
        decision = decide(view(*endpoints), POLICY)
        assert decision == Decision(0, 0, "no pending work")


def test_the_oldest_age_is_taken_across_both_endpoints() -> None:
    # Only the peer's item is old enough: that is enough, in either order of the endpoints. 500 jobs need
    # 3 workers, 1 is there; endpoint 0 takes 1 of the 2 missing.
    assert decide(view(load(300, age=5.0), load(200, age=45.0), ready=1, own=1), POLICY).launch == 1
    assert decide(view(load(200, age=45.0), load(300, age=5.0), ready=1, own=1), POLICY).launch == 1
    assert decide(view(load(200, age=25.0), load(300, age=5.0), ready=1, own=1), POLICY).launch == 0


def test_the_age_reported_by_an_endpoint_with_nothing_pending_is_ignored() -> None:
    for endpoints in [(load(0, age=500.0), load(400, age=10.0)), (load(400, age=10.0), load(0, age=500.0))]:
        decision = decide(view(*endpoints, ready=1, own=1), POLICY)
        assert decision.launch == 0
        assert "waited 10s" in decision.reason


# --- backlog sizing --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("backlog", "duration", "slots", "target", "expected"),
    [
        (1, 1.0, 2, 100.0, 1),
        (200, 1.0, 2, 100.0, 1),  # exactly one worker's worth
        (201, 1.0, 2, 100.0, 2),
        (1_000, 1.0, 2, 100.0, 5),
        (50, 8.0, 2, 100.0, 2),  # 400 slot-seconds / 200 per worker
        (51, 8.0, 2, 100.0, 3),
        (30, 4.0, 4, 60.0, 1),  # 120 slot-seconds / 240 per worker
        (90, 4.0, 4, 60.0, 2),  # 360 / 240
        (7, 30.0, 1, 60.0, 4),  # 210 / 60
    ],
)
def test_workers_needed_drain_the_backlog_within_the_target(backlog: int, duration: float, slots: int,
                                                            target: float, expected: int) -> None:
    p = policy(slots_per_worker=slots, target_drain_s=target, max_workers=100)
    assert expected == math.ceil(backlog * duration / (slots * target))
    assert workers_needed(backlog, duration, p) == expected
    measured = decide(view(load(backlog, recent_jobs=10, duration=duration)), p)
    assert measured.needed == expected
    assert f"{backlog} pending x {duration:.3g}s needs {expected} worker(s)" in measured.reason


def test_workers_needed_is_clamped_to_max_workers() -> None:
    assert workers_needed(1_000_000, 5.0, policy(max_workers=8)) == 8
    assert decide(view(load(1_000_000)), policy(max_workers=3)).needed == 3
    assert workers_needed(0, 5.0, POLICY) == 0


def test_job_duration_is_the_mean_weighted_by_recent_jobs() -> None:
    endpoints = (load(0, recent_jobs=30, duration=2.0), load(0, recent_jobs=10, duration=6.0))
    assert job_duration(endpoints, default=1.0) == pytest.approx(3.0)  # (30 x 2 + 10 x 6) / 40
    assert job_duration(endpoints[::-1], default=1.0) == pytest.approx(3.0)
    # 3.0 s x 201 jobs = 603 slot-seconds: 4 workers at 200 each; the unweighted mean (4.0 s) would give 5.
    decision = decide(view(load(100, recent_jobs=30, duration=2.0), load(101, recent_jobs=10, duration=6.0)), POLICY)
    assert decision.needed == 4


def test_job_duration_ignores_endpoints_that_measured_nothing() -> None:
    endpoints = (load(0, recent_jobs=0, duration=50.0), load(0, recent_jobs=5, duration=None),
                 load(0, recent_jobs=4, duration=3.0))
    assert job_duration(endpoints, default=1.0) == pytest.approx(3.0)


def test_job_duration_falls_back_to_the_default_when_nothing_was_measured() -> None:
    assert job_duration((), default=7.0) == 7.0
    assert job_duration((load(5), load(3, recent_jobs=0, duration=None)), default=7.0) == 7.0
    # 100 jobs x the default 4 s = 400 slot-seconds: 2 workers.
    assert decide(view(load(60), load(40)), policy(default_job_duration_s=4.0)).needed == 2
    assert decide(view(load(60), load(40)), policy(default_job_duration_s=1.0)).needed == 1


def test_a_larger_backlog_or_longer_jobs_need_more_workers() -> None:
    p = policy(max_workers=1_000)
    by_backlog = [workers_needed(backlog, 2.0, p) for backlog in range(0, 5_000, 37)]
    assert by_backlog == sorted(by_backlog)
    assert by_backlog[-1] > by_backlog[1] > 0
    by_duration = [workers_needed(500, duration / 10, p) for duration in range(1, 1_000, 7)]
    assert by_duration == sorted(by_duration)
    assert by_duration[-1] > by_duration[0]
    assert decide(view(load(2_000)), POLICY).needed > decide(view(load(200)), POLICY).needed
    assert (decide(view(load(200, recent_jobs=9, duration=5.0)), POLICY).needed
            > decide(view(load(200, recent_jobs=9, duration=1.0)), POLICY).needed)


def test_an_exact_multiple_of_the_per_worker_capacity_is_not_rounded_up() -> None:
    p = policy(slots_per_worker=1, target_drain_s=60.0, max_workers=100)
    assert workers_needed(60, 13.0, p) == 13


def test_long_jobs_never_need_more_workers_than_can_run_the_backlog_at_once() -> None:
    p = policy(slots_per_worker=2, target_drain_s=120.0, max_workers=100)
    # 10 jobs of 300 s: 5 workers run them all at once; more workers cannot finish any sooner.
    assert workers_needed(10, 300.0, p) == 5


# --- booting capacity ------------------------------------------------------------------------------------------


def test_booting_workers_count_as_capacity() -> None:
    backlog = load(600)  # 600 jobs x 1 s needs 3 workers
    for ready, booting in [(3, 0), (2, 1), (0, 3), (1, 5)]:
        decision = decide(view(backlog, ready=ready, booting=booting, own=ready + booting), POLICY)
        assert decision.needed == 3
        assert decision.launch == 0
        assert decision.reason.endswith(": enough")
        assert f"{ready} ready, {booting} booting" in decision.reason
    # Booting workers count exactly like ready ones (peer unreachable: this scaler launches all that is missing).
    assert decide(view(backlog, ready=1, booting=0, own=1, peer_reachable=False), POLICY).launch == 2
    assert decide(view(backlog, ready=0, booting=1, own=1, peer_reachable=False), POLICY).launch == 2


# --- the cap ---------------------------------------------------------------------------------------------------


def test_the_shares_add_up_to_the_cap() -> None:
    for max_workers in range(21):
        first, second = split_cap(max_workers, 0), split_cap(max_workers, 1)
        assert first + second == max_workers
        assert first - second in (0, 1)  # endpoint 0 takes the odd one


def test_a_scaler_never_launches_past_its_own_share() -> None:
    big = load(100_000)
    for index, share in [(0, 4), (1, 3)]:
        p = policy(max_workers=7, endpoint_index=index)
        for own in range(share + 3):
            for reachable in (True, False):
                decision = decide(view(big, peer_reachable=reachable, ready=own, own=own), p)
                assert decision.launch == max(0, share - own)
        full = decide(view(big, ready=share, own=share), p)
        assert "this scaler's share of the cap" in full.reason


def _random_case(rng: random.Random) -> tuple[Policy, ClusterView, ClusterView]:
    """A policy for endpoint 0 and the views of the same cluster from endpoint 0 and endpoint 1."""
    max_workers = rng.randint(0, 12)
    p = Policy(scale_after_s=rng.choice([0.0, 10.0, 30.0, 60.0]), target_drain_s=rng.choice([10.0, 60.0, 120.0, 600.0]),
               max_workers=max_workers, endpoint_index=0, max_launch_per_tick=rng.randint(1, 12),
               slots_per_worker=rng.randint(1, 4), default_job_duration_s=rng.choice([0.5, 1.0, 5.0]))
    loads = []
    for _ in range(2):
        pending = rng.choice([0, rng.randint(1, 10), rng.randint(1, 5_000)])
        measured = rng.randint(0, 100)
        loads.append(load(pending, age=rng.uniform(0, 120), recent_jobs=measured,
                          duration=rng.choice([None, rng.uniform(0.01, 60.0)]),
                          arrivals=rng.choice([0, rng.randint(1, 50), rng.randint(1, 5_000)]),
                          running=rng.choice([0, rng.randint(0, 8), rng.randint(0, 50)])))
    own = [rng.randint(0, split_cap(max_workers, index)) for index in (0, 1)]
    booting = rng.randint(0, own[0] + own[1])
    reachable = rng.random() < 0.7
    views = []
    for index in (0, 1):
        mine, theirs = loads[index], loads[1 - index]
        views.append(ClusterView(
            endpoints=(mine, theirs) if reachable else (mine,), peer_reachable=reachable,
            workers_ready=own[0] + own[1] - booting, workers_booting=booting,
            own_workers=own[index], peer_workers=own[1 - index]))
    return p, views[0], views[1]


def test_both_scalers_deciding_on_the_same_cluster_never_exceed_the_cap() -> None:
    rng = random.Random(20240611)
    launched_some = 0
    for _ in range(5_000):
        p0, view0, view1 = _random_case(rng)
        p1 = policy(**{**p0.__dict__, "endpoint_index": 1})
        d0, d1 = decide(view0, p0), decide(view1, p1)
        for decision, v, p in [(d0, view0, p0), (d1, view1, p1)]:
            assert 0 <= decision.launch <= p.max_launch_per_tick
            assert v.own_workers + decision.launch <= split_cap(p.max_workers, p.endpoint_index)
            assert 0 <= decision.needed <= p.max_workers
        assert view0.own_workers + view0.peer_workers + d0.launch + d1.launch <= p0.max_workers
        if view0.peer_reachable:
            # On one shared view the two never launch more than is missing between them.
            missing = max(0, d0.needed - view0.workers_ready - view0.workers_booting)
            assert d0.needed == d1.needed
            assert d0.launch + d1.launch <= missing
            if p0.max_launch_per_tick >= p0.max_workers:
                # ... and, unless the per-tick limit bites, exactly what is missing, as far as the shares allow.
                headroom = p0.max_workers - view0.own_workers - view0.peer_workers
                assert d0.launch + d1.launch == min(missing, headroom)
        launched_some += d0.launch + d1.launch > 0
    assert launched_some > 500  # the random views do exercise launches


# --- split between the scalers ---------------------------------------------------------------------------------


def test_with_the_peer_reachable_what_is_missing_is_split_like_the_cap() -> None:
    p = policy(max_workers=10)
    for pending, missing in [(1_000, 5), (200, 1), (400, 2), (2_000, 10)]:
        both = (load(pending // 2), load(pending - pending // 2))
        d0 = decide(view(*both), policy(max_workers=10, endpoint_index=0))
        d1 = decide(view(*both[::-1]), policy(max_workers=10, endpoint_index=1))
        assert d0.needed == d1.needed == missing
        assert (d0.launch, d1.launch) == (split_cap(missing, 0), split_cap(missing, 1))
    assert decide(view(load(1_000)), p).launch == 3  # endpoint 0 takes the odd one of 5
    assert decide(view(load(1_000)), policy(max_workers=10, endpoint_index=1)).launch == 2


def test_when_the_peer_share_is_full_this_scaler_takes_the_peer_part_within_its_own_share() -> None:
    # max 8: shares 4 + 4. The peer has its 4; 1600 jobs need all 8, so 4 are missing.
    d = decide(view(load(800), load(800), ready=4, own=0, peer=4), POLICY)
    assert (d.needed, d.launch) == (8, 4)
    # 4 missing, the peer's share has room for just 1 more: this scaler takes its half (2) and the 1 the peer
    # has no room for.
    d = decide(view(load(1_600), ready=4, own=1, peer=3), POLICY)
    assert (d.needed, d.launch) == (8, 3)
    # The same, but this scaler's own share has room for only 2.
    d = decide(view(load(1_600), ready=5, own=2, peer=3), POLICY)
    assert (d.needed, d.launch) == (8, 2)
    # Endpoint 1 takes over for a full endpoint 0 just the same.
    d = decide(view(load(800), load(800), ready=4, own=0, peer=4), policy(endpoint_index=1))
    assert (d.needed, d.launch) == (8, 4)
    # A 9-worker need, the peer's share (5) full: still no more than this scaler's share of 4.
    d = decide(view(load(5_000), ready=5, own=0, peer=5), policy(max_workers=9, endpoint_index=1))
    assert (d.needed, d.launch) == (9, 4)


def test_with_the_peer_unreachable_a_scaler_launches_all_that_is_missing_within_its_share() -> None:
    for index in (0, 1):
        d = decide(view(load(600), peer_reachable=False), policy(endpoint_index=index))
        assert (d.needed, d.launch) == (3, 3)
        d = decide(view(load(100_000), peer_reachable=False, ready=1, own=1), policy(endpoint_index=index))
        assert (d.needed, d.launch) == (8, 3)  # share 4, one already own
        # The peer's workers count as capacity but not against this scaler's share.
        d = decide(view(load(1_000), peer_reachable=False, ready=3, own=0, peer=3), policy(endpoint_index=index))
        assert (d.needed, d.launch) == (5, 2)


# --- launches per tick -----------------------------------------------------------------------------------------


def test_never_more_than_max_launch_per_tick() -> None:
    for limit in range(1, 9):
        for reachable in (True, False):
            d = decide(view(load(100_000), peer_reachable=reachable), policy(max_workers=16, max_launch_per_tick=limit))
            assert d.needed == 16
            assert d.launch == min(limit, 8)


# --- hysteresis ------------------------------------------------------------------------------------------------


def test_the_policy_never_shrinks_the_fleet() -> None:
    # Far more workers than the backlog needs: no negative launch, just none.
    for pending, age in [(0, 0.0), (1, 500.0), (1, 1.0), (300, 300.0)]:
        d = decide(view(load(pending, age=age), ready=8, own=4, peer=4), POLICY)
        assert d.launch == 0
    rng = random.Random(7)
    for _ in range(2_000):
        p0, view0, view1 = _random_case(rng)
        assert decide(view0, p0).launch >= 0
        assert decide(view1, policy(**{**p0.__dict__, "endpoint_index": 1})).launch >= 0


def test_a_backlog_current_workers_drain_within_the_target_causes_no_launch() -> None:
    # 2 workers x 2 slots x 100 s / 2.5 s = 160 jobs within the target.
    for pending in (1, 80, 159, 160):
        d = decide(view(load(pending, age=300.0, recent_jobs=50, duration=2.5), ready=2, own=2), POLICY)
        assert d.launch == 0
        assert d.reason.endswith(": enough")
    assert decide(view(load(161, age=300.0, recent_jobs=50, duration=2.5), ready=2, own=2), POLICY).launch == 1


# --- the stream of arrivals ------------------------------------------------------------------------------------


def test_workers_busy_with_the_arriving_stream_are_not_counted_as_free_for_the_backlog() -> None:
    # This endpoint holds an old backlog; at the peer, 60 jobs arrived in the last 60 s and were all taken:
    # 1 job/s x 2 s keeps 2 slots (one worker) busy.
    backlog = load(200, age=300.0, recent_jobs=600, duration=2.0)
    stream = load(0, age=0.0, arrivals=60, arrivals_pending=0)
    # The backlog alone needs 200 x 2 s / (2 slots x 100 s) = 2 workers; with the stream, 3.
    assert workers_needed(200, 2.0, POLICY) == 2
    assert workers_needed(200, 2.0, POLICY, arrivals_per_s=1.0) == 3
    decision = decide(view(backlog, stream, ready=2, own=1, peer=1), POLICY)
    assert decision.needed == 3
    assert decision.launch == 1
    assert "200 pending x 2s needs 3 worker(s) to drain in 100s beside 1 jobs/s arriving;" in decision.reason


def test_recent_arrivals_still_pending_count_once_in_the_backlog() -> None:
    # A burst of 1000 jobs just arrived: it is a backlog (1000 x 1 s / 200 = 5 workers), not also a stream
    # of 1000 per minute (which would add 1000 / 60 x 1 s / 2 slots = 9).
    burst = load(1_000, age=2.0, arrivals=1_000, arrivals_pending=1_000)
    assert decide(view(burst), POLICY).needed == 5  # an empty cluster: at once
    assert decide(view(replace(burst, oldest_pending_age_s=40.0), ready=1, own=1), POLICY).needed == 5  # past it
    # 300 of them were taken already: those are a stream of 5 jobs/s x 1 s = 5 slots, 3 more workers.
    taken = load(700, age=40.0, arrivals=1_000, arrivals_pending=700)
    assert decide(view(taken, ready=1, own=1), POLICY).needed == math.ceil((700 / 100 + 5) / 2)


def test_arrivals_served_by_workers_since_gone_launch_nothing() -> None:
    # The workers idled out after serving what arrived; nothing waits: nothing to launch for.
    served = load(0, age=0.0, recent_jobs=50, duration=2.0, arrivals=50, arrivals_pending=0)
    assert decide(view(served), POLICY) == Decision(0, 0, "no pending work")


def test_the_stream_counts_across_both_endpoints() -> None:
    a = load(100, age=300.0, recent_jobs=300, duration=2.0, arrivals=30)
    b = load(100, age=300.0, recent_jobs=900, duration=2.0, arrivals=90, arrival_window=60.0)
    # 2 jobs/s x 2 s = 4 slots for the stream, 200 x 2 s / 100 s = 4 slots for the backlog: 4 workers.
    assert decide(view(a, b, ready=1, own=1), POLICY).needed == 4
    # Each endpoint's count is over its own window: 30 in 60 s and 90 in 90 s are 1.5 jobs/s, x 2 s = 3 slots.
    one_slot = policy(slots_per_worker=1, default_job_duration_s=2.0)
    arriving = (load(0, age=0.0, arrivals=30), load(0, age=0.0, arrivals=90, arrival_window=90.0))
    assert decide(view(*arriving, ready=1, own=1), one_slot).needed == 3


def test_arrivals_that_outpace_the_fleet_launch_before_anything_has_waited() -> None:
    # 300 jobs of 2 s arrived in the last minute: 5 jobs/s x 2 s = 10 slots = 5 workers; 2 are there.
    for pending, age in [(0, 0.0), (40, 3.0)]:
        busy = load(pending, age=age, recent_jobs=500, duration=2.0, arrivals=300)
        decision = decide(view(busy, ready=2, own=1, peer=1, peer_reachable=False), POLICY)
        assert (decision.needed, decision.launch) == (5, 3)
        assert "5 jobs/s arriving x 2s needs 5 worker(s); 2 ready, 0 booting: launching 3" in decision.reason


def test_arrivals_the_fleet_keeps_up_with_launch_nothing() -> None:
    busy = load(3, age=2.0, recent_jobs=500, duration=2.0, arrivals=240)  # 4 jobs/s x 2 s: 8 slots, 4 workers
    for ready, booting in [(4, 0), (2, 2), (6, 0)]:
        decision = decide(view(busy, ready=ready, booting=booting, own=ready + booting), POLICY)
        assert (decision.needed, decision.launch) == (4, 0)
        assert decision.reason == ("oldest item has waited 2s, under the 30s threshold; "
                                   f"4 jobs/s arriving x 2s needs 4 worker(s), {ready + booting} there")


def test_completions_without_arrivals_or_backlog_launch_nothing() -> None:
    decision = decide(view(load(0, age=0.0, recent_jobs=6000, duration=2.0)), POLICY)
    assert decision == Decision(0, 0, "no pending work")


def test_needed_never_exceeds_the_cap_not_even_a_zero_cap() -> None:
    assert decide(view(load(1000, age=300.0)), policy(max_workers=0)).needed == 0
    assert decide(view(load(1000, age=300.0)), policy(max_workers=0)).launch == 0


# --- busy slots ------------------------------------------------------------------------------------------------

# The reproduction: a cap of 2, one 1-slot worker busy with a long job, one item behind it for 21 s,
# and a mean job time from earlier tiny jobs.
BUSY = Policy(scale_after_s=2.0, target_drain_s=30.0, max_workers=2, slots_per_worker=1, max_launch_per_tick=4)
TINY_JOBS = {"recent_jobs": 50, "duration": 0.000129}


def test_when_every_slot_is_busy_and_an_item_has_waited_one_more_worker_is_launched_whatever_the_mean() -> None:
    # Endpoint 0 launched the busy worker; the job and the waiting item are both at endpoint 0.
    waiting = load(1, age=21.0, running=1, **TINY_JOBS)
    idle_peer = load(0, age=0.0, **TINY_JOBS)
    decision = decide(view(waiting, idle_peer, ready=1, own=1), BUSY)
    assert (decision.needed, decision.launch) == (2, 0)  # endpoint 0's share (1) is in use ...
    decision = decide(view(idle_peer, waiting, ready=1, own=0, peer=1), replace(BUSY, endpoint_index=1))
    assert (decision.needed, decision.launch) == (2, 1)  # ... so endpoint 1 launches it
    assert decision.reason == ("1 pending x 0.000129s needs 1 worker(s) to drain in 30s, but all 1 slot(s) are "
                               "busy (1 running): 2 needed; 1 ready, 0 booting: launching 1")
    # The peer unreachable, endpoint 1 sees its own queue alone: the same launch.
    decision = decide(view(waiting, peer_reachable=False, ready=1, own=0), replace(BUSY, endpoint_index=1))
    assert (decision.needed, decision.launch) == (2, 1)
    # With the share free, endpoint 0 launches it itself.
    decision = decide(view(waiting, idle_peer, ready=1, own=0, peer=1), BUSY)
    assert (decision.needed, decision.launch) == (2, 1)


def test_running_jobs_are_counted_across_both_endpoints() -> None:
    # 2 workers x 2 slots: 3 jobs at the peer and 1 here hold all 4; the item here has waited.
    p = policy(max_workers=4)
    here, there = load(1, age=45.0, running=1), load(0, age=0.0, running=3)
    assert decide(view(here, there, ready=2, own=1, peer=1), p).needed == 3
    assert decide(view(there, here, ready=2, own=1, peer=1), p).needed == 3  # in either order
    assert decide(view(here, load(0, age=0.0, running=2), ready=2, own=1, peer=1), p).needed == 1  # one is free


def test_a_free_slot_a_booting_worker_or_a_short_wait_adds_no_worker_for_busy_slots() -> None:
    p = policy(max_workers=8)
    # 2 workers x 2 slots, 3 running: one slot is free, it takes the item.
    assert decide(view(load(1, age=300.0, running=3), ready=2, own=2), p).launch == 0
    # Every ready slot busy, but a worker is booting: its slots are on the way.
    assert decide(view(load(1, age=300.0, running=4), ready=2, booting=1, own=3), p).launch == 0
    # Every slot busy, but the item has not waited the threshold yet.
    decision = decide(view(load(1, age=29.0, running=4), ready=2, own=2), p)
    assert decision == Decision(0, 0, "oldest item has waited 29s, under the 30s threshold")
    # Once it has: one more.
    assert decide(view(load(1, age=30.0, running=4), ready=2, own=2), p).launch == 1


def test_busy_slots_add_one_worker_per_decision_and_never_pass_the_cap() -> None:
    # More jobs running than the fleet's slots (leases of workers since gone count too): still one more, not
    # one per running job; the backlog sizing wins when it asks for more.
    assert decide(view(load(1, age=300.0, running=40), ready=2, own=2), POLICY).needed == 3
    assert decide(view(load(2_000, age=300.0, running=4), ready=2, own=2), POLICY).needed == 8
    at_cap = decide(view(load(5, age=300.0, running=16), ready=8, own=4, peer=4), POLICY)
    assert (at_cap.needed, at_cap.launch) == (8, 0)
    assert at_cap.reason.endswith(": enough")


# --- the scaler's settings ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("argv", "env", "message"), [
    (["--target-drain", "0"], {}, "--target-drain must be more than 0, not 0.0"),
    (["--slots-per-worker", "0"], {}, "--slots-per-worker must be at least 1, not 0"),
    (["--max-workers", "-1"], {}, "--max-workers must be at least 0, not -1"),
    (["--default-job-duration", "nan"], {}, "--default-job-duration must be more than 0, not nan"),
    ([], {"DW_SCALE_AFTER": "-5"}, "--scale-after must be at least 0, not -5.0"),  # env fallbacks too
    ([], {"DW_IDLE_TIMEOUT": "inf"}, "--idle-timeout must be more than 0, not inf"),
])
def test_the_scaler_refuses_settings_the_policy_cannot_use(argv: list[str], env: dict[str, str], message: str,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_the_scaler_accepts_the_boundaries() -> None:
    args = parse_args(["--max-workers", "0", "--scale-after", "0", "--max-launch-per-tick", "0", "--slots-per-worker",
                       "1", "--target-drain", "0.5"])
    assert (args.max_workers, args.scale_after, args.max_launch_per_tick, args.target_drain) == (0, 0.0, 0, 0.5)


def test_the_scaler_feeds_the_running_count_of_stats_to_the_policy() -> None:
    stats = {"pending": 1, "running": 3, "oldest_pending_age_s": 21.0, "recent_jobs": 50,
             "recent_job_duration_s": 0.000129}
    assert load_of(stats).running == 3
    assert load_of({"pending": 0, "oldest_pending_age_s": 0.0}).running == 0  # an older peer without the field


# --- capacity the workers report ---------------------------------------------------------------------------------

def test_the_capacity_workers_report_sizes_the_fleet_instead_of_slots_per_worker() -> None:
    # 1,600 jobs of 1 s to drain in 100 s need 16 slots: 8 workers of 2 slots, or 1 worker of 16 lanes.
    backlog = load(1600, age=100.0)
    assert decide(view(backlog), POLICY).needed == 8
    reported = replace(view(backlog, ready=1, own=1), reported_slots_per_worker=16.0)
    decision = decide(reported, POLICY)
    assert (decision.needed, decision.launch) == (1, 0)
    assert "16 jobs at once per worker as reported" in decision.reason
    bigger = replace(view(load(4800, age=100.0), ready=1, own=1), reported_slots_per_worker=16.0)
    assert (decide(bigger, POLICY).needed, decide(bigger, POLICY).launch) == (3, 1)  # the peer launches one


def test_busy_slots_count_the_reported_capacity() -> None:
    # 2 workers of 16 lanes with 20 jobs running: slots are free, so no worker is added for busy slots.
    running = load(5, age=100.0, running=20)
    free = replace(view(running, ready=2, own=2), reported_slots_per_worker=16.0)
    assert decide(free, POLICY).launch == 0
    # With the configured 2 slots per worker, the same 20 running jobs fill every slot: one more worker.
    assert decide(view(running, ready=2, own=2), POLICY).launch == 1


def test_the_scaler_takes_the_capacity_its_fleets_workers_reported() -> None:
    from cron.providers import Machine
    from cron.scale import Fleet, cluster_view

    nodes = [Machine("i-1", "a", 0.0, ready=True), Machine("i-2", "b", 0.0, ready=True),
             Machine("i-3", "a", 0.0, ready=True)]
    stats = {"pending": 0, "oldest_pending_age_s": 0.0,
             "workers": [{"id": "i-1", "capacity": 16}, {"id": "gone", "capacity": 64},
                         {"id": "i-3", "capacity": None}]}
    peer = {"pending": 0, "oldest_pending_age_s": 0.0, "workers": [{"id": "i-2", "capacity": 4}]}
    assert cluster_view(stats, peer, Fleet(nodes), "a").reported_slots_per_worker == 10.0
    assert cluster_view(stats, None, Fleet(nodes), "a").reported_slots_per_worker == 16.0
    quiet = {"pending": 0, "oldest_pending_age_s": 0.0, "workers": []}
    assert cluster_view(quiet, None, Fleet(nodes), "a").reported_slots_per_worker is None
