"""The scaler's listing of the cluster's workers, posted to both endpoints after every run.

The endpoint keeps it (PUT /internal/scaler/fleet, endpoint/usage.py) and reports from it, in GET
/stats, the worker-seconds by market and instance type over the last hour and day and what they
cost. Every machine listed is posted, whoever launched it, with EC2's launch time, type and
market; off EC2 (local and ssh providers) the type is the provider's name and the market
"none". A post that fails is logged and changes nothing else: the next run posts again.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from cron.providers import Machine
from cron.state import EndpointUnreachable, call

log = logging.getLogger("cron.scale")



def fleet_listing(machines: Sequence[Machine], provider: str) -> dict[str, list[dict[str, object]]]:
    return {"machines": [{"id": machine.machine_id, "instance_type": machine.instance_type or provider,
                          "market": machine.market or "none", "launched_at": machine.launched_at}
                         for machine in machines]}


def report_fleet(endpoint_url: str, key: str, machines: Sequence[Machine], provider: str, ca_file: str = "") -> None:
    try:
        call(f"{endpoint_url.rstrip('/')}/internal/scaler/fleet", key, "PUT", fleet_listing(machines, provider),
             ca_file=ca_file)
    except EndpointUnreachable as exc:
        log.warning("the workers' listing was not recorded at %s (their cost in /stats misses this run): %s",
                    endpoint_url, exc)
