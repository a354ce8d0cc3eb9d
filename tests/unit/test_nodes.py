"""The node keeper's parts that need no database: the SIP probe that tells a dead node from
one whose bridge alone is down, and the reaper's decisions."""

from __future__ import annotations

import asyncio
import re
import time
from datetime import datetime, timezone
from typing import Any

import pytest
from structlog.testing import capture_logs

from bridge import nodes
from bridge.store.nodes import SilentNode


class SipPeer(asyncio.DatagramProtocol):
    """Answers every request with `status`, echoing its Call-ID (or stays silent: None)."""

    def __init__(self, status: str | None) -> None:
        self.status = status
        self.requests: list[str] = []
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        text = data.decode()
        self.requests.append(text)
        if self.status is not None and self.transport is not None:
            call_id = re.search(r"^Call-ID: (.+)$", text, re.M).group(1).strip()  # type: ignore[union-attr]
            self.transport.sendto(f"SIP/2.0 {self.status}\r\nCall-ID: {call_id}\r\n\r\n".encode(), addr)


async def peer(status: str | None) -> tuple[SipPeer, str]:
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(lambda: SipPeer(status), local_addr=("127.0.0.1", 0))
    return protocol, f"127.0.0.1:{transport.get_extra_info('sockname')[1]}"


@pytest.mark.parametrize("status", ["200 OK", "401 Unauthorized", "404 Not Found"])
async def test_any_sip_answer_means_the_asterisk_is_alive(status: str) -> None:
    probe, address = await peer(status)
    try:
        assert await nodes.sip_answers(address, timeout=1, tries=2)
        assert probe.requests[0].startswith("OPTIONS sip:127.0.0.1:")
    finally:
        assert probe.transport is not None
        probe.transport.close()


async def test_silence_or_nothing_listening_means_dead() -> None:
    probe, address = await peer(None)
    try:
        assert not await nodes.sip_answers(address, timeout=0.2, tries=3)
        assert len(probe.requests) == 3, "retried"
    finally:
        assert probe.transport is not None
        probe.transport.close()
    assert not await nodes.sip_answers(address, timeout=0.2, tries=1)  # (the port is closed now)


async def test_an_answer_to_another_request_does_not_count() -> None:
    loop = asyncio.get_running_loop()

    class Stray(SipPeer):
        def datagram_received(self, data: bytes, addr: Any) -> None:
            assert self.transport is not None
            self.transport.sendto(b"SIP/2.0 200 OK\r\nCall-ID: someone-else\r\n\r\n", addr)

    transport, _ = await loop.create_datagram_endpoint(lambda: Stray(None), local_addr=("127.0.0.1", 0))
    try:
        assert not await nodes.sip_answers(f"127.0.0.1:{transport.get_extra_info('sockname')[1]}",
                                           timeout=0.2, tries=1)
    finally:
        transport.close()


class FakeRepo:
    def __init__(self, silent: list[SilentNode]) -> None:
        self._silent = silent
        self.ended: list[str] = []

    async def silent(self, me: str, timeout: float) -> list[SilentNode]:
        return self._silent

    async def end_lost_calls(self, node: str, timeout: float, webhooks: bool) -> int:
        self.ended.append(node)
        return 2


def silent(node: str, sip: str | None) -> SilentNode:
    return SilentNode(node, datetime(2026, 1, 1, tzinfo=timezone.utc), sip, 2)


async def test_the_reaper_gives_up_only_nodes_whose_asterisk_is_silent_too(monkeypatch) -> None:
    alive = {"10.0.0.2:5060"}

    async def answers(address: str, **_: Any) -> bool:
        return address in alive

    monkeypatch.setattr(nodes, "sip_answers", answers)
    repo = FakeRepo([silent("node-2", "10.0.0.2:5060"), silent("node-3", "10.0.0.3:5060"), silent("node-4", None)])
    keeper = nodes.NodeKeeper("postgresql://unused", repo, "node-1", api_url=None, sip_address=None,  # type: ignore[arg-type]
                              timeout=15, webhooks=True, conn=None)  # type: ignore[arg-type]
    with capture_logs() as logs:
        await keeper._reap()
        await keeper._reap()
    assert repo.ended == ["node-3", "node-4", "node-3", "node-4"]
    said = [e for e in logs if e["event"] == "node.bridge_silent_asterisk_alive"]
    assert [e["node"] for e in said] == ["node-2"], "said once, not at every round"


async def test_after_a_silent_heart_the_bridge_looks_for_its_reaped_calls_at_three_beats(monkeypatch) -> None:
    """A heartbeat after none for the node timeout or more (the bridge frozen, the database
    gone): the others may have reaped this node's calls, maybe in a transaction still open,
    so the bridge looks for them at that beat and the two after. Not otherwise; and again at
    the next beat when the database did not answer."""
    async def beat(conn: Any, node: str) -> None:
        return None

    monkeypatch.setattr(nodes.NodeRepo, "beat", staticmethod(beat))
    looked: list[int] = []
    failing = [ConnectionRefusedError("refused")]

    async def after_silence() -> None:
        looked.append(len(looked))
        if failing:
            raise failing.pop()

    conn = type("Conn", (), {"is_closed": lambda self: False})()
    keeper = nodes.NodeKeeper("postgresql://unused", FakeRepo([]), "node-1", api_url=None, sip_address=None,  # type: ignore[arg-type]
                              timeout=15, webhooks=False, conn=conn, after_silence=after_silence)
    for _ in range(3):  # (beats in time)
        await keeper._beat()
        await keeper._after_silence()
    assert looked == []
    keeper._last_beat = time.monotonic() - 16  # (the last one 16 s ago)
    with capture_logs() as logs:
        for _ in range(6):
            await keeper._beat()
            await keeper._after_silence()
    assert len(looked) == 4, "three looks, one more for the one the database refused"
    assert [e["event"] for e in logs].count("node.heart_was_silent") == 1
    assert [e["event"] for e in logs].count("node.reaped_calls_unread") == 1
