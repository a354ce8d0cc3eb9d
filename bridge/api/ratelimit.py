"""Token buckets, in this bridge process: one per API token (its requests), one per token for
its conflicts (refusals that confirm or deny a guessed number), one per remote address for the
requests without a valid token.

Each key may take `burst` at once, then `rate` a second (a token's own rate, set with
maskbridge-admin, replaces the default one). Several bridges each keep their own buckets: a
key spread over N bridges gets up to N times the rate, which is what a limit per process
costs in exchange for never waiting on the database.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass


MAX_KEYS = 100_000  # buckets kept before the full ones are dropped


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

    @property
    def limited(self) -> bool:
        return self.rate > 0

    def _refilled(self, key: str, rate: float) -> _Bucket:
        burst = float(max(self.burst, 1))
        now = self.clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= MAX_KEYS:
                self._forget_full(now)
            bucket = self._buckets[key] = _Bucket(burst, now)
        bucket.level = min(burst, bucket.level + (now - bucket.at) * rate)
        bucket.at = now
        return bucket

    def _forget_full(self, now: float) -> None:
        """Drop the buckets that are full by now (they are as good as new): a flood of new keys
        (remote addresses) must not grow memory for ever."""
        burst = float(max(self.burst, 1))
        for key in [k for k, b in self._buckets.items() if b.level + (now - b.at) * self.rate >= burst]:
            del self._buckets[key]

    def _wait(self, bucket: _Bucket, rate: float) -> int:
        return max(1, math.ceil((1.0 - bucket.level) / rate))

    def take(self, key: str, rate: float | None = None) -> int:
        """0 when `key` may make a request now (it is counted), else the whole seconds after
        which it may (the Retry-After)."""
        rate = self.rate if rate is None else rate
        if rate <= 0:
            return 0
        bucket = self._refilled(key, rate)
        if bucket.level >= 1.0:
            bucket.level -= 1.0
            return 0
        return self._wait(bucket, rate)

    def wait(self, key: str) -> int:
        """What take() would answer, without counting anything: 0 when `key` has one left."""
        if self.rate <= 0:
            return 0
        bucket = self._refilled(key, self.rate)
        return 0 if bucket.level >= 1.0 else self._wait(bucket, self.rate)

    def give_back(self, key: str) -> None:
        """Return what take() counted (the request turned out not to count)."""
        bucket = self._buckets.get(key)
        if bucket is not None:
            bucket.level = min(float(max(self.burst, 1)), bucket.level + 1.0)
