"""How many jobs at once a worker of an instance type brings, before it says so itself.

A worker runs one job per slot process, one process per vCPU by default; so until workers report
their capacity, a machine counts as many slots as its type has vCPUs (or --worker-processes, if
that is set). EC2's sizes give the vCPUs for the usual families (c, m, r and their variants):
medium 1, large 2, xlarge 4, Nxlarge 4N; the burstable t2 and t3 types, and a few others, are
listed. A type this does not know (a metal size, a new family's odd size) counts as the
configured --slots-per-worker.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

SIZES = {"medium": 1, "large": 2, "xlarge": 4}
MULTIPLE = re.compile(r"([0-9]+)xlarge")
# Burstable types do not follow the sizes' rule.
BURSTABLE = {"nano": 2, "micro": 2, "small": 2, "medium": 2, "large": 2, "xlarge": 4, "2xlarge": 8}
BURSTABLE_T2 = {"nano": 1, "micro": 1, "small": 1, "medium": 2, "large": 2, "xlarge": 4, "2xlarge": 8}


def vcpus(instance_type: str) -> int | None:
    family, _, size = instance_type.partition(".")
    if family == "t2":
        return BURSTABLE_T2.get(size)
    if family.startswith("t"):
        return BURSTABLE.get(size)
    if size in SIZES:
        return SIZES[size]
    multiple = MULTIPLE.fullmatch(size)
    return 4 * int(multiple.group(1)) if multiple else None


def slots_of(instance_type: str, worker_processes: int, configured: float) -> float:
    """The jobs a worker of this type runs at once, before it reports them."""
    if worker_processes:
        return worker_processes
    return vcpus(instance_type) or configured


def mean_slots(instance_types: Sequence[str], worker_processes: int, configured: float) -> float:
    """What one worker of the fleet brings on average ("" for a machine of no known type, e.g. local)."""
    if not instance_types:
        return configured
    return sum(slots_of(name, worker_processes, configured) for name in instance_types) / len(instance_types)
