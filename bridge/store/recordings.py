"""Call recordings (the rows; the audio is in Asterisk's spool) and their access audit."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg


@dataclass(frozen=True)
class RecordingRow:
    id: uuid.UUID
    call_id: uuid.UUID
    session_id: uuid.UUID | None
    name: str  # in Asterisk's recording spool
    format: str
    started_at: datetime
    ended_at: datetime | None
    duration_ms: int | None
    bytes: int | None
    deleted_at: datetime | None
    node: str = "node-1"  # whose Asterisk spool holds the audio (its call's node)


_COLUMNS = "r.id, r.call_id, r.session_id, r.name, r.format, r.started_at, r.ended_at, r.duration_ms, r.bytes, " \
           "r.deleted_at, (SELECT n.node FROM calls n WHERE n.id = r.call_id) AS node"


class RecordingRepo:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def started(self, call_id: uuid.UUID, name: str, fmt: str) -> uuid.UUID:
        recording_id: uuid.UUID = await self.pool.fetchval(
            """INSERT INTO recordings (call_id, session_id, name, format)
               SELECT c.id, c.session_id, $2, $3 FROM calls c WHERE c.id = $1 RETURNING id""",
            call_id, name, fmt,
        )
        return recording_id

    async def finished(self, call_id: uuid.UUID, duration_ms: int | None, size: int | None) -> None:
        await self.pool.execute(
            """UPDATE recordings SET ended_at = coalesce(ended_at, now()), duration_ms = $2, bytes = $3
               WHERE call_id = $1""",
            call_id, duration_ms, size,
        )

    async def discarded(self, call_id: uuid.UUID) -> None:
        """A recording that never began in Asterisk: its row goes, unless the audit refers to
        it already (then it stays, marked deleted)."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                """DELETE FROM recordings r WHERE r.call_id = $1
                     AND NOT EXISTS (SELECT 1 FROM recording_access a WHERE a.recording_id = r.id)""",
                call_id,
            )
            await conn.execute(
                """UPDATE recordings SET deleted_at = now(), ended_at = coalesce(ended_at, now())
                   WHERE call_id = $1 AND deleted_at IS NULL""",
                call_id,
            )

    async def of_call(self, call_id: uuid.UUID) -> RecordingRow | None:
        row = await self.pool.fetchrow(f"SELECT {_COLUMNS} FROM recordings r WHERE r.call_id = $1", call_id)
        return RecordingRow(**dict(row)) if row is not None else None

    async def due_for_deletion(self, older_than_days: int, node: str, limit: int = 500) -> list[RecordingRow]:
        """Recordings of `node` (their audio is in its Asterisk's spool) whose call ended more
        than N days ago and whose audio still exists. (A recording the bridge never saw
        finish counts from its start.)"""
        rows = await self.pool.fetch(
            f"""SELECT {_COLUMNS} FROM recordings r JOIN calls c ON c.id = r.call_id
                WHERE r.deleted_at IS NULL AND coalesce(r.ended_at, r.started_at) < now() - make_interval(days => $1)
                  AND c.state = 'ended' AND c.node = $3
                ORDER BY r.started_at LIMIT $2""",
            older_than_days, limit, node,
        )
        return [RecordingRow(**dict(r)) for r in rows]

    async def mark_deleted(self, recording_id: uuid.UUID) -> None:
        """The audio is gone; the row stays (with the audit that refers to it)."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                """UPDATE recordings SET deleted_at = now(), ended_at = coalesce(ended_at, now())
                   WHERE id = $1 AND deleted_at IS NULL""",
                recording_id,
            )
            await self._audit(conn, recording_id, None, "retention", None, None, "delete", "granted", 200)

    # --- the audit ----------------------------------------------------------------------

    @staticmethod
    async def _audit(
        conn: asyncpg.Connection | asyncpg.Pool, recording_id: uuid.UUID | None, call_id: uuid.UUID | None,
        actor: str, token: str | None, remote: str | None, action: str, result: str, status: int,
    ) -> None:
        if call_id is None and recording_id is not None:
            call_id = await conn.fetchval("SELECT call_id FROM recordings WHERE id = $1", recording_id)
        await conn.execute(
            """INSERT INTO recording_access (recording_id, call_id, actor, token, remote, action, result, status)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8)""",
            recording_id, call_id, actor, token, remote, action, result, status,
        )

    async def audit(
        self, *, recording_id: uuid.UUID | None, call_id: uuid.UUID | None, actor: str, token: str | None,
        remote: str | None, action: str, result: str, status: int,
    ) -> None:
        await self._audit(self.pool, recording_id, call_id, actor, token, remote, action, result, status)

    async def access_log(
        self, *, call_id: uuid.UUID | None, after: int | None, limit: int
    ) -> list[dict[str, Any]]:
        """The audit, newest first; `after` is the id of the last row of the previous page."""
        rows = await self.pool.fetch(
            """SELECT id, at, recording_id, call_id, actor, token, remote, action, result, status FROM recording_access
               WHERE ($1::uuid IS NULL OR call_id = $1) AND ($2::bigint IS NULL OR id < $2)
               ORDER BY id DESC LIMIT $3""",
            call_id, after, limit,
        )
        return [dict(r) for r in rows]
