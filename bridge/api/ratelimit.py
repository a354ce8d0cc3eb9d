"""A token bucket per API token, in this bridge process.

Each token may make `burst` requests at once, then `rate` a second (a token's own rate, set
with maskbridge-admin, replaces the default one). Several bridges each keep their own buckets:
a token spread over N bridges gets up to N times the rate, which is what a limit per process
costs in exchange for never waiting on the database.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class _Bucket:
    level: float
    at: float


class RateLimiter:
    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate  # requests a second; 0: no limit
        self.burst = burst
        self.clock = clock
        self._buckets: dict[str, _Bucket] = {}

    def take(self, key: str, rate: float | None = None) -> int:
        """0 when `key` may make a request now (it is counted), else the whole seconds after
        which it may (the Retry-After)."""
        rate = self.rate if rate is None else rate
        if rate <= 0:
            return 0
        burst = max(self.burst, 1)
        now = self.clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(float(burst), now)
        bucket.level = min(float(burst), bucket.level + (now - bucket.at) * rate)
        bucket.at = now
        if bucket.level >= 1.0:
            bucket.level -= 1.0
            return 0
        return max(1, math.ceil((1.0 - bucket.level) / rate))
