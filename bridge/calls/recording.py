"""The recording of one call (sessions with `record`): one bridge recording, its row written
before Asterisk records, finished once the call has ended. The call's flow (flow.py) owns
it and hands it the call's events while it waits for the recording to close."""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Protocol

import structlog

from bridge.ari import AriClient, AriConflict, AriError, AriNotFound
from bridge.calls.events import CallEvent, RecordingDone

log = structlog.get_logger(__name__)

RECORDING_FORMAT = "wav"  # Asterisk's wav: 8 kHz 16-bit mono after a 44-byte header
RECORDING_FINISH_TIMEOUT = 5.0  # seconds to wait for Asterisk to close a stopped recording


class RecordingStore(Protocol):
    async def recording_started(self, call_id: uuid.UUID, name: str, fmt: str) -> uuid.UUID: ...
    async def recording_finished(self, call_id: uuid.UUID, duration_ms: int | None, size: int | None) -> None: ...
    async def recording_discarded(self, call_id: uuid.UUID) -> None: ...


def wav_duration_ms(size: int) -> int:
    """The length of an Asterisk wav recording (8 kHz, 16-bit mono) from its file size."""
    return max(0, size - 44) // 16


def recording_name(call_id: uuid.UUID) -> str:
    return f"maskbridge-{call_id}"


class CallRecording:
    def __init__(self, call_id: uuid.UUID, bridge_id: str, ari: AriClient, store: RecordingStore,
                 name: str | None = None) -> None:
        self.call_id = call_id
        self.bridge_id = bridge_id
        self.ari = ari
        self.store = store
        self.name = name  # set once its row is written (a resumed call's: taken over)

    async def start(self) -> None:
        """Record the bridge. Its row is written first: whatever Asterisk records has a row
        (which retention finds), and a recording that cannot be stored is not made. They
        were told the call is recorded; a recording that fails must not cost them the call."""
        name = recording_name(self.call_id)
        if self.name is None:
            try:
                await self.store.recording_started(self.call_id, name, RECORDING_FORMAT)
            except Exception:
                log.exception("call.recording_not_stored")
                return
            self.name = name
        try:
            await self.ari.record_bridge(self.bridge_id, name, RECORDING_FORMAT)
        except AriConflict as exc:
            # A recording of this name exists already: an earlier bridge process started it
            # and stopped before the legs were joined. It goes on; this call finishes it.
            log.info("call.recording_taken_over", recording=name, error=str(exc))
        except AriError as exc:
            log.warning("call.recording_failed", error=str(exc))
            await self._discard(name)
        else:
            log.info("call.recording_started", recording=name)

    async def _discard(self, name: str) -> None:
        """A recording that failed to start: nothing of it stays, neither in Asterisk (the
        request may have failed after Asterisk began it) nor in the database."""
        self.name = None
        for step in (self.ari.stop_recording, self.ari.delete_stored_recording):
            try:
                await step(name)
            except AriError:
                pass  # never began, or its answer was lost: what is left is gone now
        try:
            await self.store.recording_discarded(self.call_id)
        except Exception:
            log.exception("call.recording_row_not_discarded", recording=name)

    async def finish(self, next_event: Callable[[float | None], Awaitable[CallEvent | None]]) -> None:
        """Once the call has ended: stop the recording and store its length and size."""
        name = self.name
        if name is None:
            return
        try:
            try:
                await self.ari.stop_recording(name)
            except AriNotFound:
                pass  # finished already
            else:
                deadline = time.monotonic() + RECORDING_FINISH_TIMEOUT
                while (event := await next_event(deadline)) is not None:
                    if isinstance(event, RecordingDone) and event.name == name:
                        break
            size: int | None = None
            try:
                size = await self.ari.stored_recording_size(name)
            except AriError as exc:
                log.warning("call.recording_unreadable", error=str(exc))
            duration_ms = wav_duration_ms(size) if size is not None else None
            await self.store.recording_finished(self.call_id, duration_ms, size)
            log.info("call.recording_finished", recording=name, bytes=size, duration_ms=duration_ms)
        except Exception:
            log.exception("call.recording_not_finished", recording=name)
