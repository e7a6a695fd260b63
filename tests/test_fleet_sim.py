"""The fleet simulator (bench/fleet.py) in a short run: a few hundred simulated workers on two real
endpoints, and the simulator's own accounting (every job enqueued ran once, completed once and was
pulled once, with the simulation's result; the counts of the simulators, the data files and the
endpoints' metrics agree). The figures it prints are for bench runs; here only the accounting counts.
"""

from __future__ import annotations

import math

import pytest

from bench.fleet import FleetSettings, run_fleet

SHORT = FleetSettings(workers=300, processes=2, durations=(0.02, 0.5), idle_s=1.0, client_s=1.5, client_rate=10,
                      burst_work_s=0.5, max_burst=1200, start_spread_s=1.0)


@pytest.mark.slow
def test_a_short_fleet_run_accounts_for_every_job() -> None:
    report = run_fleet(SHORT, echo=False)
    assert report.problems == [], "\n".join(report.lines)
    counts = report.counts
    # the client's probes before and on the idle fleet, and two bursts of at least a job per slot each
    assert counts["enqueued"] >= 2 * 600 + 20, counts
    assert counts["pulled"] == counts["runs"] == counts["results_stored"] == counts["enqueued"], counts
    assert [burst.jobs for burst in report.bursts] == [1200, 600], counts
    assert report.idle_client is not None and report.idle_client.probes
    assert all(math.isfinite(burst.drain_s) and burst.drain_s > 0 for burst in report.bursts)


@pytest.mark.slow
def test_the_accounting_notices_wrong_results() -> None:
    """Simulated workers that return a wrong result now and then: the run says so, and says nothing else."""
    settings = FleetSettings(workers=100, processes=1, durations=(0.02,), idle_s=0.5, client_s=1.0, client_rate=10,
                             burst_work_s=0.5, max_burst=400, start_spread_s=0.5, wrong_every=25)
    report = run_fleet(settings, echo=False)
    assert len(report.problems) == 1, report.problems
    assert "pulled with a result other than the simulation's" in report.problems[0]
    assert int(report.problems[0].split()[0]) == (report.counts["runs"]) // 25, report.problems
