"""A PBX holding MB_PBX_MAX_CALLS calls from the trunk refuses the next one at once, with a
503 that names nobody: the caller's phone is never answered, no phone rings, the bridge never
sees the call. Once a call ends, the room it held is there again.

The limit is the dialplan's global MAX_CALLS (asterisk-config/pbx/extensions.conf), rendered
from MB_PBX_MAX_CALLS; the test lowers it over ARI for its own calls and puts it back."""

from __future__ import annotations

import asyncio
import uuid

from tests.live.conftest import max_calls, wait_for_call_row
from tests.live.siplog import SipLog, dialogs, logged, national_digits


async def test_a_call_beyond_the_limit_is_refused_with_503_and_the_room_comes_back(
        stack, carrier, api, db, real_number, sip_log: SipLog):
    courier, client = real_number(), real_number()
    other_courier, other_client = real_number(), real_number()
    first = await api.open_session(f"order-{uuid.uuid4()}", courier, client)
    second = await api.open_session(f"order-{uuid.uuid4()}", other_courier, other_client)
    carrier.phone(client, action="answer", listen=False)
    carrier.phone(other_client, action="answer", listen=False, hangup_after=0.5)
    async with max_calls(stack, 1):
        held = await carrier.call(courier, first["pool_number"], listen=False)
        callee = await asyncio.wait_for(carrier.incoming.get(), 10)
        await wait_for_call_row(db, first["id"], state="connected")

        # The PBX holds one call: the next is refused before anything happens to it.
        mark = sip_log.mark()
        refused = await carrier.call(other_courier, second["pool_number"], listen=False)
        await asyncio.wait_for(refused.ended.wait(), 10)
        assert refused.cause == 34, "the caller's network was told: congestion (SIP 503)"
        assert not refused.answered.is_set() and not refused.early_media
        messages = await logged(sip_log, mark, lambda got: any(m.first_line.startswith("SIP/2.0 503") for m in got))
        (dialog,) = [d for d in dialogs(messages).values() if any(m.first_line.startswith("SIP/2.0 503") for m in d)]
        answers = [m.first_line for m in dialog if m.direction == "received" and m.kind == "response"]
        assert answers[-1].startswith("SIP/2.0 503") and not any(a.startswith(("SIP/2.0 18", "SIP/2.0 200"))
                                                                  for a in answers), answers
        for message in dialog:
            for number in (courier, client, other_client):
                assert national_digits(number) not in message.text, message.text
        assert carrier.incoming.empty(), "no phone rang for the refused call"
        assert await db.fetchval("SELECT count(*) FROM calls WHERE session_id = $1", uuid.UUID(second["id"])) == 0, \
            "the bridge never saw it"

        # The held call ends: its room is there again, and the same caller gets through.
        await carrier.hangup(held)
        await asyncio.wait_for(callee.ended.wait(), 10)
        again = await carrier.call(other_courier, second["pool_number"], listen=False, hangup_after=0.5)
        other = await asyncio.wait_for(carrier.incoming.get(), 10)
        assert other.number == other_client and other.shown_number == second["pool_number"]
        await asyncio.wait_for(again.ended.wait(), 15)
        assert again.answered_at is not None
