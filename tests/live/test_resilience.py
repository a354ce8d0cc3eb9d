"""When the bridge is down, callers hear that the service is unavailable (the dialplan's
fallback after Stasis), and the bridge picks up again once it is back."""

from __future__ import annotations

import asyncio
import uuid

from bridge.devstack import processes
from tests.live.audio import rms, samples


async def test_bridge_down_caller_hears_service_unavailable_then_recovers(stack, carrier, api, real_number):
    courier, client = real_number(), real_number()
    session = await api.open_session(f"order-{uuid.uuid4()}", courier, client)
    carrier.phone(client, action="answer")
    processes.stop_bridge(stack)
    try:
        leg = await carrier.call(courier, session["pool_number"])
        await asyncio.wait_for(leg.ended.wait(), 30)
        await asyncio.wait_for(leg.recorded.wait(), 10)
        assert carrier.incoming.empty(), "nothing is routed while the bridge is down"
        assert leg.answered_at is not None and leg.cause == 34
        heard, _ = samples(carrier.recording_path(leg))
        assert rms(heard) > 100, "the caller heard the announcement"
    finally:
        processes.start_bridge(stack)

    leg = await carrier.call(courier, session["pool_number"], hangup_after=1.0)
    callee = await asyncio.wait_for(carrier.incoming.get(), 10)
    await asyncio.wait_for(leg.ended.wait(), 15)
    assert callee.number == client and callee.answered_at is not None
