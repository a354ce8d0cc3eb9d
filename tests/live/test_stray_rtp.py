"""Media from strangers gets nothing of a call and puts nothing into it. The PBX's media
guard (asterisk-config/media-guard.sh) lets the RTP range take UDP from the carrier's media
addresses only; the trunk sends each leg's audio only where the other network's SDP said
(`rtp_symmetric = no`). Without the guard, a stream from anywhere reaching a leg's port
while its phone was silent became the leg's source (its audio went to the other party, and
the real phone was locked out), and a STUN request on a held leg's port became the leg's
destination (the held party's voice went to the requester). Without `rtp_symmetric = no`,
the first stream's source also became the leg's destination (146 packets in 3 s).

The stranger's socket is on 127.0.0.1; the simulated carrier's media is on MB_TRUNK_HOST."""

from __future__ import annotations

import asyncio
import math
import os
import socket
import struct
import time
import uuid

import pytest

from bench.sipp import alaw_encode, ulaw_encode
from bridge.ari.client import AriClient
from bridge.devstack.audio import samples, tone_share
from bridge.devstack.carrier import Carrier
from tests.live.conftest import pbx_ari

STREAM_SECONDS = 3.0  # within strict RTP's learning window (5 s from the leg's address set)
STRANGER_TONE = 2500  # Hz: neither phone's


async def _variable(ari: AriClient, channel_id: str, name: str) -> str:
    return (await ari.request("GET", f"/channels/{channel_id}/variable", {"variable": name}))["value"]


async def _rtp_address(ari: AriClient, channel_id: str, which: str) -> str:
    return await _variable(ari, channel_id, f"CHANNEL(rtp,{which})")


def _host_port(address: str) -> tuple[str, int]:
    host, port = address.rsplit(":", 1)
    return host, int(port)


# 20 ms of the stranger's tone (2500 Hz at 8 kHz repeats every 16 samples: 160 is 10 periods),
# as RTP payload type and payload, in the codec the leg carries (the PBX drops any other).
_TONE = [int(8000 * math.sin(2 * math.pi * STRANGER_TONE * i / 8000)) for i in range(160)]
PAYLOADS = {"ulaw": (0, bytes(map(ulaw_encode, _TONE))), "alaw": (8, bytes(map(alaw_encode, _TONE)))}


class Stranger:
    """A socket of its own, not the carrier's, that sends to a leg's port and counts what
    comes back."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.received = 0

    def close(self) -> None:
        self.sock.close()

    def _drain(self) -> None:
        while True:
            try:
                self.sock.recv(2048)
            except BlockingIOError:
                return
            self.received += 1

    async def stream(self, target: tuple[str, int], seconds: float, codec: str) -> None:
        """50 packets a second of the stranger's tone in `codec` (ulaw, alaw), in sequence as a
        live stream is."""
        payload_type, payload = PAYLOADS[codec]
        seq = 1000
        began = time.monotonic()
        while time.monotonic() - began < seconds:
            self.sock.sendto(struct.pack("!BBHII", 0x80, payload_type, seq, seq * 160, 0x5EED5EED) + payload, target)
            seq += 1
            await asyncio.sleep(0.02)  # wait-ok: the stream's own pace (20 ms a packet)
            self._drain()

    async def stun(self, target: tuple[str, int], seconds: float) -> None:
        """A STUN binding request (RFC 5389, no attributes) every 100 ms."""
        began = time.monotonic()
        while time.monotonic() - began < seconds:
            self.sock.sendto(struct.pack("!HHI", 0x0001, 0, 0x2112A442) + os.urandom(12), target)
            await asyncio.sleep(0.1)  # wait-ok: the requests' own pace
            self._drain()


async def _codec(ari: AriClient, channel_id: str) -> str:
    return (await _variable(ari, channel_id, "CHANNEL(audionativeformat)")).strip("()")


async def _legs(ari: AriClient, pool_number: str) -> tuple[str, str]:
    """The PBX's channels of the call: (the caller's leg, the callee's leg)."""
    inbound = [c["id"] for c in await ari.request("GET", "/channels")
               if (c.get("dialplan") or {}).get("exten") == pool_number]
    assert len(inbound) == 1, inbound
    for bridge in await ari.request("GET", "/bridges"):
        if inbound[0] in bridge["channels"]:
            others = [c for c in bridge["channels"] if c != inbound[0]]
            assert len(others) == 1, bridge
            return inbound[0], others[0]
    raise AssertionError("the caller's leg is in no bridge")


async def test_a_stray_stream_to_a_silent_callers_leg_gets_none_of_the_call(carrier: Carrier, api, real_number,
                                                                             stack) -> None:
    courier, client = real_number(), real_number()
    session = await api.open_session(f"order-{uuid.uuid4()}", courier, client)
    leg, callee = await carrier.connected(
        courier, session["pool_number"], client, callee_phone={"tone": 1000, "listen": False}, tone=600, listen=False
    )
    await carrier.stop_tone(leg)  # the caller says nothing: its leg gets no RTP of its own
    ari = pbx_ari(stack)
    stranger = Stranger()
    try:
        channel, _ = await _legs(ari, session["pool_number"])
        sdp_said = await _rtp_address(ari, channel, "dest")
        await stranger.stream(_host_port(await _rtp_address(ari, channel, "src")), STREAM_SECONDS,
                              await _codec(ari, channel))
        assert stranger.received == 0, f"the PBX sent {stranger.received} packets of the call's audio to a stranger"
        assert await _rtp_address(ari, channel, "dest") == sdp_said
    finally:
        stranger.close()
        await ari.close()
    await carrier.hangup(leg)
    await asyncio.wait_for(callee.ended.wait(), 10)


@pytest.mark.parametrize("silent", ["caller", "callee"])
async def test_a_stranger_cannot_speak_into_a_call_while_a_phone_is_silent(silent: str, carrier: Carrier, api,
                                                                           real_number, stack) -> None:
    """The stranger streams its tone to the silent phone's leg while the other phone listens:
    the other phone hears none of it, and then hears the silent phone when it speaks again
    (it was not locked out of its own call)."""
    courier, client = real_number(), real_number()
    session = await api.open_session(f"order-{uuid.uuid4()}", courier, client)
    leg, callee = await carrier.connected(
        courier, session["pool_number"], client, callee_phone={"tone": 1000, "listen": False}, tone=600, listen=False
    )
    quiet, listener = (leg, callee) if silent == "caller" else (callee, leg)
    await carrier.stop_tone(quiet)
    ari = pbx_ari(stack)
    stranger = Stranger()
    try:
        legs = dict(zip(("caller", "callee"), await _legs(ari, session["pool_number"]), strict=True))
        port = _host_port(await _rtp_address(ari, legs[silent], "src"))
        streaming = asyncio.create_task(stranger.stream(port, STREAM_SECONDS + 1, await _codec(ari, legs[silent])))
        heard, rate = samples(await carrier.listen_to(listener, int(STREAM_SECONDS)))
        await streaming
        assert tone_share(heard, rate, STRANGER_TONE) < 0.1, f"the {listener.role} heard the stranger"
        await carrier.resume_tone(quiet)
        heard, rate = samples(await carrier.listen_to(listener, 2))
        assert tone_share(heard, rate, quiet.tone) > 0.5, f"the {silent} was locked out of its call"
    finally:
        stranger.close()
        await ari.close()
    await carrier.hangup(leg)
    await asyncio.wait_for(callee.ended.wait(), 10)


async def test_a_stun_request_to_a_held_leg_gets_nothing(carrier: Carrier, api, real_number, stack) -> None:
    """The callee holds (the PBX then sends nothing on its leg: no destination); STUN requests
    to that leg's port get no answer and no audio of the caller, who goes on talking."""
    courier, client = real_number(), real_number()
    session = await api.open_session(f"order-{uuid.uuid4()}", courier, client)
    leg, callee = await carrier.connected(
        courier, session["pool_number"], client, callee_phone={"tone": 1000, "listen": False}, tone=600, listen=False
    )
    ari = pbx_ari(stack)
    stranger = Stranger()
    try:
        _, channel = await _legs(ari, session["pool_number"])
        port = _host_port(await _rtp_address(ari, channel, "src"))
        await carrier.hold(callee)
        async with asyncio.timeout(10):
            while (await _rtp_address(ari, channel, "dest")) not in ("", "(null)"):
                await asyncio.sleep(0.05)  # wait-ok: polling Asterisk: no event says a leg's destination changed
        await stranger.stun(port, 2.0)
        await stranger.stream(port, 1.0, await _codec(ari, channel))  # its RTP, had STUN made it the destination
        assert stranger.received == 0, f"a STUN request to a held leg got {stranger.received} packets back"
        assert (await _rtp_address(ari, channel, "dest")) in ("", "(null)")
    finally:
        stranger.close()
        await ari.close()
    await carrier.hangup(leg)
    await asyncio.wait_for(callee.ended.wait(), 10)
