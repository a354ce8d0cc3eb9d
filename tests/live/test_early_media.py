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


async def _ringing_through_the_relay(carrier, api, real_number, net):
    """A courier's call to the client, placed through the relay and ringing: the session, the
    caller's and the callee's legs, and the Call-IDs of the calling and the called dialog."""
    courier, client = real_number(), real_number()
    session = await api.open_session(f"order-{uuid.uuid4()}", courier, client)
    carrier.phone(client, action="noanswer", ring_for=30)
    leg = await carrier.call(courier, session["pool_number"], via_network=True)
    callee = await asyncio.wait_for(carrier.incoming.get(), 10)
    await asyncio.wait_for(leg.ringing.wait(), 10)
    return session, leg, callee, net.dialog_of(courier), net.dialog_of(client)


def _relayed(net, mark: int, towards: str, call_id: str, first_line: str, method: str | None = None) -> bool:
    """Whether the relay passed, since `mark` and `towards` the PBX or the carrier, a message of
    the dialog `call_id` beginning with `first_line` (of the CSeq method `method`, if given)."""
    return any(r.towards == towards and r.message.call_id == call_id and r.message.text.startswith(first_line)
               and method in (None, r.message.cseq[1]) for r in net.since(mark))


async def test_an_answer_after_the_caller_left_is_hung_up(carrier, api, real_number, db, hostile_network):
    """The other phone answers after the caller left: the PBX has answered the caller's CANCEL
    (487) and sent its own CANCEL to the other phone, which the network loses, so the other
    phone's 200 OK crosses it. The other phone is hung up by the PBX (ACK, BYE), not left
    connected to no one; the caller never gets a 200 OK; the call counts as cancelled, not
    answered. (The order is made on the wire by the relay: with the two phones on their own,
    the 200 OK could reach the PBX before the caller's CANCEL, and the caller be answered.)"""
    net = hostile_network
    session, leg, callee, calling, called = await _ringing_through_the_relay(carrier, api, real_number, net)
    mark = net.mark()
    lose_cancels = net.rewrite(lambda msg, towards: [] if towards == "to_carrier" and msg.is_request
                               and msg.method == "CANCEL" and msg.call_id == called else None)
    try:
        await carrier.hangup(leg)
        await net.wait_for(lambda: _relayed(net, mark, "to_carrier", calling, "SIP/2.0 487", "INVITE")
                           and _relayed(net, mark, "to_carrier", called, "CANCEL "))
        await carrier.ari.answer(callee.channel_id)  # the 200 OK crosses the PBX's CANCEL
        await net.wait_for(lambda: _relayed(net, mark, "to_carrier", called, "BYE "))
    finally:
        net.stop_rewriting(lose_cancels)
    await asyncio.wait_for(callee.ended.wait(), 10)
    await asyncio.wait_for(leg.ended.wait(), 10)
    assert _relayed(net, mark, "to_pbx", called, "SIP/2.0 200", "INVITE"), "the other phone answered"
    assert not callee.hung_up_itself, "the PBX ended the other phone's call"
    assert not _relayed(net, mark, "to_carrier", calling, "SIP/2.0 200", "INVITE"), "the caller was never answered"
    row = await wait_for_call_row(db, session["id"])
    assert (row["outcome"], row["hangup_by"], row["answered_at"]) == ("caller_cancelled", "caller", None)


async def test_an_answer_that_reached_the_caller_before_its_cancel_counts(carrier, api, real_number, db,
                                                                          hostile_network):
    """The mirror order: the caller hangs up while it rings, but its CANCEL is late on the
    network, and the other phone's answer reaches the PBX first. The PBX answers the caller
    (its 200 OK crosses the CANCEL), and the caller's phone ends the call it got with a BYE: the
    call was answered, for an instant, and counts so (answered, by the caller), as the caller's
    network bills it."""
    net = hostile_network
    session, leg, callee, calling, _ = await _ringing_through_the_relay(carrier, api, real_number, net)
    mark = net.mark()
    hold_cancels = net.rewrite(lambda msg, towards: [] if towards == "to_pbx" and msg.is_request
                               and msg.method == "CANCEL" and msg.call_id == calling else None)
    try:
        await carrier.hangup(leg)
        await asyncio.wait_for(leg.ended.wait(), 10)
        await carrier.ari.answer(callee.channel_id)
        # the caller is answered
        await net.wait_for(lambda: _relayed(net, mark, "to_carrier", calling, "SIP/2.0 200", "INVITE"))
    finally:
        net.stop_rewriting(hold_cancels)
    await net.wait_for(lambda: _relayed(net, mark, "to_pbx", calling, "BYE ", "BYE"))  # and its phone ends that call
    await asyncio.wait_for(callee.ended.wait(), 10)
    assert not callee.hung_up_itself, "the PBX ended the other phone's call"
    row = await wait_for_call_row(db, session["id"])
    assert (row["outcome"], row["hangup_by"]) == ("answered", "caller") and row["answered_at"] is not None
