"""The nodes sharing this database: each one's heartbeat, and the calls of a node that was
lost. (The claim on a node id, a session-level advisory lock, is held by bridge.nodes on a
connection of its own.)"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import asyncpg

# Advisory lock keys (pg_advisory_lock's bigint space; the migrator's is 0x6D61736B).
REAPER_LOCK = 0x6D62_7265_6170  # one reaper at a time
SWEEP_LOCK = 0x6D62_7377_6570  # one housekeeping sweep (and number purge) at a time


def node_lock_sql(function: str) -> str:
    """The advisory lock on one node id ($1): held by the bridge running as that node."""
    return f"SELECT {function}(hashtextextended('maskbridge-node:' || $1, 0))"


@dataclass(frozen=True)
class SilentNode:
    id: str
    heartbeat_at: datetime
    sip_address: str | None
    calls: int  # its calls still in progress in the database


class NodeRepo:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    @staticmethod
    async def register(conn: asyncpg.Connection, node: str, api_url: str | None, sip_address: str | None) -> None:
        await conn.execute(
            """INSERT INTO nodes (id, api_url, sip_address) VALUES ($1, $2, $3)
               ON CONFLICT (id) DO UPDATE SET started_at = now(), heartbeat_at = now(),
                                              api_url = EXCLUDED.api_url, sip_address = EXCLUDED.sip_address""",
            node, api_url, sip_address,
        )

    @staticmethod
    async def beat(conn: asyncpg.Connection, node: str) -> None:
        await conn.execute("UPDATE nodes SET heartbeat_at = now() WHERE id = $1", node)

    async def api_url(self, node: str) -> str | None:
        url: str | None = await self.pool.fetchval("SELECT api_url FROM nodes WHERE id = $1", node)
        return url

    async def silent(self, me: str, timeout: float) -> list[SilentNode]:
        """Other nodes whose bridge has not beaten its heart for `timeout` seconds and that
        still have calls in progress in the database (a node row is written by its first
        bridge; calls of a node that never had one count as silent as well)."""
        rows = await self.pool.fetch(
            """SELECT c.node AS id, coalesce(n.heartbeat_at, '-infinity') AS heartbeat_at, n.sip_address,
                      count(*) AS calls
               FROM calls c LEFT JOIN nodes n ON n.id = c.node
               WHERE c.state <> 'ended' AND c.node <> $1
                 AND (n.id IS NULL OR n.heartbeat_at < now() - make_interval(secs => $2))
               GROUP BY c.node, n.heartbeat_at, n.sip_address""",
            me, timeout,
        )
        return [SilentNode(**dict(r)) for r in rows]

    async def end_lost_calls(self, node: str, timeout: float, webhooks: bool) -> int:
        """End the calls in progress of a node that is still silent, as 'node_lost' (one
        call.ended event each), and close their recordings: the audio, whatever was written,
        stays in that node's spool. One reaper at a time (the others skip); a node that came
        back meanwhile keeps its calls. Returns how many calls ended."""
        async with self.pool.acquire() as conn, conn.transaction():
            if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", REAPER_LOCK):
                return 0
            back = await conn.fetchval(
                """SELECT EXISTS (SELECT 1 FROM nodes
                                  WHERE id = $1 AND heartbeat_at >= now() - make_interval(secs => $2))""",
                node, timeout,
            )
            if back:
                return 0
            ended: int = await conn.fetchval(
                """
                WITH call AS (
                    -- Ended when the node was last known to carry them: its last heartbeat (it
                    -- beats while its bridge is connected to its Asterisk), not the reaping
                    -- MB_NODE_TIMEOUT and more later.
                    UPDATE calls SET state = 'ended', outcome = 'node_lost', hangup_by = 'system',
                                     ended_at = greatest(
                                         coalesce((SELECT heartbeat_at FROM nodes WHERE id = $1), now()),
                                         started_at, answered_at)
                    WHERE node = $1 AND state <> 'ended'
                    RETURNING calls AS r
                ), touched AS (
                    UPDATE sessions s SET last_activity_at = now()
                    FROM call WHERE s.id = (call.r).session_id AND (call.r).callee_role IS NOT NULL
                      AND s.status = 'open'
                ), recorded AS (
                    UPDATE recordings r SET ended_at = coalesce(r.ended_at, now())
                    FROM call WHERE r.call_id = (call.r).id
                ), hook AS (
                    INSERT INTO webhook_outbox (event, payload)
                    SELECT 'call.ended', maskbridge_call_event(call.r) || jsonb_build_object(
                               'recording_id', (SELECT r.id FROM recordings r WHERE r.call_id = (call.r).id))
                    FROM call WHERE $2 AND (call.r).session_id IS NOT NULL
                )
                SELECT count(*) FROM call
                """,
                node, webhooks,
            )
            return ended
