"""Named queries over sessions, participants, pool numbers and calls."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg


@dataclass(frozen=True)
class Route:
    """Where a call from (caller, pool number) goes."""

    session_id: uuid.UUID
    caller_role: str
    callee_number: str


@dataclass(frozen=True)
class SessionRow:
    id: uuid.UUID
    order_id: str
    pool_number: str
    status: str
    courier_number: str
    client_number: str
    created_at: datetime
    closed_at: datetime | None


class PairTaken(Exception):
    """A participant already holds this pool number in another live session."""


_SESSION_SELECT = """
    SELECT s.id, s.order_id, s.pool_number, s.status, s.created_at, s.closed_at,
           co.real_number AS courier_number, cl.real_number AS client_number
    FROM sessions s
    JOIN participants co ON co.session_id = s.id AND co.role = 'courier'
    JOIN participants cl ON cl.session_id = s.id AND cl.role = 'client'
"""


def _session(row: asyncpg.Record | None) -> SessionRow | None:
    return SessionRow(**dict(row)) if row is not None else None


class Store:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    # --- pool numbers ------------------------------------------------------------

    async def add_pool_numbers(self, numbers: list[str], region: str | None = None) -> None:
        await self.pool.executemany(
            "INSERT INTO pool_numbers (number, region) VALUES ($1, $2) ON CONFLICT (number) DO NOTHING",
            [(n, region) for n in numbers],
        )

    async def free_pool_numbers(self, real_numbers: list[str]) -> list[str]:
        """Active pool numbers none of these real numbers holds live, least used first."""
        rows = await self.pool.fetch(
            """
            SELECT p.number
            FROM pool_numbers p
            WHERE p.state = 'active'
              AND NOT EXISTS (SELECT 1 FROM participants x
                              WHERE x.live AND x.pool_number = p.number AND x.real_number = ANY($1))
            ORDER BY (SELECT count(*) FROM participants y WHERE y.live AND y.pool_number = p.number),
                     p.number
            """,
            real_numbers,
        )
        return [r["number"] for r in rows]

    # --- sessions ----------------------------------------------------------------

    async def open_session_for_order(self, order_id: str) -> SessionRow | None:
        return _session(await self.pool.fetchrow(_SESSION_SELECT + " WHERE s.order_id = $1 AND s.status = 'open'", order_id))

    async def get_session(self, session_id: uuid.UUID) -> SessionRow | None:
        return _session(await self.pool.fetchrow(_SESSION_SELECT + " WHERE s.id = $1", session_id))

    async def insert_session(self, order_id: str, pool_number: str, courier: str, client: str) -> SessionRow:
        """Insert a session and both participants in one transaction.

        Raises PairTaken when a participant holds the pool number live elsewhere, and
        asyncpg.UniqueViolationError on sessions_one_open_per_order (a racing open).
        """
        async with self.pool.acquire() as conn, conn.transaction():
            session_id = await conn.fetchval(
                "INSERT INTO sessions (order_id, pool_number) VALUES ($1, $2) RETURNING id", order_id, pool_number
            )
            try:
                await conn.executemany(
                    "INSERT INTO participants (session_id, role, real_number, pool_number) VALUES ($1, $2, $3, $4)",
                    [(session_id, "courier", courier, pool_number), (session_id, "client", client, pool_number)],
                )
            except asyncpg.UniqueViolationError as exc:
                if exc.constraint_name == "participants_live_pair":
                    raise PairTaken(pool_number) from exc
                raise
            row = await conn.fetchrow(_SESSION_SELECT + " WHERE s.id = $1", session_id)
        result = _session(row)
        assert result is not None
        return result

    async def close_session(self, session_id: uuid.UUID) -> SessionRow | None:
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "UPDATE sessions SET status = 'closed', closed_at = now() WHERE id = $1 AND status = 'open'", session_id
            )
            await conn.execute("UPDATE participants SET live = false WHERE session_id = $1", session_id)
            return _session(await conn.fetchrow(_SESSION_SELECT + " WHERE s.id = $1", session_id))

    # --- routing -----------------------------------------------------------------

    async def find_route(self, caller: str, pool_number: str) -> Route | None:
        row = await self.pool.fetchrow(
            """
            SELECT p.session_id, p.role, o.real_number AS callee
            FROM participants p
            JOIN sessions s ON s.id = p.session_id AND s.status = 'open'
            JOIN participants o ON o.session_id = p.session_id AND o.role <> p.role
            WHERE p.real_number = $1 AND p.pool_number = $2 AND p.live
            """,
            caller,
            pool_number,
        )
        if row is None:
            return None
        return Route(session_id=row["session_id"], caller_role=row["role"], callee_number=row["callee"])

    async def last_ended_session(self, caller: str, pool_number: str) -> uuid.UUID | None:
        """The most recent closed session in which this caller held this pool number."""
        return await self.pool.fetchval(
            """
            SELECT s.id FROM participants p JOIN sessions s ON s.id = p.session_id
            WHERE p.real_number = $1 AND p.pool_number = $2 AND NOT p.live
            ORDER BY s.closed_at DESC NULLS LAST LIMIT 1
            """,
            caller,
            pool_number,
        )

    # --- calls -------------------------------------------------------------------

    async def insert_call(
        self,
        call_id: uuid.UUID,
        *,
        session_id: uuid.UUID | None,
        pool_number: str,
        caller_role: str | None,
        caller_masked: str,
        inbound_channel_id: str,
        state: str,
    ) -> None:
        await self.pool.execute(
            """
            INSERT INTO calls (id, session_id, pool_number, caller_role, caller_masked, inbound_channel_id, state)
            VALUES ($1, $2, $3, $4, $5, $6, $7)
            """,
            call_id, session_id, pool_number, caller_role, caller_masked, inbound_channel_id, state,
        )

    async def call_ringing(self, call_id: uuid.UUID, outbound_channel_id: str, bridge_id: str) -> None:
        await self.pool.execute(
            "UPDATE calls SET state = 'ringing', outbound_channel_id = $2, bridge_id = $3 WHERE id = $1",
            call_id, outbound_channel_id, bridge_id,
        )

    async def call_connected(self, call_id: uuid.UUID) -> None:
        await self.pool.execute(
            "UPDATE calls SET state = 'connected', answered_at = now() WHERE id = $1 AND state <> 'ended'", call_id
        )

    async def call_announcing(self, call_id: uuid.UUID) -> None:
        await self.pool.execute("UPDATE calls SET state = 'announcing' WHERE id = $1 AND state <> 'ended'", call_id)

    async def call_ended(self, call_id: uuid.UUID, outcome: str, hangup_by: str, cause: int | None) -> None:
        await self.pool.execute(
            """
            UPDATE calls SET state = 'ended', ended_at = now(), outcome = $2, hangup_by = $3, hangup_cause = $4
            WHERE id = $1 AND state <> 'ended'
            """,
            call_id, outcome, hangup_by, cause,
        )

    async def active_calls(self) -> list[dict[str, Any]]:
        rows = await self.pool.fetch("SELECT * FROM calls WHERE state <> 'ended' ORDER BY started_at")
        return [dict(r) for r in rows]

    async def session_calls(self, session_id: uuid.UUID) -> list[dict[str, Any]]:
        rows = await self.pool.fetch(
            """
            SELECT id, caller_role, state, outcome, hangup_by, hangup_cause,
                   started_at, answered_at, ended_at, duration_seconds
            FROM calls WHERE session_id = $1 ORDER BY started_at
            """,
            session_id,
        )
        return [dict(r) for r in rows]

    async def get_call(self, call_id: uuid.UUID) -> dict[str, Any] | None:
        row = await self.pool.fetchrow("SELECT * FROM calls WHERE id = $1", call_id)
        return dict(row) if row is not None else None
