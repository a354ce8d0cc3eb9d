"""Store.exclusive (housekeeping's "one process of all runs this") when the database kills the
connection holding the lock while its block runs, as an operator's pg_terminate_backend or a
failover does: the block ends as it would have (the lock went with the connection: nothing to
unlock), and the pool and the lock serve the next run. It used to fail the run with asyncpg's
InterfaceError, twice over: unlocking on the connection asyncpg had taken back, then closing it
(adversary of issue 14, a storm of terminated backends: `housekeeping.failed`)."""

from __future__ import annotations

import asyncio
import secrets

import asyncpg

from bridge.store import connect
from bridge.store.queries import Store


async def gone(killer: asyncpg.Connection, pid: int) -> None:
    async with asyncio.timeout(10):
        while await killer.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", pid):
            await asyncio.sleep(0.01)  # wait-ok: polling Postgres until the backend has exited


def test_a_lock_whose_connection_is_killed_under_its_block_ends_the_block_quietly(stack):
    async def scenario() -> None:
        pool = await connect(stack.database_url, max_size=2)
        killer = await asyncpg.connect(stack.database_url)
        store = Store(pool)
        key = secrets.randbelow(2**31 - 1) + 1
        try:
            for _ in range(3):
                async with store.exclusive(key) as held:
                    assert held
                    pid = await killer.fetchval("SELECT pid FROM pg_locks WHERE locktype = 'advisory' "
                                                "AND classid = 0 AND objid = $1 AND granted", key)
                    assert await killer.fetchval("SELECT pg_terminate_backend($1)", pid)
                    await gone(killer, pid)
                # The next run: the lock is free, and the pool serves.
                async with store.exclusive(key) as again:
                    assert again
                assert await pool.fetchval("SELECT 1") == 1
        finally:
            await killer.close()
            await pool.close()

    asyncio.run(scenario())
