"""What a worker machine costs an hour, for the estimated cost in GET /stats (endpoint/usage.py).

The defaults are the On-Demand list prices of Linux instances in us-east-1 (USD per hour, as
AWS listed them in 2025). Spot prices change by zone and by the hour, so the default for Spot is
an assumption: SPOT_SHARE of the type's On-Demand price (a saving of 60 %; AWS quotes savings of
up to 90 %). Set real ones with `--price TYPE=USD` (On-Demand) and `--price TYPE/spot=USD`
(DW_PRICES, comma-separated); a type's Spot price that is not set is SPOT_SHARE of its On-Demand
one. Machines of the local and ssh providers, and types with no price, are counted in
worker-seconds but not priced.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

ON_DEMAND, SPOT = "on-demand", "spot"
SPOT_SHARE = 0.4
PRICES_AS_OF = "us-east-1, Linux, On-Demand list prices of 2025"
# USD per hour, On-Demand. The workers' usual types, and the endpoints' default (t3.small).
ON_DEMAND_PRICES = {
    "c7i.large": 0.08925, "c7i.xlarge": 0.1785, "c6i.large": 0.085, "c6i.xlarge": 0.17,
    "c7a.large": 0.10264, "c7a.xlarge": 0.20528, "c6a.large": 0.0765, "c6a.xlarge": 0.153,
    "c5.large": 0.085, "c5.xlarge": 0.17, "m7i.large": 0.1008, "m7i.xlarge": 0.2016,
    "m6i.large": 0.096, "m6i.xlarge": 0.192, "m5.large": 0.096, "m5.xlarge": 0.192,
    "t3.micro": 0.0104, "t3.small": 0.0208, "t3.medium": 0.0416,
}
PRICE_ENTRY = re.compile(r"([a-z][a-z0-9-]*\.[a-z0-9]+)(?:/(on-demand|spot))?=([0-9]+(?:\.[0-9]+)?)")


@dataclass(frozen=True)
class Price:
    instance_type: str
    market: str
    usd_per_hour: float

    def __str__(self) -> str:
        """As the setting takes it (so that a launcher can hand it on in DW_PRICES)."""
        market = "" if self.market == ON_DEMAND else f"/{self.market}"
        return f"{self.instance_type}{market}={self.usd_per_hour:.10f}".rstrip("0").rstrip(".")


def price_entry(value: str) -> Price:
    """`c7i.large=0.0893` (On-Demand) or `c7i.large/spot=0.035`: USD per hour."""
    match = PRICE_ENTRY.fullmatch(value.strip())
    if not match or not math.isfinite(float(match.group(3))):
        raise ValueError(f"must be TYPE=USD or TYPE/spot=USD per hour, such as c7i.large/spot=0.035, not {value!r}")
    return Price(match.group(1), match.group(2) or ON_DEMAND, float(match.group(3)))


price_entry.metavar = "TYPE[/MARKET]=USD"  # type: ignore[attr-defined]


class PriceTable:
    def __init__(self, overrides: Iterable[Price] = ()) -> None:
        self.on_demand = dict(ON_DEMAND_PRICES)
        self.spot: dict[str, float] = {}
        for price in overrides:
            (self.spot if price.market == SPOT else self.on_demand)[price.instance_type] = price.usd_per_hour

    def usd_per_hour(self, instance_type: str, market: str) -> float | None:
        """None: not priced (a type nobody gave a price for, or a machine that is no EC2 instance)."""
        if market == SPOT:
            if instance_type in self.spot:
                return self.spot[instance_type]
            on_demand = self.on_demand.get(instance_type)
            return None if on_demand is None else round(on_demand * SPOT_SHARE, 6)
        return self.on_demand.get(instance_type) if market == ON_DEMAND else None
