"""Shared pool numbers in order-code mode, through the real PBX: the caller keys the order's
code and reaches the other participant, who sees only the shared number; wrong codes are
asked again, then end the call and lock the caller out on that number; the prompts heard
are the prompt files (compared by loudness envelope, as in test_announcements.py)."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import asyncpg
import pytest

from bridge.crypto import NumberVault
from bridge.devstack.audio import rms, samples, tone_share
from bridge.devstack.carrier import Carrier, Leg
from bridge.phone import mask
from tests.live.conftest import wait_for_call_row, announced, last_call_of
from tests.live.test_announcements import envelope, prompt_envelope

LANGUAGE = "en"


def likeness(heard: list[float], prompt: list[float]) -> float:
    """The best normalised correlation of two envelopes, either one starting up to 0.6 s
    after the other (a sample taken by `listen_to` starts a little into the prompt)."""
    best = -1.0
    for shift in range(-30, 31):
        a, b = (heard[shift:], prompt) if shift >= 0 else (heard, prompt[-shift:])
        m = min(len(a), len(b))
        if m < 25:
            continue
        a, b = a[:m], b[:m]
        ma, mb = sum(a) / m, sum(b) / m
        cov = sum((x - ma) * (y - mb) for x, y in zip(a, b))
        norm = (sum((x - ma) ** 2 for x in a) * sum((y - mb) ** 2 for y in b)) ** 0.5 or 1.0
        best = max(best, cov / norm)
    return best


@pytest.fixture
async def shared_number(api, new_pool_number, fresh_region) -> tuple[str, str]:
    """An order-code number, the only number of a region of its own: (number, region)."""
    number = new_pool_number()
    status, body = await api.request("POST", "/v1/pool-numbers", json={"numbers": [
        {"number": number, "region": fresh_region, "language": LANGUAGE, "mode": "order_code"},
    ]})
    assert status == 201, body
    return number, fresh_region


async def open_order(api, courier: str, client: str, region: str, **terms: Any) -> dict[str, Any]:
    return await api.open_session(f"order-{uuid.uuid4()}", courier, client, mode="order_code", region=region, **terms)


async def entering_code(db: asyncpg.Connection, pool: str, caller: str) -> None:
    """Until the bridge asks `caller`'s latest call to `pool` for the code."""
    masked = mask(caller)
    async with asyncio.timeout(10):
        while await db.fetchval(
            "SELECT state FROM calls WHERE pool_number = $1 AND caller_masked = $2 ORDER BY started_at DESC LIMIT 1",
            pool, masked,
        ) != "entering_code":
            await asyncio.sleep(0.05)  # wait-ok: polling the database the bridge writes to


async def call_in(carrier: Carrier, db: asyncpg.Connection, caller: str, pool: str) -> Leg:
    """Call `pool` and wait until the bridge has answered and asks for the code."""
    leg = await carrier.call(caller, pool)
    await asyncio.wait_for(leg.answered.wait(), 10)
    await entering_code(db, pool, caller)
    return leg


def wrong(code: str) -> str:
    return "".join(str((int(d) + 1) % 10) for d in code)


async def wrong_codes_of(db: asyncpg.Connection, stack, caller: str, pool: str) -> int:
    idx = NumberVault(stack.env["MB_NUMBER_KEY"]).index(caller)
    return int(await db.fetchval(
        "SELECT count(*) FROM order_code_failures WHERE number_idx = $1 AND pool_number = $2", idx, pool
    ))


async def wrong_codes_seen(db: asyncpg.Connection, stack, caller: str, pool: str, count: int) -> None:
    """Until the bridge has recorded `count` wrong codes of `caller` on `pool`."""
    async with asyncio.timeout(10):
        while await wrong_codes_of(db, stack, caller, pool) < count:
            await asyncio.sleep(0.05)  # wait-ok: polling the database the bridge writes to


async def test_opening_in_order_code_mode_gives_the_shared_number_and_a_code(api, real_number, shared_number):
    pool, region = shared_number
    one = await open_order(api, real_number(), real_number(), region)
    two = await open_order(api, real_number(), real_number(), region, order_code="123456")
    for session in (one, two):
        assert (session["pool_number"], session["mode"]) == (pool, "order_code")
        assert len(session["order_code"]) == 6 and session["order_code"].isdigit()
    assert two["order_code"] == "123456" and one["order_code"] != two["order_code"]
    status, shown = await api.request("GET", f"/v1/sessions/{one['id']}")
    assert status == 200 and shown["order_code"] == one["order_code"]
    status, number = await api.request("GET", f"/v1/pool-numbers/{pool}")
    assert (number["mode"], number["live_sessions"]) == ("order_code", 2)


@pytest.mark.parametrize(
    ("terms", "field"),
    [
        ({"mode": "shared"}, "mode"),
        ({"mode": "order_code", "order_code": "12a456"}, "order_code"),
        ({"mode": "order_code", "order_code": "12345"}, "order_code"),
        ({"mode": "order_code", "order_code": "1234567"}, "order_code"),
        ({"mode": "order_code", "order_code": 123456}, "order_code"),
        ({"mode": "order_code", "order_code": "１２３４５６"}, "order_code"),  # fullwidth digits
        ({"order_code": "123456"}, "order_code"),  # a code for a direct session
    ],
)
async def test_bad_order_code_terms_are_refused_and_change_nothing(api, real_number, shared_number, terms, field):
    pool, region = shared_number
    order_id = f"order-{uuid.uuid4()}"
    status, body = await api.request("POST", "/v1/sessions", json={
        "order_id": order_id, "courier_number": real_number(), "client_number": real_number(), "region": region,
        **terms,
    })
    assert status == 422, body
    assert body["error"]["code"] == "invalid_input" and body["error"]["details"]["field"] == field
    status, listed = await api.request("GET", "/v1/sessions", params={"order_id": order_id})
    assert status == 200 and listed["items"] == []
    status, number = await api.request("GET", f"/v1/pool-numbers/{pool}")
    assert number["live_sessions"] == 0


async def test_the_direct_allocator_never_hands_out_an_order_code_number(api, real_number, db, shared_number):
    pool, region = shared_number
    for _ in range(3):
        session = await api.open_session(f"order-{uuid.uuid4()}", real_number(), real_number(), region=region)
        assert session["mode"] == "direct" and session["pool_number"] != pool
    assert await db.fetchval(
        """SELECT count(*) FROM sessions s JOIN pool_numbers p ON p.number = s.pool_number
           WHERE s.mode = 'direct' AND p.mode = 'order_code'"""
    ) == 0


async def test_the_mode_of_a_number_in_use_cannot_change(api, real_number, shared_number):
    pool, region = shared_number
    session = await open_order(api, real_number(), real_number(), region)
    status, body = await api.request("PATCH", f"/v1/pool-numbers/{pool}", json={"mode": "direct"})
    assert status == 409 and body["error"]["code"] == "pool_number_in_use", body
    status, body = await api.request("PATCH", f"/v1/pool-numbers/{pool}", json={"mode": "sideways"})
    assert status == 422 and body["error"]["details"]["field"] == "mode"
    await api.close_session(session["id"])
    # Closed: its participants no longer hold the shared number, so the mode can change.
    status, body = await api.request("PATCH", f"/v1/pool-numbers/{pool}", json={"mode": "direct"})
    assert status == 200 and body["mode"] == "direct", body


async def test_the_right_code_connects_and_the_other_phone_sees_only_the_shared_number(
    carrier, api, real_number, db, shared_number, webhooks
):
    """One courier, two orders on the same shared number: the code picks the order."""
    pool, region = shared_number
    courier, client, other_client = real_number(), real_number(), real_number()
    await open_order(api, courier, other_client, region)
    session = await open_order(api, courier, client, region)
    carrier.phone(client, action="answer", tone=1000)
    carrier.phone(other_client, action="answer", tone=1000)

    leg = await call_in(carrier, db, courier, pool)
    await carrier.press(leg, session["order_code"] + "#")
    callee = await asyncio.wait_for(carrier.incoming.get(), 10)
    assert callee.number == client, "the code picked the order"
    assert callee.shown_number == pool and callee.shown_name in ("", pool)
    await asyncio.wait_for(callee.answered.wait(), 10)
    await carrier.resume_tone(leg)  # pressing stopped the caller's tone

    heard_by_caller, heard_by_callee = await asyncio.gather(
        carrier.listen_to(leg, 2), carrier.listen_to(callee, 2)
    )
    caller_audio, rate = samples(heard_by_caller)
    callee_audio, rate2 = samples(heard_by_callee)
    assert rms(caller_audio) > 500 and rms(callee_audio) > 500, "recordings are not silence"
    assert tone_share(caller_audio, rate, 1000) > 0.5 and tone_share(caller_audio, rate, 600) < 0.1
    assert tone_share(callee_audio, rate2, 600) > 0.5 and tone_share(callee_audio, rate2, 1000) < 0.1

    await carrier.hangup(leg)
    await asyncio.wait_for(callee.ended.wait(), 10)
    row = await last_call_of(db, pool, courier)
    assert (row["outcome"], row["hangup_by"]) == ("answered", "caller")
    assert str(row["session_id"]) == session["id"]
    assert (row["caller_role"], row["callee_role"]) == ("courier", "client")
    assert carrier.incoming.empty(), "only the order's client rang"
    # The order system hears of it as of a direct call, the session named once the code did.
    got = await webhooks.events_of(str(row["id"]), {"call.started", "call.answered", "call.ended"})
    assert {d["body"]["data"]["session_id"] for d in got} == {session["id"]}
    assert session["order_code"] not in str([d["raw"] for d in got]), "the code is not in webhooks"


async def test_prompts_then_a_wrong_code_then_the_right_one(stack, carrier, api, real_number, db, shared_number):
    pool, region = shared_number
    courier, client = real_number(), real_number()
    session = await open_order(api, courier, client, region)
    carrier.phone(client, action="answer")
    prompts = {name: prompt_envelope(stack, LANGUAGE, name) for name in ("confbridge-pin", "auth-incorrect")}

    leg = await call_in(carrier, db, courier, pool)
    first = envelope(*samples(await carrier.listen_to(leg, 3)))
    await carrier.press(leg, wrong(session["order_code"]))  # the length ends the entry
    await wrong_codes_seen(db, stack, courier, pool, 1)  # the next prompt starts now
    second = envelope(*samples(await carrier.listen_to(leg, 3)))
    for heard, expected in ((first, "confbridge-pin"), (second, "auth-incorrect")):
        scores = {name: likeness(heard, prompt) for name, prompt in prompts.items()}
        assert scores[expected] > 0.5, (expected, scores)
        assert scores[expected] > max(v for k, v in scores.items() if k != expected) + 0.2, (expected, scores)

    await carrier.press(leg, session["order_code"])
    callee = await asyncio.wait_for(carrier.incoming.get(), 10)
    assert callee.number == client and callee.shown_number == pool
    await asyncio.wait_for(callee.answered.wait(), 10)
    # (The other phone answered; the bridge connects the two a moment later: the caller
    # hangs up once the call is connected, not as its answer crosses the hangup.)
    await wait_for_call_row(db, session["id"], state="connected")
    await carrier.hangup(leg)
    row = await last_call_of(db, pool, courier)
    assert row["outcome"] == "answered" and str(row["session_id"]) == session["id"]


async def test_a_right_code_from_someone_outside_the_order_is_a_wrong_code(
    stack, carrier, api, real_number, db, shared_number
):
    pool, region = shared_number
    courier, client, stranger = real_number(), real_number(), real_number()
    session = await open_order(api, courier, client, region)
    carrier.phone(client, action="answer")
    carrier.phone(courier, action="answer")

    leg = await call_in(carrier, db, stranger, pool)
    await carrier.press(leg, session["order_code"] + "#")
    await wrong_codes_seen(db, stack, stranger, pool, 1)
    await carrier.hangup(leg)
    row = await last_call_of(db, pool, stranger)
    assert (row["outcome"], row["hangup_by"], row["session_id"]) == ("caller_cancelled", "caller", None)
    assert carrier.incoming.empty(), "no phone rang"


async def test_wrong_codes_end_the_call_and_lock_the_caller_out(stack, carrier, api, real_number, db, shared_number):
    pool, region = shared_number
    courier, client = real_number(), real_number()
    session = await open_order(api, courier, client, region)
    code = session["order_code"]
    carrier.phone(client, action="answer")
    carrier.phone(courier, action="answer")

    leg = await call_in(carrier, db, courier, pool)
    # Three wrong codes in a row, each typed over the prompt that follows the one before.
    await carrier.press(leg, wrong(code) * 3)
    await asyncio.wait_for(leg.ended.wait(), 30)
    await asyncio.wait_for(leg.recorded.wait(), 10)
    assert leg.cause == 16 and not leg.hung_up_itself, "the PBX hung up"
    row = await last_call_of(db, pool, courier)
    assert (row["outcome"], row["hangup_by"], row["session_id"]) == ("wrong_code", "system", None)
    assert await wrong_codes_of(db, stack, courier, pool) == 3
    # The last thing heard: "you have entered too many invalid PINs".
    heard = envelope(*samples(carrier.recording_path(leg)))
    last = prompt_envelope(stack, LANGUAGE, "confbridge-pin-bad")
    assert likeness(heard[-(len(last) + 30):], last) > 0.5

    # Locked out: the next call, even with the right code at hand, is told to try later
    # and never asked for a code.
    await announced(carrier, courier, pool)
    row = await last_call_of(db, pool, courier)
    assert (row["outcome"], row["hangup_by"]) == ("locked_out", "system")
    assert await db.fetchval(
        "SELECT count(*) FROM calls WHERE id = $1 AND answered_at IS NULL", row["id"]
    ) == 1

    # The client is not affected: their right code reaches the courier.
    leg = await call_in(carrier, db, client, pool)
    await carrier.press(leg, code)
    callee = await asyncio.wait_for(carrier.incoming.get(), 10)
    assert callee.number == courier and callee.shown_number == pool
    await asyncio.wait_for(callee.answered.wait(), 10)
    await carrier.hangup(leg)
    row = await last_call_of(db, pool, client)
    assert row["outcome"] == "answered"


async def test_a_caller_hanging_up_while_keying_leaves_a_clean_row(stack, carrier, api, real_number, db, shared_number):
    pool, region = shared_number
    courier, client = real_number(), real_number()
    session = await open_order(api, courier, client, region)
    carrier.phone(client, action="answer")

    leg = await call_in(carrier, db, courier, pool)
    before, rate = samples(await carrier.listen_to(leg, 1))
    assert rms(before) > 100, "the prompt plays"
    await carrier.press(leg, session["order_code"][:3])
    # The first key stopped the prompt (5 s long): the caller hears silence, not the rest.
    after, rate = samples(await carrier.listen_to(leg, 2))
    assert rms(after[rate:]) < 50, rms(after[rate:])
    await carrier.hangup(leg)
    row = await last_call_of(db, pool, courier)
    assert (row["outcome"], row["hangup_by"], row["session_id"]) == ("caller_cancelled", "caller", None)
    assert row["answered_at"] is None and row["outbound_channel_id"] is None
    assert await wrong_codes_of(db, stack, courier, pool) == 0, "an entry cut short is no wrong code"
    assert carrier.incoming.empty(), "no phone rang"
    # Nothing is left behind: the next call of the same caller is asked for the code again.
    leg = await call_in(carrier, db, courier, pool)
    await carrier.press(leg, session["order_code"])
    callee = await asyncio.wait_for(carrier.incoming.get(), 10)
    assert callee.number == client
    await carrier.hangup(leg)
    await asyncio.wait_for(callee.ended.wait(), 10)


async def test_the_sessions_caps_apply_to_calls_by_code(carrier, api, real_number, db, shared_number):
    pool, region = shared_number
    courier, client = real_number(), real_number()
    session = await open_order(api, courier, client, region, calls_per_day=1)
    carrier.phone(client, action="answer")

    leg = await call_in(carrier, db, courier, pool)
    await carrier.press(leg, session["order_code"])
    callee = await asyncio.wait_for(carrier.incoming.get(), 10)
    await asyncio.wait_for(callee.answered.wait(), 10)
    await carrier.hangup(leg)
    await asyncio.wait_for(callee.ended.wait(), 10)
    assert (await last_call_of(db, pool, courier))["outcome"] == "answered"

    # The day's one call was put through: the right code now hears "try later".
    leg = await call_in(carrier, db, courier, pool)
    await carrier.press(leg, session["order_code"])
    await asyncio.wait_for(leg.ended.wait(), 30)
    assert leg.cause == 16 and not leg.hung_up_itself
    row = await last_call_of(db, pool, courier)
    assert (row["outcome"], row["hangup_by"]) == ("call_limit", "system")
    assert str(row["session_id"]) == session["id"] and row["caller_role"] == "courier"
    assert carrier.incoming.empty(), "no phone rang"


async def test_callers_of_a_russian_shared_number_are_asked_in_russian(
    stack, carrier, api, real_number, db, new_pool_number, fresh_region
):
    pool = new_pool_number()
    status, _ = await api.request("POST", "/v1/pool-numbers", json={"numbers": [
        {"number": pool, "region": fresh_region, "language": "ru", "mode": "order_code"},
    ]})
    assert status == 201
    caller = real_number()
    leg = await call_in(carrier, db, caller, pool)
    heard = envelope(*samples(await carrier.listen_to(leg, 3)))
    scores = {lang: likeness(heard, prompt_envelope(stack, lang, "confbridge-pin")) for lang in ("en", "ru")}
    assert scores["ru"] > 0.5 and scores["ru"] > scores["en"] + 0.2, scores
    await carrier.hangup(leg)
    row = await last_call_of(db, pool, caller)
    assert (row["outcome"], row["hangup_by"]) == ("caller_cancelled", "caller")
