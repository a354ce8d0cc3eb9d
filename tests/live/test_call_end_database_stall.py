"""A call that ends while the database stalls: the phones are let go at once, and the call's
row says it ended (how, and when) as soon as the database answers again, not only when a
bridge next connects to Asterisk (bridge.calls.flow.write_late)."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg

from bridge.devstack.settings import Stack
from tests.live.conftest import wait_for_call_row

# The call's end, waiting on the lock held on calls.
END_WAITING = """SELECT pid, query_start FROM pg_stat_activity
                 WHERE datname = current_database() AND wait_event_type = 'Lock'
                   AND query LIKE '%UPDATE calls SET state = ''ended''%'"""


async def test_the_end_of_a_call_is_written_once_a_stalled_database_answers(
    stack: Stack, api, carrier, db, real_number
):
    courier, client = real_number(), real_number()
    session = await api.open_session(f"order-{uuid.uuid4()}", courier, client)
    carrier.phone(client, action="answer", tone=1000)
    leg = await carrier.call(courier, session["pool_number"], tone=600)
    callee = await asyncio.wait_for(carrier.incoming.get(), 10)
    await asyncio.wait_for(leg.answered.wait(), 10)
    connected = await wait_for_call_row(db, session["id"], "connected")

    holder = await asyncpg.connect(stack.database_url)
    held = holder.transaction()
    await held.start()
    try:
        await holder.execute("LOCK TABLE calls IN EXCLUSIVE MODE")  # (reads go on; writes wait)
        await carrier.hangup(leg)
        # The phones are let go while the database keeps the call's end waiting.
        await asyncio.wait_for(callee.ended.wait(), 10)
        async with asyncio.timeout(10):
            while not (first := await db.fetch(END_WAITING)):
                await asyncio.sleep(0.05)  # wait-ok: polling pg_stat_activity for the stuck end
        # The bridge gives up on that statement (its command timeout)...
        async with asyncio.timeout(20):
            while {tuple(r) for r in first} & {tuple(r) for r in await db.fetch(END_WAITING)}:
                await asyncio.sleep(0.1)  # wait-ok: polling pg_stat_activity until it is cancelled
        row = await db.fetchrow("SELECT state FROM calls WHERE id = $1", connected["id"])
        assert row["state"] == "connected", "nothing could be written while the lock was held"
        released = await db.fetchval("SELECT now()")
    finally:
        await held.rollback()
        await holder.close()
    # ...and sends it again once the database answers, without any reconnect.
    row = await wait_for_call_row(db, session["id"], "ended", timeout=20)
    assert row["id"] == connected["id"]
    assert (row["outcome"], row["hangup_by"]) == ("answered", "caller")
    assert row["answered_at"] is not None
    assert row["ended_at"] < released, "the row says when the call ended, not when it could be written"
