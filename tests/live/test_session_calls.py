"""Sessions over their whole life, proven with real calls through the PBX: a reassigned
courier, expiry (absolute and after inactivity), a pair cooling off after its order, the
grace period to support. Time passing is simulated by moving the session's timestamps in
the database, never by sleeping."""

from __future__ import annotations

import asyncio
import os
import sys
import uuid

from bridge.devstack.audio import rms, samples
from bridge.app import LISTENER_NAME
from bridge.phone import mask
from tests.live.conftest import announced, last_call_of, wait_for_call_row


async def talk(carrier, caller: str, dialed: str, callee: str):
    """Place a call that the callee answers; returns (caller leg, callee leg) once both ended."""
    carrier.phone(callee, action="answer")
    leg = await carrier.call(caller, dialed, hangup_after=1.0)
    other = await asyncio.wait_for(carrier.incoming.get(), 10)
    await asyncio.wait_for(leg.ended.wait(), 15)
    await asyncio.wait_for(other.ended.wait(), 10)
    assert leg.answered_at is not None and other.answered_at is not None
    return leg, other


async def test_reassigned_courier_reaches_the_client_and_the_old_one_does_not(carrier, api, real_number, db):
    first, second, client = real_number(), real_number(), real_number()
    session = await api.open_session(f"order-{uuid.uuid4()}", first, client)
    pool = session["pool_number"]
    status, after = await api.request(
        "POST", f"/v1/sessions/{session['id']}/participants", json={"role": "courier", "number": second}
    )
    assert status == 201, after
    courier = after["participants"]["courier"]
    assert courier["number"] == mask(second)
    assert after["participants"]["client"]["proxy_number"] == pool, "the client keeps their number"

    # The new courier calls the client: the client still sees the number they were given.
    _, at_client = await talk(carrier, second, courier["proxy_number"], client)
    assert at_client.number == client and at_client.shown_number == pool
    # The client calls back on that number and reaches the new courier, who is shown
    # the number they themselves dial.
    _, at_courier = await talk(carrier, client, pool, second)
    assert at_courier.number == second and at_courier.shown_number == courier["proxy_number"]
    row = await wait_for_call_row(db, session["id"])
    assert (row["caller_role"], row["callee_role"]) == ("client", "courier")
    assert str(row["callee_participant_id"]) == courier["id"]

    # The first courier has left the order: told so, never connected.
    await announced(carrier, first, pool)
    assert (await last_call_of(db, pool, first))["outcome"] == "session_closed"

    status, events = await api.request("GET", f"/v1/sessions/{session['id']}/events")
    assert [e["kind"] for e in events["items"]] == ["opened", "courier_reassigned"]


async def test_expired_session_routes_nothing(carrier, api, real_number, db):
    courier, client = real_number(), real_number()
    session = await api.open_session(f"order-{uuid.uuid4()}", courier, client)
    await db.execute("UPDATE sessions SET expires_at = now() - interval '1 second' WHERE id = $1", session["id"])

    await announced(carrier, courier, session["pool_number"])
    assert (await last_call_of(db, session["pool_number"], courier))["outcome"] == "session_closed"
    status, read = await api.request("GET", f"/v1/sessions/{session['id']}")
    assert (read["status"], read["end_reason"]) == ("closed", "expired")
    status, events = await api.request("GET", f"/v1/sessions/{session['id']}/events")
    assert [e["kind"] for e in events["items"]] == ["opened", "expired"]


async def test_session_idle_too_long_routes_nothing_and_a_call_keeps_it_alive(carrier, api, real_number, db):
    courier, client = real_number(), real_number()
    session = await api.open_session(f"order-{uuid.uuid4()}", courier, client, idle_timeout_seconds=600)
    pool = session["pool_number"]
    # Nine idle minutes: the session is still live, and a call resets the clock.
    await db.execute("UPDATE sessions SET last_activity_at = now() - interval '9 minutes' WHERE id = $1", session["id"])
    await talk(carrier, courier, pool, client)
    status, read = await api.request("GET", f"/v1/sessions/{session['id']}")
    assert read["status"] == "open"
    assert await db.fetchval(
        "SELECT last_activity_at > now() - interval '1 minute' FROM sessions WHERE id = $1", session["id"]
    )
    # Eleven idle minutes: it has ended.
    await db.execute("UPDATE sessions SET last_activity_at = now() - interval '11 minutes' WHERE id = $1", session["id"])
    await announced(carrier, client, pool)
    status, read = await api.request("GET", f"/v1/sessions/{session['id']}")
    assert (read["status"], read["end_reason"]) == ("closed", "inactive")


async def test_cooled_off_pair_is_never_connected_to_the_numbers_next_holders(
    carrier, api, real_number, db, fresh_region, new_pool_number
):
    number = new_pool_number()
    await api.import_pool([number], fresh_region)
    courier, client = real_number(), real_number()
    old = await api.open_session(f"order-{uuid.uuid4()}", courier, client, region=fresh_region)
    assert old["pool_number"] == number, "the region's only number is preferred"
    await api.close_session(old["id"])

    # The number goes to a new order of other people while the old pair cools off.
    new_courier, new_client = real_number(), real_number()
    new = await api.open_session(f"order-{uuid.uuid4()}", new_courier, new_client, region=fresh_region)
    assert new["pool_number"] == number
    carrier.phone(new_client, action="answer")
    carrier.phone(new_courier, action="answer")

    # A former participant calling the number hears that their order finished.
    await announced(carrier, courier, number)
    await announced(carrier, client, number)
    row = await last_call_of(db, number, courier)
    assert row["outcome"] == "session_closed" and str(row["session_id"]) == old["id"]

    # Once the cool-off is over, they are strangers to the number: still never connected.
    await db.execute("UPDATE participants SET held_until = now() - interval '1 second' WHERE session_id = $1", old["id"])
    await announced(carrier, courier, number)
    assert (await last_call_of(db, number, courier))["outcome"] == "unknown_caller"
    # The new holders talk on it as usual.
    await talk(carrier, new_courier, number, new_client)


async def test_same_pair_comes_back_to_its_number(api, real_number, fresh_region, new_pool_number):
    """Sticky: a pair's next order gets the number it had, although the pair is cooling
    off on it and other numbers carry less load."""
    sticky = new_pool_number()
    await api.import_pool([sticky], fresh_region)
    courier, client = real_number(), real_number()
    first = await api.open_session(f"order-{uuid.uuid4()}", courier, client, region=fresh_region)
    assert first["pool_number"] == sticky
    await api.close_session(first["id"])
    again = await api.open_session(f"order-{uuid.uuid4()}", courier, client)
    assert again["pool_number"] == sticky, "the pair gets its last number back"
    # Someone else with the same courier is kept off it: the courier's cooling pair with
    # the first client still holds it.
    other = await api.open_session(f"order-{uuid.uuid4()}", real_number(), client)
    assert other["pool_number"] != sticky


async def test_grace_period_lets_the_client_reach_support_only(carrier, api, real_number, db, stack):
    support = stack.env["MB_SUPPORT_NUMBER"]
    courier, client = real_number(), real_number()
    session = await api.open_session(f"order-{uuid.uuid4()}", courier, client)
    pool = session["pool_number"]
    closed = await api.close_session(session["id"], grace_seconds=600)
    assert closed["status"] == "grace" and closed["grace_until"]

    # The client reaches support, which is shown the pool number, never the client's.
    _, at_support = await talk(carrier, client, pool, support)
    assert at_support.number == support and at_support.shown_number == pool
    row = await wait_for_call_row(db, session["id"])
    assert (row["caller_role"], row["callee_role"], row["outcome"]) == ("client", "support", "answered")
    # The courier reaches no one.
    carrier.phone(client, action="answer")
    await announced(carrier, courier, pool)

    # The grace period ends: the client is told the order finished.
    await db.execute("UPDATE sessions SET grace_until = now() - interval '1 second' WHERE id = $1", session["id"])
    await announced(carrier, client, pool)
    status, read = await api.request("GET", f"/v1/sessions/{session['id']}")
    assert read["status"] == "closed"
    status, events = await api.request("GET", f"/v1/sessions/{session['id']}/events")
    assert [e["kind"] for e in events["items"]] == ["opened", "grace_started", "closed"]


async def test_the_end_of_the_session_does_not_cut_its_announcement_short(carrier, api, real_number, db):
    """A client calling once the grace period is over hears that the order is finished; the
    session's end (which that very call's lookup commits) reaching the bridge while the
    announcement plays lets it play to its end. (It had cut it to silence, make test, once:
    the end's notification came after the call had its route.) Here the end comes again from
    the bridge's check of departed participants, which runs each time its listening
    connection to the database is made anew."""
    courier, client = real_number(), real_number()
    session = await api.open_session(f"order-{uuid.uuid4()}", courier, client)
    await api.close_session(session["id"], grace_seconds=600)
    await db.execute("UPDATE sessions SET grace_until = now() - interval '1 second' WHERE id = $1", session["id"])
    leg = await carrier.call(client, session["pool_number"])
    await wait_for_call_row(db, session["id"], state="announcing")
    listener = "SELECT pid FROM pg_stat_activity WHERE application_name = $1"
    old = await db.fetchval(listener, LISTENER_NAME)
    assert await db.fetchval("SELECT pg_terminate_backend($1)", old)
    async with asyncio.timeout(10):
        while (await db.fetchval(listener, LISTENER_NAME)) in (None, old):
            await asyncio.sleep(0.05)  # wait-ok: polling pg_stat_activity for the new listener
    assert not leg.ended.is_set(), "the announcement still played when the bridge looked again"
    await asyncio.wait_for(leg.ended.wait(), 30)
    await asyncio.wait_for(leg.recorded.wait(), 10)
    assert leg.answered_at is not None and leg.cause == 16, "answered, and hung up after the announcement"
    heard, _ = samples(carrier.recording_path(leg))
    assert rms(heard) > 100, "the client heard the announcement, not silence"
    row = await wait_for_call_row(db, session["id"])
    assert (row["outcome"], row["cut_reason"]) == ("session_closed", None)


async def test_a_courier_reassigned_during_a_call_is_cut_off(carrier, api, real_number, db, webhooks):
    """The order goes to another courier while the first one talks to the client: their call
    ends at once (the bridge hangs up both), recorded as cut for `reassigned`."""
    first, second, client = real_number(), real_number(), real_number()
    session = await api.open_session(f"order-{uuid.uuid4()}", first, client)
    carrier.phone(client, action="answer", listen=False)
    leg = await carrier.call(first, session["pool_number"], listen=False)
    other = await asyncio.wait_for(carrier.incoming.get(), 10)
    await wait_for_call_row(db, session["id"], state="connected")

    status, _ = await api.request("POST", f"/v1/sessions/{session['id']}/participants",
                                  json={"role": "courier", "number": second})
    assert status == 201
    await asyncio.wait_for(leg.ended.wait(), 10)
    await asyncio.wait_for(other.ended.wait(), 10)
    assert not leg.hung_up_itself and not other.hung_up_itself, "the bridge ended it"
    row = await wait_for_call_row(db, session["id"])
    assert (row["outcome"], row["hangup_by"], row["cut_reason"]) == ("answered", "system", "reassigned")


async def test_a_call_ringing_when_its_session_closes_is_cut_off(carrier, api, real_number, db):
    courier, client = real_number(), real_number()
    session = await api.open_session(f"order-{uuid.uuid4()}", courier, client)
    carrier.phone(client, action="noanswer", ring_for=30, listen=False)
    leg = await carrier.call(courier, session["pool_number"], listen=False)
    ringing = await asyncio.wait_for(carrier.incoming.get(), 10)
    await wait_for_call_row(db, session["id"], state="ringing")

    await api.close_session(session["id"])
    await asyncio.wait_for(ringing.ended.wait(), 10)
    await asyncio.wait_for(leg.ended.wait(), 10)
    assert ringing.answered_at is None and not ringing.hung_up_itself
    # The caller's phone is told the other side is unavailable (SIP 480), not that it declined (603).
    assert leg.answered_at is None and leg.cause not in (21, 16), leg.cause
    row = await wait_for_call_row(db, session["id"])
    assert (row["outcome"], row["hangup_by"], row["cut_reason"]) == ("session_closed", "system", "session_ended")


async def housekeeping(stack) -> None:
    """One sweep, by maskbridge-admin (as an operator would run it; the bridge's own runs too)."""
    admin = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bridge.cli", "housekeeping", env={**os.environ, **stack.bridge_env()},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await admin.communicate()
    assert admin.returncode == 0, out.decode()


async def test_a_call_in_progress_keeps_an_idle_session_open_and_its_end_restarts_the_clock(
    carrier, api, real_number, db, stack
):
    """Idle is "nobody called for idle_timeout_seconds", not "the conversation lasted that long"."""
    courier, client = real_number(), real_number()
    session = await api.open_session(f"order-{uuid.uuid4()}", courier, client, idle_timeout_seconds=600)
    leg, other = await carrier.connected(courier, session["pool_number"], client)
    await wait_for_call_row(db, session["id"], state="connected")
    # The call has lasted eleven minutes: a sweep leaves the session, and the call, alone.
    await db.execute("UPDATE sessions SET last_activity_at = now() - interval '11 minutes' WHERE id = $1", session["id"])
    await housekeeping(stack)
    status, read = await api.request("GET", f"/v1/sessions/{session['id']}")
    assert read["status"] == "open"
    assert not leg.ended.is_set() and not other.ended.is_set()

    await carrier.hangup(leg)
    await asyncio.wait_for(other.ended.wait(), 10)
    row = await wait_for_call_row(db, session["id"])
    assert (row["outcome"], row["cut_reason"]) == ("answered", None)
    assert await db.fetchval("SELECT last_activity_at >= $2 FROM sessions WHERE id = $1", session["id"],
                             row["ended_at"]), "the idle clock starts at the end of the call"
    # Eleven minutes after that call: it ends.
    await db.execute("UPDATE sessions SET last_activity_at = now() - interval '11 minutes' WHERE id = $1", session["id"])
    await housekeeping(stack)
    status, read = await api.request("GET", f"/v1/sessions/{session['id']}")
    assert (read["status"], read["end_reason"]) == ("closed", "inactive")


async def test_a_session_reaching_its_expiry_ends_its_call_at_once(carrier, api, real_number, db):
    """The bridge's housekeeping looks for sessions coming due every second, not only at its
    sweep (MB_SWEEP_INTERVAL): the call ends within moments of the session's expiry."""
    courier, client = real_number(), real_number()
    session = await api.open_session(f"order-{uuid.uuid4()}", courier, client)
    leg, other = await carrier.connected(courier, session["pool_number"], client)
    await wait_for_call_row(db, session["id"], state="connected")
    expires = await db.fetchval(
        "UPDATE sessions SET expires_at = now() + interval '2 seconds' WHERE id = $1 RETURNING expires_at",
        session["id"],
    )
    await asyncio.wait_for(leg.ended.wait(), 10)
    await asyncio.wait_for(other.ended.wait(), 10)
    row = await wait_for_call_row(db, session["id"])
    assert (row["outcome"], row["cut_reason"]) == ("answered", "session_ended")
    assert (row["ended_at"] - expires).total_seconds() < 2.5, "ended at the expiry, not at the next sweep"
    status, read = await api.request("GET", f"/v1/sessions/{session['id']}")
    assert (read["status"], read["end_reason"]) == ("closed", "expired")


async def test_cuts_survive_the_loss_of_the_listening_connection(carrier, api, real_number, db):
    """The connection that hears "a participant left" is killed (a Postgres restart, a
    failover): the bridge notices at once, listens again, and a courier reassigned just then
    is still cut off."""
    from bridge.app import LISTENER_NAME

    async def listener() -> int | None:
        return await db.fetchval("SELECT pid FROM pg_stat_activity WHERE application_name = $1", LISTENER_NAME)

    first, second, client = real_number(), real_number(), real_number()
    session = await api.open_session(f"order-{uuid.uuid4()}", first, client)
    leg, other = await carrier.connected(first, session["pool_number"], client)
    await wait_for_call_row(db, session["id"], state="connected")

    old = await listener()
    assert old is not None
    await db.execute("SELECT pg_terminate_backend($1)", old)
    status, _ = await api.request("POST", f"/v1/sessions/{session['id']}/participants",
                                  json={"role": "courier", "number": second})
    assert status == 201
    await asyncio.wait_for(leg.ended.wait(), 10)
    await asyncio.wait_for(other.ended.wait(), 10)
    row = await wait_for_call_row(db, session["id"])
    assert (row["outcome"], row["cut_reason"]) == ("answered", "reassigned")
    async with asyncio.timeout(5):
        while (await listener()) in (None, old):
            await asyncio.sleep(0.1)  # wait-ok: polling pg_stat_activity for the new connection
