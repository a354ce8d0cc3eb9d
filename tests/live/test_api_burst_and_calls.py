"""An order system's burst of requests cannot hold calls up: the HTTP API's statements run on
database connections of their own (MB_API_DB_CONNECTIONS, bridge.app), at most that many at
once, and a call is routed while every one of them is stuck. A request whose connection the
database kills is answered 503, and the API goes on with new connections."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import asyncpg
import pytest

from bridge.devstack.settings import Stack

# The API's statements waiting on a lock in the stack's database.
LOCK_WAITERS = """SELECT pid FROM pg_stat_activity
                  WHERE datname = current_database() AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()"""


async def stuck_api_statements(db: asyncpg.Connection, count: int) -> list[int]:
    """The server pids of the `count` API statements waiting on the lock, once they all do."""
    async with asyncio.timeout(10):
        while len(pids := [r["pid"] for r in await db.fetch(LOCK_WAITERS)]) < count:
            await asyncio.sleep(0.02)  # wait-ok: polling pg_stat_activity for the stuck statements
    return pids


def session_opens(api, real_number) -> Callable[[], Awaitable[tuple[int, Any]]]:
    async def one() -> tuple[int, Any]:
        status, body = await api.request("POST", "/v1/sessions", json={
            "order_id": f"order-{uuid.uuid4()}", "courier_number": real_number(), "client_number": real_number()})
        if status == 201:
            api.opened.append(body["id"])
        return status, body
    return one


def recording_audits(stack: Stack, http: aiohttp.ClientSession) -> Callable[[], Awaitable[tuple[int, Any]]]:
    """Reads of the recordings' access audit: each is written to the audit first (the
    Recordings service), as a request for a recording is."""
    base = f"http://{stack.env['MB_API_BIND']}:{stack.env['MB_API_PORT']}"
    headers = {"Authorization": f"Bearer {stack.env['MB_RECORDING_TOKEN']}"}

    async def one() -> tuple[int, Any]:
        async with http.get(f"{base}/v1/recordings/access?limit=1", headers=headers) as resp:
            return resp.status, await resp.json(content_type=None)
    return one


@pytest.mark.parametrize(("kind", "table", "answered"), [
    # Every open locks a pool number (and counts its holders in pool_numbers): it waits.
    ("session opens", "pool_numbers", 201),
    ("recording audit reads", "recording_access", 200),
])
async def test_a_call_is_routed_while_every_api_connection_is_stuck(
    kind, table, answered, stack: Stack, api, carrier, db, real_number
):
    api_connections = int(stack.env["MB_API_DB_CONNECTIONS"])
    courier, client = real_number(), real_number()
    session = await api.open_session(f"order-{uuid.uuid4()}", courier, client)
    carrier.phone(client, action="answer", tone=1000)

    async with aiohttp.ClientSession() as http:
        request = session_opens(api, real_number) if table == "pool_numbers" else recording_audits(stack, http)
        holder = await asyncpg.connect(stack.database_url)
        held = holder.transaction()
        await held.start()
        # (A call's route lookup only reads pool_numbers, which this lock allows.)
        await holder.execute(f"LOCK TABLE {table} IN EXCLUSIVE MODE")
        # More requests at once than the API has connections, and than the calls' pool has (10).
        burst = [asyncio.create_task(request()) for _ in range(api_connections + 12)]
        leg = None
        try:
            await stuck_api_statements(db, api_connections)
            leg = await carrier.call(courier, session["pool_number"], tone=600, hangup_after=0.5)
            callee = await asyncio.wait_for(carrier.incoming.get(), 10)
            assert callee.number == client, "the call rang the client"
            assert callee.shown_number == session["pool_number"]
            assert not [t for t in burst if t.done()], f"the call went through while all the {kind} still waited"
            assert len(await db.fetch(LOCK_WAITERS)) == api_connections, \
                "the API has no more statements in the database at once than its connections"
        finally:
            await held.rollback()
            await holder.close()
        answers = await asyncio.wait_for(asyncio.gather(*burst), 30)
    assert [status for status, _ in answers] == [answered] * len(burst), answers  # each waited its turn
    await asyncio.wait_for(leg.ended.wait(), 20)
    await asyncio.wait_for(callee.ended.wait(), 10)


async def test_requests_whose_connections_the_database_kills_get_503_and_the_next_go_through(
    stack: Stack, api, db, real_number
):
    api_connections = int(stack.env["MB_API_DB_CONNECTIONS"])
    open_one = session_opens(api, real_number)
    holder = await asyncpg.connect(stack.database_url)
    held = holder.transaction()
    await held.start()
    await holder.execute("LOCK TABLE pool_numbers IN EXCLUSIVE MODE")
    try:
        stuck = [asyncio.create_task(open_one()) for _ in range(api_connections)]
        for pid in await stuck_api_statements(db, api_connections):
            assert await db.fetchval("SELECT pg_terminate_backend($1)", pid)
        answers = await asyncio.wait_for(asyncio.gather(*stuck), 10)
    finally:
        await held.rollback()
        await holder.close()
    for status, body in answers:
        assert status == 503 and body["error"]["code"] == "database_unavailable", body
    # The pool left no broken connection behind: every open after it goes through.
    again = await asyncio.wait_for(asyncio.gather(*(open_one() for _ in range(4 * api_connections))), 30)
    assert [status for status, _ in again] == [201] * len(again), again
