"""The blocklist of real numbers, and the notification that ends their calls in progress.

A block may carry an expiry: from then on it blocks nothing (every read goes through the
view live_blocked_numbers, sql/025), and housekeeping deletes it later (remove_expired)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from bridge.requester import request_token
from bridge.store.errors import StoreError

CHANNEL = "maskbridge_blocklist"  # NOTIFY payload: the blocked number's blind index, hex
_COLUMNS = "id, number_enc, reason, created_at, expires_at"
EXPIRED_BATCH = 1000  # expired entries deleted per statement


@dataclass(frozen=True)
class BlockedRow:
    id: uuid.UUID
    number_enc: bytes
    reason: str | None
    created_at: datetime
    expires_at: datetime | None  # None: until unblocked


class BlocklistRepo:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def add(
        self, entry_id: uuid.UUID, idx: bytes, enc: bytes, reason: str | None, ttl_seconds: int | None = None
    ) -> tuple[BlockedRow, bool]:
        """Block a number for `ttl_seconds` (None: until unblocked) as entry `entry_id`, or
        return its entry in force, whose expiry becomes the later of the two (a block is never
        shortened by blocking again); every bridge listening ends its calls."""
        async with self.pool.acquire() as conn, conn.transaction():
            # An expired entry blocks nothing: a new block replaces it (a new entry).
            await conn.execute("DELETE FROM blocked_numbers WHERE number_idx = $1 AND expires_at <= now()", idx)
            row = await conn.fetchrow(
                f"""INSERT INTO blocked_numbers (id, number_idx, number_enc, reason, created_by_token, expires_at)
                    VALUES ($1, $2, $3, $4, $5, now() + make_interval(secs => $6))
                    ON CONFLICT (number_idx) DO NOTHING RETURNING {_COLUMNS}""",
                entry_id, idx, enc, reason, request_token(),  # (the API token's name, when the API blocks it)
                ttl_seconds,
            )
            created = row is not None
            if row is None:
                row = await conn.fetchrow(
                    f"""UPDATE blocked_numbers
                        SET expires_at = CASE WHEN expires_at IS NULL OR $2::integer IS NULL THEN NULL
                                              ELSE greatest(expires_at, now() + make_interval(secs => $2)) END
                        WHERE number_idx = $1 RETURNING {_COLUMNS}""",
                    idx, ttl_seconds,
                )
            # Also when it was blocked already: a call that raced the first block is ended too.
            await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, idx.hex())
        if row is None:  # inserted by nobody, yet conflicting: the transaction would have failed
            raise StoreError("the blocklist entry vanished while it was written")
        return BlockedRow(**dict(row)), created

    async def page(self, after: tuple[datetime, uuid.UUID] | None, limit: int) -> list[BlockedRow]:
        """The blocks in force (an expired one is no longer listed)."""
        rows = await self.pool.fetch(
            f"""SELECT {_COLUMNS} FROM live_blocked_numbers
                WHERE ($1::timestamptz IS NULL OR (created_at, id) > ($1, $2::uuid))
                ORDER BY created_at, id LIMIT $3""",
            after[0] if after else None, after[1] if after else None, limit,
        )
        return [BlockedRow(**dict(r)) for r in rows]

    async def remove(self, entry_id: uuid.UUID) -> BlockedRow | None:
        """Unblock; None when there is no such block in force."""
        row = await self.pool.fetchrow(
            f"""DELETE FROM blocked_numbers WHERE id = $1 AND (expires_at IS NULL OR expires_at > now())
                RETURNING {_COLUMNS}""", entry_id
        )
        return BlockedRow(**dict(row)) if row is not None else None

    async def remove_expired(self, batch: int = EXPIRED_BATCH) -> int:
        """Housekeeping: delete the entries past their expiry, `batch` at a time; how many."""
        deleted = 0
        while True:
            status = await self.pool.execute(
                """DELETE FROM blocked_numbers WHERE id IN (
                       SELECT id FROM blocked_numbers WHERE expires_at <= now() LIMIT $1 FOR UPDATE SKIP LOCKED)""",
                batch,
            )
            count = int(status.split()[-1])
            deleted += count
            if count < batch:
                return deleted

    async def blocked_among(self, participant_ids: set[uuid.UUID]) -> set[uuid.UUID]:
        """Which of these participants' numbers are blocked."""
        if not participant_ids:
            return set()
        rows = await self.pool.fetch(
            """SELECT p.id FROM participants p JOIN live_blocked_numbers b ON b.number_idx = p.number_idx
               WHERE p.id = ANY($1::uuid[])""",
            list(participant_ids),
        )
        return {r["id"] for r in rows}

    async def participant_ids(self, idx: bytes) -> set[uuid.UUID]:
        """Every participant row of a real number: the calls it is on carry these ids."""
        return {r["id"] for r in await self.pool.fetch("SELECT id FROM participants WHERE number_idx = $1", idx)}
