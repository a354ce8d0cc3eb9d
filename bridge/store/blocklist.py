"""The blocklist of real numbers, and the notification that ends their calls in progress."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from bridge.requester import request_token
from bridge.store.errors import StoreError

CHANNEL = "maskbridge_blocklist"  # NOTIFY payload: the blocked number's blind index, hex


@dataclass(frozen=True)
class BlockedRow:
    id: uuid.UUID
    number_enc: bytes
    reason: str | None
    created_at: datetime


class BlocklistRepo:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def add(self, entry_id: uuid.UUID, idx: bytes, enc: bytes, reason: str | None) -> tuple[BlockedRow, bool]:
        """Block a number (or return its entry); every bridge listening ends its calls."""
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                """INSERT INTO blocked_numbers (id, number_idx, number_enc, reason, created_by_token)
                   VALUES ($1, $2, $3, $4, $5)
                   ON CONFLICT (number_idx) DO NOTHING RETURNING id, number_enc, reason, created_at""",
                entry_id, idx, enc, reason, request_token(),  # (the API token's name, when the API blocks it)
            )
            created = row is not None
            if row is None:
                row = await conn.fetchrow(
                    "SELECT id, number_enc, reason, created_at FROM blocked_numbers WHERE number_idx = $1", idx
                )
            # Also when it was blocked already: a call that raced the first block is ended too.
            await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, idx.hex())
        if row is None:  # inserted by nobody, yet conflicting: the transaction would have failed
            raise StoreError("the blocklist entry vanished while it was written")
        return BlockedRow(**dict(row)), created

    async def page(self, after: tuple[datetime, uuid.UUID] | None, limit: int) -> list[BlockedRow]:
        rows = await self.pool.fetch(
            """SELECT id, number_enc, reason, created_at FROM blocked_numbers
               WHERE ($1::timestamptz IS NULL OR (created_at, id) > ($1, $2::uuid))
               ORDER BY created_at, id LIMIT $3""",
            after[0] if after else None, after[1] if after else None, limit,
        )
        return [BlockedRow(**dict(r)) for r in rows]

    async def remove(self, entry_id: uuid.UUID) -> BlockedRow | None:
        row = await self.pool.fetchrow(
            "DELETE FROM blocked_numbers WHERE id = $1 RETURNING id, number_enc, reason, created_at", entry_id
        )
        return BlockedRow(**dict(row)) if row is not None else None

    async def blocked_among(self, participant_ids: set[uuid.UUID]) -> set[uuid.UUID]:
        """Which of these participants' numbers are blocked."""
        if not participant_ids:
            return set()
        rows = await self.pool.fetch(
            """SELECT p.id FROM participants p JOIN blocked_numbers b ON b.number_idx = p.number_idx
               WHERE p.id = ANY($1::uuid[])""",
            list(participant_ids),
        )
        return {r["id"] for r in rows}

    async def participant_ids(self, idx: bytes) -> set[uuid.UUID]:
        """Every participant row of a real number: the calls it is on carry these ids."""
        return {r["id"] for r in await self.pool.fetch("SELECT id FROM participants WHERE number_idx = $1", idx)}
