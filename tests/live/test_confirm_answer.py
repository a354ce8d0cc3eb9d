"""The called phone confirms before the two are joined (the session term confirm_answer),
with real calls and real audio: it hears "you have an incoming call; press 1 to accept this
call, or 2 to reject it" while the caller hears ringback, and only a key of 1 joins them. A
voicemail or answering machine, which never presses 1, is never joined: nothing it plays
(a greeting that names its owner) reaches the caller."""

from __future__ import annotations

import asyncio
import uuid

from bridge.devstack.audio import rms, samples, tone_share
from tests.live.conftest import wait_for_call_row
from tests.live.test_announcements import envelope, prompt_envelope
from tests.live.test_order_code import likeness  # (either may start first: a sample starts a little into the prompt)
from tests.live.test_early_media import RINGBACK_HZ

CALLER_TONE, CALLEE_TONE = 600, 1000  # the courier's phone; the client's phone (or its voicemail greeting)


async def test_a_call_the_other_phone_confirms(stack, carrier, api, real_number, db):
    courier, client = real_number(), real_number()
    session = await api.open_session(f"order-{uuid.uuid4()}", courier, client, confirm_answer=True)
    assert session["confirm_answer"] is True
    carrier.phone(client, action="answer", tone=CALLEE_TONE, listen=False)
    leg = await carrier.call(courier, session["pool_number"], tone=CALLER_TONE, listen=False)
    callee = await asyncio.wait_for(carrier.incoming.get(), 10)
    await asyncio.wait_for(callee.answered.wait(), 10)
    await wait_for_call_row(db, session["id"], state="confirming")

    # While it is asked: the other phone hears the prompt; the caller, still unanswered,
    # hears ringback, and nothing of the other phone.
    asked, waiting = await asyncio.gather(carrier.listen_to(callee, 3), carrier.listen_to(leg, 3))
    heard, rate = samples(asked)
    assert likeness(envelope(heard, rate), prompt_envelope(stack, "en", "followme/no-recording")) > 0.5
    ringback, rate = samples(waiting)
    assert leg.answered_at is None
    assert rms(ringback) > 300 and tone_share(ringback, rate, RINGBACK_HZ) > 0.8
    assert tone_share(ringback, rate, CALLEE_TONE) < 0.05

    await carrier.press(callee, "1")
    await asyncio.wait_for(leg.answered.wait(), 10)
    await carrier.resume_tone(callee)
    caller_hears, callee_hears = await asyncio.gather(carrier.listen_to(leg, 2), carrier.listen_to(callee, 2))
    values, rate = samples(caller_hears)
    assert tone_share(values, rate, CALLEE_TONE) > 0.5, "joined: the caller hears the other phone"
    values, rate = samples(callee_hears)
    assert tone_share(values, rate, CALLER_TONE) > 0.5, "joined: the other phone hears the caller"
    await carrier.hangup(leg)
    await asyncio.wait_for(callee.ended.wait(), 10)
    row = await wait_for_call_row(db, session["id"])
    assert (row["outcome"], row["hangup_by"], row["confirm_answer"]) == ("answered", "caller", True)
    assert row["answered_at"] is not None


async def test_an_answering_machine_that_never_presses_1_is_never_joined(stack, carrier, api, real_number, db):
    """The client's voicemail answers at once and plays its greeting (its tone) and never
    presses a key: asked twice, it is hung up; the caller heard ringback all along and is
    told no answer; the call is not_confirmed and was never answered."""
    courier, client = real_number(), real_number()
    session = await api.open_session(f"order-{uuid.uuid4()}", courier, client, confirm_answer=True)
    carrier.phone(client, action="answer", answer_after=0.1, tone=CALLEE_TONE)  # records all it hears
    leg = await carrier.call(courier, session["pool_number"], tone=CALLER_TONE, listen=False)
    machine = await asyncio.wait_for(carrier.incoming.get(), 10)
    await wait_for_call_row(db, session["id"], state="confirming")
    waiting, rate = samples(await carrier.listen_to(leg, 3))
    assert tone_share(waiting, rate, RINGBACK_HZ) > 0.8 and tone_share(waiting, rate, CALLEE_TONE) < 0.05

    await asyncio.wait_for(leg.ended.wait(), 40)
    await asyncio.wait_for(machine.ended.wait(), 10)
    assert leg.answered_at is None, "the caller was never answered"
    assert leg.cause in (18, 19), "the caller was told no answer"
    assert not machine.hung_up_itself, "the bridge hung up the machine"
    row = await wait_for_call_row(db, session["id"])
    assert (row["outcome"], row["hangup_by"], row["hangup_cause"], row["answered_at"]) == (
        "not_confirmed", "system", 19, None)
    # What the machine heard: the prompt, twice; never the caller.
    await asyncio.wait_for(machine.recorded.wait(), 10)
    heard, rate = samples(carrier.recording_path(machine))
    assert likeness(envelope(heard, rate), prompt_envelope(stack, "en", "followme/no-recording")) > 0.5
    assert tone_share(heard, rate, CALLER_TONE) < 0.02


async def test_a_phone_that_presses_2_rejects_the_call(carrier, api, real_number, db):
    courier, client = real_number(), real_number()
    session = await api.open_session(f"order-{uuid.uuid4()}", courier, client, confirm_answer=True)
    carrier.phone(client, action="answer", tone=CALLEE_TONE, listen=False)
    leg = await carrier.call(courier, session["pool_number"], tone=CALLER_TONE, listen=False)
    callee = await asyncio.wait_for(carrier.incoming.get(), 10)
    await wait_for_call_row(db, session["id"], state="confirming")
    await carrier.press(callee, "2")
    await asyncio.wait_for(leg.ended.wait(), 10)
    await asyncio.wait_for(callee.ended.wait(), 10)
    assert leg.answered_at is None and leg.cause == 21
    row = await wait_for_call_row(db, session["id"])
    assert (row["outcome"], row["hangup_by"]) == ("rejected", "callee")


async def test_the_bridges_default_applies_to_sessions_opened_without_the_term(api, real_number):
    session = await api.open_session(f"order-{uuid.uuid4()}", real_number(), real_number())
    assert session["confirm_answer"] is False  # MB_CONFIRM_ANSWER, "no" in the tests
    status, answer = await api.request("POST", "/v1/sessions", json={
        "order_id": f"order-{uuid.uuid4()}", "courier_number": real_number(), "client_number": real_number(),
        "confirm_answer": "yes"})
    assert status == 422 and answer["error"]["details"]["field"] == "confirm_answer"
