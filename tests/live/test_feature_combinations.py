"""Features that meet in one call: a recorded session reached by its order code, and a
client calling back to block the courier on a recorded session (the legs are held apart
while it rings there)."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import asyncpg

from tests.live.conftest import wait_for_call_row
from bridge.devstack.audio import samples, tone_share
from tests.live.test_order_code import call_in, open_order, shared_number  # noqa: F401 - a fixture


async def finished_recording(db: asyncpg.Connection, session_id: str, timeout: float = 15) -> dict[str, Any]:
    """The recording of the session's latest call once Asterisk has closed it."""
    async with asyncio.timeout(timeout):
        while True:
            row = await db.fetchrow(
                """SELECT r.* FROM recordings r JOIN calls c ON c.id = r.call_id
                   WHERE c.session_id = $1 ORDER BY r.started_at DESC LIMIT 1""", session_id)
            if row is not None and row["ended_at"] is not None:
                return dict(row)
            await asyncio.sleep(0.05)  # wait-ok: polling the database the bridge writes to


async def test_a_recorded_session_reached_by_its_order_code_is_recorded(
    carrier, api, db, real_number, shared_number
):
    pool, region = shared_number
    courier, client = real_number(), real_number()
    session = await open_order(api, courier, client, region, record=True)
    assert session["record"] is True and session["order_code"]
    carrier.phone(client, action="answer", tone=1000)
    leg = await call_in(carrier, db, courier, pool)
    await carrier.press(leg, session["order_code"])
    callee = await asyncio.wait_for(carrier.incoming.get(), 10)
    assert callee.shown_number == pool
    await asyncio.wait_for(callee.answered.wait(), 10)
    # The recording begins once both heard the consent announcement and were joined.
    async with asyncio.timeout(15):
        while not await db.fetchval(
            "SELECT count(*) FROM recordings r JOIN calls c ON c.id = r.call_id WHERE c.session_id = $1",
            session["id"],
        ):
            await asyncio.sleep(0.05)  # wait-ok: polling the database the bridge writes to
    # Audio flows through the recorded bridge: the caller hears the client's tone. Hanging up
    # the moment the recording row appears could leave a file of its header only.
    heard, rate = samples(await carrier.listen_to(leg, 1))
    assert tone_share(heard, rate, 1000) > 0.5, "the courier heard the client through the bridge"
    await carrier.hangup(leg)
    await asyncio.wait_for(callee.ended.wait(), 10)

    row = await wait_for_call_row(db, session["id"])
    assert (row["outcome"], row["record"]) == ("answered", True)
    recording = await finished_recording(db, session["id"])
    assert recording["call_id"] == row["id"] and recording["bytes"] > 44


async def test_a_client_calling_back_blocks_the_courier_on_a_recorded_session(carrier, api, db, real_number, stack):
    courier, client = real_number(), real_number()
    session = await api.open_session(f"order-{uuid.uuid4()}", courier, client, record=True)
    carrier.phone(courier, action="noanswer", ring_for=30)
    leg = await carrier.call(client, session["pool_number"], keys_on_early_media=stack.env["MB_BLOCK_KEYS"])
    courier_phone = await asyncio.wait_for(carrier.incoming.get(), 10)
    await asyncio.wait_for(courier_phone.ended.wait(), 10)
    await asyncio.wait_for(leg.ended.wait(), 15)
    assert courier_phone.answered_at is None and leg.answered_at is None
    row = await wait_for_call_row(db, session["id"])
    assert (row["outcome"], row["cut_reason"]) == ("blocked", "blocked_by_client")
    assert await db.fetchval("SELECT count(*) FROM recordings WHERE call_id = $1", row["id"]) == 0
