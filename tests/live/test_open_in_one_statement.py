"""A session open in one statement (sql/027), against the real Postgres of the stack in a
schema of its own: what it returns is what it wrote, the load it keeps is exact, and a
retire or a mode change that races it is never overtaken."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any

import pytest

from bridge.errors import PoolExhausted
from bridge.store import connect
from bridge.store.db import keeps_session_state
from tests.live.conftest import Harness, opening

TABLES = "recording_access, recordings, calls, session_events, participants, sessions, pool_numbers"
NUMBERS = [f"+7495777{i:04d}" for i in range(40)]


@pytest.fixture(scope="module")
def harness(scratch_db: Harness) -> Harness:
    return scratch_db


async def fresh(h: Harness, numbers: list[str]) -> None:
    await h.pool.execute(f"TRUNCATE {TABLES}")
    await h.pools.import_numbers([{"number": n} for n in numbers])


async def exact_load(h: Harness) -> None:
    wrong = await h.pool.fetch(
        """SELECT p.number, p.holders FROM pool_numbers p WHERE p.holders <> (
               SELECT count(*) FROM participants h WHERE h.holds AND NOT h.by_code AND h.pool_number = p.number)""")
    assert not wrong, f"holders differs from the count of holders: {wrong[:3]}"


def test_what_an_open_returns_is_what_it_wrote(harness: Harness) -> None:
    async def scenario() -> None:
        await fresh(harness, NUMBERS[:3])
        opened, created = await harness.sessions.open(opening(
            "written-1", "+79161230001", "+79161230002", ttl_seconds=600, idle_timeout_seconds=300,
            calls_per_hour=3, quiet_hours={"from": "22:00", "to": "08:00", "timezone": "Europe/Moscow"}))
        assert created
        assert opened == await harness.sessions.get(opened.id)
        again, created = await harness.sessions.open(opening("written-1", "+79161230001", "+79161230002"))
        assert not created and again == opened
        events = await harness.sessions.events(opened.id)
        assert [e["kind"] for e in events] == ["opened"]
        detail = events[0]["detail"]
        assert detail["pool_number"] == opened.pool_number and detail["ttl_seconds"] == 600
        assert detail["idle_timeout_seconds"] == 300 and detail["calls_per_hour"] == 3 and detail["mode"] == "direct"
        assert detail["quiet_hours"] == {"from": "22:00", "to": "08:00", "timezone": "Europe/Moscow"}

    harness.run(scenario())


def test_racing_opens_of_distinct_pairs_keep_the_load_exact_and_spread_out(harness: Harness) -> None:
    """200 opens at once on 40 numbers: every one opens, and each number's load (holders,
    counted in place by the triggers of sql/027) is its count of holders when they are done."""
    async def scenario() -> None:
        await fresh(harness, NUMBERS)
        results = await asyncio.gather(*(
            harness.sessions.open(opening(f"spread-{i}", f"+7916100{i:04d}", f"+7916200{i:04d}"))
            for i in range(200)), return_exceptions=True)
        failures = [r for r in results if isinstance(r, BaseException)]
        assert not failures, failures[:3]
        await exact_load(harness)
        loads = [r["holders"] for r in await harness.pool.fetch("SELECT holders FROM pool_numbers")]
        assert sum(loads) == 400 and min(loads) > 0, sorted(loads)
        # Closing half of them with no cool-off, then the sweep's release, keep it exact too.
        ids = [r["id"] for r in await harness.pool.fetch("SELECT id FROM sessions ORDER BY order_id LIMIT 100")]
        await asyncio.gather(*(harness.store.sessions.end(i, "closed", 0, 0) for i in ids))
        await exact_load(harness)

    harness.run(scenario())


def test_an_open_takes_the_one_number_of_its_tier_no_racing_open_holds(harness: Harness) -> None:
    """An open locks one of four numbers of its tier drawn at random (sql/028); when racing
    opens hold those four, it takes one of the rest at once rather than waiting for them.
    Four of five equally loaded numbers are held: the open takes the fifth, without waiting
    (drawn again eight times: the four drawn miss the fifth 41 % of the time)."""
    async def scenario() -> None:
        for attempt in range(8):
            await fresh(harness, NUMBERS[:5])
            gate = await harness.pool.acquire()
            try:
                async with gate.transaction():
                    await gate.execute("SELECT 1 FROM pool_numbers WHERE number = ANY($1) FOR UPDATE", NUMBERS[:4])
                    async with asyncio.timeout(10):
                        session, created = await harness.sessions.open(
                            opening(f"tier-{attempt}", "+79161230031", "+79161230032"))
            finally:
                await harness.pool.release(gate)
            assert created and session.pool_number == NUMBERS[4], session.pool_number
            await exact_load(harness)

    harness.run(scenario())


async def _held_at_a_lock(h: Harness, change: str, args: tuple[Any, ...], open_: Awaitable[Any]) -> Any:
    """Run `change` in a transaction, let the open start and wait at its lock, then commit
    `change`: the open sees what committed."""
    gate = await h.pool.acquire()
    try:
        tx = gate.transaction()
        await tx.start()
        await gate.execute(change, *args)
        task = asyncio.ensure_future(open_)
        async with asyncio.timeout(10):
            while not await gate.fetchval(
                "SELECT count(*) FROM pg_locks WHERE NOT granted AND pid <> pg_backend_pid()"
            ) and not task.done():
                await asyncio.sleep(0.005)  # wait-ok: polling Postgres until the open waits for the lock
        await tx.commit()
    finally:
        await h.pool.release(gate)
    return await asyncio.gather(task, return_exceptions=True)


@pytest.mark.parametrize("change", [
    "UPDATE pool_numbers SET state = 'cooling', cooling_until = now() + interval '1 hour' WHERE number = $1",
    "UPDATE pool_numbers SET mode = 'order_code' WHERE number = $1",
])
def test_an_open_racing_a_retire_or_a_mode_change_does_not_take_the_number(harness: Harness, change: str) -> None:
    async def scenario() -> None:
        await fresh(harness, NUMBERS[:1])
        [result] = await _held_at_a_lock(
            harness, change, (NUMBERS[0],), harness.sessions.open(opening("raced-1", "+79161230011", "+79161230012")))
        assert isinstance(result, PoolExhausted), result
        assert await harness.pool.fetchval("SELECT count(*) FROM sessions") == 0
        await exact_load(harness)

    harness.run(scenario())


def test_many_opens_of_one_order_at_once_open_one_session(harness: Harness) -> None:
    async def scenario() -> None:
        await fresh(harness, NUMBERS[:5])
        results = await asyncio.gather(*(
            harness.sessions.open(opening("same-order", "+79161230021", "+79161230022")) for _ in range(30)))
        assert len({session.id for session, _ in results}) == 1
        assert sum(created for _, created in results) == 1
        assert await harness.pool.fetchval("SELECT count(*) FROM sessions") == 1
        await exact_load(harness)

    harness.run(scenario())


def test_a_pool_connection_that_took_session_state_is_reset_and_others_are_not_asked(
    harness: Harness, stack: Any
) -> None:
    """The bridge's pool sends asyncpg's reset query only for connections marked as taking
    session state (bridge.store.db): their session advisory locks go with it."""
    async def scenario() -> None:
        pool = await connect(stack.database_url, min_size=1, max_size=1)
        try:
            async with pool.acquire() as conn:
                pid = conn.get_server_pid()
                keeps_session_state(conn)
                await conn.execute("SELECT pg_advisory_lock(4242424242)")  # (never unlocked here)
            assert await pool.fetchval("SELECT pg_backend_pid()") == pid, "the same connection, back in the pool"
            assert not await pool.fetchval(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = $1", pid)
        finally:
            await pool.close()

    harness.run(scenario())
