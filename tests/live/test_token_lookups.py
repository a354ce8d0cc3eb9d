"""Named API tokens looked up together (bridge.store.tokens._Lookups), against the real
Postgres of the stack in a schema of its own: the lookups that come while one statement
runs wait for it and go in the next one, all of them (one connection, not one each), and
each gets its own token; an error of a statement reaches the lookups of that statement
only."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator

import asyncpg
import pytest

from bridge import metrics
from bridge.store.tokens import TokenRepo, TokenRow
from bridge.tokens import TOUCH_RETRY, Tokens
from tests.live.conftest import Harness, histogram_totals


@pytest.fixture(scope="module")
def harness(scratch_db: Harness) -> Harness:
    return scratch_db


def statements() -> tuple[float, float]:
    """(statements, lookups) so far, from the metric (every repository of this process)."""
    return histogram_totals(metrics.TOKEN_LOOKUPS_PER_STATEMENT)


async def waiting_for_the_table(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval(
        "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = 'api_tokens'::regclass"))


async def until_waiting(conn: asyncpg.Connection, count: int) -> None:
    async with asyncio.timeout(10):
        while await waiting_for_the_table(conn) < count:
            await asyncio.sleep(0.005)  # wait-ok: polling Postgres until the statement waits at the lock


async def new_tokens(harness: Harness) -> dict[str, str]:
    """Three tokens (one revoked): their key ids by name."""
    tokens = Tokens(TokenRepo(harness.pool))
    suffix = secrets.token_hex(4)
    made = {}
    for name in ("alpha", "beta", "gone"):
        row, _ = await tokens.add(f"{name}-{suffix}", ["sessions:read"])
        made[name] = row.key_id
    await tokens.revoke(f"gone-{suffix}")
    return made


@contextlib.asynccontextmanager
async def table_locked(harness: Harness, repo: TokenRepo, key_id: str) -> AsyncIterator[
        tuple[asyncpg.Connection, asyncio.Future[TokenRow | None]]]:
    """A transaction that holds api_tokens locked (committed at the end), and a lookup of
    key_id whose statement waits at that lock."""
    gate = await harness.pool.acquire()
    try:
        async with gate.transaction():
            await gate.execute("LOCK TABLE api_tokens IN ACCESS EXCLUSIVE MODE")
            first = asyncio.ensure_future(repo.by_key_id(key_id))
            await until_waiting(gate, 1)
            yield gate, first
    finally:
        await harness.pool.release(gate)


def test_lookups_that_come_while_one_runs_go_together_on_one_connection(harness: Harness) -> None:
    """A lookup's statement waits at a lock; 30 more lookups come meanwhile (two tokens, a
    revoked one, key ids nobody has): none starts a statement of its own (one statement
    waits, and the pool's two other connections stay free), and once the lock goes they are all
    answered by one statement, each with its own token."""
    async def scenario() -> None:
        key = await new_tokens(harness)
        repo = TokenRepo(harness.pool)
        before = statements()
        async with table_locked(harness, repo, key["alpha"]) as (gate, first):
            asked = ["alpha"] * 10 + ["beta"] * 10 + ["gone"] * 5 + ["nobody"] * 5
            unknown = "zz" + secrets.token_hex(5)
            later = [asyncio.ensure_future(repo.by_key_id(key.get(name, unknown))) for name in asked]
            # The pool's two other connections are still there for anything else (one by one, the
            # 30 would have taken them, and this would wait behind them for ever).
            async with asyncio.timeout(5):
                assert await harness.pool.fetchval("SELECT 1") == 1
            assert await waiting_for_the_table(gate) == 1, "a later lookup started a statement of its own"
            assert all(not f.done() for f in later)
        async with asyncio.timeout(10):
            alone = await first
            rows = await asyncio.gather(*later)
        assert alone is not None and alone.key_id == key["alpha"]
        for name, row in zip(asked, rows, strict=True):
            if name == "nobody":
                assert row is None
            else:
                assert row is not None and row.key_id == key[name] and row.name.startswith(name)
                assert (row.revoked_at is not None) == (name == "gone")
        count, sent = (a - b for a, b in zip(statements(), before, strict=True))
        assert (count, sent) == (2, 31), "the first alone, the 30 that came meanwhile in one statement"

    harness.run(scenario())


def test_an_error_of_a_statement_reaches_its_lookups_only(harness: Harness) -> None:
    """The statement of a lookup is cancelled while it waits at a lock: that lookup gets the
    database's error; the lookups that came meanwhile go in the next statement and get
    their tokens, and so does one asked after."""
    async def scenario() -> None:
        key = await new_tokens(harness)
        repo = TokenRepo(harness.pool)
        async with table_locked(harness, repo, key["alpha"]) as (gate, first):
            later = [asyncio.ensure_future(repo.by_key_id(key[name])) for name in ("alpha", "beta")]
            await asyncio.sleep(0)  # wait-ok: one turn of the loop, in which both lookups register (no timing)
            cancelled = await gate.fetchval(
                "SELECT pg_cancel_backend(l.pid) FROM pg_locks l WHERE NOT l.granted "
                "AND l.relation = 'api_tokens'::regclass")
            assert cancelled
            with pytest.raises(asyncpg.QueryCanceledError):
                async with asyncio.timeout(10):
                    await first
            await until_waiting(gate, 1)  # (the next statement, with the two that came meanwhile)
        async with asyncio.timeout(10):
            rows = await asyncio.gather(*later)
            after = await repo.by_key_id(key["beta"])
        assert [r.key_id if r else None for r in rows] == [key["alpha"], key["beta"]]
        assert after is not None and after.key_id == key["beta"]

    harness.run(scenario())


def test_a_request_does_not_wait_for_a_transaction_holding_its_tokens_row(harness: Harness) -> None:
    """The once-a-minute write of a token's last use, when another transaction holds the
    token's row (the admin tool changing it, say): the request is answered at once, while
    that transaction still runs; the write skips the row, and the token's next request once
    the row is free makes it."""
    async def scenario() -> None:
        tokens = Tokens(TokenRepo(harness.pool))
        row, secret = await tokens.add(f"held-{secrets.token_hex(4)}", ["sessions:read"])
        holder = await harness.pool.acquire()
        try:
            async with holder.transaction():
                await holder.execute("UPDATE api_tokens SET rate_per_second = rate_per_second WHERE name = $1",
                                     row.name)
                async with asyncio.timeout(5):  # (the row stays held meanwhile: waiting on it never ends)
                    caller = await tokens.caller(f"Bearer {secret}")
                    await tokens.touches_written()
                assert caller.kind == "token" and caller.token == row.name
                assert await holder.fetchval("SELECT last_used_at FROM api_tokens WHERE name = $1",
                                             row.name) is None
            assert (await tokens.caller(f"Bearer {secret}")).kind == "token"
            await tokens.touches_written()
            assert await holder.fetchval("SELECT last_used_at FROM api_tokens WHERE name = $1",
                                         row.name) is not None
        finally:
            await harness.pool.release(holder)

    harness.run(scenario())


@pytest.mark.parametrize("lock", ["SHARE", "EXCLUSIVE"])
def test_a_table_lock_delays_neither_the_request_nor_the_next_ones(harness: Harness, lock: str) -> None:
    """A transaction holding api_tokens in a mode that an UPDATE waits for (an index being
    built takes SHARE): the requests of two tokens due for their last use are answered at
    once, and their write gives up after TOUCH_LOCK_WAIT_MS, not holding a connection
    meanwhile for longer; it is tried again by a request TOUCH_RETRY seconds later."""
    async def scenario() -> None:
        tokens = Tokens(TokenRepo(harness.pool))
        made = [await tokens.add(f"table-{i}-{secrets.token_hex(4)}", ["sessions:read"]) for i in range(2)]
        holder = await harness.pool.acquire()
        try:
            async with holder.transaction():
                await holder.execute(f"LOCK TABLE api_tokens IN {lock} MODE")
                async with asyncio.timeout(5):  # (the lock stays meanwhile: waiting on it never ends)
                    callers = [await tokens.caller(f"Bearer {secret}") for _, secret in made]
                    await tokens.touches_written()
                assert [c.kind for c in callers] == ["token", "token"]
                names = [row.name for row, _ in made]
                assert await holder.fetchval(
                    "SELECT count(*) FROM api_tokens WHERE name = ANY($1) AND last_used_at IS NOT NULL", names) == 0
            # The lock gone: a request at once is not due (the write failed lately), one
            # TOUCH_RETRY seconds later is.
            assert (await tokens.caller(f"Bearer {made[0][1]}")).kind == "token"
            await tokens.touches_written()
            assert await holder.fetchval("SELECT last_used_at FROM api_tokens WHERE name = $1", names[0]) is None
            for name in names:  # (as if TOUCH_RETRY seconds went by)
                tokens._touched[name] -= TOUCH_RETRY
            for _, secret in made:
                assert (await tokens.caller(f"Bearer {secret}")).kind == "token"
            await tokens.touches_written()
            assert await holder.fetchval(
                "SELECT count(*) FROM api_tokens WHERE name = ANY($1) AND last_used_at IS NOT NULL", names) == 2
        finally:
            await harness.pool.release(holder)

    harness.run(scenario())
