"""Call recordings: who may reach them, the audit of every access, and retention.

The audio stays in Asterisk's recording spool and is reached through ARI only (no shared
file system). Only the recording token reaches it, never the order system's API token;
every access, granted or not, is written to the audit (recording_access).

With several nodes, a recording's audio is in the spool of its call's node: a bridge asked
for another node's recording fetches it from that node's bridge (its API, with the recording
token), which audits the access too. Nothing is copied: the audio lives and dies where it
was recorded (each node's retention deletes its own).
"""

from __future__ import annotations

import hmac
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import structlog

from bridge.ari import AriClient, AriError, AriNotFound
from bridge.ari.client import StoredFile
from bridge.errors import (
    AsteriskUnavailable, RecordingDeleted, RecordingInProgress, RecordingNotFound, RecordingTokenRequired, Unauthorized,
)
from bridge.store import Store
from bridge.store.recordings import RecordingRow

log = structlog.get_logger(__name__)

# What the API shows of a recording (the name in Asterisk's spool stays inside).
PUBLIC_FIELDS = ("id", "call_id", "session_id", "format", "started_at", "ended_at", "duration_ms", "bytes",
                 "deleted_at")


def render_recording(row: RecordingRow) -> dict[str, Any]:
    return {field: getattr(row, field) for field in PUBLIC_FIELDS}


class Recordings:
    def __init__(
        self, store: Store, ari: AriClient | None, recording_token: str, api_token: str = "",
        retention_days: int = 30, node: str = "node-1",
        peers: Callable[[str], Awaitable[str | None]] | None = None,
    ) -> None:
        self.peers = peers  # node id -> the base URL of its bridge's API
        self.repo = store.recordings
        self.node = node  # whose spool `ari` reaches: this node's recordings only
        self.ari = ari
        self._recording_token = recording_token.encode()
        self._api_token = api_token.encode()
        self.retention_days = retention_days

    # --- who is asking --------------------------------------------------------------------

    def actor(self, authorization: str) -> str:
        """Which token a request's Authorization header holds: recording_token, api_token,
        invalid_token or no_token (compared in constant time)."""
        scheme, _, given = authorization.partition(" ")
        if not authorization:
            return "no_token"
        presented = given.strip().encode("utf-8", "surrogateescape")
        if scheme.lower() == "bearer":
            if self._recording_token and hmac.compare_digest(presented, self._recording_token):
                return "recording_token"
            if self._api_token and hmac.compare_digest(presented, self._api_token):
                return "api_token"
        return "invalid_token"

    async def _deny(self, actor: str, remote: str | None, action: str, call_id: uuid.UUID | None) -> None:
        """Raise what a request without the recording token gets; audited first."""
        if actor == "recording_token":
            return
        status = 403 if actor == "api_token" else 401
        await self.repo.audit(recording_id=None, call_id=call_id, actor=actor, remote=remote, action=action,
                              result="denied", status=status)
        log.warning("recording.access_denied", actor=actor, action=action, call_id=str(call_id))
        if status == 403:
            raise RecordingTokenRequired()
        raise Unauthorized("missing or wrong recording token")

    async def _recording(self, actor: str, remote: str | None, action: str, call_id: uuid.UUID | None) -> RecordingRow:
        await self._deny(actor, remote, action, call_id)
        row = await self.repo.of_call(call_id) if call_id is not None else None
        if row is None:
            await self.repo.audit(recording_id=None, call_id=call_id, actor=actor, remote=remote, action=action,
                                  result="not_found", status=404)
            raise RecordingNotFound()
        if row.deleted_at is not None:
            await self.repo.audit(recording_id=row.id, call_id=call_id, actor=actor, remote=remote, action=action,
                                  result="gone", status=410)
            raise RecordingDeleted(deleted_at=row.deleted_at.isoformat())
        return row

    # --- access ---------------------------------------------------------------------------

    async def metadata(self, actor: str, remote: str | None, call_id: uuid.UUID | None) -> RecordingRow:
        row = await self._recording(actor, remote, "metadata", call_id)
        await self.repo.audit(recording_id=row.id, call_id=call_id, actor=actor, remote=remote, action="metadata",
                              result="granted", status=200)
        return row

    @asynccontextmanager
    async def audio(
        self, actor: str, remote: str | None, call_id: uuid.UUID | None
    ) -> AsyncIterator[tuple[RecordingRow, StoredFile]]:
        """The recording's audio, streamed from Asterisk; audited before a byte is sent."""
        row = await self._recording(actor, remote, "download", call_id)

        async def fail(result: str, status: int) -> None:
            await self.repo.audit(recording_id=row.id, call_id=call_id, actor=actor, remote=remote,
                                  action="download", result=result, status=status)

        if row.ended_at is None:
            await fail("failed", 409)
            raise RecordingInProgress()
        if row.node != self.node:
            async with self._from_peer(row, fail) as stored:
                await self.repo.audit(recording_id=row.id, call_id=call_id, actor=actor, remote=remote,
                                      action="download", result="granted", status=200)
                log.info("recording.downloaded", recording_id=str(row.id), actor=actor, node=row.node)
                yield row, stored
            return
        if self.ari is None:
            await fail("failed", 503)
            raise AsteriskUnavailable("recordings are reached through Asterisk, which is not configured")
        try:
            async with self.ari.stored_recording_file(row.name) as stored:
                await self.repo.audit(recording_id=row.id, call_id=call_id, actor=actor, remote=remote,
                                      action="download", result="granted", status=200)
                log.info("recording.downloaded", recording_id=str(row.id), actor=actor)
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
        headers = {"Authorization": f"Bearer {self._recording_token.decode()}", "X-Maskbridge-Node": self.node}
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
        self, actor: str, remote: str | None, call_id: uuid.UUID | None, after: int | None, limit: int,
        invalid: Exception | None = None,
    ) -> list[dict[str, Any]]:
        """The audit (itself audited: reading it is an access too). `invalid`: what was wrong
        with the request's parameters; raised once the token was checked, and audited too."""
        await self._deny(actor, remote, "audit", call_id)
        if invalid is not None:
            await self.repo.audit(recording_id=None, call_id=call_id, actor=actor, remote=remote, action="audit",
                                  result="failed", status=422)
            raise invalid
        await self.repo.audit(recording_id=None, call_id=call_id, actor=actor, remote=remote, action="audit",
                              result="granted", status=200)
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
