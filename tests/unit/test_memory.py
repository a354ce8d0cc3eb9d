"""bridge.memory: the C heap's free pages are handed back once a minute (the soak in
docs/bench measures what it does to RSS; here, that it runs, and stops)."""

from __future__ import annotations

import asyncio

from bridge import memory


def test_the_c_library_here_trims():
    trim = memory.malloc_trim()
    assert trim is not None
    assert trim() in (0, 1)  # 1: memory was handed back, 0: there was none to


async def test_it_trims_every_interval_until_stopped():
    stop = asyncio.Event()
    trimmed = asyncio.Queue[int]()

    def trim() -> int:
        trimmed.put_nowait(1)
        return 1

    task = asyncio.create_task(memory.trim_freed(stop, every=0.01, trim=trim))
    for _ in range(3):
        await asyncio.wait_for(trimmed.get(), timeout=5)
    stop.set()
    await asyncio.wait_for(task, timeout=5)  # it stops when told to


async def test_nothing_runs_without_malloc_trim(monkeypatch):
    monkeypatch.setattr(memory, "malloc_trim", lambda: None)
    stop = asyncio.Event()
    await asyncio.wait_for(memory.trim_freed(stop, every=0.01), timeout=5)  # returns at once
