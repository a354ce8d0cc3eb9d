"""Session opens in batches (sql/029, bridge.store.sessions._OpenBatches), against the real
Postgres of the stack in a schema of its own: opens that come while others' statements run
go together in one statement; each gets its own outcome or its own error, and an error of
the whole statement reaches every open of it and writes none."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from typing import Any

import asyncpg
import pytest

from bridge import metrics
from bridge.crypto import NumberVault, participant_number
from bridge.sessions import Sessions
from bridge.store import Store
from bridge.store.sessions import OPENS_PER_STATEMENT, Sealed, SessionTerms
from tests.live.conftest import SCRATCH_KEY, Harness, histogram_totals, opening
from tests.live.test_open_in_one_statement import fresh

NUMBERS = [f"+7495888{i:04d}" for i in range(40)]


@pytest.fixture(scope="module")
def harness(scratch_db: Harness) -> Harness:
    return scratch_db


TERMS = SessionTerms(region=None, ttl_seconds=600, idle_timeout_seconds=None, grace_seconds=0)


async def seal(h: Harness, number: str) -> Sealed:
    """A number as an open writes it, for a participant row of its own."""
    row = uuid.uuid4()
    return Sealed(id=row, idx=h.vault.index(number), enc=await h.vault.seal(number, participant_number(row)))


def statements() -> tuple[float, float]:
    """(statements, opens) sent so far by every process-wide batcher (the metric)."""
    return histogram_totals(metrics.SESSION_OPENS_PER_STATEMENT)


def test_opens_at_once_go_together_and_each_gets_its_own_outcome(harness: Harness) -> None:
    """60 opens at once through a pool of 4 connections: fewer statements than opens, none
    of more than OPENS_PER_STATEMENT; 50 distinct orders each open once, 10 opens of one
    order open one session between them, and every pair holds a number of its own."""
    async def scenario() -> None:
        await fresh(harness, NUMBERS)
        before = statements()
        results = await asyncio.gather(
            *(harness.sessions.open(opening(f"batch-{i}", f"+7916300{i:04d}", f"+7916400{i:04d}")) for i in range(50)),
            *(harness.sessions.open(opening("batch-same", "+79163009999", "+79164009999")) for _ in range(10)))
        count, sent = (a - b for a, b in zip(statements(), before, strict=True))
        # (sent: 60, and those sent again: an open after a statement's first that would have
        # waited for a lock, or that raced another for the same order or pair)
        assert sent >= 60 and sent / count > 1.5, f"{sent} opens in {count} statements"
        distinct, same = results[:50], results[50:]
        assert all(created for _, created in distinct)
        assert len({s.id for s, _ in distinct}) == 50
        assert len({s.id for s, _ in same}) == 1 and sum(created for _, created in same) == 1
        assert await harness.pool.fetchval("SELECT count(*) FROM sessions") == 51
        for session, _ in results:
            assert session == await harness.sessions.get(session.id)
        # Each pair's two people hold their number once (no open of the batch took another's).
        held = await harness.pool.fetch(
            "SELECT number_idx, pool_number, count(*) AS n FROM participants GROUP BY 1, 2 HAVING count(*) > 1")
        assert not held, held[:3]

    harness.run(scenario())


def test_an_open_that_fails_in_a_batch_fails_alone(harness: Harness) -> None:
    """One open of a batch breaks a check of the sessions table (an idle timeout of -5, which
    the API never sends): it gets the database's error for it, the others of its statement
    open, and nothing of it is written."""
    async def scenario() -> None:
        await fresh(harness, NUMBERS)
        repo = harness.store.sessions
        terms = TERMS

        async def sealed(number: str) -> Sealed:
            return await seal(harness, number)

        # The pool has 4 connections, one taken here: 4 opens take the other 3 (and wait to
        # write a session, the table locked here) and wait for the last; the next 9 wait for a
        # statement, and go in one once the lock goes.
        gate = await harness.pool.acquire()
        try:
            tx = gate.transaction()
            await tx.start()
            await gate.execute("LOCK TABLE sessions IN SHARE MODE")
            blocked = [asyncio.ensure_future(repo.open(f"first-{i}", await sealed(f"+7916500{i:04d}"),
                                                      await sealed(f"+7916600{i:04d}"), terms)) for i in range(4)]
            async with asyncio.timeout(10):
                while await gate.fetchval("SELECT count(*) FROM pg_locks WHERE NOT granted") < 3:
                    await asyncio.sleep(0.005)  # wait-ok: polling Postgres until three opens wait at the lock
            before = statements()
            batch = [asyncio.ensure_future(repo.open(
                f"second-{i}", await sealed(f"+7916700{i:04d}"), await sealed(f"+7916800{i:04d}"),
                dataclasses.replace(terms, idle_timeout_seconds=-5) if i == 4 else terms)) for i in range(9)]
            await tx.commit()
        finally:
            await harness.pool.release(gate)
        async with asyncio.timeout(10):
            opened = await asyncio.gather(*blocked)
            results = await asyncio.gather(*batch, return_exceptions=True)
        assert all(o.outcome == "opened" for o in opened)
        count, sent = (a - b for a, b in zip(statements(), before, strict=True))
        assert (count, sent) == (1, 9), "the nine went in one statement"
        failed = results.pop(4)
        assert isinstance(failed, asyncpg.CheckViolationError), failed
        assert failed.constraint_name == "sessions_idle_timeout_seconds_check"
        assert all(not isinstance(r, BaseException) and r.outcome == "opened" for r in results), results
        orders = {r["order_id"] for r in await harness.pool.fetch("SELECT order_id FROM sessions")}
        assert orders == {f"first-{i}" for i in range(4)} | {f"second-{i}" for i in range(9) if i != 4}
        assert not await harness.pool.fetchval("SELECT count(*) FROM session_events e WHERE NOT EXISTS ("
                                               "SELECT 1 FROM sessions s WHERE s.id = e.session_id)")

    harness.run(scenario())


def test_a_cancelled_statement_fails_every_open_of_it_and_writes_none(harness: Harness, stack: Any) -> None:
    """An operator's pg_cancel_backend (or a statement timeout) of a batch's statement: every
    open of it gets the error (a database error the API answers 503), and none is written.
    Through a pool of one connection: one open waits at a locked number, five wait behind it
    and go together."""
    async def scenario() -> None:
        await fresh(harness, NUMBERS[:5])
        pool = await asyncpg.create_pool(stack.database_url, min_size=1, max_size=1,
                                         server_settings={"search_path": "scratch_test_open_in_batches"})
        assert pool is not None
        try:
            vault = NumberVault(SCRATCH_KEY, Store(pool).number_keys)
            await vault.start()
            sessions = Sessions(Store(pool), vault, harness.sessions.policy)
            gate = await harness.pool.acquire()
            try:
                tx = gate.transaction()
                await tx.start()
                await gate.execute("SELECT 1 FROM pool_numbers FOR UPDATE")
                first = asyncio.ensure_future(sessions.open(opening("cancel-0", "+79169000000", "+79169100000")))
                backend = await waiting_backend(gate)
                rest = [asyncio.ensure_future(sessions.open(opening(f"cancel-{i}", f"+7916900000{i}",
                                                                    f"+7916910000{i}"))) for i in range(1, 6)]
                before = statements()
                await gate.execute("SELECT pg_cancel_backend($1)", backend)
                async with asyncio.timeout(10):
                    [one] = await asyncio.gather(first, return_exceptions=True)
                assert isinstance(one, asyncpg.QueryCanceledError), one
                # The five go next, together, and wait at the lock in their turn: cancelled too.
                async with asyncio.timeout(10):
                    while statements()[0] - before[0] < 1:
                        await asyncio.sleep(0.005)  # wait-ok: until the batcher sent the five's statement
                assert statements()[1] - before[1] == 5
                await gate.execute("SELECT pg_cancel_backend($1)", await waiting_backend(gate))
                async with asyncio.timeout(10):
                    others = await asyncio.gather(*rest, return_exceptions=True)
                assert all(isinstance(r, asyncpg.QueryCanceledError) for r in others), others
                await tx.rollback()
            finally:
                await harness.pool.release(gate)
            assert await harness.pool.fetchval("SELECT count(*) FROM sessions") == 0
            assert await harness.pool.fetchval("SELECT count(*) FROM participants") == 0
            # And the pool's connection serves the next open.
            session, created = await sessions.open(opening("cancel-after", "+79169200000", "+79169300000"))
            assert created and session.order_id == "cancel-after"
        finally:
            await pool.close()

    harness.run(scenario())


async def waiting_backend(gate: asyncpg.Connection) -> int:
    """The one backend waiting for a lock (an open's statement)."""
    async with asyncio.timeout(10):
        while True:
            pids = await gate.fetch("SELECT DISTINCT pid FROM pg_locks WHERE NOT granted")
            if pids:
                assert len(pids) == 1, pids
                return int(pids[0]["pid"])
            await asyncio.sleep(0.005)  # wait-ok: polling Postgres until the open waits at the lock


def test_a_statement_takes_at_most_its_share(harness: Harness) -> None:
    """More opens than a statement takes, behind a pool that is busy: none is of more than
    OPENS_PER_STATEMENT, and the database refuses more than 32 in one."""
    async def scenario() -> None:
        await fresh(harness, NUMBERS)
        before = statements()
        buckets_before = bucket_counts()
        results = await asyncio.gather(*(
            harness.sessions.open(opening(f"share-{i}", f"+7916310{i:04d}", f"+7916410{i:04d}")) for i in range(120)))
        assert all(created for _, created in results)
        after = bucket_counts()
        assert after[float("inf")] - buckets_before[float("inf")] == statements()[0] - before[0]
        over = (after[float("inf")] - after[OPENS_PER_STATEMENT]) - (
            buckets_before[float("inf")] - buckets_before[OPENS_PER_STATEMENT])
        assert over == 0, f"{over} statements of more than {OPENS_PER_STATEMENT} opens"
        with pytest.raises(asyncpg.ProgramLimitExceededError):
            await harness.pool.fetch("SELECT * FROM maskbridge_open_sessions($1, NULL, NULL, NULL, NULL, NULL, NULL,"
                                     " NULL, NULL, NULL)", [f"o-{i}" for i in range(33)])

    harness.run(scenario())


def bucket_counts() -> dict[float, float]:
    counts: dict[float, float] = {}
    for metric in metrics.SESSION_OPENS_PER_STATEMENT.collect():
        for sample in metric.samples:
            if sample.name.endswith("_bucket"):
                counts[float(sample.labels["le"])] = sample.value
    return counts


def test_an_open_that_waits_for_its_whole_tier_takes_a_number_once_one_is_free(harness: Harness) -> None:
    """Racing opens hold every number of an open's tier: it waits for one of them (drawn at
    random) and takes it once free, rather than giving up ("look again": its draw was made
    again for every row of the table, and matched none a third of the time). Straight through
    the repository, which does not look again; eight times."""
    async def scenario() -> None:
        for attempt in range(8):
            await fresh(harness, NUMBERS[:5])
            gate = await harness.pool.acquire()
            try:
                tx = gate.transaction()
                await tx.start()
                await gate.execute("SELECT 1 FROM pool_numbers FOR UPDATE")
                waiting = asyncio.ensure_future(harness.store.sessions.open(
                    f"whole-tier-{attempt}", await seal(harness, "+79169500000"), await seal(harness, "+79169600000"),
                    TERMS))
                async with asyncio.timeout(10):
                    while not waiting.done() and not await gate.fetchval(
                            "SELECT count(*) FROM pg_locks WHERE NOT granted"):
                        await asyncio.sleep(0.005)  # wait-ok: polling Postgres until the open waits at the lock
                await tx.commit()
            finally:
                await harness.pool.release(gate)
            async with asyncio.timeout(10):
                opening_ = await waiting  # (it raised Contended, "look again", before)
            assert opening_.outcome == "opened" and opening_.session is not None
            assert opening_.session.pool_number in NUMBERS[:5]

    harness.run(scenario())


def test_an_open_after_a_statements_first_does_not_wait_and_goes_first_in_the_next(
    harness: Harness, stack: Any
) -> None:
    """Two numbers, one locked here. Through a pool of one connection: X opens alone (the
    free number); then one statement holds a second open of X's order (the first of it:
    nothing to lock) and a new pair's open, whose only number left is the locked one. That
    open does not wait inside the statement: the statement answers X's order while the lock
    is still held here, and the open goes again, first in the next statement, which waits
    for the number and takes it once the lock goes."""
    async def scenario() -> None:
        free, locked = NUMBERS[:2]
        await fresh(harness, [free, locked])
        pool = await asyncpg.create_pool(stack.database_url, min_size=1, max_size=1,
                                         server_settings={"search_path": "scratch_test_open_in_batches"})
        assert pool is not None
        try:
            repo = Store(pool).sessions
            gate = await harness.pool.acquire()
            try:
                tx = gate.transaction()
                await tx.start()
                await gate.execute("SELECT 1 FROM pool_numbers WHERE number = $1 FOR UPDATE", locked)
                before = statements()
                first = asyncio.ensure_future(repo.open("next-x", await seal(harness, "+79169700000"),
                                                        await seal(harness, "+79169800000"), TERMS))
                again = asyncio.ensure_future(repo.open("next-x", await seal(harness, "+79169700000"),
                                                        await seal(harness, "+79169800000"), TERMS))
                later = asyncio.ensure_future(repo.open("next-y", await seal(harness, "+79169700001"),
                                                        await seal(harness, "+79169800001"), TERMS))
                async with asyncio.timeout(10):
                    opened, found = await asyncio.gather(first, again)
                assert opened.outcome == "opened" and opened.session is not None
                assert opened.session.pool_number == free
                assert found.outcome == "open_already" and found.session is not None
                assert found.session.id == opened.session.id
                await waiting_backend(gate)  # (the third statement: the later open, first now, waits)
                assert not later.done()
                count, sent = (a - b for a, b in zip(statements(), before, strict=True))
                assert (count, sent) == (3, 4), "alone, then two together, then the later one again"
                await tx.commit()
            finally:
                await harness.pool.release(gate)
            async with asyncio.timeout(10):
                took = await later
            assert took.outcome == "opened" and took.session is not None and took.session.pool_number == locked
        finally:
            await pool.close()

    harness.run(scenario())
