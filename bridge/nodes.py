"""One bridge per node, many nodes on one database.

A node is an Asterisk and its bridge. The bridge claims its node id for as long as it runs
(a session advisory lock on a connection of its own): a second bridge started as the same
node, which would take the Stasis application from the first and leave it deaf, stops at
once with a clear error. The claim's connection also beats the node's heart (nodes.heartbeat_at).

Any bridge reaps a node that went silent: when a node has not beaten its heart for
MB_NODE_TIMEOUT seconds and its Asterisk does not answer a SIP OPTIONS either, its calls in
progress are ended as 'node_lost' (one call.ended webhook each). A node whose bridge alone is
down keeps its calls: its Asterisk still carries them, and its bridge resumes them when it
comes back.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable

import asyncpg
import structlog

from bridge import metrics
from bridge.ari import AriClient, AriError
from bridge.store.db import COMMAND_TIMEOUT, CONNECT_TIMEOUT
from bridge.store.errors import database_unreachable
from bridge.store.nodes import NodeRepo, node_lock_sql

log = structlog.get_logger(__name__)

PROBE_TIMEOUT = 1.0  # seconds a SIP OPTIONS waits for an answer, per try
PROBE_TRIES = 3


class NodeTaken(Exception):
    """Another bridge runs as this node."""


def application_name(node: str) -> str:
    return f"maskbridge-node:{node}"[:63]


async def claim(dsn: str, node: str, api_url: str | None, sip_address: str | None) -> asyncpg.Connection:
    """The connection that holds this node's claim (and registers the node); raises NodeTaken
    when another bridge holds it."""
    conn = await asyncpg.connect(dsn, server_settings={"application_name": application_name(node)},
                                 timeout=CONNECT_TIMEOUT, command_timeout=COMMAND_TIMEOUT)
    try:
        if not await conn.fetchval(node_lock_sql("pg_try_advisory_lock"), node):
            holder = await conn.fetchrow(
                """SELECT a.client_addr::text AS address, a.backend_start FROM pg_locks l
                   JOIN pg_stat_activity a ON a.pid = l.pid
                   WHERE l.locktype = 'advisory' AND l.granted AND a.application_name = $1 AND a.pid <> pg_backend_pid()
                   LIMIT 1""",
                application_name(node),
            )
            where = (f" (its database connection: from {holder['address'] or 'a local socket'}, "
                     f"since {holder['backend_start']:%Y-%m-%d %H:%M:%S %Z})") if holder else ""
            raise NodeTaken(
                f"another bridge already runs as node {node!r}{where}: two bridges on one Asterisk would take the "
                "Stasis application from each other. Stop it (make stop), or give this one its own MB_NODE_ID "
                "and its own Asterisk."
            )
        await NodeRepo.register(conn, node, api_url, sip_address)
    except BaseException:
        await conn.close()
        raise
    return conn


async def guard_asterisk(ari: AriClient, conn: asyncpg.Connection, node: str, timeout: float) -> None:
    """Refuse (NodeTaken) to drive an Asterisk another live node's bridge drives: two bridges
    with different node ids on one Asterisk would take its Stasis application from each other.
    The Asterisk is known by its entity id; one that does not answer yet is looked at by
    nobody (its bridge connects when it is up, and the other nodes' bridges would have
    refused first)."""
    try:
        entity = await ari.entity_id()
    except AriError as exc:
        log.warning("node.asterisk_not_checked", node=node, error=str(exc))
        return
    if not entity:
        return
    async with conn.transaction():
        # (one bridge at a time per Asterisk between the look and the claim: two started at once
        # would both find nobody)
        await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended('maskbridge-asterisk:' || $1, 0))",
                           entity)
        other = await conn.fetchval(
            """SELECT id FROM nodes WHERE asterisk_entity_id = $1 AND id <> $2
                 AND heartbeat_at > now() - make_interval(secs => $3) LIMIT 1""",
            entity, node, timeout,
        )
        if other is None:
            await conn.execute("UPDATE nodes SET asterisk_entity_id = $1, heartbeat_at = now() WHERE id = $2",
                               entity, node)
            return
    raise NodeTaken(
        f"node {other!r} already runs a bridge on this Asterisk (entity id {entity}): two bridges on one "
        f"Asterisk would take the Stasis application from each other. Give this node ({node!r}) its own "
        "Asterisk (MB_ARI_URL), or stop the other bridge. (Or two Asterisks were given one entityid: each "
        "node's must be its own, MB_ENTITYID.)"
    )


async def sip_answers(address: str, timeout: float = PROBE_TIMEOUT, tries: int = PROBE_TRIES) -> bool:
    """Whether anything answers a SIP OPTIONS at host:port over UDP (any response counts:
    an Asterisk that refuses us is still alive)."""
    host, _, port = address.rpartition(":")
    loop = asyncio.get_running_loop()
    call_id = uuid.uuid4().hex
    answered: asyncio.Future[bool] = loop.create_future()

    class Probe(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: object) -> None:
            if data.startswith(b"SIP/2.0 ") and call_id.encode() in data and not answered.done():
                answered.set_result(True)

        def error_received(self, exc: Exception) -> None:
            pass  # (an ICMP "port unreachable": nothing listens; the tries run out)

    try:
        transport, _ = await loop.create_datagram_endpoint(Probe, remote_addr=(host, int(port)))
    except OSError:
        return False
    try:
        local_host, local_port = transport.get_extra_info("sockname")[:2]
        for attempt in range(tries):
            request = (
                f"OPTIONS sip:{host}:{port} SIP/2.0\r\n"
                f"Via: SIP/2.0/UDP {local_host}:{local_port};branch=z9hG4bK{uuid.uuid4().hex};rport\r\n"
                "Max-Forwards: 70\r\n"
                f"From: <sip:maskbridge@{local_host}>;tag={uuid.uuid4().hex[:10]}\r\n"
                f"To: <sip:{host}:{port}>\r\n"
                f"Call-ID: {call_id}\r\n"
                f"CSeq: {attempt + 1} OPTIONS\r\n"
                "User-Agent: maskbridge-reaper\r\n"
                "Content-Length: 0\r\n\r\n"
            )
            transport.sendto(request.encode())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    return await asyncio.shield(answered)
        return False
    finally:
        transport.close()


class NodeKeeper:
    """Holds this node's claim, beats its heart and reaps silent nodes, until `stop`. If the
    claim is lost to another bridge (after a database restart), it says so and stops the
    process (`taken` is set).

    The heart beats only while `alive()` says so (the bridge's ARI connection is up): a
    bridge whose Asterisk died is a node that is gone, and the others reap its calls once
    its Asterisk does not answer SIP either."""

    def __init__(self, dsn: str, repo: NodeRepo, node: str, *, api_url: str | None, sip_address: str | None,
                 timeout: float, webhooks: bool, conn: asyncpg.Connection,
                 alive: Callable[[], bool] = lambda: True,
                 after_silence: Callable[[], Awaitable[None]] | None = None) -> None:
        self.alive = alive
        # Run at the first heartbeats after one missed for `timeout` s or more (the others may
        # have reaped this node's calls meanwhile): the bridge ends those still up here.
        self.after_silence = after_silence
        self._last_beat: float | None = None  # (monotonic) the last heartbeat written
        self._look_again = 0  # heartbeats at which after_silence runs still
        self.dsn = dsn
        self.repo = repo
        self.node = node
        self.api_url = api_url
        self.sip_address = sip_address
        self.timeout = timeout
        self.webhooks = webhooks
        self.conn: asyncpg.Connection | None = conn
        self.taken: NodeTaken | None = None
        self.beat_every = min(2.0, timeout / 4)
        self._kept: set[str] = set()  # silent nodes whose Asterisk answers (said once each)

    async def run(self, stop: asyncio.Event) -> None:
        try:
            while not stop.is_set():
                await self._beat()
                if self.taken is not None:
                    stop.set()
                    return
                await self._after_silence()
                await self._reap()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.beat_every):
                        await stop.wait()
        finally:
            if self.conn is not None and not self.conn.is_closed():
                await self.conn.close()

    async def _beat(self) -> None:
        try:
            if self.conn is None or self.conn.is_closed():
                self.conn = None
                self.conn = await claim(self.dsn, self.node, self.api_url, self.sip_address)
                log.info("node.claimed_again", node=self.node)
            if self.alive():
                await NodeRepo.beat(self.conn, self.node)
                metrics.NODE_HEARTBEAT.set_to_current_time()
                now = time.monotonic()
                if self._last_beat is not None and now - self._last_beat >= self.timeout:
                    # (Three times: a reaper that found this node silent just before this beat
                    # may still be ending its calls, in a transaction not committed yet.)
                    log.warning("node.heart_was_silent", node=self.node, seconds=round(now - self._last_beat, 1))
                    self._look_again = 3
                self._last_beat = now
            else:
                await self.conn.fetchval("SELECT 1")  # (the claim's connection, kept alive)
        except NodeTaken as exc:
            log.error("node.taken", node=self.node, error=str(exc))
            self.taken = exc
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("node.heartbeat_failed", node=self.node, error=str(exc) or type(exc).__name__)
            if self.conn is not None:
                with contextlib.suppress(Exception):
                    await self.conn.close()
                self.conn = None

    async def _after_silence(self) -> None:
        if not self._look_again or self.after_silence is None:
            return
        self._look_again -= 1
        try:
            await self.after_silence()
        except Exception as exc:
            if database_unreachable(exc):
                log.warning("node.reaped_calls_unread", node=self.node, error=type(exc).__name__)
                self._look_again += 1  # (again at the next heartbeat)
            else:
                log.exception("node.reaped_calls_failed")

    async def _reap(self) -> None:
        try:
            kept = set()
            for silent in await self.repo.silent(self.node, self.timeout):
                if silent.sip_address and await sip_answers(silent.sip_address):
                    kept.add(silent.id)
                    if silent.id not in self._kept:
                        log.warning("node.bridge_silent_asterisk_alive", node=silent.id, calls=silent.calls)
                    continue
                ended = await self.repo.end_lost_calls(silent.id, self.timeout, self.webhooks)
                if ended:
                    metrics.NODE_LOST_CALLS.labels(silent.id).inc(ended)
                    log.warning("node.lost", node=silent.id, calls_ended=ended,
                                last_heartbeat=silent.heartbeat_at.isoformat())
            self._kept = kept
        except Exception as exc:
            if database_unreachable(exc):
                log.warning("node.reaper_database_unavailable", error=type(exc).__name__)
            else:
                log.exception("node.reaper_failed")
