"""Real SIP through Kamailio and two nodes: calls spread over both, masked, each row naming
its node and each webhook delivered once; a node whose bridge or Asterisk is killed costs
only its own calls (or none); a block cuts calls on every node; caps hold across nodes; a
recording is deleted by the node whose spool holds it."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from bridge.devstack import asterisk, kamailio, postgres, processes
from bridge.devstack.audio import rms, samples, tone_share
from bridge.devstack.carrier import Carrier, Leg
from bridge.devstack.demo import DEMO_COURIER, DEMO_ORDER
from bridge.devstack.settings import PROJECT_DIR, Stack
from tests.live.conftest import Api, WebhookReceiver, max_calls
from tests.live.siplog import SipLog, SipMessage, dialogs, identity_leaks, logged, reinvite_answered

_numbers = itertools.count(random.randrange(0, 1_000_000))


def real_number() -> str:
    return f"+7926{next(_numbers) % 10_000_000:07d}"


async def rows_of(db: asyncpg.Connection, session_ids: list[str]) -> list[dict[str, Any]]:
    return [dict(r) for r in await db.fetch(
        "SELECT * FROM calls WHERE session_id = ANY($1::uuid[]) ORDER BY started_at", session_ids)]


async def until(check, timeout: float, what: str) -> Any:
    """Poll `check` (a coroutine function) until it returns something true."""
    async with asyncio.timeout(timeout):
        while not (result := await check()):
            await asyncio.sleep(0.1)  # wait-ok: polling the database the bridges write to
    return result


async def connected_calls(carrier: Carrier, api: Api, db: asyncpg.Connection, count: int) -> list[tuple[str, Leg]]:
    """`count` calls put through and answered, one session each, placed one after the other
    (round robin: they alternate between the nodes). Returns (session id, caller's leg)."""
    calls = []
    for _ in range(count):
        courier, client = real_number(), real_number()
        session = await api.open_session(f"order-{uuid.uuid4()}", courier, client)
        carrier.phone(client, action="answer", answer_after=0.1, listen=False)
        leg = await carrier.call(courier, session["pool_number"], listen=False)
        await asyncio.wait_for(leg.answered.wait(), 15)
        calls.append((session["id"], leg))
    ids = [s for s, _ in calls]
    await until(lambda: _all_connected(db, ids), 15, "every call connected")
    return calls


async def _all_connected(db: asyncpg.Connection, session_ids: list[str]) -> bool:
    rows = await rows_of(db, session_ids)
    return len(rows) == len(session_ids) and all(r["state"] == "connected" for r in rows)


async def node_of(db: asyncpg.Connection, session_id: str) -> str:
    return str(await db.fetchval("SELECT node FROM calls WHERE session_id = $1 ORDER BY started_at DESC LIMIT 1",
                                 uuid.UUID(session_id)))


async def test_calls_spread_over_both_nodes_masked_with_each_webhook_once(
    cluster: Stack, carrier: Carrier, api: Api, db: asyncpg.Connection, webhooks: WebhookReceiver
):
    """100 calls at 10 a second: each node takes 40-60 % of them, every callee is shown the
    pool number only, every row names its node, every event reaches the order system once."""
    pairs = []
    for _ in range(10):
        courier, client = real_number(), real_number()
        session = await api.open_session(f"order-{uuid.uuid4()}", courier, client)
        carrier.phone(client, action="answer", answer_after=0.1, hangup_after=0.5, listen=False)
        pairs.append((session, courier, client))
    sip_log = SipLog(asterisk.host_path(cluster, "carrier", "log", "sip.log"))
    mark = sip_log.mark()
    legs = []
    began = time.monotonic()
    for i in range(100):
        session, courier, _client = pairs[i % 10]
        legs.append(await carrier.call(courier, session["pool_number"], listen=False))
        # (offered load: 10 calls a second, whatever happens to them)
        await asyncio.sleep(max(0.0, began + (i + 1) * 0.1 - time.monotonic()))  # wait-ok: pacing
    callees = [await asyncio.wait_for(carrier.incoming.get(), 30) for _ in range(100)]
    for leg in legs:
        await asyncio.wait_for(leg.ended.wait(), 30)
    shown = {(c.number, c.shown_number, c.shown_name or c.shown_number) for c in callees}
    expected = {(client, s["pool_number"], s["pool_number"]) for s, _courier, client in pairs}
    assert shown == expected, "every callee saw the pool number, and only it"

    # The identity scan: no SIP message either phone received names the other's real number.
    numbers = [n for _s, courier, client in pairs for n in (courier, client)]
    messages = await logged(sip_log, mark, lambda got: _byes(got) >= 100, timeout=30)
    scanned = 0
    for dialog in dialogs(messages).values():
        own = _own_number(dialog)
        for message in dialog:
            if message.direction == "received":
                scanned += 1
                leaks = identity_leaks(message.text, [n for n in numbers if n != own])
                assert not leaks, f"{leaks} reached {own}:\n{message.text}"
    assert scanned > 600

    ids = [s["id"] for s, _c, _cl in pairs]
    rows = await until(lambda: _ended(db, ids, 100), 30, "every call row ended")
    per_node = collections.Counter(r["node"] for r in rows)
    assert set(per_node) == {"node-1", "node-2"}, per_node
    assert all(40 <= n <= 60 for n in per_node.values()), per_node
    assert {r["outcome"] for r in rows} == {"answered"}

    # Each event once: both bridges deliver from one outbox.
    call_ids = [str(r["id"]) for r in rows]
    for call_id in call_ids:
        await webhooks.events_of(call_id, {"call.started", "call.answered", "call.ended"}, timeout=30)
    delivered = collections.Counter(
        d["body"]["id"] for d in webhooks.deliveries
        if d["status"] == 204 and d["body"]["data"].get("call_id") in set(call_ids))
    assert len(delivered) == 300 and set(delivered.values()) == {1}


def _byes(messages: list[SipMessage]) -> int:
    """BYEs the carrier received (each callee leg ends with one: the caller hung up)."""
    return sum(m.first_line.startswith("BYE ") for m in messages if m.direction == "received")


def _own_number(dialog: list[SipMessage]) -> str:
    """The carrier phone's own number in a dialog: the callee's (the INVITE it received) or
    the caller's (the From of the INVITE it sent)."""
    for message in dialog:
        if message.first_line.startswith("INVITE "):
            if message.direction == "received":
                return "+" + message.first_line.split("sip:", 1)[1].split("@", 1)[0].lstrip("+")
            return "+" + message.header("From")[0].split("sip:", 1)[1].split("@", 1)[0].lstrip("+")
    return ""


async def _ended(db: asyncpg.Connection, session_ids: list[str], count: int) -> list[dict[str, Any]] | None:
    rows = await rows_of(db, session_ids)
    return rows if len(rows) == count and all(r["state"] == "ended" for r in rows) else None


async def test_a_killed_bridge_costs_no_call_and_its_successor_resumes_only_its_own(
    cluster: Stack, carrier: Carrier, api: Api, db: asyncpg.Connection, nodes_up: list[Stack]
):
    calls = await connected_calls(carrier, api, db, 6)
    on = {sid: await node_of(db, sid) for sid, _leg in calls}
    assert collections.Counter(on.values()) == {"node-1": 3, "node-2": 3}
    node2 = nodes_up[1]
    pid = processes.bridge_pid(node2)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    # Node 2's Asterisk lets the application go once it reads the killed socket's end; a call
    # that comes before waits in Stasis for the next bridge, which takes it up (reconcile's
    # adoption). (Placed at once, the next call sometimes came first on a busy machine.)
    await until(lambda: _socket_closed_by(node2), 10, "node 2's Asterisk to close the killed bridge's sockets")

    # New calls all go to node 1 (node 2's dialplan answers 503 and Kamailio moves on).
    more = await connected_calls(carrier, api, db, 4)
    assert {await node_of(db, sid) for sid, _leg in more} == {"node-1"}
    assert not any(leg.ended.is_set() for _sid, leg in calls), "node 2's calls stayed up without their bridge"

    before = {r["id"]: (r["state"], r["ended_at"]) for r in await rows_of(db, [s for s, _ in calls + more])
              if r["node"] == "node-1"}
    await asyncio.to_thread(processes.start_bridge, node2)
    # Node 2's calls, resumed: hung up by their callers, they end properly.
    for sid, leg in calls:
        if on[sid] == "node-2":
            await carrier.hangup(leg)
    for sid, _leg in calls:
        if on[sid] == "node-2":
            row = await until(lambda sid=sid: _ended_row(db, sid), 15, "node 2's call ended")
            assert (row["outcome"], row["hangup_by"]) == ("answered", "caller")
    after = {r["id"]: (r["state"], r["ended_at"]) for r in await rows_of(db, [s for s, _ in calls + more])
             if r["node"] == "node-1"}
    assert after == before, "the restarted bridge wrote nothing to node 1's calls"
    for sid, leg in calls + more:
        if await node_of(db, sid) == "node-1":
            await carrier.hangup(leg)
            row = await until(lambda sid=sid: _ended_row(db, sid), 15, "node 1's call ended")
            assert (row["outcome"], row["hangup_by"]) == ("answered", "caller")


async def test_a_node_at_its_call_limit_passes_new_calls_to_the_other(
    cluster: Stack, carrier: Carrier, api: Api, db: asyncpg.Connection
):
    """Node 2 holding MB_PBX_MAX_CALLS calls refuses the next with 503 before anything is
    played, and Kamailio puts it through node 1: the caller never hears the refusal. Both
    full, the carrier gets a 503. Once node 2's call ends, it takes a call again, and only
    one."""
    calls = await connected_calls(carrier, api, db, 2)
    on = {sid: await node_of(db, sid) for sid, _leg in calls}
    assert sorted(on.values()) == ["node-1", "node-2"]
    async with max_calls(cluster.nodes[1], 1):
        more = await connected_calls(carrier, api, db, 4)  # (round robin: two went to node 2 first)
        assert {await node_of(db, sid) for sid, _leg in more} == {"node-1"}
        assert not any(leg.ended.is_set() for _sid, leg in calls + more)
        # Both nodes full (node 1 holds five): the carrier is told 503, by Kamailio (a 503 it
        # relayed would have reached the carrier as a 500: adversary, issue 14).
        async with max_calls(cluster.nodes[0], 5):
            courier, client = real_number(), real_number()
            session = await api.open_session(f"order-{uuid.uuid4()}", courier, client)
            carrier.phone(client, action="answer", listen=False)
            refused = await carrier.call(courier, session["pool_number"], listen=False)
            await asyncio.wait_for(refused.ended.wait(), 15)
            assert refused.cause == 34 and not refused.answered.is_set(), refused.cause
            assert client not in [leg.number for leg in carrier.legs.values() if leg.role == "callee"]
            assert await rows_of(db, [session["id"]]) == []
            # Node 1 full and node 2 silent (its Asterisk frozen): 503 too, whichever node is
            # tried first (a last node that timed out after a full one made it a 408).
            frozen = asterisk._pid(cluster.nodes[1], "pbx")
            assert frozen is not None
            os.kill(frozen, signal.SIGSTOP)
            try:
                refused = [await carrier.call(courier, session["pool_number"], listen=False) for _ in range(2)]
                for leg in refused:
                    await asyncio.wait_for(leg.ended.wait(), 15)
                assert [leg.cause for leg in refused] == [34, 34]
            finally:
                os.kill(frozen, signal.SIGCONT)
            await until(lambda: _node_up_again(cluster), 20, "Kamailio to probe node 2 up again")
        for sid, leg in calls:
            if on[sid] == "node-2":
                await carrier.hangup(leg)
                await until(lambda sid=sid: _ended_row(db, sid), 15, "node 2's call ended")
        # Room for one call on node 2 again: it takes the first that comes to it, and then
        # is full again (the second that would have gone there goes to node 1).
        again = await connected_calls(carrier, api, db, 4)
        assert collections.Counter([await node_of(db, sid) for sid, _leg in again]) == {"node-1": 3, "node-2": 1}
    for _sid, leg in calls + more + again:
        if not leg.ended.is_set():
            await carrier.hangup(leg)
    for sid, _leg in calls + more + again:
        await until(lambda sid=sid: _ended_row(db, sid), 15, "every call ended")


async def _node_up_again(cluster: Stack) -> bool:
    """Whether Kamailio's dispatcher has every node up (its OPTIONS probes answered)."""
    states = await asyncio.to_thread(kamailio.node_states, cluster)
    return len(states) == len(cluster.nodes) and set(states.values()) == {"up"}


async def _socket_closed_by(node: Stack) -> bool:
    """Whether the node's Asterisk has read the end of every ARI connection of the killed
    bridge and closed its side (none left in CLOSE-WAIT): the application is let go then."""
    e = node.bridge_env()
    address = e["MB_ARI_URL"].split("//", 1)[1]
    out = await asyncio.to_thread(subprocess.run, ["ss", "-Htn", "state", "close-wait", "src", address],
                                  capture_output=True, text=True, check=True)
    return not out.stdout.strip()


async def _ended_row(db: asyncpg.Connection, session_id: str) -> dict[str, Any] | None:
    row = await db.fetchrow("SELECT * FROM calls WHERE session_id = $1 ORDER BY started_at DESC LIMIT 1",
                            uuid.UUID(session_id))
    return dict(row) if row is not None and row["state"] == "ended" else None


async def test_a_killed_asterisk_costs_only_its_own_calls(
    cluster: Stack, carrier: Carrier, api: Api, db: asyncpg.Connection, nodes_up: list[Stack]
):
    """Kill -9 of node 2's Asterisk with 20 calls up on each node: node 1's calls carry on,
    node 2's rows end as node_lost, and calls offered all the while are put through."""
    calls = await connected_calls(carrier, api, db, 40)
    on = {sid: await node_of(db, sid) for sid, _leg in calls}
    assert collections.Counter(on.values()) == {"node-1": 20, "node-2": 20}

    offered: list[tuple[float, Leg, str]] = []
    stop = asyncio.Event()

    async def offer() -> None:
        courier, client = real_number(), real_number()
        session = await api.open_session(f"order-{uuid.uuid4()}", courier, client)
        carrier.phone(client, action="answer", answer_after=0.1, hangup_after=0.5, listen=False)
        while not stop.is_set():
            offered.append((time.monotonic(), await carrier.call(courier, session["pool_number"], listen=False),
                            session["id"]))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.5):
                    await stop.wait()  # (offered load: two calls a second)

    load = asyncio.create_task(offer())
    killed_at = time.monotonic()
    dead = asterisk._pid(nodes_up[1], "pbx")
    assert dead is not None
    os.kill(dead, signal.SIGKILL)

    lost = [sid for sid, node in on.items() if node == "node-2"]
    rows = await until(lambda: _ended(db, lost, len(lost)), 30, "node 2's calls given up")
    assert {r["outcome"] for r in rows} == {"node_lost"}
    lost_after = time.monotonic() - killed_at
    kept = [leg for sid, leg in calls if on[sid] == "node-1"]
    assert not any(leg.ended.is_set() for leg in kept), "node 1's calls carried on"
    assert all(r["state"] == "connected" for r in await rows_of(db, [s for s in on if on[s] == "node-1"]))

    stop.set()
    await load
    for _at, leg, _sid in offered:
        await asyncio.wait_for(leg.ended.wait(), 30)
    assert offered and all(leg.answered_at is not None for _at, leg, _sid in offered), \
        "every call offered while node 2 died was put through"
    # (How long the caller waited for the answer, before and after the kill: measured, not asserted.)
    waits = [(at - killed_at, leg.answered_at - at) for at, leg, _sid in offered if leg.answered_at]
    worst = max((w for t, w in waits if t >= 0), default=0.0)
    settled = [w for t, w in waits if t >= 10]
    print(f"node 2's calls ended as node_lost {lost_after:.1f} s after its Asterisk was killed; "
          f"{len(offered)} calls offered meanwhile; answer waits: before the kill at most "
          f"{max((w for t, w in waits if t < 0), default=0.0):.2f} s, after it at most {worst:.2f} s, "
          f"10 s after it at most {max(settled, default=0.0):.2f} s")
    for leg in kept:
        await carrier.hangup(leg)


async def test_a_block_cuts_the_numbers_calls_on_every_node(
    cluster: Stack, carrier: Carrier, api: Api, db: asyncpg.Connection
):
    courier = real_number()
    sessions, legs = [], []
    for _ in range(2):
        client = real_number()
        session = await api.open_session(f"order-{uuid.uuid4()}", courier, client)
        carrier.phone(client, action="answer", answer_after=0.1, listen=False)
        legs.append(await carrier.call(courier, session["pool_number"], listen=False))
        await asyncio.wait_for(legs[-1].answered.wait(), 15)
        sessions.append(session["id"])
    await until(lambda: _all_connected(db, sessions), 15, "both connected")
    assert {await node_of(db, s) for s in sessions} == {"node-1", "node-2"}
    status, body = await api.request("POST", "/v1/blocklist", json={"number": courier, "reason": "test"})
    assert status in (200, 201), body
    blocked_at = time.monotonic()
    for leg in legs:
        await asyncio.wait_for(leg.ended.wait(), 10)
    print(f"both calls cut {time.monotonic() - blocked_at:.2f} s after the block")
    for sid in sessions:
        row = await until(lambda sid=sid: _ended_row(db, sid), 10, "cut")
        assert (row["hangup_by"], row["cut_reason"]) == ("system", "blocked")


async def test_caps_hold_across_nodes(cluster: Stack, carrier: Carrier, api: Api, db: asyncpg.Connection):
    courier, client = real_number(), real_number()
    session = await api.open_session(f"order-{uuid.uuid4()}", courier, client, calls_per_hour=2)
    carrier.phone(client, action="answer", answer_after=0.1, hangup_after=0.3, listen=False)
    for _ in range(3):
        leg = await carrier.call(courier, session["pool_number"], listen=False)
        await asyncio.wait_for(leg.ended.wait(), 20)
    rows = await until(lambda: _ended(db, [session["id"]], 3), 15, "three calls ended")
    assert [r["outcome"] for r in rows] == ["answered", "answered", "call_limit"]
    assert {r["node"] for r in rows[:2]} == {"node-1", "node-2"}


async def test_a_recording_is_deleted_by_the_node_that_holds_it(
    cluster: Stack, carrier: Carrier, api: Api, db: asyncpg.Connection
):
    courier, client = real_number(), real_number()
    session = await api.open_session(f"order-{uuid.uuid4()}", courier, client, record=True)
    carrier.phone(client, action="answer", answer_after=0.1, listen=False)
    leg = await carrier.call(courier, session["pool_number"], listen=False)
    await asyncio.wait_for(leg.answered.wait(), 15)
    recording = await until(lambda: db.fetchrow(
        "SELECT r.* FROM recordings r JOIN calls c ON c.id = r.call_id WHERE c.session_id = $1",
        uuid.UUID(session["id"])), 20, "recording started")
    await carrier.hangup(leg)
    await until(lambda: db.fetchval("SELECT ended_at IS NOT NULL FROM recordings WHERE id = $1", recording["id"]),
                20, "recording finished")
    holder = cluster.node(int((await node_of(db, session["id"])).split("-")[1]))
    other = cluster.node(3 - int(holder.env["MB_NODE_ID"].split("-")[1]))
    audio = asterisk.host_path(holder, "pbx", "spool", "recording", recording["name"] + ".wav")
    assert audio.exists()
    # Downloaded through either node's API: the other one fetches it from the holder.
    for node in (holder, other):
        base = f"http://{node.env['MB_API_BIND']}:{node.env['MB_API_PORT']}"
        async with aiohttp.ClientSession() as http, http.get(
            f"{base}/v1/calls/{recording['call_id']}/recording/audio",
            headers={"Authorization": f"Bearer {cluster.env['MB_RECORDING_TOKEN']}"},
        ) as resp:
            assert resp.status == 200, await resp.text()
            assert await resp.read() == audio.read_bytes()
    # Audited where it was asked for, and on the holder when another node fetched it there.
    assert await db.fetchval(
        "SELECT count(*) FROM recording_access WHERE recording_id = $1 AND action = 'download' AND result = 'granted'",
        recording["id"]) == 3
    await db.execute("UPDATE recordings SET ended_at = now() - interval '400 days' WHERE id = $1", recording["id"])
    await db.execute("UPDATE calls SET ended_at = now() - interval '400 days' WHERE id = $1", recording["call_id"])

    def purge(node: Stack) -> None:
        done = subprocess.run(
            [sys.executable, "-m", "bridge.cli", "housekeeping", "--recordings", "--recordings-older-than", "365"],
            cwd=PROJECT_DIR, env={**os.environ, **node.bridge_env()}, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr

    await asyncio.to_thread(purge, other)
    assert await db.fetchval("SELECT deleted_at FROM recordings WHERE id = $1", recording["id"]) is None
    assert audio.exists(), "the other node did not touch it"
    await asyncio.to_thread(purge, holder)
    assert await db.fetchval("SELECT deleted_at FROM recordings WHERE id = $1", recording["id"]) is not None
    assert not audio.exists(), "the audio is gone from the spool of the node that held it"



async def test_postgres_restarted_under_load(
    cluster: Stack, carrier: Carrier, api: Api, db: asyncpg.Connection, nodes_up: list[Stack]
):
    """20 calls up and 5 calls a second offered while Postgres restarts: the calls up carry
    on and end properly afterwards; a call offered in the gap is told the service is
    unavailable (cause 34: the announcement, or a 503), never left in silence; service comes
    back by itself."""
    calls = await connected_calls(carrier, api, db, 20)
    await db.close()
    offered: list[Leg] = []
    stop = asyncio.Event()

    async def offer() -> None:
        pairs = []
        for _ in range(5):
            courier, client = real_number(), real_number()
            session = await api.open_session(f"order-{uuid.uuid4()}", courier, client)
            carrier.phone(client, action="answer", answer_after=0.1, hangup_after=0.5, listen=False)
            pairs.append((courier, session["pool_number"]))
        for i in itertools.count():
            courier, pool = pairs[i % 5]
            offered.append(await carrier.call(courier, pool, listen=False))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.2):
                    await stop.wait()  # (offered load: five calls a second)
            if stop.is_set():
                return

    load = asyncio.create_task(offer())
    await until(lambda: _some(offered, 5), 10, "load offered")
    await asyncio.to_thread(postgres.stop, cluster)
    gap_began = len(offered)
    # (down while five calls are offered)
    await until(lambda: _some(offered, gap_began + 5), 10, "calls offered while Postgres is down")
    await asyncio.to_thread(postgres.start, cluster)
    # Service is back once a call offered after the restart is put through and answered.
    db = await asyncpg.connect(cluster.database_url)
    restarted = len(offered)
    since = await db.fetchval("SELECT now()")
    await until(lambda: db.fetchval("SELECT count(*) FROM calls WHERE started_at > $1 AND answered_at IS NOT NULL "
                                    "AND callee_role IS NOT NULL", since), 60, "a call put through again")
    stop.set()
    await load
    for leg in offered:
        await asyncio.wait_for(leg.ended.wait(), 40)
    silent = [leg for leg in offered if leg.cause not in (16, 34)]
    assert not silent, [(leg.cause, leg.answered_at) for leg in silent]
    told = [leg for leg in offered[gap_began:restarted] if leg.cause == 34]
    assert told, "calls offered while the database was down were told it is unavailable"
    print(f"{len(offered)} calls offered; {len(offered[gap_began:restarted])} while Postgres restarted, "
          f"{len(told)} of them told the service is unavailable")

    assert not any(leg.ended.is_set() for _sid, leg in calls), "the calls up survived the restart"
    try:
        for _sid, leg in calls:
            await carrier.hangup(leg)
        for sid, _leg in calls:
            row = await until(lambda sid=sid: _ended_row(db, sid), 20, "ended after the restart")
            assert (row["outcome"], row["hangup_by"]) == ("answered", "caller")
    finally:
        await db.close()


async def _some(legs: list[Leg], count: int) -> bool:
    return len(legs) >= count


def test_the_scale_out_benchmark_runs(cluster: Stack, tmp_path):
    """`make bench NODES=2` in miniature (timing is measured there, never asserted here):
    the nodes under CPU quotas, one node then two, CPU per call of every process."""
    done = subprocess.run([sys.executable, "-m", "bench.scaleout", "--tiny", "--out", str(tmp_path)], cwd=PROJECT_DIR,
                          env={**{k: v for k, v in os.environ.items() if not k.startswith("MB_")}, **cluster.env},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "scaleout.json").read_text())
    assert results["one_node"] and results["two_nodes"]
    assert results["cpu"]["ok"] == results["cpu"]["calls"]
    assert set(results["cpu"]["ms_per_call"]) >= {"kamailio", "postgres", "node-1 Asterisk", "node-2 bridge"}
    assert (tmp_path / "scaleout.md").read_text().startswith("# Scale-out")
    assert not any(Path("/sys/fs/cgroup/cpu").glob(f"maskbridge-{cluster.instance_tag}-*")), "the quotas are gone"


async def test_kamailio_refuses_calls_from_anyone_but_the_carrier(cluster: Stack):
    """An INVITE from an address that is not the carrier's gets 403, as does an OPTIONS."""
    kam = (cluster.env["MB_PBX_SIP_BIND"], int(cluster.env["MB_PBX_SIP_PORT"]))
    for method in ("INVITE", "OPTIONS"):
        answer = await sip_request(kam, method, source="127.0.0.1")
        assert answer.startswith("SIP/2.0 403"), answer[:200]


async def test_kamailio_relays_in_dialog_requests_only_between_the_carrier_and_the_nodes(cluster: Stack):
    """A request that looks in-dialog (a To tag) with a Route header of the sender's choosing
    must not make Kamailio an open relay, even from the carrier's address."""
    loop = asyncio.get_running_loop()
    received: list[bytes] = []

    class Victim(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: object) -> None:
            received.append(data)

    victim, _ = await loop.create_datagram_endpoint(Victim, local_addr=("127.0.0.74", 0))
    try:
        port = victim.get_extra_info("sockname")[1]
        kam = (cluster.env["MB_PBX_SIP_BIND"], int(cluster.env["MB_PBX_SIP_PORT"]))
        answer = await sip_request(
            kam, "MESSAGE", source=cluster.env["MB_TRUNK_HOST"], uri=f"sip:victim@127.0.0.74:{port}",
            extra=f"Route: <sip:{kam[0]}:{kam[1]};lr>\r\n", to_tag=True)
        assert answer.startswith("SIP/2.0 403"), answer[:200]
        assert received == [], "nothing reached the address the Route pointed at"
    finally:
        victim.close()


async def sip_request(to: tuple[str, int], method: str, source: str, uri: str | None = None, extra: str = "",
                      to_tag: bool = False) -> str:
    loop = asyncio.get_running_loop()
    got: asyncio.Future[bytes] = loop.create_future()

    class Peer(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: object) -> None:
            if not got.done() and not data.startswith(b"SIP/2.0 100"):
                got.set_result(data)

    transport, _ = await loop.create_datagram_endpoint(Peer, local_addr=(source, 0), remote_addr=to)
    try:
        port = transport.get_extra_info("sockname")[1]
        call_id = uuid.uuid4().hex
        transport.sendto((
            f"{method} {uri or f'sip:+74950000001@{to[0]}:{to[1]}'} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP {source}:{port};branch=z9hG4bK{call_id[:12]};rport\r\n"
            "Max-Forwards: 70\r\n"
            f"From: <sip:+79160000001@{source}>;tag={call_id[:8]}\r\n"
            f"To: <sip:+74950000001@{to[0]}>{';tag=x' + call_id[8:16] if to_tag else ''}\r\n"
            f"Call-ID: {call_id}\r\n"
            f"CSeq: 1 {method}\r\n"
            f"Contact: <sip:+79160000001@{source}:{port}>\r\n"
            f"{extra}"
            "Content-Length: 0\r\n\r\n"
        ).encode())
        return (await asyncio.wait_for(got, 5)).decode(errors="replace")
    finally:
        transport.close()


async def test_make_call_says_which_node_took_the_call_and_make_status_shows_both(
    cluster: Stack, db: asyncpg.Connection
):
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MB_")}, **cluster.env}
    pool = await db.fetchval("SELECT pool_number FROM sessions WHERE order_id = $1 AND status = 'open'", DEMO_ORDER)
    nodes = set()
    for _ in range(2):
        done = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "bridge.devstack", "call", DEMO_COURIER, pool, "--hangup-after",
                             "0.5"], cwd=PROJECT_DIR, env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr[-2000:]
        assert f"caller ID shown:   {pool}" in done.stdout, done.stdout
        nodes |= {line.split(": ", 1)[1] for line in done.stdout.splitlines() if line.startswith("node: ")}
    assert nodes == {"node-1", "node-2"}
    status = subprocess.run([sys.executable, "-m", "bridge.devstack", "status"], cwd=PROJECT_DIR, env=env,
                            capture_output=True, text=True, timeout=60).stdout
    for node in ("node-1", "node-2"):
        line = next(ln for ln in status.splitlines() if ln.startswith(node + ":"))
        assert "asterisk up" in line and "'ari': True" in line and "kamailio sees it up" in line, status


@pytest.mark.parametrize("holder", ["caller", "callee"])
async def test_hold_and_resume_through_kamailio(cluster: Stack, carrier: Carrier, api: Api, db: asyncpg.Connection,
                                                holder: str):
    """In-dialog requests follow the dialog through Kamailio (Record-Route) both ways: the
    carrier's re-INVITEs to hold and resume reach the node that has the call, for a call in
    from the carrier (caller) and for the node's call out to it (callee); audio flows again
    after the resume."""
    sip_log = SipLog(asterisk.host_path(cluster, "carrier", "log", "sip.log"))
    courier, client = real_number(), real_number()
    session = await api.open_session(f"order-{uuid.uuid4()}", courier, client)
    leg, callee = await carrier.connected(
        courier, session["pool_number"], client, callee_phone={"tone": 1000, "listen": False}, tone=600, listen=False
    )
    holding, held = (leg, callee) if holder == "caller" else (callee, leg)
    mark = sip_log.mark()
    await carrier.hold(holding)
    assert "a=recvonly" in (await reinvite_answered(sip_log, mark, "sendonly")).text
    mark = sip_log.mark()
    await carrier.resume(holding)
    assert "a=sendrecv" in (await reinvite_answered(sip_log, mark, "sendrecv")).text
    assert not leg.ended.is_set() and not callee.ended.is_set()
    heard, rate = samples(await carrier.listen_to(held, 2))
    assert tone_share(heard, rate, holding.tone) > 0.5, "audio flows again after the resume"
    await carrier.hangup(leg)
    await asyncio.wait_for(callee.ended.wait(), 10)
    row = await until(lambda: _ended_row(db, session["id"]), 10, "ended")
    assert (row["outcome"], row["hangup_by"]) == ("answered", "caller")


async def test_a_node_whose_asterisk_hangs_and_comes_back_takes_calls_again(
    cluster: Stack, carrier: Carrier, api: Api, db: asyncpg.Connection, nodes_up: list[Stack]
):
    """SIGSTOP of node 2's Asterisk for longer than the bridge waits for ARI, then SIGCONT:
    meanwhile calls go to node 1; afterwards node 2's bridge is connected to its
    application again (not to a websocket Asterisk delivers nothing to) and takes calls."""
    node2 = nodes_up[1]
    pid = asterisk._pid(node2, "pbx")
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    try:
        # The bridge notices (its watch of the application times out) and stops saying it is healthy.
        await until(lambda: _unhealthy(node2), 40, "node 2's bridge says ARI is down")
        assert {await masked_node(carrier, api, db) for _ in range(2)} == {"node-1"}
    finally:
        os.kill(pid, signal.SIGCONT)
    await until(lambda: _healthy(node2), 40, "node 2's bridge connected again")
    seen: set[str] = set()
    async with asyncio.timeout(60):
        while "node-2" not in seen:  # (Kamailio's probes mark it up again within seconds)
            seen.add(await masked_node(carrier, api, db))


async def _unhealthy(node: Stack) -> bool:
    return not ((await asyncio.to_thread(processes.health, node)) or {}).get("ari", False)


async def _healthy(node: Stack) -> bool:
    return (await asyncio.to_thread(processes.health, node)) == {"ari": True, "database": True}


async def masked_node(carrier: Carrier, api: Api, db: asyncpg.Connection) -> str:
    """The node that put through a short masked call (answered, hung up)."""
    courier, client = real_number(), real_number()
    session = await api.open_session(f"order-{uuid.uuid4()}", courier, client)
    carrier.phone(client, action="answer", answer_after=0.1, hangup_after=0.3, listen=False)
    leg = await carrier.call(courier, session["pool_number"], listen=False)
    await asyncio.wait_for(leg.ended.wait(), 30)
    row = await until(lambda: _ended_row(db, session["id"]), 15, "the call ended")
    assert row["outcome"] == "answered", row
    return str(row["node"])


async def test_with_no_bridge_anywhere_the_caller_hears_the_service_is_unavailable(
    cluster: Stack, carrier: Carrier, api: Api, nodes_up: list[Stack]
):
    """Every node answers 503 while another is left; the last one tells the caller (an
    announcement, then cause 34), never a bare failure or silence."""
    courier, client = real_number(), real_number()
    session = await api.open_session(f"order-{uuid.uuid4()}", courier, client)
    for node in nodes_up:
        await asyncio.to_thread(processes.stop_bridge, node)
    leg = await carrier.call(courier, session["pool_number"])
    await asyncio.wait_for(leg.ended.wait(), 40)
    await asyncio.wait_for(leg.recorded.wait(), 10)
    assert carrier.incoming.empty(), "nothing rang"
    assert leg.answered_at is not None and leg.cause == 34
    heard, _ = samples(carrier.recording_path(leg))
    assert rms(heard) > 100, "the caller heard the announcement"
