"""Calls to an order-code (shared) pool number against the scripted ARI fake: the prompt,
digits typed over it, `#`, `*`, timeouts, wrong codes, the lockout, and the caller hanging
up while keying. The harness (real dispatcher, flow and ARI client; fake ARI and store) is
the one of test_call_flow.py."""

from __future__ import annotations

import asyncio
import dataclasses
import re
from typing import Any

import asyncpg

from test_call_flow import CALLEE, CALLER, FAST, POOL, Harness, harness, logs  # noqa: F401 - fixtures

from bridge.calls.flood import UnknownCallers
from bridge.calls.order_code import KeypadTiming

CODE = "482913"
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
# Short keypad timeouts: a test that waits for one waits well under a second.
QUICK = dataclasses.replace(
    FAST, keypad=KeypadTiming(length=6, first_digit=0.3, between_digits=0.3, whole_entry=2.0)
)


async def _prompted(h: Harness, attempt: int = 1, inbound: str = "in-1") -> tuple[str, str]:
    """Until the caller hears the code prompt of `attempt`: (playback id, media)."""
    play = await h.fake.wait_request("POST", re.compile(rf"/ari/channels/{inbound}/play/.+-code-{attempt}$"))
    return play.path.rsplit("/", 1)[1], play.query["media"]


def _code_lookups(h: Harness) -> list[str]:
    return [args["order_code"] for op, _cid, args in h.store.ops if op == "route_by_code"]


async def test_the_right_code_typed_over_the_prompt_puts_the_call_through(harness) -> None:
    h = await harness(QUICK)
    route = h.store.add_order_code(CALLER, POOL, CODE, CALLEE)
    await h.fake.inbound_call("in-1", CALLER, POOL)

    await h.fake.wait_request("POST", "/ari/channels/in-1/answer")  # answered before the prompt
    playback, media = await _prompted(h)
    assert media == "sound:confbridge-pin"
    row = await h.store.state("in-1", "entering_code")

    await h.fake.press("in-1", CODE[:1])
    await h.fake.wait_request("DELETE", f"/ari/playbacks/{playback}")  # the first digit stops the prompt
    await h.fake.press("in-1", CODE[1:])  # the code's length ends the entry: no # needed

    create = await h.fake.wait_request("POST", "/ari/channels/create")
    assert create.query["endpoint"] == f"PJSIP/{CALLEE}@trunk"
    assert create.body["variables"]["CALLERID(num)"] == POOL  # the callee sees the shared number
    await h.fake.wait_request("POST", f"/ari/channels/{create.query['channelId']}/dial")
    row = await h.store.state("in-1", "ringing")
    assert row["session_id"] == route.session_id and row["callee_participant_id"] == route.callee_participant_id
    assert _code_lookups(h) == [CODE]
    await h.fake.answer(create.query["channelId"])
    await h.store.state("in-1", "connected")
    await h.fake.hangup("in-1")
    row = await h.store.ended("in-1")
    assert (row["outcome"], row["hangup_by"]) == ("answered", "caller")
    assert h.store.states[row["id"]] == ["routing", "entering_code", "ringing", "connected", "ended"]
    await h.settle()


async def test_a_wrong_code_is_asked_again_then_the_right_one_connects(harness) -> None:
    h = await harness(QUICK)
    h.store.add_order_code(CALLER, POOL, CODE, CALLEE)
    await h.fake.inbound_call("in-1", CALLER, POOL)
    await _prompted(h, 1)

    await h.fake.press("in-1", "12#")  # '#' ends a short entry
    _playback, media = await _prompted(h, 2)
    assert media == "sound:auth-incorrect"  # "Password incorrect. Please enter your password ..."
    await h.fake.press("in-1", "9*" + CODE)  # '*' starts the entry again

    await h.fake.wait_request("POST", "/ari/channels/create")
    assert _code_lookups(h) == ["12", CODE]
    assert h.store.wrong_codes == [(CALLER, POOL)]
    await h.fake.hangup("in-1")
    row = await h.store.ended("in-1")
    assert row["outcome"] == "caller_cancelled"
    await h.settle()


async def test_a_pause_ends_the_entry_and_nothing_keyed_is_no_wrong_code(harness) -> None:
    h = await harness(QUICK)
    h.store.add_order_code(CALLER, POOL, CODE, CALLEE)
    await h.fake.inbound_call("in-1", CALLER, POOL)
    playback, _ = await _prompted(h, 1)
    await h.fake.finish_playback(playback)
    # Nothing keyed within first_digit: asked again with the same prompt, no lookup.
    playback, media = await _prompted(h, 2)
    assert media == "sound:confbridge-pin"
    assert _code_lookups(h) == []
    await h.fake.finish_playback(playback)
    await h.fake.press("in-1", "4829")  # then a pause: the entry ends with what was keyed
    _playback, media = await _prompted(h, 3)
    assert _code_lookups(h) == ["4829"] and media == "sound:auth-incorrect"
    await h.fake.hangup("in-1")
    await h.store.ended("in-1")
    await h.settle()


async def test_too_many_wrong_codes_end_the_call_and_lock_the_caller_out(harness) -> None:
    h = await harness(QUICK)
    h.store.add_order_code(CALLER, POOL, CODE, CALLEE)
    h.fake.auto_finish_playback = False
    await h.fake.inbound_call("in-1", CALLER, POOL)
    await _prompted(h, 1)
    # All three at once: the digits queue up and each entry types over the next prompt.
    await h.fake.press("in-1", "111111222222333333")
    last = await h.fake.wait_request("POST", re.compile(r"/ari/channels/in-1/play/.+-announcement$"))
    assert last.query["media"] == "sound:confbridge-pin-bad"
    assert _code_lookups(h) == ["111111", "222222", "333333"]
    await h.fake.finish_playback(last.path.rsplit("/", 1)[1])
    delete = await h.fake.wait_request("DELETE", "/ari/channels/in-1")
    assert delete.query["reason"] == "normal"
    row = await h.store.ended("in-1")
    assert (row["outcome"], row["hangup_by"], row["session_id"]) == ("wrong_code", "system", None)
    await h.settle()
    assert h.fake.find("POST", "/ari/channels/create") == []

    # The next call, even about to key the right code, is refused without a prompt.
    h.fake.auto_finish_playback = True
    await h.fake.inbound_call("in-2", CALLER, POOL)
    row = await h.store.ended("in-2")
    assert (row["outcome"], row["hangup_by"]) == ("locked_out", "system")
    plays = h.fake.find("POST", re.compile(r"/ari/channels/in-2/play/.+"))
    assert [p.query["media"] for p in plays] == ["sound:im-sorry,sound:pls-try-call-later"]
    assert "entering_code" not in h.store.states[row["id"]]
    await h.settle()


async def test_a_caller_hanging_up_while_keying_leaves_a_clean_row(harness, logs) -> None:
    h = await harness(QUICK)
    h.store.add_order_code(CALLER, POOL, CODE, CALLEE)
    await h.fake.inbound_call("in-1", CALLER, POOL)
    await _prompted(h, 1)
    await h.fake.press("in-1", CODE[:3])
    await h.handled_event("ChannelDtmfReceived", "in-1")
    await h.fake.hangup("in-1")

    row = await h.store.ended("in-1")
    assert (row["outcome"], row["hangup_by"], row["session_id"]) == ("caller_cancelled", "caller", None)
    await h.settle()  # the call's task ended without an exception, nothing registered
    assert _code_lookups(h) == [] and h.store.wrong_codes == []
    assert h.fake.channels == {} and h.fake.bridges == {}
    assert not [e for e in logs if e.get("log_level") == "error"]
    # (a call's id is a random UUID, whose hex can hold any three digits: it is left out)
    assert not [e for e in logs if CODE[:3] in _UUID.sub("", repr(e))], "keyed digits are never logged"


async def test_a_caller_hanging_up_during_the_prompt_leaves_a_clean_row(harness) -> None:
    h = await harness(QUICK)
    h.store.add_order_code(CALLER, POOL, CODE, CALLEE)
    await h.fake.inbound_call("in-1", CALLER, POOL)
    await _prompted(h, 1)
    await h.fake.hangup("in-1")
    row = await h.store.ended("in-1")
    assert (row["outcome"], row["hangup_by"]) == ("caller_cancelled", "caller")
    await h.settle()
    assert h.fake.find("DELETE", "/ari/channels/in-1") == []


async def test_the_right_code_from_someone_outside_the_order_is_a_wrong_code(harness) -> None:
    h = await harness(QUICK)
    h.store.add_order_code(CALLEE, POOL, CODE, CALLER)  # the code is the other person's
    await h.fake.inbound_call("in-1", CALLER, POOL)
    await _prompted(h, 1)
    await h.fake.press("in-1", CODE)
    _playback, media = await _prompted(h, 2)
    assert media == "sound:auth-incorrect"
    assert h.store.wrong_codes == [(CALLER, POOL)]
    await h.fake.hangup("in-1")
    await h.store.ended("in-1")
    await h.settle()
    assert h.fake.find("POST", "/ari/channels/create") == []


async def test_a_caller_hanging_up_while_the_code_is_looked_up_rings_no_one(harness) -> None:
    h = await harness(QUICK)
    h.store.add_order_code(CALLER, POOL, CODE, CALLEE)
    h.store.code_gate = asyncio.Event()
    await h.fake.inbound_call("in-1", CALLER, POOL)
    await _prompted(h, 1)
    await h.fake.press("in-1", CODE)
    await h.store.wait(lambda: _code_lookups(h) == [CODE], "the code lookup")
    await h.fake.hangup("in-1")
    await h.handled_event("ChannelDestroyed", "in-1")
    h.store.code_gate.set()  # the right code comes back after the caller left

    row = await h.store.ended("in-1")
    assert (row["outcome"], row["hangup_by"]) == ("caller_cancelled", "caller")
    await h.settle()
    assert h.fake.find("POST", "/ari/channels/create") == []
    assert h.fake.channels == {} and h.fake.bridges == {}


async def test_a_database_failure_while_looking_up_the_code_tells_the_caller(harness) -> None:
    h = await harness(QUICK)
    h.store.add_order_code(CALLER, POOL, CODE, CALLEE)

    async def broken(*_args: Any, **_kw: Any) -> Any:
        raise asyncpg.PostgresConnectionError("database gone")

    h.store.route_by_code = broken  # type: ignore[method-assign]
    await h.fake.inbound_call("in-1", CALLER, POOL)
    await _prompted(h, 1)
    await h.fake.press("in-1", CODE)
    play = await h.fake.wait_request("POST", re.compile(r"/ari/channels/in-1/play/.+-unavailable$"))
    assert play.query["media"] == "sound:all-circuits-busy-now"
    await h.fake.finish_playback(play.path.rsplit("/", 1)[1])
    delete = await h.fake.wait_request("DELETE", "/ari/channels/in-1")
    assert delete.query["reason_code"] == "34"
    row = await h.store.ended("in-1")
    assert (row["outcome"], row["hangup_by"]) == ("failed", "system")
    await h.settle()


async def test_strangers_flooding_a_shared_number_are_refused_unanswered_its_people_are_not(harness) -> None:
    """Callers who are none of an order-code number's orders' people can key no code that
    routes: they count as unknown callers do, and beyond the limit (10 a minute per number)
    they are hung up unanswered (cause 21: SIP 403), never prompted. One of the orders'
    people is still asked for the code."""
    h = await harness(QUICK)
    h.dispatcher.unknown_callers = UnknownCallers(10, 100)  # (the bridge's defaults)
    h.store.add_order_code(CALLER, POOL, CODE, CALLEE)
    for i in range(10):
        await h.fake.inbound_call(f"in-s{i}", f"+7926000{i:04d}", POOL)
        await _prompted(h, inbound=f"in-s{i}")
    await h.fake.inbound_call("in-s10", "+79260000010", POOL)
    refused = await h.fake.wait_request("DELETE", "/ari/channels/in-s10")
    assert refused.query["reason_code"] == "21"
    assert h.fake.find("POST", "/ari/channels/in-s10/answer") == []
    assert h.fake.find("POST", re.compile(r"/ari/channels/in-s10/play/.+")) == []

    await h.fake.inbound_call("in-1", CALLER, POOL)
    await _prompted(h)
    for i in range(10):
        await h.fake.hangup(f"in-s{i}")
    await h.fake.hangup("in-1")
    await h.settle()
