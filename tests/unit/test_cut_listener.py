"""The cut listener (bridge.app.cut_listener) across a lost connection, against a fake of
asyncpg's connection that behaves as asyncpg 0.32 does: closing a connection calls its
termination listeners soon after (loop.call_soon), when the listener may already be on its
next connection."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from bridge import app
from bridge.store.sessions import PARTICIPANTS_LEFT

WAIT = 10.0


class FakeConnection:
    def __init__(self) -> None:
        self.listeners: dict[str, Any] = {}
        self.terminated: list[Any] = []
        self.closed = False

    def add_termination_listener(self, callback: Any) -> None:
        self.terminated.append(callback)

    async def add_listener(self, channel: str, callback: Any) -> None:
        self.listeners[channel] = callback

    async def fetchval(self, _query: str) -> int:
        return 1

    def is_closed(self) -> bool:
        return self.closed

    async def close(self) -> None:
        self.closed = True
        for callback in self.terminated:  # (as asyncpg: after the close returned)
            asyncio.get_running_loop().call_soon(callback, self)

    def lose(self) -> None:
        """The server went away: asyncpg says so to the termination listeners."""
        self.closed = True
        for callback in self.terminated:
            callback(self)


class FailingBlocklist:
    async def participant_ids(self, _idx: bytes) -> set[uuid.UUID]:
        raise TimeoutError  # (the database stalled: the listener gives this connection up)


class FakeStore:
    blocklist = FailingBlocklist()


class FakeDispatcher:
    def __init__(self) -> None:
        self.cuts: list[tuple[set[uuid.UUID], str]] = []
        self.caught_up = 0
        self.changed = asyncio.Event()
        self.store = FakeStore()

    async def cut_departed(self) -> None:
        self.caught_up += 1
        self.changed.set()

    def cut_calls(self, ids: set[uuid.UUID], reason: str) -> int:
        self.cuts.append((ids, reason))
        self.changed.set()
        return len(ids)


async def _until(dispatcher: FakeDispatcher, predicate: Any, what: str) -> None:
    async with asyncio.timeout(WAIT):
        while not predicate():
            dispatcher.changed.clear()
            await dispatcher.changed.wait()


@pytest.fixture
def connections(monkeypatch: pytest.MonkeyPatch) -> list[FakeConnection]:
    made: list[FakeConnection] = []

    async def connect(*_args: Any, **_kw: Any) -> FakeConnection:
        conn = FakeConnection()
        made.append(conn)
        return conn

    monkeypatch.setattr(app.asyncpg, "connect", connect)
    return made


async def test_a_closed_connection_s_late_notice_does_not_kill_the_next_one(connections) -> None:
    """After a failure on its connection (here a statement that timed out) the listener
    closes it and connects again, and stays connected: the closed connection's termination
    notice, which asyncpg delivers after the close, is no news of the new one (it used to end
    every new connection at once, for good: cuts then came only from the catch-up query of
    each reconnect)."""
    dispatcher = FakeDispatcher()
    stop = asyncio.Event()
    task = asyncio.create_task(app.cut_listener("postgresql://fake/db", dispatcher, stop))  # type: ignore[arg-type]
    try:
        await _until(dispatcher, lambda: dispatcher.caught_up == 1, "the first connection")
        first = connections[0]
        from bridge.store.blocklist import CHANNEL as BLOCKLIST_CHANNEL
        first.listeners[BLOCKLIST_CHANNEL](first, 1, BLOCKLIST_CHANNEL, "00")
        await _until(dispatcher, lambda: dispatcher.caught_up == 2, "the second connection")
        second = connections[1]
        # Whatever the first connection's late notices did, the second one hears a cut.
        participant = uuid.uuid4()
        for _ in range(3):
            await asyncio.sleep(0)  # wait-ok: lets the closed connection's call_soon notice run first
        second.listeners[PARTICIPANTS_LEFT](second, 1, PARTICIPANTS_LEFT, f"session_ended {participant}")
        await _until(dispatcher, lambda: dispatcher.cuts, "the cut")
        assert dispatcher.cuts == [({participant}, "session_ended")]
        assert len(connections) == 2 and not second.closed
    finally:
        stop.set()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
