"""What the worker machines cost (endpoint/usage.py, endpoint/prices.py): the scalers' listings of
the cluster's machines, the worker-seconds by market and type over the last hour and day, and the
estimate in USD in GET /stats; against a real store, then over HTTP at a real endpoint.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import requests

from conftest import PEER_AUTH, SCALER_AUTH, WORKER_AUTH, Services, metric
from endpoint.prices import ON_DEMAND_PRICES, SPOT_SHARE, Price, PriceTable, price_entry
from endpoint.store import Store
from endpoint.usage import Listed

HOUR = 3600.0


@pytest.fixture
def store(tmp_path: Path):
    opened = Store(tmp_path / "a.sqlite3", "a", maintenance_interval=0.05)
    yield opened
    opened.close()


def row(figures: dict, window: str, market: str, instance_type: str) -> dict:
    (found,) = [entry for entry in figures[window]["by_type"]
                if (entry["market"], entry["instance_type"]) == (market, instance_type)]
    return found


def test_worker_seconds_run_from_launch_to_the_last_listing_in_each_window(store: Store) -> None:
    usage = store.usage(PriceTable())
    now = time.time()
    usage.record([Listed("i-old", "c7i.large", "spot", now - 2 * HOUR),  # launched before the last hour
                  Listed("i-new", "c7i.large", "on-demand", now - 600)], now=now - 1.0)
    usage.record([Listed("i-old", "c7i.large", "spot", now - 2 * HOUR)], now=now)  # i-new not listed any more
    figures = usage.figures(now=now)
    assert row(figures, "last_hour", "spot", "c7i.large")["worker_seconds"] == pytest.approx(HOUR, abs=0.2)
    assert row(figures, "last_day", "spot", "c7i.large")["worker_seconds"] == pytest.approx(2 * HOUR, abs=0.2)
    # From its launch to the last listing that showed it.
    assert row(figures, "last_hour", "on-demand", "c7i.large")["worker_seconds"] == pytest.approx(599, abs=0.2)
    spot = row(figures, "last_day", "spot", "c7i.large")
    assert spot["usd_per_hour"] == pytest.approx(ON_DEMAND_PRICES["c7i.large"] * SPOT_SHARE)
    assert spot["estimated_usd"] == pytest.approx(2 * ON_DEMAND_PRICES["c7i.large"] * SPOT_SHARE, rel=1e-3)
    total = figures["last_hour"]["estimated_usd"]
    assert total == pytest.approx(sum(entry["estimated_usd"] for entry in figures["last_hour"]["by_type"]))


def test_a_short_life_is_billed_a_minute_and_the_last_word_of_its_worker_ends_it(store: Store) -> None:
    usage = store.usage(PriceTable())
    now = time.time()
    usage.record([Listed("i-brief", "c6i.large", "on-demand", now - 5)], now=now - 4)
    figures = usage.figures(now=now + 600)
    assert row(figures, "last_hour", "on-demand", "c6i.large")["worker_seconds"] == pytest.approx(60, abs=0.1)

    # Its worker was heard from after the last listing: that is when it was last alive.
    usage.record([Listed("i-heard", "c6i.large", "on-demand", now - 300)], now=now - 200)
    store.claim("i-heard")  # the endpoint hears from it now (an empty poll)
    time.sleep(0.3)  # recorded by the store's maintenance
    heard = usage.figures(now=now + 600)
    assert row(heard, "last_hour", "on-demand", "c6i.large")["worker_seconds"] == pytest.approx(60 + 300, abs=2)


def test_prices_are_the_defaults_unless_set_and_unpriced_machines_still_count(store: Store) -> None:
    usage = store.usage(PriceTable([price_entry("c7i.large/spot=0.03"), price_entry("m7i.large=0.2"),
                                    price_entry("new.large=1")]))
    now = time.time()
    usage.record([Listed("i-1", "c7i.large", "spot", now - HOUR), Listed("i-2", "m7i.large", "spot", now - HOUR),
                  Listed("local-a-1", "local", "none", now - HOUR), Listed("i-3", "x9.huge", "on-demand", now - HOUR),
                  Listed("i-4", "new.large", "on-demand", now - HOUR)], now=now)
    every = usage.figures(now=now)
    figures = every["last_hour"]
    assert row(every, "last_hour", "spot", "c7i.large")["usd_per_hour"] == 0.03  # set
    # Not set for Spot: its share of the On-Demand price that is set.
    assert row(every, "last_hour", "spot", "m7i.large")["usd_per_hour"] == pytest.approx(0.2 * SPOT_SHARE)
    assert row(every, "last_hour", "on-demand", "new.large")["usd_per_hour"] == 1
    for market, name in (("none", "local"), ("on-demand", "x9.huge")):
        entry = row(every, "last_hour", market, name)
        assert entry["usd_per_hour"] is None and entry["estimated_usd"] is None
    assert figures["unpriced_worker_seconds"] == pytest.approx(2 * HOUR, abs=1)
    assert figures["worker_seconds"] == pytest.approx(5 * HOUR, abs=1)
    assert figures["estimated_usd"] == pytest.approx(0.03 + 0.2 * SPOT_SHARE + 1, rel=1e-3)


def test_a_price_entry_is_checked_and_handed_on_as_written() -> None:
    for bad in ("c7i.large", "c7i.large=-1", "c7i.large/reserved=0.1", "C7I.large=0.1", "c7i.large=1e3", ""):
        with pytest.raises(ValueError):
            price_entry(bad)
    entry = price_entry("c7i.large/spot=0.035")
    assert entry == Price("c7i.large", "spot", 0.035) and price_entry(str(entry)) == entry
    assert str(price_entry("t3.micro=0.0104")) == "t3.micro=0.0104"


def test_listings_are_checked_and_stats_report_the_cost(services: Services) -> None:
    a = services.endpoint("a", extra_args=("--price", "c7i.large/spot=0.036"))
    url = f"{a.url}/internal/scaler/fleet"
    now = time.time()
    good = {"id": "i-0abc", "instance_type": "c7i.large", "market": "spot", "launched_at": now - 120}
    for bad in ({"machines": [{**good, "market": "reserved"}]}, {"machines": [{**good, "launched_at": "soon"}]},
                {"machines": [{**good, "launched_at": now + 7 * 86_400}]}, {"machines": [{**good, "id": "a b"}]},
                {"machines": [{**good, "instance_type": "C7I"}]}, {"machines": good}, {"machines": [1]}):
        response = requests.put(url, data=json.dumps(bad), headers=SCALER_AUTH, timeout=10)
        assert response.status_code == 400, (bad, response.text)
    assert requests.put(url, data=b'{"machines": [', headers=SCALER_AUTH, timeout=10).status_code == 400
    assert requests.put(url, json={"machines": [good]}, timeout=10).status_code == 401
    for other_role in (WORKER_AUTH, PEER_AUTH):  # the scalers' route: neither a worker's nor an endpoint's
        assert requests.put(url, json={"machines": [good]}, headers=other_role, timeout=10).status_code == 403
    assert a.stats()["usage"]["last_day"]["worker_seconds"] == 0  # nothing of the refused ones was kept
    response = requests.put(url, json={"machines": [good]}, headers=SCALER_AUTH, timeout=10)
    assert response.status_code == 200 and response.json() == {"recorded": 1}
    usage = a.stats(public=True)["usage"]  # figures, no names: public
    (entry,) = usage["last_hour"]["by_type"]
    assert entry["market"] == "spot" and entry["usd_per_hour"] == 0.036
    assert entry["worker_seconds"] == pytest.approx(120, abs=5)
    assert usage["last_hour"]["estimated_usd"] == pytest.approx(entry["worker_seconds"] / 3600 * 0.036, rel=1e-3)
    assert "us-east-1" in usage["prices"]
    scraped = requests.get(f"{a.url}/metrics", timeout=10).text  # the same figures for Prometheus
    for window, name in (("1h", "last_hour"), ("1d", "last_day")):
        (entry,) = usage[name]["by_type"]
        labels = {"window": window, "market": "spot", "instance_type": "c7i.large"}
        assert metric(scraped, "dw_worker_seconds", **labels) == pytest.approx(entry["worker_seconds"], abs=5)
        assert metric(scraped, "dw_worker_estimated_cost_usd", **labels) == pytest.approx(entry["estimated_usd"],
                                                                                           rel=0.05)
    page = requests.get(f"{a.url}/", timeout=10).text  # and on the dashboard, public too
    row = page[page.index('data-cost="spot/c7i.large"'):]
    row = row[:row.index("</tr>")]
    assert "<td>spot</td><td>c7i.large</td>" in row and f"{usage['last_day']['estimated_usd']:.4f}" in row
