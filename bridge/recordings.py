"""Call recordings: who may reach them, the audit of every access, and retention.

The audio stays in Asterisk's recording spool and is reached through ARI only (no shared
file system). Only a token with the scope recordings:read reaches it (the audit: audit:read),
never the order system's MB_API_TOKEN; every access, granted or not, is written to the audit
(recording_access) with the name of the token that asked.

With several nodes, a recording's audio is in the spool of its call's node: a bridge asked
for another node's recording fetches it from that node's bridge (its API, with the recording
token), which audits the access too. Nothing is copied: the audio lives and dies where it
was recorded (each node's retention deletes its own).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import structlog

from bridge.ari import AriClient, AriError, AriNotFound
from bridge.ari.client import StoredFile
from bridge.errors import (
    AsteriskUnavailable, RecordingDeleted, RecordingInProgress, RecordingNotFound, ServiceError,
)
from bridge.store import Store
from bridge.store.recordings import RecordingRow
from bridge.tokens import Caller

log = structlog.get_logger(__name__)

# What the API shows of a recording (the name in Asterisk's spool stays inside).
PUBLIC_FIELDS = ("id", "call_id", "session_id", "format", "started_at", "ended_at", "duration_ms", "bytes",
                 "deleted_at")


def render_recording(row: RecordingRow) -> dict[str, Any]:
    return {field: getattr(row, field) for field in PUBLIC_FIELDS}


class Recordings:
    def __init__(
        self, store: Store, ari: AriClient | None, recording_token: str, retention_days: int = 30,
        node: str = "node-1", peers: Callable[[str], Awaitable[str | None]] | None = None,
    ) -> None:
        self.peers = peers  # node id -> the base URL of its bridge's API
        self.repo = store.recordings
        self.node = node  # whose spool `ari` reaches: this node's recordings only
        self.ari = ari
        self._recording_token = recording_token  # (what this bridge shows another node's bridge)
        self.retention_days = retention_days

    async def _audit(
        self, who: Caller, remote: str | None, call_id: uuid.UUID | None, action: str, result: str, status: int,
        recording_id: uuid.UUID | None,
    ) -> None:
        await self.repo.audit(recording_id=recording_id, call_id=call_id, actor=who.kind, token=who.token,
                              remote=remote, action=action, result=result, status=status)

    # --- who is asking --------------------------------------------------------------------

    async def _deny(
        self, who: Caller, remote: str | None, action: str, call_id: uuid.UUID | None, refusal: ServiceError | None
    ) -> None:
        """Raise `refusal`, what the API found wrong with the request's token (none, a wrong
        one, one without the scope, one over its rate limit), audited first."""
        if refusal is None:
            return
        await self._audit(who, remote, call_id, action, "denied", refusal.http_status, None)
        log.warning("recording.access_denied", actor=who.kind, token=who.token, action=action,
                    call_id=str(call_id), status=refusal.http_status)
        raise refusal

    async def _recording(
        self, who: Caller, remote: str | None, action: str, call_id: uuid.UUID | None, refusal: ServiceError | None
    ) -> RecordingRow:
        await self._deny(who, remote, action, call_id, refusal)
        row = await self.repo.of_call(call_id) if call_id is not None else None
        if row is None:
            await self._audit(who, remote, call_id, action, "not_found", 404, None)
            raise RecordingNotFound()
        if row.deleted_at is not None:
            await self._audit(who, remote, call_id, action, "gone", 410, row.id)
            raise RecordingDeleted(deleted_at=row.deleted_at.isoformat())
        return row

    # --- access ---------------------------------------------------------------------------

    async def metadata(
        self, who: Caller, remote: str | None, call_id: uuid.UUID | None, refusal: ServiceError | None = None
    ) -> RecordingRow:
        row = await self._recording(who, remote, "metadata", call_id, refusal)
        await self._audit(who, remote, call_id, "metadata", "granted", 200, row.id)
        return row

    @asynccontextmanager
    async def audio(
        self, who: Caller, remote: str | None, call_id: uuid.UUID | None, refusal: ServiceError | None = None
    ) -> AsyncIterator[tuple[RecordingRow, StoredFile]]:
        """The recording's audio, streamed from Asterisk; audited before a byte is sent."""
        row = await self._recording(who, remote, "download", call_id, refusal)

        async def fail(result: str, status: int) -> None:
            await self._audit(who, remote, call_id, "download", result, status, row.id)

        if row.ended_at is None:
            await fail("failed", 409)
            raise RecordingInProgress()
        if row.node != self.node:
            async with self._from_peer(row, fail) as stored:
                await self._audit(who, remote, call_id, "download", "granted", 200, row.id)
                log.info("recording.downloaded", recording_id=str(row.id), token=who.token, node=row.node)
                yield row, stored
            return
        if self.ari is None:
            await fail("failed", 503)
            raise AsteriskUnavailable("recordings are reached through Asterisk, which is not configured")
        try:
            async with self.ari.stored_recording_file(row.name) as stored:
                await self._audit(who, remote, call_id, "download", "granted", 200, row.id)
                log.info("recording.downloaded", recording_id=str(row.id), token=who.token)
                yield row, stored
        except AriNotFound:
            await fail("not_found", 404)
            raise RecordingNotFound("the recording's audio is missing from Asterisk") from None
        except AriError as exc:
            await fail("failed", 503)
            raise AsteriskUnavailable(f"Asterisk did not hand out the recording: {exc.status or 'no answer'}") from None

    @asynccontextmanager
    async def _from_peer(
        self, row: RecordingRow, fail: Callable[[str, int], Awaitable[None]]
    ) -> AsyncIterator[StoredFile]:
        """The audio of another node's recording, streamed from that node's bridge."""
        base = await self.peers(row.node) if self.peers is not None else None
        if not base:
            await fail("failed", 503)
            raise AsteriskUnavailable(f"the recording is on node {row.node}, whose API this bridge does not know "
                                      "(its MB_NODE_API_URL)")
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=30)
        headers = {"Authorization": f"Bearer {self._recording_token}", "X-Maskbridge-Node": self.node}
        try:
            async with aiohttp.ClientSession(timeout=timeout) as http, http.get(
                f"{base}/v1/calls/{row.call_id}/recording/audio", headers=headers
            ) as resp:
                if resp.status == 404:
                    await fail("not_found", 404)
                    raise RecordingNotFound(f"the recording's audio is missing from node {row.node}")
                if resp.status != 200:
                    await fail("failed", 503)
                    raise AsteriskUnavailable(f"node {row.node} did not hand out the recording: {resp.status}")
                yield StoredFile("audio/wav", resp.content_length, resp.content.iter_chunked(64 * 1024))
        except (aiohttp.ClientError, TimeoutError) as exc:
            await fail("failed", 503)
            raise AsteriskUnavailable(f"node {row.node} did not answer: {type(exc).__name__}") from None

    async def access_log(
        self, who: Caller, remote: str | None, call_id: uuid.UUID | None, after: int | None, limit: int,
        invalid: Exception | None = None, refusal: ServiceError | None = None,
    ) -> list[dict[str, Any]]:
        """The audit (itself audited: reading it is an access too). `invalid`: what was wrong
        with the request's parameters; raised once the token was checked, and audited too."""
        await self._deny(who, remote, "audit", call_id, refusal)
        if invalid is not None:
            await self._audit(who, remote, call_id, "audit", "failed", 422, None)
            raise invalid
        await self._audit(who, remote, call_id, "audit", "granted", 200, None)
        return await self.repo.access_log(call_id=call_id, after=after, limit=limit)

    # --- retention ------------------------------------------------------------------------

    async def purge(self, older_than_days: int | None = None) -> dict[str, int]:
        """Delete the audio of this node's recordings whose call ended more than N days ago
        (default MB_RECORDING_RETENTION_DAYS) through its ARI, and mark them deleted. (Each
        node's bridge deletes what its own Asterisk holds.)"""
        if self.ari is None:
            raise AsteriskUnavailable("deleting recordings needs ARI (MB_ARI_URL, MB_ARI_USER, MB_ARI_PASSWORD)")
        days = self.retention_days if older_than_days is None else older_than_days
        deleted = failed = 0
        for row in await self.repo.due_for_deletion(days, self.node):
            try:
                await self.ari.delete_stored_recording(row.name)
            except AriNotFound:
                pass  # gone already (deleted by hand, or never written): the row follows
            except AriError as exc:
                failed += 1
                log.warning("recording.delete_failed", recording_id=str(row.id), error=str(exc))
                continue
            await self.repo.mark_deleted(row.id)
            deleted += 1
        counts = {"recordings_deleted": deleted, "recordings_failed": failed}
        log.info("recording.retention", older_than_days=days, **counts)
        return counts
