"""Driver of the simulated carrier: places calls into the PBX with any caller ID and plays
every phone behind the trunk (answer, busy, no answer, reject), each phone playing a known
tone and recording what it hears. Used by `make call` and the live tests."""

from __future__ import annotations

import array
import asyncio
import math
import time
import wave
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bridge.ari import AriClient, AriConflict, AriError, AriNotFound, EventStream
from bridge.devstack import asterisk
from bridge.devstack.settings import Stack

Event = dict[str, Any]


@dataclass
class Phone:
    """How the phone behind a number behaves when called."""

    action: str = "answer"  # answer | busy | noanswer | reject | unreachable (cause 27) | redirect (302)
    answer_after: float = 0.3  # seconds of ringing before answering
    ring_for: float = 2.0  # noanswer: seconds of ringing before the network gives up (480)
    tone: int = 1000  # Hz the phone plays once connected
    hangup_after: float | None = None  # seconds after answer at which this phone hangs up
    listen: bool = True  # record what the phone hears (off for load: a snoop and a file per leg)
    early_media: bool = False  # plays its tone while it rings (183 with audio), as a network announcement would
    redirect_to: str = ""  # redirect: the 302's Contact (a SIP URI of the network's choosing)


# A hangup the carrier's Asterisk did not carry out is asked for again this much later, this
# many times in all (Carrier.hangup).
HANGUP_AGAIN_SECONDS = 2.0
HANGUP_TRIES = 3


@dataclass
class Leg:
    """One phone's view of a call."""

    role: str  # caller | callee
    channel_id: str
    number: str  # the phone's own number
    dialed: str = ""  # the number it called (caller) or was called on (callee)
    shown_number: str = ""  # caller ID shown to a called phone
    shown_name: str = ""
    tone: int = 1000
    hangup_after: float | None = None
    listen: bool = True
    ringing: asyncio.Event = field(default_factory=asyncio.Event)
    in_stasis: asyncio.Event = field(default_factory=asyncio.Event)
    early_media: bool = False  # the caller got a 183 with SDP (it hears the PBX, and can send keys)
    answered: asyncio.Event = field(default_factory=asyncio.Event)
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    recorded: asyncio.Event = field(default_factory=asyncio.Event)
    playing: asyncio.Event = field(default_factory=asyncio.Event)  # its tone has started playing (after answer)
    digits: str = ""  # DTMF this phone received
    digit: asyncio.Event = field(default_factory=asyncio.Event)  # set at each digit received
    answered_at: float | None = None
    ended_at: float | None = None
    cause: int | None = None
    hung_up_itself: bool = False  # this phone hung up (rather than the network)
    recording: str | None = None

    @property
    def duration(self) -> float | None:
        if self.answered_at is None or self.ended_at is None:
            return None
        return self.ended_at - self.answered_at


class Carrier:
    def __init__(self, stack: Stack) -> None:
        env = stack.env
        self.stack = stack
        self.ari = AriClient(
            f"http://{env['MB_TRUNK_HOST']}:{env['MB_CARRIER_ARI_PORT']}",
            "carrier",
            env["MB_CARRIER_ARI_PASSWORD"],
            env["MB_CARRIER_APP"],
        )
        self.phones: dict[str, Phone] = {}
        self.legs: dict[str, Leg] = {}
        self.incoming: asyncio.Queue[Leg] = asyncio.Queue()
        self._snoops: dict[str, str] = {}  # snoop channel -> the recording it makes
        self._snoop_seconds: dict[str, int] = {}
        self._stream = EventStream(self.ari, self._handle)
        self._task: asyncio.Task[None] | None = None
        self._timers: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> "Carrier":
        self._task = asyncio.create_task(self._stream.run())
        await asyncio.wait_for(self._stream.connected.wait(), 15)
        return self

    async def __aexit__(self, *exc: object) -> None:
        for leg in self.legs.values():
            if not leg.ended.is_set():
                try:
                    await self.ari.hangup(leg.channel_id)
                except AriError:
                    pass
        for t in self._timers:
            t.cancel()
        self._stream.stop()
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._until_unregistered()
        await self.ari.close()

    async def _until_unregistered(self, timeout: float = 5.0) -> None:
        """Until Asterisk has dropped the application with this websocket. Otherwise the
        next Carrier's fresh registration could be undone by this one's late teardown, and
        its first call would find "Stasis app 'phones' doesn't exist"."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                await self.ari.application()
            except AriNotFound:
                return
            except AriError:
                return  # Asterisk is gone: nothing left to wait for
            await asyncio.sleep(0.05)  # polling Asterisk: no event says an application went away

    def phone(self, number: str, **behaviour: Any) -> None:
        self.phones[number] = Phone(**behaviour)

    def _tone_media(self, freq: int, seconds: int = 60) -> str:
        """A sine tone as a sound file of the carrier's (made once), as ARI media."""
        path = asterisk.host_path(self.stack, "carrier", "sounds", f"tone-{freq}.wav")
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            rate = 8000
            frames = array.array(
                "h", (int(8000 * math.sin(2 * math.pi * freq * i / rate)) for i in range(rate * seconds))
            )
            with wave.open(str(path), "wb") as w:
                w.setnchannels(1)
                w.setsampwidth(2)
                w.setframerate(rate)
                w.writeframes(frames.tobytes())
        return f"sound:{self.stack.ast_dir('carrier')}/sounds/tone-{freq}"

    def recording_path(self, leg: Leg) -> Path:
        if not leg.recording:
            raise ValueError(f"the {leg.role} leg {leg.channel_id} recorded nothing")
        return asterisk.host_path(self.stack, "carrier", "spool", "recording", leg.recording + ".wav")

    async def call(
        self, from_number: str, to_number: str, *, tone: int = 600, hangup_after: float | None = None,
        caller_name: str | None = None, listen: bool = True, headers: dict[str, str] | None = None,
        withheld: bool = False, keys_on_early_media: str | None = None, via_network: bool = False,
    ) -> Leg:
        """Place a call from the trunk to the PBX, presenting `from_number` as the caller
        (with `caller_name` as display name, and extra SIP `headers` such as Diversion).
        `withheld`: the caller withholds their number; the carrier then sends an anonymous
        From and asserts the number in P-Asserted-Identity with Privacy: id.
        `keys_on_early_media`: the phone keys these digits as soon as the PBX gives it early
        media (183), before any answer; the call then goes through the carrier's dialplan
        (a Local channel: this leg is its caller side).
        `via_network`: the call goes through the hostile network relay (network.py), which
        must be running."""
        channel_id = f"carrier-{uuid.uuid4()}"
        leg = Leg(
            "caller", channel_id, from_number, dialed=to_number, tone=tone, hangup_after=hangup_after, listen=listen
        )
        self.legs[channel_id] = leg
        # chan_pjsip builds From (and PAI, Privacy) of an outgoing call from the channel's
        # connected line; the caller ID is what the carrier itself knows of the call.
        pres = {"CALLERID(pres)": "prohib", "CONNECTEDLINE(pres,i)": "prohib"} if withheld else {}
        variables = {
            "CALLERID(num)": from_number, "CALLERID(name)": caller_name or "",
            "CONNECTEDLINE(num,i)": from_number, "CONNECTEDLINE(name,i)": caller_name or "", **pres,
            **{f"PJSIP_HEADER(add,{name})": value for name, value in (headers or {}).items()},
        }
        # Created in Stasis, then dialed: the phone can act before it is answered (send its
        # keys over early media, listen to the ringback).
        endpoint = f"PJSIP/{to_number}@{'pbx-via-network' if via_network else 'pbx'}"
        if keys_on_early_media:
            endpoint = f"Local/{to_number}@caller-keys"
            variables["_KEYS"] = keys_on_early_media
        await self.ari.create_channel(endpoint, channel_id, ["caller"], variables)
        await asyncio.wait_for(leg.in_stasis.wait(), 10)  # before that, ARI refuses to dial it
        await self.ari.dial(channel_id, timeout=60)
        return leg

    async def connected(
        self, from_number: str, to_number: str, callee: str, *, callee_phone: dict[str, Any] | None = None,
        timeout: float = 10, **call_options: Any,
    ) -> tuple[Leg, Leg]:
        """A call from `from_number` to `to_number` (`call_options` as `call`'s), which the
        PBX sends on to `callee`'s phone; that phone answers (`callee_phone`: its other
        behaviour, as `phone`'s). The caller's leg and the callee's, once both are answered."""
        self.phone(callee, **{"action": "answer", **(callee_phone or {})})
        leg = await self.call(from_number, to_number, **call_options)
        other = await asyncio.wait_for(self.incoming.get(), timeout)
        await asyncio.wait_for(leg.answered.wait(), timeout)
        await asyncio.wait_for(other.answered.wait(), timeout)
        return leg, other

    async def stop_tone(self, leg: Leg) -> None:
        """The phone stops playing its tone and says nothing from then on (its leg sends no RTP).
        ARI runs a channel's operations in turn: DTMF or a hold sent to a phone would wait
        for the end of its tone's playback. So the tone is stopped first (once it has started:
        a stop that comes before the play would be no stop at all)."""
        if leg.answered.is_set():
            await asyncio.wait_for(leg.playing.wait(), 10)
        try:
            await self.ari.stop_playback(f"tone-{leg.channel_id}")
        except AriNotFound:
            pass

    async def press(self, leg: Leg, digits: str) -> None:
        """The phone stops its tone and sends DTMF (RFC 4733 events) on its call."""
        await self.stop_tone(leg)
        await self.ari.send_dtmf(leg.channel_id, digits)

    async def hold(self, leg: Leg) -> None:
        """The phone puts its call on hold: its tone stops and a re-INVITE with a=sendonly goes
        to the PBX."""
        await self.stop_tone(leg)
        await self.ari.hold(leg.channel_id)

    async def resume(self, leg: Leg) -> None:
        """The phone takes its call off hold (a re-INVITE with a=sendrecv) and plays its tone again."""
        await self.ari.unhold(leg.channel_id)
        await self.resume_tone(leg)

    async def resume_tone(self, leg: Leg) -> None:
        """The phone plays its tone again (after `press` stopped it)."""
        await self.ari.play(leg.channel_id, self._tone_media(leg.tone), f"tone-{leg.channel_id}")

    async def wait_digits(self, leg: Leg, digits: str, timeout: float = 10) -> None:
        """Until the phone has received `digits` (at the end of what it received)."""
        async with asyncio.timeout(timeout):
            while not leg.digits.endswith(digits):
                leg.digit.clear()
                await leg.digit.wait()

    async def listen_to(self, leg: Leg, seconds: int) -> Path:
        """Record `seconds` of what an answered phone hears now (for legs placed without
        listening); returns the recording once it is finished."""
        # A name of its own each time: a phone can be listened to more than once.
        ear = f"sample-{leg.channel_id}-{uuid.uuid4().hex[:8]}"
        leg.recording = ear
        leg.recorded.clear()
        self._snoops[ear] = ear
        self._snoop_seconds[ear] = seconds
        await self.ari.snoop(leg.channel_id, ear, ["snoop"], spy="in")
        try:
            await asyncio.wait_for(leg.recorded.wait(), seconds + 10)
        finally:
            try:
                await self.ari.hangup(ear)
            except AriError:
                pass
        return self.recording_path(leg)

    async def assert_identity(self, leg: Leg, number: str, name: str = "") -> None:
        """The phone's network asserts a (new) identity for it in the middle of the call: a
        connected-line update, which the carrier sends the PBX as an UPDATE or re-INVITE
        with P-Asserted-Identity (as an IMS network does after a forwarding or a pickup).
        (ARI would run it only after the phone's tone: the tone stops meanwhile.)"""
        await self.stop_tone(leg)
        await self.ari.set_variable(leg.channel_id, "CONNECTEDLINE(name,i)", name)
        await self.ari.set_variable(leg.channel_id, "CONNECTEDLINE(num)", number)
        if leg.answered.is_set():
            await self.resume_tone(leg)

    async def transfer(self, leg: Leg, target: str) -> None:
        """The phone transfers its call: REFER to the PBX with Refer-To `target` (a SIP URI)
        once answered; a 302 Moved Temporarily to it while a called phone rings."""
        await self.ari.request("POST", f"/channels/{leg.channel_id}/redirect", {"endpoint": f"PJSIP/{target}"})

    async def hangup(self, leg: Leg, reason: str = "normal", code: int | None = None) -> None:
        """The phone hangs up (or, for a called phone, refuses with `reason` or cause `code`).

        The simulated carrier's Asterisk has been seen to take a hangup (ARI answered it) and
        not carry it out: a caller's leg hung up just after its answer sent no BYE and stayed
        up (in about 1 of 7 runs of the identity tests on one machine). A phone whose user
        hangs up does hang up, so the leg is hung up again, in the background, while it lasts
        HANGUP_AGAIN_SECONDS later (HANGUP_TRIES in all); the caller does not wait for it."""
        leg.hung_up_itself = True
        try:
            await self.ari.hangup(leg.channel_id, reason, code)
        except AriNotFound:
            return

        async def again() -> None:
            for _ in range(HANGUP_TRIES - 1):
                try:
                    await asyncio.wait_for(leg.ended.wait(), HANGUP_AGAIN_SECONDS)
                    return
                except TimeoutError:
                    pass
                try:
                    await self.ari.hangup(leg.channel_id, reason, code)
                except AriNotFound:
                    return
                except AriError:
                    pass

        self._in_background(again())

    # --- events ----------------------------------------------------------------------

    def _later(self, delay: float, action: Any) -> None:
        async def run() -> None:
            await asyncio.sleep(delay)  # the simulated phone's own timing, not a test wait
            try:
                await action()
            except AriError:
                pass

        self._in_background(run())

    def _in_background(self, work: Coroutine[Any, Any, None]) -> None:
        """Run `work` as one of the carrier's timer tasks: cancelled when the carrier closes."""
        task = asyncio.create_task(work)
        self._timers.add(task)
        task.add_done_callback(self._timers.discard)

    async def _handle(self, event: Event) -> None:
        kind = event.get("type")
        # (A Dial event names the dialed channel "peer".)
        channel = event.get("channel") or (event.get("peer") if kind == "Dial" else None) or {}
        cid = channel.get("id", "")
        if kind == "StasisStart":
            args = event.get("args") or []
            if args[:1] == ["callee"]:
                await self._incoming(channel, args[1] if len(args) > 1 else "")
            elif args[:1] == ["caller"] and cid in self.legs:
                self.legs[cid].in_stasis.set()
            elif args[:1] == ["snoop"] and cid in self._snoops:
                seconds = self._snoop_seconds.get(cid, 120)
                # The name given when the snoop was made: a phone listened to (listen_to) while
                # its first snoop was still starting records twice, under two names.
                await self.ari.record(cid, self._snoops[cid], "wav", max_seconds=seconds)
            return
        if kind == "PlaybackStarted":
            # A playback can be stopped only once it has started (before, ARI answers 500).
            playback = str((event.get("playback") or {}).get("id", ""))
            if playback.startswith("tone-") and playback[5:] in self.legs:
                self.legs[playback[5:]].playing.set()
            return
        if kind == "RecordingFinished":
            name = (event.get("recording") or {}).get("name")
            for recorded in self.legs.values():
                if recorded.recording == name:
                    recorded.recorded.set()
            return
        leg = self.legs.get(cid)
        if leg is None:
            return
        if kind == "ChannelDtmfReceived":
            leg.digits += str(event.get("digit", ""))
            leg.digit.set()
        elif kind == "Dial" and event.get("dialstatus") in ("RINGING", "PROGRESS"):
            # The PBX says the other phone rings: 180, or 183 with early media (the PBX's
            # own ringback, or the other phone's announcement).
            leg.early_media = leg.early_media or event["dialstatus"] == "PROGRESS"
            leg.ringing.set()
        elif kind == "ChannelStateChange" and channel.get("state") == "Ringing":
            leg.ringing.set()
        elif kind == "ChannelStateChange" and channel.get("state") == "Up" and leg.role == "caller":
            await self._answered(leg)
        elif kind == "ChannelHangupRequest" and event.get("cause") is not None:
            leg.cause = int(event["cause"])
        elif (kind == "ChannelDestroyed" or (kind == "StasisEnd" and leg.role == "callee")) and not leg.ended.is_set():
            # A called phone's channel leaves Stasis into the dialplan's Hangup(): its
            # StasisEnd is the last event we get for it.
            if kind == "ChannelDestroyed" or leg.cause is None:
                leg.cause = int(event.get("cause", leg.cause or 0))
            leg.ended_at = time.monotonic()
            leg.ended.set()
            if not leg.answered.is_set():
                leg.recorded.set()  # nothing was recorded

    async def _incoming(self, channel: Event, dialed: str) -> None:
        caller = channel.get("caller") or {}
        phone = self.phones.get(dialed, Phone())
        leg = Leg(
            "callee", channel["id"], dialed, dialed=dialed, shown_number=caller.get("number", ""),
            shown_name=caller.get("name", ""), tone=phone.tone, hangup_after=phone.hangup_after,
            listen=phone.listen,
        )
        self.legs[leg.channel_id] = leg
        await self.incoming.put(leg)
        if phone.action == "busy":
            await self.hangup(leg, "busy")
        elif phone.action == "reject":
            await self.hangup(leg, "rejected")
        elif phone.action == "unreachable":
            await self.hangup(leg, code=27)  # the network: destination out of order (SIP 502)
        elif phone.action == "redirect":
            # A 302 is possible only before the phone rings (chan_pjsip: state Ring).
            await self.transfer(leg, phone.redirect_to)
        else:
            await self.ari.ring(leg.channel_id)
            leg.ringing.set()
            if phone.early_media:
                await self.ari.play(leg.channel_id, self._tone_media(leg.tone), f"early-{leg.channel_id}")
            if phone.action == "noanswer":
                self._later(phone.ring_for, lambda: self.hangup(leg, "no_answer"))
            else:
                self._later(phone.answer_after, lambda: self._answer(leg))

    async def _answer(self, leg: Leg) -> None:
        if leg.ended.is_set():
            return
        try:
            await self.ari.stop_playback(f"early-{leg.channel_id}")
        except AriNotFound:
            pass
        await self.ari.answer(leg.channel_id)
        await self._answered(leg)

    async def _answered(self, leg: Leg) -> None:
        """The phone is connected (and in Stasis): play its tone, record what it hears."""
        if leg.answered.is_set():
            return
        leg.answered_at = leg.answered_at or time.monotonic()
        leg.answered.set()
        if not leg.listen:
            leg.recorded.set()  # nothing is recorded
            try:
                await self.ari.play(leg.channel_id, self._tone_media(leg.tone), f"tone-{leg.channel_id}")
            except (AriNotFound, AriConflict):
                leg.playing.set()  # hung up meanwhile: nothing will play
                return
            if leg.hangup_after is not None:
                self._later(leg.hangup_after, lambda: self.hangup(leg))
            return
        leg.recording = f"{leg.role}-{leg.channel_id}"
        # A snoop channel records what the phone hears; the phone plays its tone from a
        # sound file. (Asterisk's `tone:` generator on the channel silences the spy.)
        ear = f"ear-{leg.channel_id}"
        self._snoops[ear] = leg.recording
        try:
            await self.ari.snoop(leg.channel_id, ear, ["snoop"], spy="in")
            await self.ari.play(leg.channel_id, self._tone_media(leg.tone), f"tone-{leg.channel_id}")
        except (AriNotFound, AriConflict):  # hung up meanwhile
            leg.recorded.set()
            leg.playing.set()
            return
        if leg.hangup_after is not None:
            self._later(leg.hangup_after, lambda: self.hangup(leg))
