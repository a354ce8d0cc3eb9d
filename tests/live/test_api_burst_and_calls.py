"""An order system's burst of requests cannot hold calls up: the HTTP API's statements run on
database connections of their own (MB_API_DB_CONNECTIONS, bridge.app), at most that many at
once, and a call is routed while every one of them is stuck."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg

from bridge.devstack.settings import Stack

# The API's statements waiting on a lock in the stack's database.
LOCK_WAITERS = """SELECT count(*) FROM pg_stat_activity
                  WHERE datname = current_database() AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()"""


async def test_a_call_is_routed_while_every_api_connection_is_stuck(stack: Stack, api, carrier, db, real_number):
    api_connections = int(stack.env["MB_API_DB_CONNECTIONS"])
    courier, client = real_number(), real_number()
    session = await api.open_session(f"order-{uuid.uuid4()}", courier, client)
    carrier.phone(client, action="answer", tone=1000)

    # More opens at once than the API has connections, and than the calls' pool has (10).
    burst = [(f"order-{uuid.uuid4()}", real_number(), real_number()) for _ in range(api_connections + 12)]
    holder = await asyncpg.connect(stack.database_url)
    held = holder.transaction()
    await held.start()
    # Every open locks a pool number (and counts its holders in pool_numbers): it waits.
    # A call's route lookup only reads the table, which this lock allows.
    await holder.execute("LOCK TABLE pool_numbers IN EXCLUSIVE MODE")
    opens = [
        asyncio.create_task(api.request("POST", "/v1/sessions",
                                        json={"order_id": order, "courier_number": c, "client_number": k}))
        for order, c, k in burst
    ]
    leg = None
    try:
        async with asyncio.timeout(10):
            while await db.fetchval(LOCK_WAITERS) < api_connections:
                await asyncio.sleep(0.02)  # wait-ok: polling pg_stat_activity for the stuck statements
        leg = await carrier.call(courier, session["pool_number"], tone=600, hangup_after=0.5)
        callee = await asyncio.wait_for(carrier.incoming.get(), 10)
        assert callee.number == client, "the call rang the client"
        assert callee.shown_number == session["pool_number"]
        assert not [t for t in opens if t.done()], "the call went through while every open still waited"
        assert await db.fetchval(LOCK_WAITERS) == api_connections, \
            "the API has no more statements in the database at once than its connections"
    finally:
        await held.rollback()
        await holder.close()
    answers = await asyncio.wait_for(asyncio.gather(*opens), 30)
    for status, body in answers:
        assert status == 201, body  # nothing lost: each open waited its turn, then went through
        api.opened.append(body["id"])
    await asyncio.wait_for(leg.ended.wait(), 20)
    await asyncio.wait_for(callee.ended.wait(), 10)
