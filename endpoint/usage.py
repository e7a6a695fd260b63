"""What the worker machines cost: worker-seconds by market and instance type, and an estimate in USD.

Where the seconds come from: EC2's own record of each instance (its launch time, type and
market), as the scalers list the cluster's workers at every run and post them here (PUT
/internal/scaler/fleet, the scaler key: endpoint/scaler_record.py; cron/fleet_report.py). A
machine's life runs from its launch to the later of the last listing that still showed it and
the last time this endpoint heard from its worker (the workers table), which is within a second
of its end for a worker that exits by itself. So a worker is counted from its launch (its boot
and provisioning are billed too) and at least 60 s (EC2's minimum per launch), once however many
scalers list it; either endpoint counts every machine of the cluster, as both scalers list all of
them. What this misses: the time between the last listing or word and the instance's end, at
most one scaler period (a minute) for a machine that went silent.

GET /stats shows `usage`: for the last hour and the last day, the worker-seconds and the
estimated cost by market and type, priced by endpoint/prices.py. Part of the storage layer
(the SQL lives here and in store.py, nowhere else): written through the file's single writer,
rows kept for two days.
"""

from __future__ import annotations

import re
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from endpoint.inputs import InputError
from endpoint.prices import PRICES_AS_OF, PriceTable
from endpoint.writer import Writer

WINDOWS_S = {"last_hour": 3600.0, "last_day": 86_400.0}
KEPT_S = 2 * 86_400.0
MINIMUM_BILLED_S = 60.0  # EC2 bills at least a minute per launch (Linux, per second)
MAX_MACHINES = 10_000  # in one post
MARKETS = ("on-demand", "spot", "none")  # none: no EC2 instance (local and ssh providers)
MACHINE_ID_PATTERN = re.compile(r"[A-Za-z0-9._:@-]{1,128}")
TYPE_PATTERN = re.compile(r"[a-z0-9][a-z0-9.-]{0,63}")


@dataclass(frozen=True)
class Listed:
    machine_id: str
    instance_type: str
    market: str
    launched_at: float


class Usage:
    def __init__(self, writer: Writer, reader: Callable[[], sqlite3.Connection], prices: PriceTable) -> None:
        self._writer = writer
        self._reader = reader
        self.prices = prices

    def record(self, machines: list[Listed], now: float | None = None) -> None:
        """One scaler's listing: every machine it saw alive now (and the launch time EC2 gave it)."""
        now = time.time() if now is None else now

        def op(conn: sqlite3.Connection) -> None:
            conn.executemany(
                """INSERT INTO fleet_machines (machine_id, instance_type, market, launched_at, last_listed_at)
                   VALUES (?, ?, ?, ?, ?)
                   ON CONFLICT (machine_id) DO UPDATE
                   SET instance_type = excluded.instance_type, market = excluded.market,
                       launched_at = min(launched_at, excluded.launched_at),
                       last_listed_at = max(last_listed_at, excluded.last_listed_at)""",
                [(machine.machine_id, machine.instance_type, machine.market, min(machine.launched_at, now), now)
                 for machine in machines])
            conn.execute("DELETE FROM fleet_machines WHERE last_listed_at < ?", (now - KEPT_S,))

        self._writer.run(op, durable=False)  # a listing lost in a crash is repeated by the next run

    def figures(self, now: float | None = None) -> dict[str, Any]:
        now = time.time() if now is None else now
        rows = self._reader().execute(
            """SELECT f.instance_type, f.market, f.launched_at, max(f.last_listed_at, coalesce(w.last_seen_at, 0))
               FROM fleet_machines f LEFT JOIN workers w ON w.worker_id = f.machine_id""").fetchall()
        figures: dict[str, Any] = {"prices": PRICES_AS_OF + " unless set (--price); Spot estimated unless set"}
        for name, window in WINDOWS_S.items():
            figures[name] = self._window(rows, now - window, now)
        return figures

    def _window(self, rows: list[tuple[str, str, float, float]], start: float, end: float) -> dict[str, Any]:
        seconds: dict[tuple[str, str], float] = {}
        for instance_type, market, launched_at, last_alive in rows:
            billed_until = min(end, max(last_alive, launched_at + MINIMUM_BILLED_S))
            overlap = billed_until - max(start, launched_at)
            if overlap > 0:
                seconds[(market, instance_type)] = seconds.get((market, instance_type), 0.0) + overlap
        by_type, total_usd, unpriced = [], 0.0, 0.0
        for (market, instance_type), worker_seconds in sorted(seconds.items()):
            usd_per_hour = self.prices.usd_per_hour(instance_type, market)
            cost = None if usd_per_hour is None else worker_seconds / 3600 * usd_per_hour
            by_type.append({"market": market, "instance_type": instance_type,
                            "worker_seconds": round(worker_seconds, 1), "usd_per_hour": usd_per_hour,
                            "estimated_usd": None if cost is None else round(cost, 6)})
            if cost is None:
                unpriced += worker_seconds
            else:
                total_usd += cost
        return {"worker_seconds": round(sum(seconds.values()), 1), "estimated_usd": round(total_usd, 6),
                "unpriced_worker_seconds": round(unpriced, 1), "by_type": by_type}


def listed_machines(fields: Any, now: float) -> list[Listed]:
    """A scaler's post, checked item by item (a bad one is 400 and writes nothing)."""
    machines = fields.get("machines") if isinstance(fields, dict) else None
    if not isinstance(machines, list) or len(machines) > MAX_MACHINES:
        raise InputError(400, f"field 'machines' must be a list of at most {MAX_MACHINES} machines")
    listed = []
    for machine in machines:
        if not isinstance(machine, dict):
            raise InputError(400, "each machine must be an object")
        machine_id, instance_type = machine.get("id"), machine.get("instance_type")
        market, launched_at = machine.get("market"), machine.get("launched_at")
        if not isinstance(machine_id, str) or not MACHINE_ID_PATTERN.fullmatch(machine_id):
            raise InputError(400, "a machine's 'id' must be 1-128 characters of [A-Za-z0-9._:@-]")
        if not isinstance(instance_type, str) or not TYPE_PATTERN.fullmatch(instance_type):
            raise InputError(400, "a machine's 'instance_type' must be 1-64 characters of [a-z0-9.-]")
        if market not in MARKETS:
            raise InputError(400, f"a machine's 'market' must be one of {', '.join(MARKETS)}")
        if isinstance(launched_at, bool) or not isinstance(launched_at, (int, float)) \
                or not now - 366 * 86_400 <= launched_at <= now + 86_400:
            raise InputError(400, "a machine's 'launched_at' must be a unix time within the last year")
        listed.append(Listed(machine_id, instance_type, market, float(launched_at)))
    return listed
