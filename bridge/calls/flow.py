"""One masked call, top to bottom.

A call from the trunk to a pool number enters Stasis; we look up the live session for
(caller's real number, dialed pool number), create the leg to the other participant
showing only the pool number, bridge the two and supervise them until one side hangs up.
The states are named after what the caller hears.
"""

from __future__ import annotations

import asyncio
import enum
import time
import uuid
from datetime import datetime, timezone
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import structlog

from bridge.ari import AriClient, AriConflict, AriError, AriNotFound
from bridge.calls.order_code import CodePrompt, KeypadTiming
from bridge.languages import sounds_of
from bridge.phone import InvalidNumber, mask, normalize
from bridge.sessions import Route
from bridge.terms import Terms

log = structlog.get_logger(__name__)

Event = dict[str, Any]

UNKNOWN_CALLER_SOUND = "ss-noservice"
SESSION_CLOSED_SOUND = "ss-noservice"
BLOCKED_SOUND = "cannot-complete-as-dialed"
UNAVAILABLE_SOUND = "all-circuits-busy-now"  # as the dialplan plays when the bridge is down
BLOCK_CONFIRMED_SOUND = "auth-thankyou"  # to the client who blocked the other party
CONSENT_SOUND = "conf-now-recording"  # "this call is now being recorded", to both parties
RECORDING_FORMAT = "wav"  # Asterisk's wav: 8 kHz 16-bit mono after a 44-byte header
RECORDING_FINISH_TIMEOUT = 5.0  # seconds to wait for Asterisk to close a stopped recording
TRY_LATER_SOUND = "im-sorry,pls-try-call-later"  # call limit reached, quiet hours, locked out
# Order-code numbers: "Please enter your personal identification number followed by the
# pound, or hash key"; after a wrong code "Password incorrect. Please enter your password
# followed by the pound key"; after the last "You have entered too many invalid personal
# identification numbers". (In both languages' sound packages.)
ORDER_CODE_PROMPT = "confbridge-pin"
WRONG_CODE_SOUND = "auth-incorrect"
TOO_MANY_WRONG_CODES_SOUND = "confbridge-pin-bad"
CUT = "MaskbridgeCut"  # our own event: end this call now (e.g. a participant was blocked)

# Hangup cause of the other leg (before answer) -> the call's outcome. The caller is hung
# up with the same cause, so that their phone says what happened; any other cause reaches
# the caller as 34 (no circuit: SIP 503), never as itself (23 would be a 302 naming where
# the other network wanted the call to go).
_REFUSALS: dict[int, str] = {
    17: "busy",
    18: "no_answer",
    19: "no_answer",
    21: "rejected",
    1: "unreachable",  # unallocated number
    3: "unreachable",  # no route to destination
    20: "unreachable",  # subscriber absent (switched off, out of coverage)
    27: "unreachable",  # destination out of order
}
# The other network answered 302 (cause 23): the redirect is not followed (that would
# let a network send our call, at our cost and showing the pool number, anywhere it
# likes); the caller hears the other phone is unavailable (cause 20: SIP 480).
REDIRECTED_CAUSE = 23
REDIRECTED_CAUSE_TO_CALLER = 20
FAILED_CAUSE_TO_CALLER = 34
# The dialplan hands a call to the bridge only once its leg is masked ([from-trunk] in
# extensions.conf: MASK_NUMBER and the interception routines), and says so with this argument
# of Stasis(). A call without it came through a dialplan older than this bridge.
MASKED_ARG = "masked"
# On the leg to the other participant: Asterisk runs these routines before it sends the leg
# an update of the other side's identity ([mb-identity] in extensions.conf); they leave only
# MASK_NUMBER, the pool number this leg knows the call by.
IDENTITY_SUBS = {
    "CONNECTED_LINE_SEND_SUB": "mb-identity,connected,1",
    "REDIRECTING_SEND_SUB": "mb-identity,redirecting,1",
}


def caller_cause(cause: int | None) -> int:
    """What the caller is hung up with when the other phone's network refused the call."""
    if cause in _REFUSALS:
        return cause
    return REDIRECTED_CAUSE_TO_CALLER if cause == REDIRECTED_CAUSE else FAILED_CAUSE_TO_CALLER


_GONE = ("StasisEnd", "ChannelDestroyed", "ChannelHangupRequest")


class CallState(enum.Enum):
    ROUTING = "routing"  # a few ms of silence while the session is looked up
    ENTERING_CODE = "entering_code"  # an order-code number: the caller is asked for the order's code
    RINGING = "ringing"  # the caller hears the other phone ring
    CONSENT = "consent"  # answered; both hear that the call is recorded, each on their own
    CONNECTED = "connected"  # they talk
    ANNOUNCING = "announcing"  # the caller hears why the call cannot be put through
    ENDED = "ended"


class Router(Protocol):
    async def route(self, caller: str, pool_number: str) -> Route: ...
    async def route_by_code(self, caller: str, pool_number: str, order_code: str) -> Route: ...
    async def block_by_client(self, session_id: uuid.UUID, participant_id: uuid.UUID, by: uuid.UUID) -> None: ...


class CallStore(Protocol):
    async def insert_call(self, call_id: uuid.UUID, **fields: Any) -> None: ...
    async def call_ringing(self, call_id: uuid.UUID, outbound_channel_id: str, bridge_id: str) -> None: ...
    async def call_connected(self, call_id: uuid.UUID) -> None: ...
    async def call_announcing(self, call_id: uuid.UUID) -> None: ...
    async def recording_started(self, call_id: uuid.UUID, name: str, fmt: str) -> uuid.UUID: ...
    async def recording_finished(self, call_id: uuid.UUID, duration_ms: int | None, size: int | None) -> None: ...
    async def recording_discarded(self, call_id: uuid.UUID) -> None: ...
    async def call_entering_code(self, call_id: uuid.UUID) -> None: ...
    async def call_routed(self, call_id: uuid.UUID, **fields: Any) -> None: ...
    async def call_ended(
        self, call_id: uuid.UUID, outcome: str, hangup_by: str, cause: int | None, cut_reason: str | None = None
    ) -> None: ...


@dataclass(frozen=True)
class FlowSettings:
    trunk_endpoint: str = "trunk"
    default_region: str = "RU"
    ring_timeout: float = 30.0
    stasis_start_timeout: float = 5.0
    announcement_timeout: float = 30.0
    duration_warning: float = 30.0  # seconds before a call's maximum duration that both hear the warning
    block_keys: str = "*9"  # the client presses these during a call to block the other party
    default_language: str = "en"  # of announcements when no route says otherwise
    keypad: KeypadTiming = KeypadTiming()  # order codes: length and timeouts of the entry
    order_code_attempts: int = 3  # codes a caller may key in one call


# What both parties hear before the bridge ends a call at its maximum duration: three short
# 1400 Hz beeps (a tone no phone of the simulated carrier plays, so tests can hear it).
# ("!" plays a segment once; without it Asterisk repeats the tone until it is stopped.)
DURATION_WARNING_TONE = "tone:!1400/250,!0/250,!1400/250,!0/250,!1400/250"

def _channel_of(event: Event) -> str | None:
    channel = event.get("channel")
    return channel.get("id") if isinstance(channel, dict) else None


def _cause(event: Event) -> int | None:
    """The hangup cause an event carries; None when it carries none (e.g. reconciled)."""
    cause = event.get("cause")
    return int(cause) if cause is not None else None


def _gone(event: Event, channel_id: str) -> bool:
    return event.get("type") in _GONE and _channel_of(event) == channel_id


def _finished_playback(event: Event) -> str | None:
    """The id of the playback an event says has finished, if it says so."""
    if event.get("type") != "PlaybackFinished":
        return None
    playback = event.get("playback")
    return playback.get("id") if isinstance(playback, dict) else None


def wav_duration_ms(size: int) -> int:
    """The length of an Asterisk wav recording (8 kHz, 16-bit mono) from its file size."""
    return max(0, size - 44) // 16


class MaskedCall:
    """The state machine of one call. Events arrive through `feed`, in order, and are
    handled by the single task running `run`."""

    def __init__(
        self,
        call_id: uuid.UUID,
        inbound: Event,
        dialed: str,
        ari: AriClient,
        store: CallStore,
        settings: FlowSettings,
        register: Callable[[str, "MaskedCall"], None],
        router: Router | None = None,
        recently_blocked: Callable[[set[uuid.UUID], float], bool] | None = None,
        masked: bool = True,
    ) -> None:
        self.id = call_id
        self.masked = masked  # the dialplan masked the caller's leg (MASKED_ARG)
        self.router = router
        self._recently_blocked = recently_blocked or (lambda _ids, _since: False)
        self.inbound_id: str = inbound["id"]
        self.inbound = inbound
        self.dialed = dialed
        self.outbound_id = f"{call_id}-callee"
        self.bridge_id = str(call_id)
        self.ari = ari
        self.store = store
        self.settings = settings
        self._register = register
        self.state = CallState.ROUTING
        self._events: asyncio.Queue[Event] = asyncio.Queue()
        self._bridge_created = False
        self._talked_before = 0.0  # seconds a resumed call had been connected before this process
        self.route: Route | None = None
        self._client_digits = ""
        self._recording: str | None = None  # the name of this call's recording in Asterisk

    # --- plumbing ------------------------------------------------------------------

    @property
    def participant_ids(self) -> set[uuid.UUID]:
        """Who is on this call (pseudonymous ids), once it is routed: a block of either ends it."""
        route = self.route
        if route is None:
            return set()
        return {p for p in (route.caller_participant_id, route.callee_participant_id) if p}

    def feed(self, event: Event) -> None:
        self._events.put_nowait(event)

    def cut(self, reason: str) -> None:
        """End this call now, whatever its state (it is ended by the bridge: hangup_by system)."""
        self.feed({"type": CUT, "reason": reason})

    def channel_ids(self) -> list[str]:
        return [self.inbound_id, self.outbound_id]

    def keys(self) -> list[str]:
        """What the dispatcher finds this call by: its channels, and its bridge (for the
        events of the bridge's recording)."""
        return [*self.channel_ids(), f"bridge:{self.bridge_id}"]

    async def _next(self, deadline: float | None) -> Event | None:
        """The next event of this call, or None once `deadline` (monotonic) has passed."""
        if deadline is None:
            return await self._events.get()
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            # What already happened comes before the deadline: a hangup or an answer that
            # is queued when it passes is handled as such.
            return self._events.get_nowait() if not self._events.empty() else None
        # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
        # arrives together with an event, and a stopping bridge would then go on to hang
        # up calls it should leave up for the next process.
        try:
            async with asyncio.timeout(remaining):
                return await self._events.get()
        except TimeoutError:
            return None

    def _caller_left_already(self) -> bool:
        """Whether a hangup of the caller is among the events queued so far."""
        pending = []
        left = False
        while not self._events.empty():
            event = self._events.get_nowait()
            left = left or _gone(event, self.inbound_id)
            pending.append(event)
        for event in pending:
            self._events.put_nowait(event)
        return left

    async def _hangup(self, channel_id: str, reason: str = "normal", code: int | None = None) -> None:
        try:
            await self.ari.hangup(channel_id, reason, code)
        except AriNotFound:
            pass  # already gone: the outcome we wanted

    async def _end(self, outcome: str, hangup_by: str, cause: int | None, cut_reason: str | None = None) -> None:
        self.state = CallState.ENDED
        await self.store.call_ended(self.id, outcome, hangup_by, cause, cut_reason)
        log.info("call.ended", outcome=outcome, hangup_by=hangup_by, cause=cause, cut_reason=cut_reason)

    async def _cut(self, event: Event, outcome: str) -> None:
        """Both legs are hung up by the bridge (a CUT event)."""
        await self._hangup(self.outbound_id)
        await self._hangup(self.inbound_id)
        await self._end(outcome, "system", None, event.get("reason"))

    # --- the flow ------------------------------------------------------------------

    async def run(self) -> None:
        structlog.contextvars.bind_contextvars(call_id=str(self.id))
        try:
            await self._route()
        except Exception:
            log.exception("call.failed", state=self.state.value)
            if self.state in (CallState.ROUTING, CallState.ENTERING_CODE):
                # Nothing rang yet (e.g. the database is down): the caller is told the
                # service is unavailable, not left with silence.
                await self._unavailable()
            await self._hangup(self.inbound_id, "congestion", code=34)
            await self._hangup(self.outbound_id, "normal")
            if self.state is not CallState.ENDED:
                try:
                    await self._end("failed", "system", 34)
                except Exception:  # noqa: BLE001 - the database may be what failed
                    log.exception("call.row_not_ended")
        finally:
            await self._finish_recording()
            await self._destroy_bridge()

    def _sounds(self) -> str:
        """The sounds directory of the language the caller is told things in."""
        language = self.route.language if self.route is not None else self.settings.default_language
        return sounds_of(language)

    async def _unavailable(self) -> None:
        playback_id = f"{self.id}-unavailable"
        try:
            await self.ari.answer(self.inbound_id)
            await self.ari.play(self.inbound_id, f"sound:{UNAVAILABLE_SOUND}", playback_id, self._sounds())
        except AriError:
            return
        deadline = time.monotonic() + self.settings.announcement_timeout
        while (event := await self._next(deadline)) is not None:
            if _gone(event, self.inbound_id) or (
                event.get("type") == "PlaybackFinished" and event.get("playback", {}).get("id") == playback_id
            ):
                return

    async def _destroy_bridge(self) -> None:
        # Only once the call has ended: a bridge process that is stopped (task cancelled)
        # leaves calls up, for the next process to resume (StasisDispatcher.reconcile).
        if self._bridge_created and self.state is CallState.ENDED:
            try:
                await self.ari.destroy_bridge(self.bridge_id)
            except AriError:
                pass

    def _take_route(self, route: Route, lookup_began: float) -> Route:
        """The call's route, known at once, so that a block from now on finds this call
        (StasisDispatcher.cut_calls); and a block that was being applied while the route was
        looked up (since `lookup_began`) is honoured too."""
        self.route = route
        if route.kind == "connect" and self._recently_blocked(self.participant_ids, lookup_began):
            self.route = Route("blocked", session_id=route.session_id, caller_role=route.caller_role,
                               caller_participant_id=route.caller_participant_id, language=route.language)
        return self.route

    async def _route(self) -> None:
        if not self.masked:
            # Fail closed: without the dialplan's masking, whatever the other network says
            # of itself could reach this caller.
            log.error("call.refused_unmasked_leg", hint="the PBX's extensions.conf is older than the bridge: "
                      "its [from-trunk] must set MASK_NUMBER and the interception routines and pass 'masked' to Stasis")
            await self._unavailable()
            await self._hangup(self.inbound_id, "congestion", code=FAILED_CAUSE_TO_CALLER)
            self.state = CallState.ENDED
            return
        raw_caller = (self.inbound.get("caller") or {}).get("number") or ""
        caller: str | None
        pool: str | None
        try:
            caller = normalize(raw_caller, self.settings.default_region)
        except InvalidNumber:
            caller = None
        try:
            pool = normalize(self.dialed, self.settings.default_region)
        except InvalidNumber:
            pool = None
        assert self.router is not None, "a new call needs a router"
        looked_up = time.perf_counter()
        lookup_began = time.monotonic()
        route = await self.router.route(caller, pool) if caller and pool else None
        route_ms = round((time.perf_counter() - looked_up) * 1000, 2)
        route = self._take_route(route, lookup_began) if route is not None else None
        known = route is not None and route.pool_known
        # A number that is not one of our pool numbers could be a person's number: it is
        # kept masked.
        dialed = pool if pool and known else mask(pool or self.dialed[:32])
        log.info(
            "call.started",
            caller=mask(caller or raw_caller or "anonymous"),
            pool_number=dialed,
            route=route.kind if route else "unknown",
            route_ms=route_ms,
        )
        await self.store.insert_call(
            self.id,
            session_id=route.session_id if route else None,
            pool_number=dialed,
            caller_role=route.caller_role if route else None,
            caller_masked=mask(caller or raw_caller or "anonymous"),
            inbound_channel_id=self.inbound_id,
            state=CallState.ROUTING.value,
            caller_participant_id=route.caller_participant_id if route else None,
            callee_role=route.callee_role if route else None,
            callee_participant_id=route.callee_participant_id if route else None,
            terms=route.terms if route else None,
        )
        if route is not None and route.kind == "locked_out":
            await self._announce("locked_out", TRY_LATER_SOUND)
            return
        if route is not None and route.kind == "order_code":
            assert caller is not None and pool is not None
            coded = await self._enter_order_code(caller, pool)
            if coded is None:
                return  # the call ended (wrong codes, or the caller left)
            route = coded
        assert pool is not None or route is None or route.kind == "unknown"
        await self._put_through(route, pool or "")

    async def _put_through(self, route: Route | None, pool: str) -> None:
        """Ring the other participant, or tell the caller why not."""
        if route is None or route.kind == "unknown":
            await self._announce("unknown_caller", UNKNOWN_CALLER_SOUND)
            return
        if route.kind == "blocked":
            await self._announce("blocked", BLOCKED_SOUND)
            return
        if route.kind in ("call_limit", "quiet_hours"):
            await self._announce(route.kind, TRY_LATER_SOUND)
            return
        if route.kind == "finished":
            await self._announce("session_closed", SESSION_CLOSED_SOUND)
            return
        await self._ring(route, pool)

    async def _enter_order_code(self, caller: str, pool: str) -> Route | None:
        """A shared (order-code) number: the caller is answered and asked for the order's
        code, up to `order_code_attempts` times. Returns the route the right code gave
        (the call row now names its session), or None once the call has ended: too many
        wrong codes (outcome wrong_code), or the caller hung up (caller_cancelled)."""
        assert self.router is not None
        self.state = CallState.ENTERING_CODE
        await self.store.call_entering_code(self.id)
        try:
            await self.ari.answer(self.inbound_id)
        except (AriNotFound, AriConflict):  # the caller hung up meanwhile
            await self._end("caller_cancelled", "caller", None)
            return None
        keypad = CodePrompt(self.ari, self.inbound_id, self._next, self.settings.keypad, self._sounds())
        sound = ORDER_CODE_PROMPT
        for attempt in range(1, self.settings.order_code_attempts + 1):
            keyed = await keypad.ask(f"sound:{sound}", f"{self.id}-code-{attempt}")
            if keyed.left:
                log.info("call.left_during_code", attempt=attempt)
                await self._end("caller_cancelled", "caller", None)
                return None
            if not keyed.digits:
                log.info("call.no_code_keyed", attempt=attempt)
                continue  # nothing keyed in time: asked again (not a wrong code)
            lookup_began = time.monotonic()
            route = await self.router.route_by_code(caller, pool, keyed.digits)
            if route.kind == "locked_out":
                log.info("call.wrong_code", attempt=attempt, locked_out=True)
                break
            if route.kind == "wrong_code":
                log.info("call.wrong_code", attempt=attempt)
                sound = WRONG_CODE_SOUND
                continue
            route = self._take_route(route, lookup_began)
            await self.store.call_routed(
                self.id,
                session_id=route.session_id,
                caller_role=route.caller_role,
                caller_participant_id=route.caller_participant_id,
                callee_role=route.callee_role,
                callee_participant_id=route.callee_participant_id,
                terms=route.terms,
            )
            log.info("call.order_code_accepted", route=route.kind, attempt=attempt)
            return route
        await self._announce("wrong_code", TOO_MANY_WRONG_CODES_SOUND)
        return None

    async def _announce(self, outcome: str, sound: str) -> None:
        """Tell the caller why the call cannot be put through, then hang up."""
        self.state = CallState.ANNOUNCING
        await self.store.call_announcing(self.id)
        playback_id = f"{self.id}-announcement"
        try:
            await self.ari.answer(self.inbound_id)
            media = ",".join(f"sound:{name}" for name in sound.split(","))
            await self.ari.play(self.inbound_id, media, playback_id, self._sounds())
        except (AriNotFound, AriConflict):  # the caller hung up meanwhile
            await self._end(outcome, "caller", None)
            return
        deadline = time.monotonic() + self.settings.announcement_timeout
        while (event := await self._next(deadline)) is not None:
            if _gone(event, self.inbound_id):
                await self._end(outcome, "caller", None)
                return
            if event.get("type") == "PlaybackFinished" and event.get("playback", {}).get("id") == playback_id:
                break
        await self._hangup(self.inbound_id, "normal")
        await self._end(outcome, "system", None)

    async def _ring(self, route: Route, pool: str) -> None:
        """Create the leg to the other participant, masked, and let the caller hear it ring."""
        self.state = CallState.RINGING
        if self._caller_left_already():
            await self._end("caller_cancelled", "caller", None)
            return
        try:
            # (The caller's own leg was masked by the dialplan: it knows the other side only
            # as the number it dialed, whatever the other network says.)
            await self.ari.create_bridge(self.bridge_id, name=f"call-{self.id}")
            self._bridge_created = True
            if not route.terms.record:
                # In the bridge from now on, the caller hears the other phone ring. A recorded
                # call's legs are joined only after both heard the consent announcement.
                await self.ari.add_to_bridge(self.bridge_id, self.inbound_id)
        except (AriNotFound, AriConflict):  # the caller's channel is gone or leaving
            await self._end("caller_cancelled", "caller", None)
            return
        self._register(self.outbound_id, self)
        # The new leg's only identity is the pool number: chan_pjsip builds From, PAI and
        # RPID from it, and the interception routines keep it so whatever updates come.
        # No `originator`, no `caller` on dial: both would copy the caller's real identity
        # onto this leg.
        # The callee is shown the pool number they themselves would dial to reach the
        # caller (after a courier reassignment it can differ from the one the caller dialed).
        shown = route.shown_number or pool
        masked_identity = {
            "CALLERID(num)": shown,
            "CALLERID(name)": shown,
            "CONNECTEDLINE(num)": shown,
            "CONNECTEDLINE(name)": shown,
            "MASK_NUMBER": shown,
            **IDENTITY_SUBS,
        }
        try:
            await self.ari.create_channel(
                f"PJSIP/{route.callee_number}@{self.settings.trunk_endpoint}",
                self.outbound_id,
                ["outbound", str(self.id)],
                masked_identity,
            )
        except AriError as exc:
            log.warning("call.outbound_failed", error=str(exc))
            # The request may have failed after Asterisk created the leg (a lost answer).
            await self._hangup(self.outbound_id)
            await self._hangup(self.inbound_id, "congestion")
            await self._end("failed", "system", None)
            return
        await self.store.call_ringing(self.id, self.outbound_id, self.bridge_id)

        # The new leg must be in Stasis before it can join the bridge.
        deadline = time.monotonic() + self.settings.stasis_start_timeout
        while True:
            event = await self._next(deadline)
            if event is None:
                raise RuntimeError("outbound leg never entered Stasis")
            if _gone(event, self.inbound_id):
                await self._hangup(self.outbound_id)
                await self._end("caller_cancelled", "caller", None)
                return
            if event.get("type") == CUT:
                await self._cut(event, "blocked")
                return
            if event.get("type") == "StasisStart" and _channel_of(event) == self.outbound_id:
                break
        if not route.terms.record:
            await self.ari.add_to_bridge(self.bridge_id, self.outbound_id)
        await self.ari.dial(self.outbound_id, timeout=int(self.settings.ring_timeout) + 5)
        if route.terms.record:
            # Held apart from the other leg, the caller is told it rings by signalling.
            try:
                await self.ari.ring(self.inbound_id)
            except (AriNotFound, AriConflict):
                pass  # the caller left: the loop below sees it
        log.info("call.ringing", callee=mask(route.callee_number or ""), callee_role=route.callee_role)

        deadline = time.monotonic() + self.settings.ring_timeout
        while True:
            event = await self._next(deadline)
            if event is None:
                log.info("call.ring_timeout", seconds=self.settings.ring_timeout)
                await self._hangup(self.outbound_id, "no_answer")
                await self._hangup(self.inbound_id, "no_answer")
                await self._end("no_answer", "system", 19)
                return
            kind = event.get("type")
            channel = _channel_of(event)
            if _gone(event, self.inbound_id):
                await self._hangup(self.outbound_id)  # cancels the ringing phone
                await self._end("caller_cancelled", "caller", None)
                return
            if kind == CUT:
                await self._cut(event, "blocked")
                return
            if kind == "ChannelDtmfReceived" and await self._client_blocks(event, outcome="blocked"):
                return  # a client calling back blocked the other party while it rang
            if kind == "ChannelDestroyed" and channel == self.outbound_id:
                cause = _cause(event)
                outcome = _REFUSALS.get(cause or 0, "redirected" if cause == REDIRECTED_CAUSE else "failed")
                await self._hangup(self.inbound_id, "congestion", code=caller_cause(cause))
                await self._end(outcome, "callee", cause)
                return
            if kind == "ChannelStateChange" and channel == self.outbound_id and event["channel"]["state"] == "Up":
                break
        await self._talk()

    async def _talk(self) -> None:
        """The other phone answered: connect the caller and wait for either side to hang up."""
        self.state = CallState.CONNECTED
        # Stored before the caller hears the answer: a bridge process stopped from here on
        # leaves a row that says connected, and the next process resumes the call.
        await self.store.call_connected(self.id)
        try:
            await self.ari.answer(self.inbound_id)
        except (AriNotFound, AriConflict):
            pass  # the caller left at the moment of answer; the loop below sees it
        except AriError as exc:
            # Asterisk answers 500 when the channel is already being hung up (a soft hangup
            # pending: the caller left just now); its hangup event follows.
            log.warning("call.answer_failed", error=str(exc))
        if self.route is not None and self.route.terms.record:
            if not await self._consent():
                return
            await self._join_and_record()
        log.info("call.connected")
        await self._supervise()

    async def _consent(self) -> bool:
        """Both parties hear that the call is recorded, each on their own leg while the two
        are held apart, before they hear each other. False when the call ended meanwhile
        (either hung up: the call ends as answered, by them)."""
        self.state = CallState.CONSENT
        log.info("call.consent_announcement")
        pending = {f"{self.id}-consent-caller": self.inbound_id, f"{self.id}-consent-callee": self.outbound_id}
        for playback_id, channel_id in list(pending.items()):
            try:
                await self.ari.play(channel_id, f"sound:{CONSENT_SOUND}", playback_id, self._sounds())
            except (AriNotFound, AriConflict):
                pass  # that side hung up meanwhile: its hangup is among the events
        deadline = time.monotonic() + self.settings.announcement_timeout
        while pending:
            event = await self._next(deadline)
            if event is None:
                raise RuntimeError("the consent announcement did not finish")
            if event.get("type") == CUT:
                await self._cut(event, "answered")
                return False
            if _gone(event, self.inbound_id):
                await self._hangup(self.outbound_id)
                await self._end("answered", "caller", _cause(event))
                return False
            if event.get("type") == "ChannelDestroyed" and _channel_of(event) == self.outbound_id:
                await self._hangup(self.inbound_id)
                await self._end("answered", "callee", _cause(event))
                return False
            pending.pop(_finished_playback(event) or "", None)
        self.state = CallState.CONNECTED
        return True

    async def _join_and_record(self, resumed: bool = False) -> None:
        """Put both legs in the bridge and record it as one file. The recording starts
        first, on the empty bridge, so that it misses nothing they say. (A resumed call
        joins whichever leg the earlier process did not.)"""
        self._register(f"bridge:{self.bridge_id}", self)  # the recording's events
        await self._start_recording()
        joined: set[str] = set()
        if resumed:
            try:
                joined = set((await self.ari.get_bridge(self.bridge_id)).get("channels") or [])
            except AriError as exc:
                log.warning("call.bridge_unreadable", error=str(exc))
        for channel_id in (self.inbound_id, self.outbound_id):
            if channel_id in joined:
                continue
            try:
                await self.ari.add_to_bridge(self.bridge_id, channel_id)
            except AriError as exc:
                # Most likely that side hung up meanwhile (Asterisk answers 400 for a channel
                # that is gone): the supervision sees its hangup.
                log.warning("call.join_failed", channel=channel_id, error=str(exc))

    async def _start_recording(self) -> None:
        """Record the bridge. Its row is written first: whatever Asterisk records has a row
        (which retention finds), and a recording that cannot be stored is not made. They
        were told the call is recorded; a recording that fails must not cost them the call."""
        name = f"maskbridge-{self.id}"
        if self._recording is None:
            try:
                await self.store.recording_started(self.id, name, RECORDING_FORMAT)
            except Exception:  # noqa: BLE001 - e.g. the database is down: no recording, the call goes on
                log.exception("call.recording_not_stored")
                return
            self._recording = name
        try:
            await self.ari.record_bridge(self.bridge_id, name, RECORDING_FORMAT)
        except AriConflict as exc:
            # A recording of this name exists already: an earlier bridge process started it
            # and stopped before the legs were joined. It goes on; this call finishes it.
            log.info("call.recording_taken_over", recording=name, error=str(exc))
        except AriError as exc:
            log.warning("call.recording_failed", error=str(exc))
            await self._discard_recording(name)
        else:
            log.info("call.recording_started", recording=name)

    async def _discard_recording(self, name: str) -> None:
        """A recording that failed to start: nothing of it stays, neither in Asterisk (the
        request may have failed after Asterisk began it) nor in the database."""
        self._recording = None
        for step in (self.ari.stop_recording, self.ari.delete_stored_recording):
            try:
                await step(name)
            except AriError:
                pass  # never began, or its answer was lost: what is left is gone now
        try:
            await self.store.recording_discarded(self.id)
        except Exception:  # noqa: BLE001 - the call goes on
            log.exception("call.recording_row_not_discarded", recording=name)

    async def _finish_recording(self) -> None:
        """Once the call has ended: stop its recording and store its length and size."""
        name = self._recording
        if name is None or self.state is not CallState.ENDED:
            return  # a stopping bridge process leaves the recording to the next one
        try:
            try:
                await self.ari.stop_recording(name)
            except AriNotFound:
                pass  # finished already
            else:
                deadline = time.monotonic() + RECORDING_FINISH_TIMEOUT
                while (event := await self._next(deadline)) is not None:
                    if event.get("type") in ("RecordingFinished", "RecordingFailed") and \
                            (event.get("recording") or {}).get("name") == name:
                        break
            size: int | None = None
            try:
                size = await self.ari.stored_recording_size(name)
            except AriError as exc:
                log.warning("call.recording_unreadable", error=str(exc))
            duration_ms = wav_duration_ms(size) if size is not None else None
            await self.store.recording_finished(self.id, duration_ms, size)
            log.info("call.recording_finished", recording=name, bytes=size, duration_ms=duration_ms)
        except Exception:  # noqa: BLE001 - the call itself has ended already
            log.exception("call.recording_not_finished", recording=name)

    async def _supervise(self) -> None:
        longest = self.route.terms.max_call_seconds if self.route is not None else None
        deadline = time.monotonic() + longest - self._talked_before if longest else None
        warn_at = deadline - min(self.settings.duration_warning, longest / 2) if deadline and longest else None
        while True:
            event = await self._next(warn_at or deadline)
            if event is None and warn_at is not None:
                warn_at = None
                log.info("call.duration_warning", seconds_left=round((deadline or 0) - time.monotonic(), 1))
                try:
                    await self.ari.play_on_bridge(self.bridge_id, DURATION_WARNING_TONE, f"{self.id}-warning")
                except AriError as exc:
                    log.warning("call.duration_warning_failed", error=str(exc))
                continue
            if event is None:
                log.info("call.max_duration", seconds=longest)
                await self._cut({"type": CUT, "reason": "max_duration"}, "answered")
                return
            if event.get("type") == CUT:
                await self._cut(event, "answered")
                return
            if event.get("type") == "ChannelDtmfReceived" and await self._client_blocks(event):
                return
            if event.get("type") in ("ChannelHold", "ChannelUnhold"):
                await self._hold_music(event)
                continue
            if _gone(event, self.inbound_id):
                await self._hangup(self.outbound_id)
                await self._end("answered", "caller", _cause(event))
                return
            if event.get("type") == "ChannelDestroyed" and _channel_of(event) == self.outbound_id:
                await self._hangup(self.inbound_id)
                await self._end("answered", "callee", _cause(event))
                return

    async def _hold_music(self, event: Event) -> None:
        """One phone put the call on hold (its re-INVITE: a=sendonly) or took it off: the
        other party hears music on hold meanwhile. (Asterisk's own hold passing through the
        bridge did start it, but not every time: the held caller sometimes heard silence.)"""
        holder = _channel_of(event)
        if holder not in (self.inbound_id, self.outbound_id):
            return
        held = self.outbound_id if holder == self.inbound_id else self.inbound_id
        try:
            if event["type"] == "ChannelHold":
                await self.ari.start_moh(held)
            else:
                await self.ari.stop_moh(held)
        except AriError as exc:
            log.warning("call.hold_music_failed", error=str(exc))
        log.info("call.hold" if event["type"] == "ChannelHold" else "call.resume", by="caller" if holder == self.inbound_id else "callee")

    async def _client_blocks(self, event: Event, outcome: str = "answered") -> bool:
        """The client keyed the block code: the other party is blocked for this order, their
        leg is hung up, the client hears a confirmation and the call ends. (Digits pass
        through to the other party as they are pressed.) This works during the call, and
        while the other phone still rings when the client is the caller (calling back to
        block): the PBX gives the caller early media, so their keys reach us. The call's
        outcome is `outcome` (answered during a call, blocked before)."""
        route = self.route
        if route is None or route.session_id is None or "client" not in (route.caller_role, route.callee_role):
            return False
        client_is_caller = route.caller_role == "client"
        client_leg = self.inbound_id if client_is_caller else self.outbound_id
        if _channel_of(event) != client_leg:
            return False
        self._client_digits = (self._client_digits + str(event.get("digit", "")))[-16:]
        if not self._client_digits.endswith(self.settings.block_keys):
            return False
        client = route.caller_participant_id if client_is_caller else route.callee_participant_id
        other = route.callee_participant_id if client_is_caller else route.caller_participant_id
        if other is None or client is None or self.router is None:
            return False
        try:
            await self.router.block_by_client(route.session_id, other, client)
        except Exception:  # noqa: BLE001 - the call goes on; the client can key the code again
            log.exception("call.block_by_client_failed")
            self._client_digits = ""
            return False
        log.info("call.blocked_by_client")
        await self._hangup(self.outbound_id if client_is_caller else self.inbound_id)
        playback_id = f"{self.id}-blocked"
        try:
            await self.ari.play(client_leg, f"sound:{BLOCK_CONFIRMED_SOUND}", playback_id, self._sounds())
            deadline = time.monotonic() + self.settings.announcement_timeout
            while (next_event := await self._next(deadline)) is not None:
                if _gone(next_event, client_leg) or (
                    next_event.get("type") == "PlaybackFinished"
                    and next_event.get("playback", {}).get("id") == playback_id
                ):
                    break
        except (AriNotFound, AriConflict):
            pass  # the client hung up meanwhile
        await self._hangup(client_leg)
        await self._end(outcome, "system", None, "blocked_by_client")
        return True

    @classmethod
    def resume_connected(
        cls,
        row: dict[str, Any],
        ari: AriClient,
        store: CallStore,
        settings: FlowSettings,
        register: Callable[[str, "MaskedCall"], None],
        router: Router | None = None,
        language: str | None = None,
    ) -> "MaskedCall":
        """A call that was connected when an earlier bridge process stopped: supervise it.
        `router` carries the client's block (*9); `language` is the pool number's, of what
        they hear (default MB_DEFAULT_LANGUAGE)."""
        call = cls(row["id"], {"id": row["inbound_channel_id"]}, row["pool_number"], ari, store, settings, register,
                   router)
        call.state = CallState.CONNECTED
        # Who is who (for blocks and the client's keypad), and the maximum duration, which
        # still counts from the answer however long the restart took.
        call.route = Route(
            "connect", session_id=row.get("session_id"), caller_role=row.get("caller_role"),
            caller_participant_id=row.get("caller_participant_id"), callee_role=row.get("callee_role"),
            callee_participant_id=row.get("callee_participant_id"), language=language or settings.default_language,
            terms=Terms.from_columns(row, Terms.on_call_row_names()),
        )
        call._recording = row.get("recording_name")
        if call.route.terms.max_call_seconds and row.get("answered_at") is not None:
            call._talked_before = (datetime.now(timezone.utc) - row["answered_at"]).total_seconds()
        call._bridge_created = row["bridge_id"] is not None
        return call

    async def run_resumed(self) -> None:
        structlog.contextvars.bind_contextvars(call_id=str(self.id))
        log.info("call.resumed")
        try:
            if self.route is not None and self.route.terms.record:
                if self._recording is None:
                    # The earlier process stopped before the recording began: the parties may
                    # not have heard the whole announcement, so they hear it (again) first.
                    if not await self._consent():
                        return
                # It may also have stopped after the recording's row, before Asterisk began
                # it or before both legs were joined: the recording runs (is started, or
                # taken over) and both legs are in the bridge.
                await self._join_and_record(resumed=True)
            await self._supervise()
        except Exception:
            log.exception("call.failed", state=self.state.value)
            await self._hangup(self.inbound_id)
            await self._hangup(self.outbound_id)
            if self.state is not CallState.ENDED:
                await self._end("answered", "system", None)
        finally:
            await self._finish_recording()
            await self._destroy_bridge()
