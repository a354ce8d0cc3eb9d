"""Hangups, busy, no answer, unknown callers and closed sessions, through the real PBX;
each leaves its call row."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from bridge.devstack.audio import samples, tone_share
from bridge.phone import mask
from tests.live.conftest import announced, wait_for_call_row


async def open_pair(api, real_number):
    courier, client = real_number(), real_number()
    session = await api.open_session(f"order-{uuid.uuid4()}", courier, client)
    return session, courier, client


@pytest.mark.parametrize("who", ["caller", "callee"])
async def test_either_side_hanging_up_ends_both_legs(who, carrier, api, real_number, db):
    session, courier, client = await open_pair(api, real_number)
    carrier.phone(client, action="answer", hangup_after=1.5 if who == "callee" else None)

    leg = await carrier.call(courier, session["pool_number"], hangup_after=1.5 if who == "caller" else None)
    callee = await asyncio.wait_for(carrier.incoming.get(), 10)
    await asyncio.wait_for(leg.ended.wait(), 15)
    await asyncio.wait_for(callee.ended.wait(), 10)

    row = await wait_for_call_row(db, session["id"])
    assert row["outcome"] == "answered"
    assert row["hangup_by"] == who
    assert row["caller_role"] == "courier"
    assert row["answered_at"] is not None and row["ended_at"] is not None
    assert 1.0 <= float(row["duration_seconds"]) <= 5.0
    # The leg that did not hang up was hung up by the bridge (a BYE: normal clearing).
    other = callee if who == "caller" else leg
    assert other.cause == 16


@pytest.mark.parametrize(
    ("action", "outcome", "caller_causes"),
    [
        ("busy", "busy", {17}),
        ("reject", "rejected", {21}),
        ("noanswer", "no_answer", {18, 19}),
        ("unreachable", "unreachable", {27}),
    ],
)
async def test_refusal_of_the_other_phone_reaches_the_caller(
    action, outcome, caller_causes, carrier, api, real_number, db
):
    session, courier, client = await open_pair(api, real_number)
    carrier.phone(client, action=action, ring_for=1.0)

    leg = await carrier.call(courier, session["pool_number"])
    callee = await asyncio.wait_for(carrier.incoming.get(), 10)
    await asyncio.wait_for(leg.ended.wait(), 15)

    assert callee.number == client
    assert leg.answered_at is None, "the caller was never answered"
    assert leg.cause in caller_causes
    if action == "noanswer":
        assert leg.ringing.is_set(), "the caller heard ringing while the other phone rang"
    row = await wait_for_call_row(db, session["id"])
    assert row["outcome"] == outcome
    assert row["hangup_by"] == "callee"
    assert row["answered_at"] is None


async def test_ring_timeout_of_the_bridge_gives_no_answer(carrier, api, real_number, db, stack):
    """The other phone rings and rings: after MB_RING_TIMEOUT the caller hears no answer."""
    session, courier, client = await open_pair(api, real_number)
    carrier.phone(client, action="noanswer", ring_for=120)
    timeout = float(stack.env["MB_RING_TIMEOUT"])

    leg = await carrier.call(courier, session["pool_number"])
    callee = await asyncio.wait_for(carrier.incoming.get(), 10)
    await asyncio.wait_for(leg.ended.wait(), timeout + 10)
    await asyncio.wait_for(callee.ended.wait(), 5)

    assert leg.ringing.is_set()
    assert leg.cause in (18, 19)
    row = await wait_for_call_row(db, session["id"])
    assert (row["outcome"], row["hangup_by"]) == ("no_answer", "system")


async def test_caller_hanging_up_while_it_rings_cancels_the_other_phone(carrier, api, real_number, db):
    session, courier, client = await open_pair(api, real_number)
    carrier.phone(client, action="noanswer", ring_for=120)

    leg = await carrier.call(courier, session["pool_number"])
    callee = await asyncio.wait_for(carrier.incoming.get(), 10)
    await asyncio.wait_for(leg.ringing.wait(), 5)
    await carrier.hangup(leg)
    await asyncio.wait_for(callee.ended.wait(), 10)

    assert callee.answered_at is None
    row = await wait_for_call_row(db, session["id"])
    assert (row["outcome"], row["hangup_by"]) == ("caller_cancelled", "caller")


async def test_unknown_caller_hears_an_announcement_and_nothing_is_routed(carrier, api, real_number, db):
    session, courier, client = await open_pair(api, real_number)
    stranger = real_number()
    await announced(carrier, stranger, session["pool_number"])
    row = await db.fetchrow(
        "SELECT * FROM calls WHERE session_id IS NULL AND caller_masked = $1 ORDER BY started_at DESC LIMIT 1",
        mask(stranger),
    )
    assert row is not None and row["outcome"] == "unknown_caller" and row["state"] == "ended"


async def test_call_after_the_session_closed_is_not_routed(carrier, api, real_number, db):
    session, courier, client = await open_pair(api, real_number)
    await api.close_session(session["id"])
    await announced(carrier, courier, session["pool_number"])
    row = await db.fetchrow(
        "SELECT * FROM calls WHERE pool_number = $1 AND caller_masked = $2 ORDER BY started_at DESC LIMIT 1",
        session["pool_number"],
        mask(courier),
    )
    assert row is not None and row["outcome"] == "session_closed"
    assert str(row["session_id"]) == session["id"], "the attempt is linked to the closed session"


async def test_dtmf_passes_through_both_ways(carrier, api, real_number, db):
    """Keypad digits reach the other phone (e.g. a door code, an IVR), in both directions."""
    session, courier, client = await open_pair(api, real_number)
    carrier.phone(client, action="answer")
    leg = await carrier.call(courier, session["pool_number"])
    callee = await asyncio.wait_for(carrier.incoming.get(), 10)
    await asyncio.wait_for(leg.answered.wait(), 10)
    await wait_for_call_row(db, session["id"], "connected")

    await carrier.press(leg, "1#9")
    await carrier.wait_digits(callee, "1#9")
    await carrier.press(callee, "*0")
    await carrier.wait_digits(leg, "*0")
    await carrier.hangup(leg)
    await asyncio.wait_for(callee.ended.wait(), 10)


async def test_a_call_at_its_maximum_duration_is_warned_then_ended(carrier, api, real_number, db):
    """max_call_seconds=4: at 2 s before the end both hear three 1400 Hz beeps, then the
    bridge ends the call."""
    courier, client = real_number(), real_number()
    session = await api.open_session(f"order-{uuid.uuid4()}", courier, client, max_call_seconds=4)
    carrier.phone(client, action="answer")
    leg = await carrier.call(courier, session["pool_number"])
    callee = await asyncio.wait_for(carrier.incoming.get(), 10)
    await asyncio.wait_for(leg.ended.wait(), 15)
    await asyncio.wait_for(callee.ended.wait(), 10)
    await asyncio.wait_for(leg.recorded.wait(), 10)
    await asyncio.wait_for(callee.recorded.wait(), 10)

    assert not leg.hung_up_itself and not callee.hung_up_itself
    row = await wait_for_call_row(db, session["id"])
    assert (row["outcome"], row["hangup_by"], row["cut_reason"]) == ("answered", "system", "max_duration")
    assert 3.5 <= float(row["duration_seconds"]) <= 6.0
    for phone in (leg, callee):
        heard, rate = samples(carrier.recording_path(phone))
        before, after = heard[: int(rate * 1.5)], heard[int(rate * 1.5):]  # the warning comes at 2 s
        assert tone_share(before, rate, 1400) < 0.005, "no beep before the warning"
        assert tone_share(after, rate, 1400) > 0.02, "the warning beeps were heard"
