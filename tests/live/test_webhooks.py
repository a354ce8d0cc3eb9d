"""Signed webhooks to the order system, from real calls: started, answered, ended and
blocked, with pseudonymous references only, retried when the order system fails."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import uuid

from bridge.store.webhooks import WebhookRepo
from tests.live.conftest import Harness, announced, wait_for_call_row


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


def test_the_outbox_keeps_finished_events_for_the_retention_only(scratch_db: Harness) -> None:
    """Against the real Postgres, in a schema of its own: events delivered or given up before
    the retention are deleted, in batches; newer ones, and pending ones however old, stay."""
    h = scratch_db
    h.run(h.pool.execute("TRUNCATE webhook_outbox"))
    rows = {  # (delivered, failed) that many days ago; None: not
        "delivered_old": (8, None), "gave_up_old": (None, 8), "delivered_recently": (6, None),
        "gave_up_recently": (None, 0), "pending_old": (None, None),
    }
    copies = 3  # with batches of 2, the old ones take three statements
    for name, (delivered, failed) in rows.items():
        for _ in range(copies):
            h.run(h.pool.execute(
                """INSERT INTO webhook_outbox (event, payload, created_at, delivered_at, failed_at)
                   VALUES ('call.ended', jsonb_build_object('name', $1::text), now() - interval '9 days',
                           now() - make_interval(days => $2), now() - make_interval(days => $3))""",
                name, delivered, failed,
            ))
    repo = WebhookRepo(h.pool)
    assert h.run(repo.prune(7, batch=2)) == 2 * copies
    left = h.run(h.pool.fetch("SELECT payload->>'name' AS name, count(*) AS n FROM webhook_outbox GROUP BY 1"))
    assert {r["name"]: r["n"] for r in left} == {"delivered_recently": copies, "gave_up_recently": copies,
                                                "pending_old": copies}
    assert h.run(repo.prune(7)) == 0, "nothing more is due"
    assert h.run(repo.prune(1, batch=2)) == copies, "a shorter retention reaches the newer ones"
