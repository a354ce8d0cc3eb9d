"""When the bridge is down, callers hear that the service is unavailable (the dialplan's
fallback after Stasis), and the bridge picks up again once it is back."""

from __future__ import annotations

import asyncio
import uuid

from bridge.devstack import postgres, processes
from bridge.devstack.audio import rms, samples
from tests.live.conftest import wait_for_call_row


async def unavailable_then_recovers(stack, carrier, api, real_number, down, up) -> None:
    """With `down` done, a caller hears that the service is unavailable (cause 34) and nothing
    rings; once `up` is done, calls are put through again."""
    courier, client = real_number(), real_number()
    session = await api.open_session(f"order-{uuid.uuid4()}", courier, client)
    carrier.phone(client, action="answer")
    await asyncio.to_thread(down, stack)
    try:
        leg = await carrier.call(courier, session["pool_number"])
        await asyncio.wait_for(leg.ended.wait(), 40)
        await asyncio.wait_for(leg.recorded.wait(), 10)
        assert carrier.incoming.empty(), "nothing is routed meanwhile"
        assert leg.answered_at is not None and leg.cause == 34
        heard, _ = samples(carrier.recording_path(leg))
        assert rms(heard) > 100, "the caller heard that the service is unavailable"
    finally:
        await asyncio.to_thread(up, stack)
        await asyncio.to_thread(processes.wait_healthy, stack)

    leg = await carrier.call(courier, session["pool_number"], hangup_after=1.0)
    callee = await asyncio.wait_for(carrier.incoming.get(), 10)
    await asyncio.wait_for(leg.ended.wait(), 15)
    assert callee.number == client and callee.answered_at is not None


async def test_bridge_down_caller_hears_service_unavailable_then_recovers(stack, carrier, api, real_number):
    """The dialplan's fallback after Stasis."""
    await unavailable_then_recovers(stack, carrier, api, real_number, processes.stop_bridge, processes.start_bridge)


async def test_restarted_bridge_resumes_a_connected_call_and_finishes_it(stack, carrier, api, real_number, db):
    """The state needed to finish a call is in Postgres, not only in the bridge's memory."""
    courier, client = real_number(), real_number()
    session = await api.open_session(f"order-{uuid.uuid4()}", courier, client)
    carrier.phone(client, action="answer")
    leg = await carrier.call(courier, session["pool_number"])
    callee = await asyncio.wait_for(carrier.incoming.get(), 10)
    await asyncio.wait_for(leg.answered.wait(), 10)
    await asyncio.wait_for(callee.answered.wait(), 10)
    await wait_for_call_row(db, session["id"], state="connected")

    processes.stop_bridge(stack)
    processes.start_bridge(stack)
    assert not leg.ended.is_set() and not callee.ended.is_set(), "the call stayed up across the restart"

    await carrier.hangup(leg)
    await asyncio.wait_for(callee.ended.wait(), 10)
    assert callee.cause == 16, "the resumed bridge hung up the other leg"
    row = await wait_for_call_row(db, session["id"])
    assert (row["outcome"], row["hangup_by"]) == ("answered", "caller")


async def test_database_down_caller_hears_service_unavailable_then_recovers(stack, carrier, api, real_number):
    """The bridge's own: routing fails, the caller is told."""
    await unavailable_then_recovers(stack, carrier, api, real_number, postgres.stop, postgres.start)


async def test_the_client_can_still_block_the_courier_on_a_call_resumed_after_a_restart(
    stack, carrier, api, real_number, db
):
    """A resumed call carries the router: the client's block keys still block (and end the call)."""
    courier, client = real_number(), real_number()
    session = await api.open_session(f"order-{uuid.uuid4()}", courier, client)
    carrier.phone(client, action="answer")
    leg = await carrier.call(courier, session["pool_number"])
    callee = await asyncio.wait_for(carrier.incoming.get(), 10)
    await asyncio.wait_for(callee.answered.wait(), 10)
    await wait_for_call_row(db, session["id"], state="connected")

    await asyncio.to_thread(processes.stop_bridge, stack)
    await asyncio.to_thread(processes.start_bridge, stack)
    assert not leg.ended.is_set() and not callee.ended.is_set(), "the call stayed up across the restart"

    await carrier.press(callee, stack.env["MB_BLOCK_KEYS"])
    await asyncio.wait_for(leg.ended.wait(), 10)
    await asyncio.wait_for(callee.ended.wait(), 15)
    row = await wait_for_call_row(db, session["id"])
    assert (row["outcome"], row["hangup_by"], row["cut_reason"]) == ("answered", "system", "blocked_by_client")
    status, events = await api.request("GET", f"/v1/sessions/{session['id']}/events")
    blocked = [e for e in events["items"] if e["kind"] == "blocked_by_client"]
    assert len(blocked) == 1 and blocked[0]["detail"]["participant"] == session["participants"]["courier"]["id"]
