"""Signed webhooks to the order system, from real calls: started, answered, ended and
blocked, with pseudonymous references only, retried when the order system fails."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import uuid

from tests.live.conftest import announced, wait_for_call_row


def verify(secret: str, delivery: dict) -> None:
    parts = dict(p.split("=", 1) for p in delivery["headers"]["X-Maskbridge-Signature"].split(","))
    expected = hmac.new(secret.encode(), f"{parts['t']}.".encode() + delivery["raw"], hashlib.sha256).hexdigest()
    assert hmac.compare_digest(parts["v1"], expected), "the signature verifies with the shared secret"
    assert delivery["headers"]["X-Maskbridge-Delivery"] == delivery["body"]["id"]
    assert delivery["headers"]["X-Maskbridge-Event"] == delivery["body"]["type"]


async def test_a_call_sends_started_answered_ended_signed_and_without_numbers(
    carrier, api, real_number, db, stack, webhooks
):
    courier, client = real_number(), real_number()
    order = f"order-{uuid.uuid4()}"
    session = await api.open_session(order, courier, client)
    carrier.phone(client, action="answer")
    leg = await carrier.call(courier, session["pool_number"], hangup_after=1.0)
    await asyncio.wait_for(leg.ended.wait(), 15)
    row = await wait_for_call_row(db, session["id"])

    got = await webhooks.events_of(str(row["id"]), {"call.started", "call.answered", "call.ended"})
    by_seq = sorted(got, key=lambda d: d["body"]["seq"])
    assert [d["body"]["type"] for d in by_seq] == ["call.started", "call.answered", "call.ended"]
    for delivery in got:
        verify(stack.env["MB_WEBHOOK_SECRET"], delivery)
        text = delivery["raw"].decode()
        assert courier[2:] not in text and client[2:] not in text, "no real number in a webhook"
    ended = by_seq[-1]["body"]["data"]
    assert ended["order_id"] == order and ended["session_id"] == session["id"]
    assert (ended["caller_role"], ended["callee_role"], ended["outcome"], ended["hangup_by"]) == (
        "courier", "client", "answered", "caller"
    )
    assert ended["caller_participant_id"] == session["participants"]["courier"]["id"]


async def test_a_failed_delivery_is_retried(carrier, api, real_number, db, webhooks):
    courier, client = real_number(), real_number()
    session = await api.open_session(f"order-{uuid.uuid4()}", courier, client)
    carrier.phone(client, action="answer")
    leg = await carrier.call(courier, session["pool_number"], hangup_after=1.0)
    # The order system fails the first delivery of each of this call's events from now on.
    async with asyncio.timeout(10):
        while (call_id := await db.fetchval("SELECT id FROM calls WHERE session_id = $1", session["id"])) is None:
            await asyncio.sleep(0.02)  # wait-ok: polling the database the bridge writes to
    webhooks.flaky.add(str(call_id))
    await asyncio.wait_for(leg.ended.wait(), 15)
    got = await webhooks.events_of(str(call_id), {"call.ended"}, timeout=30)
    ended = [d for d in got if d["body"]["type"] == "call.ended"][0]
    attempts = [d for d in webhooks.deliveries if d["body"]["id"] == ended["body"]["id"]]
    assert [d["status"] for d in attempts] == [503, 204], "refused once, delivered on the retry"
    # The bridge marks it delivered once it has the answer: wait for that, then count.
    async with asyncio.timeout(10):
        while (row := await db.fetchrow(
            "SELECT attempts, delivered_at FROM webhook_outbox WHERE id = $1", uuid.UUID(ended["body"]["id"])
        ))["delivered_at"] is None:
            await asyncio.sleep(0.02)  # wait-ok: polling the database the bridge writes to
    assert row["attempts"] == 2


async def test_a_refused_blocked_call_is_reported(carrier, api, real_number, db, webhooks):
    courier, client = real_number(), real_number()
    session = await api.open_session(f"order-{uuid.uuid4()}", courier, client)
    status, entry = await api.request("POST", "/v1/blocklist", json={"number": courier})
    assert status == 201
    try:
        await announced(carrier, courier, session["pool_number"])
        row = await wait_for_call_row(db, session["id"])
        got = await webhooks.events_of(str(row["id"]), {"call.blocked", "call.ended"})
        blocked = [d["body"]["data"] for d in got if d["body"]["type"] == "call.blocked"][0]
        assert (blocked["outcome"], blocked["caller_role"]) == ("blocked", "courier")
    finally:
        await api.request("DELETE", f"/v1/blocklist/{entry['id']}")
