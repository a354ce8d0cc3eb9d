"""The webhook outbox: events waiting for delivery, claimed in batches, marked as they go;
deleted once delivered (or given up) longer ago than the retention."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

PRUNE_BATCH = 1000  # events deleted per statement: a short lock each, never the whole backlog at once

@dataclass(frozen=True)
class Pending:
    id: uuid.UUID
    seq: int
    event: str
    payload: Any  # JSON text
    created_at: datetime
    attempts: int


class WebhookRepo:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def claim(self, limit: int, lease_seconds: int, fresh_first: bool = False) -> list[Pending]:
        """Due events, oldest first, leased so that another deliverer skips them meanwhile.
        `fresh_first`: events never tried before the others (a probe of an endpoint taken to be
        down: an event it refused already would say little about it)."""
        order = "attempts > 0, next_attempt_at, seq" if fresh_first else "next_attempt_at, seq"
        rows = await self.pool.fetch(
            f"""
            UPDATE webhook_outbox SET next_attempt_at = now() + make_interval(secs => $2)
            WHERE id IN (SELECT id FROM webhook_outbox
                         WHERE delivered_at IS NULL AND failed_at IS NULL AND next_attempt_at <= now()
                         ORDER BY {order} LIMIT $1 FOR UPDATE SKIP LOCKED)
            RETURNING id, seq, event, payload, created_at, attempts
            """,
            limit, lease_seconds,
        )
        return sorted((Pending(**dict(r)) for r in rows), key=lambda p: p.seq)

    async def delivered(self, event_id: uuid.UUID) -> None:
        await self.pool.execute(
            "UPDATE webhook_outbox SET delivered_at = now(), attempts = attempts + 1, last_error = NULL WHERE id = $1",
            event_id,
        )

    async def failed(self, event_id: uuid.UUID, error: str, retry_in: float | None) -> None:
        """A failed attempt: retried in `retry_in` seconds, or given up (None)."""
        await self.pool.execute(
            """
            UPDATE webhook_outbox SET attempts = attempts + 1, last_error = $2,
                   next_attempt_at = now() + make_interval(secs => coalesce($3, 0)),
                   failed_at = CASE WHEN $3 IS NULL THEN now() END
            WHERE id = $1
            """,
            event_id, error[:500], retry_in,
        )

    async def prune(self, older_than_days: int, batch: int = PRUNE_BATCH) -> int:
        """Delete the events delivered or given up more than `older_than_days` ago, `batch`
        at a time (pending ones stay, however old); how many."""
        deleted = 0
        while True:
            status = await self.pool.execute(
                """
                DELETE FROM webhook_outbox WHERE id IN (
                    SELECT id FROM webhook_outbox
                    WHERE (delivered_at IS NOT NULL OR failed_at IS NOT NULL)
                      AND coalesce(delivered_at, failed_at) < now() - make_interval(days => $1)
                    LIMIT $2 FOR UPDATE SKIP LOCKED)
                """,
                older_than_days, batch,
            )
            count = int(status.split()[-1])
            deleted += count
            if count < batch:
                return deleted
