"""A large pool import does not hold the event loop (calls are handled meanwhile), and two
imports run one after the other. The pool service over a fake repository."""

from __future__ import annotations

import asyncio
from typing import Any

from bridge.pools import Pools


class FakeRepo:
    def __init__(self) -> None:
        self.imports: list[int] = []
        self.running = 0
        self.most_at_once = 0

    async def import_numbers(self, rows: list[Any]) -> dict[str, int]:
        self.running += 1
        self.most_at_once = max(self.most_at_once, self.running)
        await asyncio.sleep(0)  # wait-ok: a yield standing for a database round trip
        self.imports.append(len(rows))
        self.running -= 1
        return {"added": len(rows), "updated": 0, "reactivated": 0, "unchanged": 0}


class FakeStore:
    def __init__(self) -> None:
        self.pools = FakeRepo()


def csv_of(count: int, first: int = 0) -> str:
    return "".join(f"+7495{first + n:07d},RU-MOW\n" for n in range(count))


async def test_the_event_loop_runs_while_thousands_of_numbers_are_checked():
    pools = Pools(FakeStore())  # type: ignore[arg-type]
    ticks = 0
    stop = asyncio.Event()

    async def other_work() -> None:  # what the calls would be doing meanwhile
        nonlocal ticks
        while not stop.is_set():
            ticks += 1
            await asyncio.sleep(0)  # wait-ok: a yield (the other work is counting turns)

    worker = asyncio.create_task(other_work())
    await asyncio.sleep(0)  # wait-ok: a yield, so that the worker starts
    counts = await pools.import_csv(csv_of(5000))
    stop.set()
    await worker
    assert counts["added"] == 5000
    assert ticks >= 5000 // 200, f"the loop ran only {ticks} times during the import"


async def test_imports_run_one_at_a_time():
    store = FakeStore()
    pools = Pools(store)  # type: ignore[arg-type]
    results = await asyncio.gather(*(pools.import_csv(csv_of(1000, first=1000 * i)) for i in range(4)))
    assert [r["added"] for r in results] == [1000] * 4
    assert store.pools.most_at_once == 1


def test_a_csv_line_with_more_columns_than_it_may_have_imports_nothing():
    """number, region, language, mode: a fifth column is refused, as an unknown field of a
    JSON import is (it used to be dropped silently); empty trailing columns are fine."""
    import pytest

    from bridge.errors import InvalidImport
    from bridge.pools import parse_csv

    assert parse_csv("+74958100900,RU-MOW,en,direct,,\n") == [("line 1", "+74958100900", "RU-MOW", "en", "direct")]
    store = FakeStore()
    pools = Pools(store)  # type: ignore[arg-type]
    with pytest.raises(InvalidImport, match="line 2 has 5 columns; at most 4"):
        asyncio.run(pools.import_csv("+74958100901\n+74958100900,ZZ-ADV,en,direct,extra\n"))
    assert store.pools.imports == []
