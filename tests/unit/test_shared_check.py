"""/healthz's checks run once at a time (bridge.app.SharedCheck): a flood of health requests,
which need no token, costs Asterisk and the database one check at a time."""

from __future__ import annotations

import asyncio

from bridge.app import SharedCheck


async def test_callers_during_a_run_share_it_and_the_next_caller_runs_it_again() -> None:
    runs = 0
    release = asyncio.Event()
    answers = iter([True, False])

    async def check() -> bool:
        nonlocal runs
        runs += 1
        await release.wait()
        return next(answers)

    shared = SharedCheck(check)
    callers = [asyncio.ensure_future(shared()) for _ in range(200)]
    async with asyncio.timeout(5):
        while runs == 0:
            await asyncio.sleep(0)  # wait-ok: letting the first caller start the run
    release.set()
    assert await asyncio.gather(*callers) == [True] * 200
    assert runs == 1
    # No answer is kept once given: the next caller asks again (a PBX that hung meanwhile).
    assert await shared() is False and runs == 2


async def test_a_caller_that_goes_away_leaves_the_run_to_the_others() -> None:
    release = asyncio.Event()

    async def check() -> bool:
        await release.wait()
        return True

    shared = SharedCheck(check)
    leaving, staying = asyncio.ensure_future(shared()), asyncio.ensure_future(shared())
    await asyncio.sleep(0)  # wait-ok: both callers waiting on the run
    leaving.cancel()
    release.set()
    assert await staying is True
    assert leaving.cancelled()
