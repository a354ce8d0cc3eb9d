"""The call's first row (the route lookup's, on the call's critical path) commits without
waiting for the disk, for that statement alone; the call's next write waits, as every other
statement does. Against the real Postgres of the stack, in a schema of its own."""

from __future__ import annotations

import uuid

import pytest

from bridge.store.queries import NewCall, Store
from tests.live.conftest import Harness, opening


@pytest.fixture(scope="module")
def harness(scratch_db: Harness) -> Harness:
    return scratch_db


def test_the_route_lookup_commits_without_waiting_and_the_next_statement_waits(harness: Harness) -> None:
    async def scenario() -> None:
        await harness.pools.import_numbers([{"number": "+74957770901"}])
        session, _ = await harness.sessions.open(opening("commit-1", "+79161230901", "+79161230902"))
        call = NewCall(uuid.uuid4(), "+7495777****", "+7916123****", "in-commit-1")
        async with harness.pool.acquire() as conn:
            assert await conn.fetchval("SHOW synchronous_commit") == "on"
            store = Store(conn)  # type: ignore[arg-type]  # (one connection: the statement's own)
            async with conn.transaction():
                route, dialed = await store.route_and_record(
                    harness.vault.index("+79161230901"), session.pool_number, call)
                # (set for this transaction: the statement's own when it runs alone)
                assert await conn.fetchval("SHOW synchronous_commit") == "off"
            assert route is not None and route.session_id == session.id and dialed.known
            assert await conn.fetchval("SHOW synchronous_commit") == "on"
            assert await store.call_ended(call.id, "caller_cancelled", "caller", None, rung=False) is True
            assert await conn.fetchval("SHOW synchronous_commit") == "on"
            # A second end (a reconcile's, after a stopped process's statement committed) changes
            # nothing, and says so.
            assert await store.call_ended(call.id, "failed", "system", None) is False
        row = await harness.pool.fetchrow("SELECT session_id, state, outcome FROM calls WHERE id = $1", call.id)
        assert dict(row) == {"session_id": session.id, "state": "ended", "outcome": "caller_cancelled"}
        ended = await harness.pool.fetchval(
            "SELECT count(*) FROM webhook_outbox WHERE event = 'call.ended' AND payload->>'call_id' = $1", str(call.id))
        assert ended == (1 if harness.store.webhooks else 0)

    harness.run(scenario())
