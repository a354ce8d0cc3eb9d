"""Before the other phone answers: the caller hears ringback from the PBX, or the other
phone's own early media; a client calling back can block the courier while it rings; and
an answer that comes after the caller left is hung up, not connected."""

from __future__ import annotations

import asyncio
import uuid

from bridge.devstack.audio import rms, samples, tone_share
from tests.live.conftest import announced, last_call_of, wait_for_call_row

RINGBACK_HZ = 425  # asterisk-config/pbx/indications.conf: country ru, ring = 425/1000,0/4000


async def test_the_caller_hears_ringback_while_the_other_phone_rings(carrier, api, real_number, db):
    courier, client = real_number(), real_number()
    session = await api.open_session(f"order-{uuid.uuid4()}", courier, client)
    carrier.phone(client, action="noanswer", ring_for=30)
    leg = await carrier.call(courier, session["pool_number"], tone=600)
    callee = await asyncio.wait_for(carrier.incoming.get(), 10)
    await asyncio.wait_for(leg.ringing.wait(), 10)
    assert leg.early_media, "the PBX answered the ringing with 183 and SDP"
    # One whole cadence (1 s of tone, 4 s of silence), whenever it starts.
    heard, rate = samples(await carrier.listen_to(leg, 5))
    assert rms(heard) > 300 and tone_share(heard, rate, RINGBACK_HZ) > 0.8, "the caller hears ringback"
    await asyncio.wait_for(leg.ended.wait(), 10)  # MB_RING_TIMEOUT (6 s in the tests)
    await asyncio.wait_for(callee.ended.wait(), 10)
    row = await wait_for_call_row(db, session["id"])
    assert (row["outcome"], row["answered_at"]) == ("no_answer", None)


async def test_the_other_phones_early_media_reaches_the_caller(carrier, api, real_number, db):
    """The other phone sends early media of its own (its network's announcement, say): the
    PBX's ringback gives way to it, before any answer."""
    courier, client = real_number(), real_number()
    session = await api.open_session(f"order-{uuid.uuid4()}", courier, client)
    carrier.phone(client, action="noanswer", ring_for=30, early_media=True, tone=1000)
    leg = await carrier.call(courier, session["pool_number"], tone=600)
    callee = await asyncio.wait_for(carrier.incoming.get(), 10)
    await asyncio.wait_for(leg.ringing.wait(), 10)
    heard, rate = samples(await carrier.listen_to(leg, 2))
    assert tone_share(heard, rate, 1000) > 0.8 and tone_share(heard, rate, RINGBACK_HZ) < 0.05
    assert leg.answered_at is None and callee.answered_at is None

    await carrier.hangup(leg)
    await asyncio.wait_for(callee.ended.wait(), 10)
    row = await wait_for_call_row(db, session["id"])
    assert (row["outcome"], row["answered_at"]) == ("caller_cancelled", None)


async def test_a_client_calling_back_blocks_the_courier_while_it_rings(carrier, api, real_number, db, stack,
                                                                       webhooks):
    """The client calls the pool number and keys MB_BLOCK_KEYS before the courier answers:
    the courier's phone stops ringing, the client hears the confirmation (unanswered: the
    call costs the client nothing), the block is recorded and reported, and the courier
    reaches no one on this order."""
    courier, client = real_number(), real_number()
    session = await api.open_session(f"order-{uuid.uuid4()}", courier, client)
    pool = session["pool_number"]
    carrier.phone(courier, action="noanswer", ring_for=30)
    leg = await carrier.call(client, pool, keys_on_early_media=stack.env["MB_BLOCK_KEYS"])
    courier_phone = await asyncio.wait_for(carrier.incoming.get(), 10)
    confirmation = asyncio.create_task(carrier.listen_to(leg, 8))
    await asyncio.wait_for(courier_phone.ended.wait(), 10)
    await asyncio.wait_for(leg.ended.wait(), 15)
    assert not courier_phone.hung_up_itself and courier_phone.answered_at is None, "the PBX cancelled the ringing"
    assert leg.answered_at is None, "the client's call was never answered"
    assert leg.ended_at - courier_phone.ended_at > 0.3, "the client stayed on to hear the confirmation"
    heard, rate = samples(await confirmation)
    assert rms(heard) > 300, "the client heard something after keying"
    row = await wait_for_call_row(db, session["id"])
    assert (row["outcome"], row["hangup_by"], row["cut_reason"]) == ("blocked", "system", "blocked_by_client")
    delivered = await webhooks.events_of(str(row["id"]), {"call.blocked"})
    assert any(d["body"]["type"] == "call.blocked" for d in delivered)

    status, events = await api.request("GET", f"/v1/sessions/{session['id']}/events")
    blocked = [e for e in events["items"] if e["kind"] == "blocked_by_client"]
    assert len(blocked) == 1 and blocked[0]["detail"]["participant"] == session["participants"]["courier"]["id"]
    await announced(carrier, courier, pool)
    assert (await last_call_of(db, pool, courier))["outcome"] == "blocked"


async def test_an_answer_after_the_caller_left_is_hung_up(carrier, api, real_number, db):
    """The other phone answers just after the caller hung up (as soon as the carrier knows
    the caller is gone): it is hung up by the PBX, not left connected to no one, and the
    call counts as cancelled, not answered."""
    courier, client = real_number(), real_number()
    session = await api.open_session(f"order-{uuid.uuid4()}", courier, client)
    carrier.phone(client, action="noanswer", ring_for=30)
    leg = await carrier.call(courier, session["pool_number"])
    callee = await asyncio.wait_for(carrier.incoming.get(), 10)
    await asyncio.wait_for(leg.ringing.wait(), 10)

    await carrier.hangup(leg)
    await asyncio.wait_for(leg.ended.wait(), 10)
    try:
        await carrier.ari.answer(callee.channel_id)  # the 200 OK crosses the PBX's CANCEL
    except Exception:
        pass
    await asyncio.wait_for(callee.ended.wait(), 10)
    assert not callee.hung_up_itself, "the PBX ended the other phone's call"
    row = await wait_for_call_row(db, session["id"])
    assert (row["outcome"], row["hangup_by"], row["answered_at"]) == ("caller_cancelled", "caller", None)
