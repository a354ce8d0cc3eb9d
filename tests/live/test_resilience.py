"""When the bridge is down, callers hear that the service is unavailable (the dialplan's
fallback after Stasis), and the bridge picks up again once it is back."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import urllib.error
import urllib.request
import uuid
from datetime import datetime, timezone

import pytest

from bridge.devstack import asterisk, postgres, processes
from bridge.devstack.audio import rms, samples
from bridge.phone import mask
from tests.live.conftest import pbx_ari, wait_for_call_row


async def connected_call(carrier, api, real_number, db):
    """A courier's call to the client of a new session, answered and stored as connected:
    (session, the courier's number, the courier's leg, the client's leg)."""
    courier, client = real_number(), real_number()
    session = await api.open_session(f"order-{uuid.uuid4()}", courier, client)
    leg, callee = await carrier.connected(courier, session["pool_number"], client)
    await wait_for_call_row(db, session["id"], state="connected")
    return session, courier, leg, callee


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
    leg, callee = await carrier.connected(courier, session["pool_number"], client)
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
    session, courier, leg, callee = await connected_call(carrier, api, real_number, db)

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


@pytest.mark.parametrize("change", ["reassign", "close", "block"])
async def test_a_change_made_while_the_bridge_was_down_ends_the_call_it_resumes(
    change, stack, carrier, api, real_number, db
):
    """The courier reassigned, the session closed or the courier blocked with maskbridge-admin
    while no bridge ran: its notice reached no one, and the bridge that resumes the call must
    end it all the same, at once."""
    session, courier, leg, callee = await connected_call(carrier, api, real_number, db)

    await asyncio.to_thread(processes.stop_bridge, stack)
    try:
        command = {
            "reassign": ["session", "reassign", session["id"], real_number()],
            "close": ["session", "close", session["id"]],
            "block": ["block", "add", courier, "--reason", "test"],
        }[change]
        admin = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bridge.cli", *command, env={**os.environ, **stack.bridge_env()},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await admin.communicate()
        assert admin.returncode == 0, out.decode()
        assert not leg.ended.is_set() and not callee.ended.is_set(), "no bridge ran to end the call"
    finally:
        await asyncio.to_thread(processes.start_bridge, stack)
        if change == "block":
            status, entries = await api.request("GET", "/v1/blocklist?limit=500")
            for entry in entries["items"]:
                if entry["number"] == mask(courier):
                    await api.request("DELETE", f"/v1/blocklist/{entry['id']}")

    await asyncio.wait_for(leg.ended.wait(), 10)
    await asyncio.wait_for(callee.ended.wait(), 10)
    row = await wait_for_call_row(db, session["id"])
    expected = {"reassign": "reassigned", "close": "session_ended", "block": "blocked"}[change]
    assert (row["outcome"], row["hangup_by"], row["cut_reason"]) == ("answered", "system", expected)


def _health(stack) -> tuple[int, dict]:
    """GET /healthz, waiting long enough for its own 2 s checks: (status, body)."""
    url = f"http://{stack.env['MB_API_BIND']}:{stack.env['MB_API_PORT']}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.mark.parametrize("when", ["connected", "ringing", "connected, stopped gracefully"])
async def test_a_call_lost_with_a_killed_asterisk_is_the_systems_not_the_callers(
        stack, carrier, api, real_number, db, when):
    """Asterisk killed (-9) during a call and started again: once the bridge is back on it, the
    call's row ends as node_lost by the system. (Connected, it said the caller hung up: support
    read a crash as the courier's doing; ringing, no_answer, when the ring timeout fell due before
    the bridge had reconnected.) Stopped gracefully instead (`core stop now`, as `core restart
    now` does first: Asterisk hangs every channel up itself), the same (it said the caller hung
    up, cause 4). The row's end is when Asterisk went, not when the bridge was back on it. Calls
    go through again afterwards."""
    if when != "ringing":
        session, courier, leg, callee = await connected_call(carrier, api, real_number, db)
    else:
        courier, client = real_number(), real_number()
        session = await api.open_session(f"order-{uuid.uuid4()}", courier, client)
        carrier.phone(client, action="answer", answer_after=60)
        leg = await carrier.call(courier, session["pool_number"])
        callee = await asyncio.wait_for(carrier.incoming.get(), 10)
        await wait_for_call_row(db, session["id"], state="ringing")
    pid = asterisk._pid(stack, "pbx")
    assert pid is not None
    if "gracefully" not in when:
        os.kill(pid, signal.SIGKILL)
    try:
        # Until it has exited for good: its threads still hold its control socket for a while
        # after its main thread is gone, and a start then took the dying one for running (and
        # failed to reload it). stop() waits for the process and the socket both (and stops a
        # running one with `core stop now`).
        await asyncio.to_thread(asterisk.stop, stack, "pbx")
    finally:
        restarted_at = datetime.now(timezone.utc)
        await asyncio.to_thread(asterisk.start, stack, "pbx")
        await asyncio.to_thread(processes.wait_healthy, stack)
    row = await wait_for_call_row(db, session["id"])
    assert (row["outcome"], row["hangup_by"], row["hangup_cause"]) == ("node_lost", "system", None)
    assert row["ended_at"] is not None and row["ended_at"] < restarted_at
    # (The carrier's own legs never heard a BYE from the dead PBX: hung up here.)
    for stale in (leg, callee):
        with contextlib.suppress(Exception):
            await carrier.hangup(stale)

    carrier.phone(callee.number, action="answer")
    leg = await carrier.call(courier, session["pool_number"], hangup_after=1.0)
    callee = await asyncio.wait_for(carrier.incoming.get(), 10)
    await asyncio.wait_for(leg.ended.wait(), 15)
    assert callee.answered_at is not None


@pytest.mark.parametrize("leg", ["caller", "callee"])
async def test_a_leg_an_operator_hangs_up_on_the_pbx_is_the_systems_not_a_phones(
        stack, carrier, api, real_number, db, leg):
    """`channel request hangup` on the PBX's console, on either leg of a connected call: no
    phone hung up, the system did (the row said the caller, or the callee, with cause 16). The
    other phone is hung up."""
    session, _courier, caller, callee = await connected_call(carrier, api, real_number, db)
    row = await wait_for_call_row(db, session["id"], state="connected")
    pbx = pbx_ari(stack)
    try:
        channel = await pbx.get_channel(row["inbound_channel_id" if leg == "caller" else "outbound_channel_id"])
    finally:
        await pbx.close()
    done = await asyncio.to_thread(asterisk.rx, stack, "pbx", f"channel request hangup {channel['name']}")
    assert done.returncode == 0, done.stderr
    await asyncio.wait_for(caller.ended.wait(), 10)
    await asyncio.wait_for(callee.ended.wait(), 10)
    row = await wait_for_call_row(db, session["id"])
    assert (row["outcome"], row["hangup_by"], row["hangup_cause"]) == ("answered", "system", None)


async def test_a_call_reaped_while_its_bridge_was_frozen_is_hung_up_once_it_runs_again(
        stack, carrier, api, real_number, db):
    """The bridge frozen longer than the node timeout (15 s) while the call talks, and the call
    given up meanwhile by another node's reaper (here its row is ended as that reaper ends it):
    once the bridge runs again, its first heartbeat finds the silence, and it hangs up the phones
    that went on talking unrecorded (adversary finding). The row stays as the reaper wrote it."""
    session, _courier, caller, callee = await connected_call(carrier, api, real_number, db)
    row = await wait_for_call_row(db, session["id"], state="connected")
    pid = processes.bridge_pid(stack)
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    try:
        await db.execute("UPDATE calls SET state = 'ended', outcome = 'node_lost', hangup_by = 'system', "
                         "ended_at = now() WHERE id = $1", row["id"])
        await asyncio.sleep(float(stack.env["MB_NODE_TIMEOUT"]) + 1)  # wait-ok: the silence is what is tested
    finally:
        os.kill(pid, signal.SIGCONT)
    await asyncio.wait_for(caller.ended.wait(), 15)
    await asyncio.wait_for(callee.ended.wait(), 15)
    row = await db.fetchrow("SELECT state, outcome, hangup_by FROM calls WHERE id = $1", row["id"])
    assert (row["state"], row["outcome"], row["hangup_by"]) == ("ended", "node_lost", "system")
    await asyncio.to_thread(processes.wait_healthy, stack)


async def test_an_answer_while_the_bridge_was_frozen_past_the_ring_timeout_connects_the_call(
        stack, carrier, api, real_number, db):
    """The bridge frozen while the other phone rings, past the ring timeout, and the other phone
    answers meanwhile: once the bridge runs again, the answer waiting in its event socket comes
    before the timeout it notices late. The call is connected, not cut as unanswered (adversary
    finding: the callee was hung up after talking to nobody, the row said no_answer)."""
    courier, client = real_number(), real_number()
    session = await api.open_session(f"order-{uuid.uuid4()}", courier, client)
    carrier.phone(client, action="answer", answer_after=1.0)
    leg = await carrier.call(courier, session["pool_number"])
    callee = await asyncio.wait_for(carrier.incoming.get(), 10)
    pid = processes.bridge_pid(stack)
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    try:
        await asyncio.wait_for(callee.answered.wait(), 10)
        await asyncio.sleep(float(stack.env["MB_RING_TIMEOUT"]) + 1)  # wait-ok: the freeze is what is tested
    finally:
        os.kill(pid, signal.SIGCONT)
    await wait_for_call_row(db, session["id"], state="connected")
    await asyncio.wait_for(leg.answered.wait(), 10)
    assert not callee.ended.is_set()
    await carrier.hangup(leg)
    await asyncio.wait_for(callee.ended.wait(), 10)
    row = await wait_for_call_row(db, session["id"])
    assert (row["outcome"], row["hangup_by"]) == ("answered", "caller")


async def test_health_says_asterisk_is_down_while_it_hangs_and_up_once_it_answers_again(stack):
    """An Asterisk that hangs (SIGSTOP) keeps the event websocket open until its heartbeat
    misses, 15 s and more: /healthz asks Asterisk itself, so the first health check says ARI
    is down (503), and once Asterisk runs again, up."""
    await asyncio.to_thread(processes.wait_healthy, stack)
    assert await asyncio.to_thread(_health, stack) == (200, {"ari": True, "database": True})
    pid = asterisk._pid(stack, "pbx")
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    try:
        assert await asyncio.to_thread(_health, stack) == (503, {"ari": False, "database": True})
    finally:
        os.kill(pid, signal.SIGCONT)
    await asyncio.to_thread(processes.wait_healthy, stack)
    assert await asyncio.to_thread(_health, stack) == (200, {"ari": True, "database": True})


def _postgres_processes(stack) -> list[int]:
    """The stack's Postgres: its postmaster, then every process it runs."""
    postmaster = int((stack.pg_dir / "postmaster.pid").read_text().split()[0])
    with open(f"/proc/{postmaster}/task/{postmaster}/children") as children:
        return [postmaster, *map(int, children.read().split())]


async def test_health_says_the_database_is_down_while_it_hangs_within_a_probes_patience(stack):
    """A database that hangs (its processes SIGSTOPped): the health check gives up on its
    query and answers, within the 5 s a probe waits (devstack's; docker's waits 4 s), that
    the database is down; then up again once it runs."""
    await asyncio.to_thread(processes.wait_healthy, stack)
    frozen = _postgres_processes(stack)
    for pid in frozen:
        os.kill(pid, signal.SIGSTOP)
    try:
        assert await asyncio.to_thread(processes.health, stack) == {"ari": True, "database": False}
    finally:
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)
    await asyncio.to_thread(processes.wait_healthy, stack)
