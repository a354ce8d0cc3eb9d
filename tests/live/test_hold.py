"""Hold and resume from either side: the phone's re-INVITE (a=sendonly, then a=sendrecv)
keeps the call up, the held phone hears music on hold, and after resume both phones hear
each other again."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from bridge.devstack.audio import rms, samples, tone_share
from bridge.devstack.carrier import Carrier, Leg
from tests.live.conftest import wait_for_call_row
from tests.live.siplog import SipLog, reinvite_answered


async def hears(carrier: Carrier, leg: Leg, freq: int) -> tuple[float, float]:
    """(loudness, share of `freq`) of two seconds of what the phone of `leg` hears now."""
    heard, rate = samples(await carrier.listen_to(leg, 2))
    return rms(heard), tone_share(heard, rate, freq)


@pytest.mark.parametrize("holder", ["caller", "callee"])
async def test_hold_and_resume_keep_the_call_up(holder, carrier, api, real_number, db, sip_log: SipLog):
    courier, client = real_number(), real_number()
    session = await api.open_session(f"order-{uuid.uuid4()}", courier, client)
    leg, callee = await carrier.connected(
        courier, session["pool_number"], client, callee_phone={"tone": 1000, "listen": False}, tone=600, listen=False
    )
    holding, held = (leg, callee) if holder == "caller" else (callee, leg)

    mark = sip_log.mark()
    await carrier.hold(holding)
    ok = await reinvite_answered(sip_log, mark, "sendonly")
    assert "a=recvonly" in ok.text, "the PBX accepted the hold"
    loudness, _ = await hears(carrier, held, holding.tone)
    assert loudness > 300, "the held phone hears music on hold, not dead air"
    mark = sip_log.mark()
    await carrier.resume(holding)
    ok = await reinvite_answered(sip_log, mark, "sendrecv")
    assert "a=sendrecv" in ok.text

    assert not leg.ended.is_set() and not callee.ended.is_set(), "hold and resume kept the call up"
    assert (await hears(carrier, held, holding.tone))[1] > 0.5
    assert (await hears(carrier, holding, held.tone))[1] > 0.5
    await carrier.hangup(leg)
    await asyncio.wait_for(callee.ended.wait(), 10)
    row = await wait_for_call_row(db, session["id"])
    assert row["outcome"] == "answered" and row["hangup_by"] == "caller"
