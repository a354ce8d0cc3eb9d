"""A large pool import refreshes pool_numbers' statistics at once (bridge/store/pools.py):
the session opens' plans are generic and kept per connection, and planned on the
statistics of an empty pool they read every active number to lock one."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest
from structlog.testing import capture_logs

from bridge.devstack.settings import Stack
from bridge.store.pools import ANALYZE_AFTER
from tests.live.conftest import Harness

TABLES = "recording_access, recordings, calls, session_events, participants, sessions, pool_numbers"
# The statement of maskbridge_open_session that locks one of four numbers drawn from the tier
# (sql/028), as a prepared statement under the function's plan_cache_mode.
PICK = """SELECT p.number FROM pool_numbers p
          WHERE p.number = ANY($1::text[]) AND p.state = 'active' AND p.mode = 'direct'
          ORDER BY random() LIMIT 1 FOR NO KEY UPDATE SKIP LOCKED"""


@pytest.fixture(scope="module")
def harness(scratch_db: Harness) -> Harness:
    return scratch_db


def _plan(rows: list) -> str:
    return "\n".join(r[0] for r in rows)


def test_a_large_import_makes_every_connection_plan_the_opens_again(harness: Harness) -> None:
    async def scenario() -> None:
        await harness.pool.execute(f"TRUNCATE {TABLES}")
        await harness.pool.execute("ANALYZE pool_numbers")  # (an empty pool, as at the first start)
        await harness.pools.import_numbers([{"number": f"+7495888{i:04d}", "region": "RU-MOW"} for i in range(3)])
        async with harness.pool.acquire() as conn:
            await conn.execute("SET plan_cache_mode = force_generic_plan")
            await conn.execute(f"PREPARE pick(text[]) AS {PICK}")
            try:
                before = _plan(await conn.fetch("EXPLAIN EXECUTE pick('{+74958880001}')"))
                analyzed = await harness.pool.fetchval(
                    "SELECT analyze_count FROM pg_stat_user_tables WHERE relid = 'pool_numbers'::regclass")
                counts = await harness.pools.import_numbers(
                    [{"number": f"+7495999{i:04d}", "region": "RU-MOW"} for i in range(2000)])
                assert counts["added"] == 2000
                after = _plan(await conn.fetch("EXPLAIN EXECUTE pick('{+74959990001}')"))
            finally:
                await conn.execute("DEALLOCATE pick")
        assert await harness.pool.fetchval(
            "SELECT analyze_count FROM pg_stat_user_tables WHERE relid = 'pool_numbers'::regclass") == analyzed + 1
        assert await harness.pool.fetchval("SELECT reltuples FROM pg_class WHERE oid = 'pool_numbers'::regclass") \
            == 2003
        # Planned on three numbers, the pick reads an index whole; planned again on 2003, it
        # looks the four numbers up.
        assert "Index Cond: (number = ANY" not in before, f"the premise changed (Postgres plans it well): {before}"
        assert "Index Cond: (number = ANY" in after, after

    harness.run(scenario())


def test_a_small_import_leaves_the_statistics_to_autovacuum(harness: Harness) -> None:
    async def scenario() -> None:
        analyzed = await harness.pool.fetchval(
            "SELECT analyze_count FROM pg_stat_user_tables WHERE relid = 'pool_numbers'::regclass")
        await harness.pools.import_numbers(
            [{"number": f"+7495777{i:04d}"} for i in range(ANALYZE_AFTER - 1)])
        assert await harness.pool.fetchval(
            "SELECT analyze_count FROM pg_stat_user_tables WHERE relid = 'pool_numbers'::regclass") == analyzed

    harness.run(scenario())


def test_an_import_whose_analyze_cannot_run_stands_and_waits_for_no_lock(harness: Harness, stack: Stack) -> None:
    """ANALYZE runs once the import committed, and waits for no lock: with the table held as
    a VACUUM holds it, the import is reported as done (it is), a warning says ANALYZE did not
    run, and the import does not wait for the VACUUM (nor would the imports queued behind
    it). (The 60 s bound only keeps a regression from hanging the suite: the import would
    otherwise wait for the lock as long as it is held.)"""
    async def scenario() -> None:
        schema = await harness.pool.fetchval("SELECT current_schema()")
        holder = await asyncpg.connect(stack.database_url, server_settings={"search_path": schema})
        try:
            tx = holder.transaction()
            await tx.start()
            await holder.execute("LOCK TABLE pool_numbers IN SHARE UPDATE EXCLUSIVE MODE")  # (as a VACUUM holds it)
            with capture_logs() as logs:
                counts = await asyncio.wait_for(harness.pools.import_numbers(
                    [{"number": f"+7495666{i:04d}"} for i in range(ANALYZE_AFTER)]), 60)
            await tx.rollback()
        finally:
            await holder.close()
        assert counts["added"] == ANALYZE_AFTER
        assert await harness.pool.fetchval(
            "SELECT count(*) FROM pool_numbers WHERE number LIKE '+7495666%'") == ANALYZE_AFTER
        failed = [e for e in logs if e["event"] == "pool.analyze_failed"]
        assert len(failed) == 1 and "lock timeout" in failed[0]["error"]

    harness.run(scenario())
