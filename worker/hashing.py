"""The work itself: iterated SHA-512."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from itertools import repeat

# Iterations between looks at `cancelled`: rare enough to cost nothing measurable,
# often enough (a few milliseconds) to stop promptly when a lease is lost.
CHECK_EVERY = 8192


def work(data: bytes, iterations: int, cancelled: Callable[[], bool] | None = None) -> str | None:
    """sha512(data), then `iterations - 1` more times sha512 of the previous digest, as hex.

    Returns None if `cancelled()` turned true before the end; once the last digest is computed
    the result is returned whatever `cancelled()` says (a finished hash is never thrown away).
    """
    sha512 = hashlib.sha512  # a local name: one dictionary look-up less per iteration
    out = sha512(data).digest()
    remaining = iterations - 1
    while remaining > 0:
        step = min(remaining, CHECK_EVERY)
        for _ in repeat(None, step):
            out = sha512(out).digest()
        remaining -= step
        if remaining and cancelled is not None and cancelled():
            return None
    return out.hex()
