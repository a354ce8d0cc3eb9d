"""bridge.store.sessions._OpenBatches pairs the rows of maskbridge_open_sessions with its
opens by position. A statement that answered another number of rows than it was sent opens
(which the function never does: one row per open, in order) must fail every open of it,
not leave their requests waiting for ever nor give one open another's session."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from bridge.store.sessions import _OpenBatches


class ShortPool:
    """One connection; every statement answers one row fewer than it was sent opens."""

    def get_max_size(self) -> int:
        return 1

    async def fetch(self, query: str, *columns: list[Any]) -> list[dict[str, Any]]:
        await asyncio.sleep(0)  # wait-ok: a yield, as a round trip would (the opens asked meanwhile wait for the next statement)
        return [{"failed": None, "outcome": "opened"} for _ in columns[0][1:]]


async def test_a_statement_with_a_row_missing_fails_each_of_its_opens() -> None:
    batches = _OpenBatches(ShortPool())  # type: ignore[arg-type]
    opens = [asyncio.ensure_future(batches.open((f"order-{i}",) + (None,) * 9)) for i in range(5)]
    async with asyncio.timeout(5):
        results = await asyncio.gather(*opens, return_exceptions=True)
    assert all(isinstance(r, RuntimeError) and "rows for" in str(r) for r in results), results
    with pytest.raises(RuntimeError):
        async with asyncio.timeout(5):
            await batches.open(("alone",) + (None,) * 9)
