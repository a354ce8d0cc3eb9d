"""The blocklist, with real calls: a blocked number is refused on every session, its calls in
progress end at once (blocked through the API or through maskbridge-admin), and unblocking
restores it."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid

from bridge.devstack.settings import PROJECT_DIR
from bridge.phone import mask
from tests.live.conftest import announced, last_call_of, wait_for_call_row


async def block(api, number: str, reason: str = "harassment reported") -> dict:
    status, entry = await api.request("POST", "/v1/blocklist", json={"number": number, "reason": reason})
    assert status == 201, entry
    return entry


async def unblock(api, entry: dict) -> None:
    status, _ = await api.request("DELETE", f"/v1/blocklist/{entry['id']}")
    assert status == 200


async def test_a_blocked_number_is_refused_on_every_session_until_unblocked(carrier, api, real_number, db):
    courier, client, other_client = real_number(), real_number(), real_number()
    first = await api.open_session(f"order-{uuid.uuid4()}", courier, client)
    second = await api.open_session(f"order-{uuid.uuid4()}", courier, other_client)
    entry = await block(api, courier)
    assert entry["number"] == mask(courier) and courier not in str(entry)
    try:
        for session in (first, second):
            carrier.phone(client, action="answer")
            carrier.phone(other_client, action="answer")
            await announced(carrier, courier, session["pool_number"])
            row = await last_call_of(db, session["pool_number"], courier)
            assert (row["outcome"], str(row["session_id"])) == ("blocked", session["id"])
        # Nobody is put through to a blocked number either.
        await announced(carrier, client, first["pool_number"])
        assert (await last_call_of(db, first["pool_number"], client))["outcome"] == "blocked"
        status, listed = await api.request("GET", "/v1/blocklist?limit=500")
        assert entry["id"] in [e["id"] for e in listed["items"]]
        status, again = await api.request("POST", "/v1/blocklist", json={"number": "8" + courier[2:]})
        assert status == 200 and again["id"] == entry["id"], "blocking twice is one entry"
    finally:
        await unblock(api, entry)
    carrier.phone(client, action="answer")
    leg = await carrier.call(courier, first["pool_number"], hangup_after=0.5)
    callee = await asyncio.wait_for(carrier.incoming.get(), 10)
    await asyncio.wait_for(leg.ended.wait(), 15)
    assert callee.number == client and callee.answered_at is not None, "unblocked: put through again"


async def test_blocking_ends_the_call_in_progress_at_once(carrier, api, real_number, db):
    courier, client = real_number(), real_number()
    session = await api.open_session(f"order-{uuid.uuid4()}", courier, client)
    carrier.phone(client, action="answer")
    leg = await carrier.call(courier, session["pool_number"])
    callee = await asyncio.wait_for(carrier.incoming.get(), 10)
    await asyncio.wait_for(leg.answered.wait(), 10)
    await wait_for_call_row(db, session["id"], "connected")

    entry = await block(api, courier)
    try:
        await asyncio.wait_for(leg.ended.wait(), 10)
        await asyncio.wait_for(callee.ended.wait(), 10)
        row = await wait_for_call_row(db, session["id"])
        assert (row["outcome"], row["hangup_by"], row["cut_reason"]) == ("answered", "system", "blocked")
        assert not leg.hung_up_itself and not callee.hung_up_itself
    finally:
        await unblock(api, entry)


async def test_blocking_from_the_admin_tool_ends_a_ringing_call_too(carrier, api, real_number, db):
    """maskbridge-admin runs in another process: the bridge hears of the block through Postgres."""
    courier, client = real_number(), real_number()
    session = await api.open_session(f"order-{uuid.uuid4()}", courier, client)
    carrier.phone(client, action="noanswer", ring_for=60)
    leg = await carrier.call(courier, session["pool_number"])
    callee = await asyncio.wait_for(carrier.incoming.get(), 10)
    await asyncio.wait_for(leg.ringing.wait(), 10)

    tool = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bridge.devstack", "admin", "--json", "block", "add", "-", "--reason", "test",
        cwd=PROJECT_DIR, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(tool.communicate((courier + "\n").encode()), 60)
    assert tool.returncode == 0, err.decode()
    assert courier not in out.decode(), "the tool shows the number masked"
    try:
        await asyncio.wait_for(callee.ended.wait(), 10)
        await asyncio.wait_for(leg.ended.wait(), 10)
        assert callee.answered_at is None
        row = await wait_for_call_row(db, session["id"])
        assert (row["outcome"], row["hangup_by"], row["cut_reason"]) == ("blocked", "system", "blocked")
    finally:
        entry_id = await db.fetchval("SELECT id FROM blocked_numbers ORDER BY created_at DESC LIMIT 1")
        await unblock(api, {"id": str(entry_id)})


async def test_bad_blocklist_requests_get_their_4xx(api, db):
    before = await db.fetchval("SELECT count(*) FROM blocked_numbers")
    for body, code in (
        ({"number": "junk"}, "invalid_input"),
        ({"number": "+79161234567", "reason": "x" * 501}, "invalid_input"),
        ({"number": "+79161234567", "extra": 1}, "invalid_input"),
        ({}, "invalid_input"),
    ):
        status, answer = await api.request("POST", "/v1/blocklist", json=body)
        assert (status, answer["error"]["code"]) == (422, code)
    for entry in (str(uuid.uuid4()), "nope"):
        status, answer = await api.request("DELETE", f"/v1/blocklist/{entry}")
        assert (status, answer["error"]["code"]) == (404, "block_not_found")
    assert await db.fetchval("SELECT count(*) FROM blocked_numbers") == before


async def test_the_client_blocks_the_courier_from_the_keypad(carrier, api, real_number, db, stack):
    """During a call the client keys MB_BLOCK_KEYS: the courier's leg is hung up, the client
    hears a confirmation, the block is recorded, and the courier reaches no one on this order."""
    courier, client = real_number(), real_number()
    session = await api.open_session(f"order-{uuid.uuid4()}", courier, client)
    pool = session["pool_number"]
    carrier.phone(client, action="answer")
    leg = await carrier.call(courier, pool)
    callee = await asyncio.wait_for(carrier.incoming.get(), 10)
    await asyncio.wait_for(callee.answered.wait(), 10)
    await wait_for_call_row(db, session["id"], "connected")

    await carrier.press(callee, stack.env["MB_BLOCK_KEYS"])
    await asyncio.wait_for(leg.ended.wait(), 10)
    await asyncio.wait_for(callee.ended.wait(), 15)
    assert leg.ended_at is not None and callee.ended_at is not None
    assert callee.ended_at - leg.ended_at > 0.3, "the client stayed on to hear the confirmation"
    row = await wait_for_call_row(db, session["id"])
    assert (row["outcome"], row["hangup_by"], row["cut_reason"]) == ("answered", "system", "blocked_by_client")

    status, events = await api.request("GET", f"/v1/sessions/{session['id']}/events")
    blocked = [e for e in events["items"] if e["kind"] == "blocked_by_client"]
    assert len(blocked) == 1 and blocked[0]["detail"]["participant"] == session["participants"]["courier"]["id"]
    await announced(carrier, courier, pool)
    assert (await last_call_of(db, pool, courier))["outcome"] == "blocked"
