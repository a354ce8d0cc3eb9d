"""A stream of RTP from elsewhere, reaching the PBX's port of a call's leg while that leg's
phone is silent, does not get the call's audio: the PBX sends each leg's audio only where the
other network's SDP said (with symmetric RTP it took the stray stream's source as the leg's
destination and sent the other party's voice there: 146 packets in 3 s)."""

from __future__ import annotations

import asyncio
import socket
import struct
import time
import uuid

from bridge.ari.client import AriClient
from bridge.devstack.carrier import Carrier
from tests.live.conftest import pbx_ari

STREAM_SECONDS = 3.0  # within strict RTP's learning window (5 s from the leg's address set)


async def _rtp_address(ari: AriClient, channel_id: str, which: str) -> tuple[str, int]:
    value = (await ari.request("GET", f"/channels/{channel_id}/variable",
                               {"variable": f"CHANNEL(rtp,{which})"}))["value"]
    host, port = value.rsplit(":", 1)
    return host, int(port)


async def _stray_stream(target: tuple[str, int]) -> tuple[int, tuple[str, int]]:
    """50 packets a second of PCMU to `target` for STREAM_SECONDS from a socket of its own,
    in sequence (as a live stream is); how many packets came back to that socket, and its
    address."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.setblocking(False)
        got, seq = 0, 1000
        began = time.monotonic()
        while time.monotonic() - began < STREAM_SECONDS:
            sock.sendto(struct.pack("!BBHII", 0x80, 0, seq, seq * 160, 0x5EED5EED) + b"\xd5" * 160, target)
            seq += 1
            await asyncio.sleep(0.02)  # wait-ok: the stream's own pace (20 ms a packet)
            while True:
                try:
                    sock.recv(2048)
                except BlockingIOError:
                    break
                got += 1
        return got, sock.getsockname()


async def test_a_stray_stream_to_a_silent_callers_leg_gets_none_of_the_call(carrier: Carrier, api, real_number,
                                                                             stack) -> None:
    courier, client = real_number(), real_number()
    session = await api.open_session(f"order-{uuid.uuid4()}", courier, client)
    carrier.phone(client, action="answer", tone=1000, listen=False)
    leg = await carrier.call(courier, session["pool_number"], tone=600, listen=False)
    callee = await asyncio.wait_for(carrier.incoming.get(), 10)
    await asyncio.wait_for(leg.answered.wait(), 10)
    await asyncio.wait_for(callee.answered.wait(), 10)
    await carrier.stop_tone(leg)  # the caller says nothing: its leg gets no RTP of its own
    ari = pbx_ari(stack)
    try:
        inbound = [c for c in await ari.request("GET", "/channels")
                   if (c.get("dialplan") or {}).get("exten") == session["pool_number"]]
        assert len(inbound) == 1, inbound
        channel = inbound[0]["id"]
        sdp_said = await _rtp_address(ari, channel, "dest")
        got, stray = await _stray_stream(await _rtp_address(ari, channel, "src"))
        assert got == 0, f"the PBX sent {got} packets of the call's audio to a stray stream's source"
        assert await _rtp_address(ari, channel, "dest") == sdp_said != stray
    finally:
        await ari.close()
    await carrier.hangup(leg)
    await asyncio.wait_for(callee.ended.wait(), 10)
