"""Floods cost little: unknown callers beyond a rate are refused unanswered, and new calls
beyond what the database can route at once are shed at once.

An unknown caller is answered to hear why the call cannot go through, and an answered call
costs its minutes: a robocall flood on pool numbers would cost money by the minute and fill
the bridge with calls. `UnknownCallers` counts the unknown callers announced in a sliding
window, per pool number and in total (per bridge process); beyond either limit the caller's
leg is hung up unanswered with cause 21 (the PBX answers the INVITE 403): no answer, no
media, no minutes, one database write (the call's row, which its route lookup wrote anyway,
says it ended). Known participants are not counted and never refused: their calls are told
apart by the same route lookup.

`ROUTING_LIMIT`: a call waits for the database while its route is looked up. Beyond that many
calls routing at once (a database that slows down under a flood), a new call is hung up
unanswered with cause 34 (SIP 503) before any lookup, instead of queueing for a connection:
the caller's network says the service is unavailable, rather than leaving them in silence.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

# Calls whose route is being looked up, at most, per bridge process (the pool has 10
# connections; a route lookup takes a few ms, so this many wait at most some tens of ms on a
# healthy database).
ROUTING_LIMIT = 50
FLOOD_CAUSE = 21  # call rejected: SIP 403, sent before any answer
SHED_CAUSE = 34  # no circuit available: SIP 503


class UnknownCallers:
    """Unknown callers announced within the last `window` seconds, per pool number and in
    total. Memory stays bounded: only admitted calls are kept, at most `total` of them."""

    def __init__(self, per_number: int, total: int, window: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.per_number = per_number  # 0: no limit
        self.total = total  # 0: no limit
        self.window = window
        self._clock = clock
        self._all: deque[tuple[float, str]] = deque()
        self._by_number: dict[str, int] = {}

    def _forget_old(self, now: float) -> None:
        while self._all and self._all[0][0] <= now - self.window:
            _, number = self._all.popleft()
            left = self._by_number[number] - 1
            if left:
                self._by_number[number] = left
            else:
                del self._by_number[number]

    def admit(self, pool_number: str) -> str | None:
        """None: this unknown caller may be announced (and is counted). Otherwise the limit
        that refuses it: "pool_number" or "total"."""
        now = self._clock()
        self._forget_old(now)
        if self.per_number and self._by_number.get(pool_number, 0) >= self.per_number:
            return "pool_number"
        if self.total and len(self._all) >= self.total:
            return "total"
        self._all.append((now, pool_number))
        self._by_number[pool_number] = self._by_number.get(pool_number, 0) + 1
        return None
