"""Many nodes on one database, seen from the stack's one bridge (node-1): a second bridge for
the same node is refused; the reaper ends the calls of a node that went silent (and only
when its Asterisk no longer answers SIP); a restarted bridge resumes only its own node's
calls; caps hold for calls committed at once on two nodes; one bridge at a time sweeps;
each node's retention deletes only the recordings in its own spool.

Other nodes are rows written here (a node is a heartbeat and the calls naming it); the
tests with two real nodes behind Kamailio are in test_cluster.py."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from bridge.devstack import processes
from bridge.store import Store
from bridge.store.nodes import SWEEP_LOCK
from bridge.terms import Terms

REAPER_WAIT = 30  # seconds: the bridge's node timeout in make test is 15 s at most


async def fake_call(db: asyncpg.Connection, node: str, session_id: str | None = None,
                    state: str = "connected") -> uuid.UUID:
    """A call row of `node` that no Asterisk holds."""
    call_id = uuid.uuid4()
    await db.execute(
        """INSERT INTO calls (id, session_id, pool_number, caller_role, caller_masked, state, inbound_channel_id,
                              outbound_channel_id, node, answered_at, callee_role)
           VALUES ($1, $2, '+74950000000', 'courier', '+***00', $3, $4, $5, $6, now(), 'client')""",
        call_id, session_id and uuid.UUID(session_id), state, f"gone-{call_id}", f"gone-out-{call_id}", node,
    )
    return call_id


async def outcome_of(db: asyncpg.Connection, call_id: uuid.UUID, timeout: float = REAPER_WAIT) -> str:
    async with asyncio.timeout(timeout):
        while (row := await db.fetchrow("SELECT state, outcome FROM calls WHERE id = $1", call_id))["state"] != "ended":
            await asyncio.sleep(0.1)  # wait-ok: polling the database the bridge writes to
    return str(row["outcome"])


@pytest.fixture
async def nodes(db: asyncpg.Connection) -> AsyncIterator[list[str]]:
    """Node ids for a test; their rows and calls are gone afterwards."""
    made: list[str] = []
    yield made
    await db.execute("UPDATE calls SET state = 'ended', ended_at = now(), outcome = 'failed' "
                     "WHERE node = ANY($1) AND state <> 'ended'", made)
    await db.execute("DELETE FROM nodes WHERE id = ANY($1)", made)


def node_id(nodes: list[str], name: str) -> str:
    nodes.append(f"{name}-{uuid.uuid4().hex[:6]}")
    return nodes[-1]


def test_a_second_bridge_for_the_same_node_stops_with_a_clear_error(stack):
    """The leftover-bridge trap: a second bridge started as node-1 would take the Stasis
    application from the running one. It exits at once (status 2) and says why; the running
    bridge is not disturbed."""
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MB_")}, **stack.bridge_env(),
           "MB_API_PORT": str(int(stack.env["MB_API_PORT"]) + 7)}
    done = subprocess.run([sys.executable, "-m", "bridge"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "another bridge already runs as node 'node-1'" in done.stderr
    assert "Traceback" not in done.stderr
    assert processes.health(stack) == {"ari": True, "database": True}


async def test_the_calls_of_a_silent_node_end_as_node_lost_with_one_webhook_each(db, api, real_number, nodes):
    session = await api.open_session(f"order-{uuid.uuid4()}", real_number(), real_number())
    ghost = node_id(nodes, "ghost")
    # Its bridge last beat its heart an hour ago, and nothing answers SIP where its Asterisk was.
    await db.execute("INSERT INTO nodes (id, heartbeat_at, sip_address) VALUES ($1, now() - interval '1 hour', "
                     "'127.0.0.1:9')", ghost)
    talking = await fake_call(db, ghost, session["id"])
    ringing = await fake_call(db, ghost, session["id"], state="ringing")
    # (The talking call began before the node's last heartbeat, the ringing one after it.)
    await db.execute("UPDATE calls SET started_at = now() - interval '2 hours', answered_at = now() - interval "
                     "'2 hours' WHERE id = $1", talking)
    assert await outcome_of(db, talking) == "node_lost"
    assert await outcome_of(db, ringing) == "node_lost"
    heartbeat = await db.fetchval("SELECT heartbeat_at FROM nodes WHERE id = $1", ghost)
    row = await db.fetchrow("SELECT hangup_by, ended_at FROM calls WHERE id = $1", talking)
    # It ended when its node was last known to carry it, not when it was reaped an hour on.
    assert (row["hangup_by"], row["ended_at"]) == ("system", heartbeat)
    row = await db.fetchrow("SELECT ended_at, started_at, answered_at FROM calls WHERE id = $1", ringing)
    assert row["ended_at"] == max(row["started_at"], row["answered_at"]), "never before the call began"
    for call_id in (talking, ringing):
        assert await db.fetchval(
            "SELECT count(*) FROM webhook_outbox WHERE event = 'call.ended' AND payload->>'call_id' = $1",
            str(call_id),
        ) == 1


async def test_a_node_whose_bridge_is_silent_but_whose_asterisk_answers_keeps_its_calls(stack, db, nodes):
    """Its Asterisk still carries the calls (its bridge alone is down, or restarting): they
    are not given up. (A ghost node written after it is reaped: the reaper has had a look.)"""
    sleepy = node_id(nodes, "sleepy")
    await db.execute("INSERT INTO nodes (id, heartbeat_at, sip_address) VALUES ($1, now() - interval '1 hour', $2)",
                     sleepy, f"{stack.env['MB_PBX_SIP_BIND']}:{stack.env['MB_PBX_SIP_PORT']}")
    kept = await fake_call(db, sleepy)
    ghost = node_id(nodes, "ghost")
    await db.execute("INSERT INTO nodes (id, heartbeat_at) VALUES ($1, now() - interval '1 hour')", ghost)
    assert await outcome_of(db, await fake_call(db, ghost)) == "node_lost"
    assert await db.fetchval("SELECT state FROM calls WHERE id = $1", kept) == "connected"


async def test_a_node_beating_its_heart_keeps_its_calls_and_a_restarted_bridge_leaves_them_alone(stack, db, nodes):
    """A replica touches only its own node's calls: the restarted bridge finishes the call row
    node-1 left behind (no channel of it is live) and not the other node's."""
    other = node_id(nodes, "other")
    await db.execute("INSERT INTO nodes (id, heartbeat_at) VALUES ($1, now() + interval '1 hour')", other)
    theirs = await fake_call(db, other)
    ours = await fake_call(db, "node-1")
    await asyncio.to_thread(processes.stop_bridge, stack)
    await asyncio.to_thread(processes.start_bridge, stack)
    assert await outcome_of(db, ours) == "answered"  # (finished as left behind: it had been answered)
    assert await db.fetchval("SELECT hangup_by FROM calls WHERE id = $1", ours) == "system"
    assert await db.fetchval("SELECT state FROM calls WHERE id = $1", theirs) == "connected"


async def test_caps_hold_for_calls_committed_at_once_on_two_nodes(stack, db, api, real_number):
    """Five calls of one session, each written by a node of its own at the same moment, on a
    session capped at two calls an hour: two are put through, three are not."""
    session = await api.open_session(f"order-{uuid.uuid4()}", real_number(), real_number(), calls_per_hour=2)
    participants = {r["role"]: r["id"] for r in await db.fetch(
        "SELECT role, id FROM participants WHERE session_id = $1", uuid.UUID(session["id"]))}
    pool = await asyncpg.create_pool(stack.database_url, min_size=5, max_size=5)
    try:
        async def call(node: str) -> bool:
            return await Store(pool, node=node).insert_call(
                uuid.uuid4(), session_id=uuid.UUID(session["id"]), pool_number=session["pool_number"],
                caller_role="courier", caller_masked="+***00", inbound_channel_id=f"in-{uuid.uuid4()}",
                state="routing", caller_participant_id=participants["courier"], callee_role="client",
                callee_participant_id=participants["client"], terms=Terms(calls_per_hour=2),
            )

        admitted = await asyncio.gather(*(call(f"n{i}") for i in range(5)))
    finally:
        await pool.close()
    assert sorted(admitted) == [False, False, False, True, True]
    rows = await db.fetch("SELECT callee_role FROM calls WHERE session_id = $1", uuid.UUID(session["id"]))
    assert sorted(r["callee_role"] or "" for r in rows) == ["", "", "", "client", "client"]
    await db.execute("UPDATE calls SET state = 'ended', ended_at = now(), outcome = 'failed' "
                     "WHERE session_id = $1 AND state <> 'ended'", uuid.UUID(session["id"]))


async def test_one_bridge_at_a_time_sweeps(stack, db, api, real_number):
    """While another bridge holds the sweep (its lock here), a session past its expiry is
    left to it; once released, this bridge sweeps it."""
    holder = await asyncpg.connect(stack.database_url)
    try:
        # (taken as soon as the stack's own bridge is not sweeping: a sweep running just now
        # holds it for a moment, and a try at that moment failed this test once)
        await holder.execute("SET lock_timeout = '10s'")
        await holder.execute("SELECT pg_advisory_lock($1)", SWEEP_LOCK)
        session = await api.open_session(f"order-{uuid.uuid4()}", real_number(), real_number(), ttl_seconds=1)
        # (past its expiry, the session is due: the bridge would sweep it within about a second)
        async with asyncio.timeout(10):
            while await db.fetchval("SELECT maskbridge_session_due(s) IS NULL FROM sessions s WHERE id = $1",
                                    uuid.UUID(session["id"])):
                await asyncio.sleep(0.1)  # wait-ok: waiting for the clock to pass the expiry
        # The bridge's housekeeping looks at least once a second: a round that found the lock
        # taken leaves a mark in the metrics' last-run gauge; two of them have passed here.
        await housekeeping_rounds(api, 2)
        assert await db.fetchval("SELECT status FROM sessions WHERE id = $1", uuid.UUID(session["id"])) == "open"
    finally:
        await holder.close()
    async with asyncio.timeout(10):
        while await db.fetchval("SELECT status FROM sessions WHERE id = $1", uuid.UUID(session["id"])) == "open":
            await asyncio.sleep(0.1)  # wait-ok: polling the database the bridge writes to


async def housekeeping_rounds(api, rounds: int) -> None:
    """Wait for `rounds` more runs of the bridge's housekeeping (its last-run gauge moving)."""
    seen: list[float] = []
    async with asyncio.timeout(60):
        while len(set(seen)) <= rounds:
            text = await api.metrics()
            for line in text.splitlines():
                if line.startswith("maskbridge_housekeeping_last_run_timestamp_seconds "):
                    seen.append(float(line.split()[1]))
            await asyncio.sleep(0.2)  # wait-ok: polling the metrics for the next round


async def test_each_node_deletes_only_the_recordings_in_its_own_spool(stack, db, nodes):
    other = node_id(nodes, "other")
    await db.execute("INSERT INTO nodes (id, heartbeat_at) VALUES ($1, now() + interval '1 hour')", other)
    ids = {}
    for node in ("node-1", other):
        call_id = await fake_call(db, node)
        await db.execute("UPDATE calls SET state = 'ended', ended_at = now() - interval '40 days', outcome = 'answered' "
                         "WHERE id = $1", call_id)
        ids[node] = await db.fetchval(
            """INSERT INTO recordings (call_id, name, format, started_at, ended_at)
               VALUES ($1, $2, 'wav', now() - interval '40 days', now() - interval '40 days') RETURNING id""",
            call_id, f"rec-{call_id}",
        )
    pool = await asyncpg.create_pool(stack.database_url, min_size=1, max_size=2)
    try:
        due = {r.id for r in await Store(pool, node="node-1").recordings.due_for_deletion(30, "node-1")}
        theirs = {r.id for r in await Store(pool, node=other).recordings.due_for_deletion(30, other)}
    finally:
        await pool.close()
    assert ids["node-1"] in due and ids[other] not in due
    assert ids[other] in theirs and ids["node-1"] not in theirs
    await db.execute("UPDATE recordings SET deleted_at = now() WHERE id = ANY($1)", list(ids.values()))


async def test_two_bridges_started_at_once_on_one_asterisk_are_not_both_let_through(stack, db, nodes):
    """Two node ids, one Asterisk, guarded at the same moment: one goes on, the other is
    refused. (The carrier's Asterisk plays an Asterisk no node drives yet.)"""
    from bridge import nodes as node_module
    from bridge.ari import AriClient

    ids = [node_id(nodes, "racer"), node_id(nodes, "racer")]
    carrier_ari = f"http://{stack.env['MB_TRUNK_HOST']}:{stack.env['MB_CARRIER_ARI_PORT']}"
    for _round in range(3):
        conns = [await node_module.claim(stack.database_url, i, None, None) for i in ids]
        aris = [AriClient(carrier_ari, "carrier", stack.env["MB_CARRIER_ARI_PASSWORD"], "race") for _ in ids]
        try:
            outcomes = await asyncio.gather(*(node_module.guard_asterisk(a, c, i, 15) for a, c, i in zip(aris, conns, ids)),
                                            return_exceptions=True)
        finally:
            for a in aris:
                await a.close()
            for c in conns:
                await c.close()
        assert sorted(type(o).__name__ for o in outcomes) == ["NodeTaken", "NoneType"], outcomes
        await db.execute("UPDATE nodes SET asterisk_entity_id = NULL WHERE id = ANY($1)", ids)
