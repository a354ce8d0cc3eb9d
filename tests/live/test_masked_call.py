"""A courier's call to the pool number rings the client, who sees only the pool number;
and the reverse. Every SIP message each phone received is scanned for the other side's
real number, with the trunk's identity settings off and on."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from bridge.devstack.carrier import Carrier, Leg
from bridge.devstack.audio import rms, samples, tone_share
from tests.live.conftest import pbx_ari, wait_for_call_row
from tests.live.siplog import SipLog, SipMessage, dialogs, ended_by_caller, logged, national_digits

IDENTITY_ON = {
    "MB_TRUNK_SEND_PAI": "yes",
    "MB_TRUNK_SEND_RPID": "yes",
    "MB_TRUNK_TRUST_ID_OUTBOUND": "yes",
}


async def talk(carrier: Carrier, caller: str, pool: str, *, hangup_after: float = 2.0) -> tuple[Leg, Leg]:
    leg = await carrier.call(caller, pool, tone=600, hangup_after=hangup_after)
    callee = await asyncio.wait_for(carrier.incoming.get(), 10)
    await asyncio.wait_for(leg.ended.wait(), 20)
    await asyncio.wait_for(callee.ended.wait(), 10)
    return leg, callee


def split_by_phone(messages: list[SipMessage], callee_number: str) -> tuple[list[SipMessage], list[SipMessage]]:
    """(messages of the calling phone's dialog, messages of the called phone's dialog),
    as the carrier received them from the PBX."""
    calling: list[SipMessage] = []
    called: list[SipMessage] = []
    for dialog in dialogs(messages).values():
        received = [m for m in dialog if m.direction == "received"]
        invited = any(m.kind == "request" and m.first_line.startswith(f"INVITE sip:{callee_number}@") for m in received)
        (called if invited else calling).extend(received)
    return calling, called


@pytest.mark.parametrize("identity", ["plain", "pai-rpid-trusted"])
@pytest.mark.parametrize("direction", ["courier-to-client", "client-to-courier"])
async def test_called_phone_sees_only_the_pool_number(
    direction, identity, carrier, api, real_number, sip_log: SipLog, trunk_identity
):
    trunk_identity(IDENTITY_ON if identity != "plain" else {})
    courier, client = real_number(), real_number()
    session = await api.open_session(f"order-{uuid.uuid4()}", courier, client)
    pool = session["pool_number"]
    caller, callee_number = (courier, client) if direction == "courier-to-client" else (client, courier)
    carrier.phone(callee_number, action="answer", tone=1000)
    mark = sip_log.mark()

    leg, callee = await talk(carrier, caller, pool)

    assert callee.number == callee_number, "the other participant's phone rang"
    assert callee.shown_number == pool
    assert callee.shown_name in ("", pool)
    assert leg.answered_at is not None and callee.answered_at is not None

    calling, called = split_by_phone(await logged(sip_log, mark, ended_by_caller(callee_number)), callee_number)
    assert any(m.first_line.startswith("INVITE") for m in called), "the called phone's INVITE is in the log"
    assert any(m.first_line.startswith("SIP/2.0 200") for m in calling), "the calling phone got its 200 OK"
    for msg in called:
        assert national_digits(caller) not in msg.text, f"caller's real number reached the called phone:\n{msg.text}"
    for msg in calling:
        assert national_digits(callee_number) not in msg.text, f"callee's real number reached the caller:\n{msg.text}"

    invite = next(m for m in called if m.first_line.startswith("INVITE"))
    assert pool in invite.header("From")[0]
    if identity == "plain":
        assert not invite.header("P-Asserted-Identity")
    else:
        # The settings are really on: the identity headers are there, and carry the pool number.
        assert invite.header("P-Asserted-Identity") and pool in invite.header("P-Asserted-Identity")[0]
        assert invite.header("Remote-Party-ID") and pool in invite.header("Remote-Party-ID")[0]


async def test_no_channel_of_a_call_holds_the_callers_real_number(stack, carrier, api, real_number, db):
    """Asterisk hands each leg the other's caller ID whenever a bridge is rebuilt: once the
    other phone rings, the caller's own leg holds the pool number as its caller ID, so there
    is nothing real to hand on (the interception routine is the layer above)."""
    courier, client = real_number(), real_number()
    session = await api.open_session(f"order-{uuid.uuid4()}", courier, client)
    carrier.phone(client, action="answer", listen=False)
    leg = await carrier.call(courier, session["pool_number"], listen=False)
    callee = await asyncio.wait_for(carrier.incoming.get(), 10)
    row = await wait_for_call_row(db, session["id"], state="connected")
    pbx = pbx_ari(stack)
    try:
        for channel_id in (row["inbound_channel_id"], row["outbound_channel_id"]):
            channel = await pbx.get_channel(channel_id)
            shown = f"{channel['caller']['number']} {channel['caller']['name']} {channel['connected']}"
            assert national_digits(courier) not in shown and national_digits(client) not in shown, shown
            assert channel["caller"]["number"] == session["pool_number"]
    finally:
        await pbx.close()
    await carrier.hangup(leg)
    await asyncio.wait_for(callee.ended.wait(), 10)


async def test_audio_flows_both_ways(carrier, api, real_number):
    courier, client = real_number(), real_number()
    session = await api.open_session(f"order-{uuid.uuid4()}", courier, client)
    carrier.phone(client, action="answer", tone=1000)

    leg, callee = await talk(carrier, courier, session["pool_number"], hangup_after=3.0)
    await asyncio.wait_for(leg.recorded.wait(), 10)
    await asyncio.wait_for(callee.recorded.wait(), 10)

    heard_by_caller, rate = samples(carrier.recording_path(leg))
    heard_by_callee, rate2 = samples(carrier.recording_path(callee))
    assert rms(heard_by_caller) > 500 and rms(heard_by_callee) > 500, "recordings are not silence"
    # Each side hears the other's tone (courier 600 Hz, client 1000 Hz), not its own.
    assert tone_share(heard_by_caller, rate, 1000) > 0.5
    assert tone_share(heard_by_caller, rate, 600) < 0.1
    assert tone_share(heard_by_callee, rate2, 600) > 0.5
    assert tone_share(heard_by_callee, rate2, 1000) < 0.1
