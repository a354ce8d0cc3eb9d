"""The blocklist, with real calls: a blocked number is refused on every session, its calls in
progress end at once (blocked through the API or through maskbridge-admin), and unblocking
restores it."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from datetime import datetime, timedelta, timezone

import asyncpg

from bridge.blocklist import Blocklist
from bridge.devstack.settings import PROJECT_DIR
from bridge.phone import mask
from tests.live.conftest import Harness, announced, last_call_of, wait_for_call_row


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
        # A number in the reason, however it is written (the reason is shown as it is).
        *(({"number": "+79161234567", "reason": f"calls from {written}"}, "invalid_input")
          for written in ("+7 916 777-77-77", "8_916_777_77_77", "+7916'777'7777", "+7916/777/7777",
                          "+7916\u2014777\u20147777", "8~916~777~77~77")),
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


async def test_a_block_with_a_ttl_is_listed_with_its_expiry_and_never_shortened(api, real_number):
    number = real_number()
    status, entry = await api.request("POST", "/v1/blocklist", json={"number": number, "ttl_seconds": 3600})
    assert status == 201 and entry["expires_at"] is not None
    try:
        expires = datetime.fromisoformat(entry["expires_at"])
        assert timedelta(minutes=59) < expires - datetime.now(timezone.utc) <= timedelta(hours=1)
        status, listed = await api.request("GET", "/v1/blocklist?limit=500")
        assert {e["id"]: e["expires_at"] for e in listed["items"]}[entry["id"]] == entry["expires_at"]
        # Blocking again: the later expiry wins, null (until unblocked) being the latest.
        status, shorter = await api.request("POST", "/v1/blocklist", json={"number": number, "ttl_seconds": 60})
        assert (status, shorter["id"], shorter["expires_at"]) == (200, entry["id"], entry["expires_at"])
        status, longer = await api.request("POST", "/v1/blocklist", json={"number": number, "ttl_seconds": 7200})
        assert status == 200 and datetime.fromisoformat(longer["expires_at"]) > expires
        status, forever = await api.request("POST", "/v1/blocklist", json={"number": number})
        assert (status, forever["expires_at"]) == (200, None)
        status, still = await api.request("POST", "/v1/blocklist", json={"number": number, "ttl_seconds": 60})
        assert (status, still["expires_at"]) == (200, None), "a block until unblocked is not shortened"
    finally:
        await unblock(api, entry)


async def test_an_expired_block_stops_blocking_before_any_housekeeping(carrier, api, real_number, db, stack):
    """The entry is still in the table (no sweep ran): from its expiry on it blocks nothing,
    is not listed, cannot be removed, and blocking the number again makes a new entry."""
    courier, client = real_number(), real_number()
    session = await api.open_session(f"order-{uuid.uuid4()}", courier, client)
    status, entry = await api.request("POST", "/v1/blocklist", json={"number": courier, "ttl_seconds": 3600})
    assert status == 201
    await announced(carrier, courier, session["pool_number"])
    assert (await last_call_of(db, session["pool_number"], courier))["outcome"] == "blocked"
    # Its hour has passed (written so, rather than waited for). The entry is then held locked
    # until the call is over: the 30 s housekeeping skips locked entries (FOR UPDATE SKIP
    # LOCKED), so that "no sweep ran" holds whenever this test runs; reads are not held up.
    await db.execute("UPDATE blocked_numbers SET expires_at = now() - interval '1 second' WHERE id = $1",
                     uuid.UUID(entry["id"]))
    holder = await asyncpg.connect(stack.database_url)
    try:
        async with holder.transaction():
            held = await holder.fetchval("SELECT count(*) FROM (SELECT 1 FROM blocked_numbers WHERE id = $1 "
                                         "FOR UPDATE) AS entry", uuid.UUID(entry["id"]))
            assert held == 1, "housekeeping deleted the entry before it could be held"
            carrier.phone(client, action="answer")
            leg = await carrier.call(courier, session["pool_number"], hangup_after=0.5)
            callee = await asyncio.wait_for(carrier.incoming.get(), 10)
            await asyncio.wait_for(leg.ended.wait(), 15)
            assert callee.number == client and callee.answered_at is not None, "expired: put through again"
            assert await db.fetchval("SELECT count(*) FROM blocked_numbers WHERE id = $1",
                                     uuid.UUID(entry["id"])) == 1
    finally:
        await holder.close()
    status, listed = await api.request("GET", "/v1/blocklist?limit=500")
    assert entry["id"] not in [e["id"] for e in listed["items"]]
    status, gone = await api.request("DELETE", f"/v1/blocklist/{entry['id']}")
    assert (status, gone["error"]["code"]) == (404, "block_not_found")
    again = await block(api, courier)  # (201: a new entry)
    assert again["id"] != entry["id"] and again["expires_at"] is None
    await unblock(api, again)


def test_housekeeping_deletes_expired_blocks_in_batches(scratch_db: Harness) -> None:
    h = scratch_db
    h.run(h.pool.execute("TRUNCATE blocked_numbers"))
    blocklist = Blocklist(h.store, h.vault)
    for i in range(5):
        h.run(blocklist.add(f"+7916444000{i}", None, 60))
    h.run(blocklist.add("+79164440010", None, 3600))  # not yet expired
    h.run(blocklist.add("+79164440011"))  # until unblocked
    expire = ("UPDATE blocked_numbers SET expires_at = now() - interval '1 second' "
              "WHERE expires_at < now() + interval '2 minutes'")
    h.run(h.pool.execute(expire))
    assert h.run(h.store.blocklist.remove_expired(batch=2)) == 5
    assert h.run(h.pool.fetchval("SELECT count(*) FROM blocked_numbers")) == 2
    # The session housekeeping (the bridges' sweep, maskbridge-admin housekeeping) runs it.
    h.run(blocklist.add("+79164440012", None, 60))
    h.run(h.pool.execute(expire))
    assert h.run(h.sessions.sweep()).get("blocks_expired") == 1
    assert h.run(h.pool.fetchval("SELECT count(*) FROM blocked_numbers")) == 2
