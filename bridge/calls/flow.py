"""One masked call, top to bottom.

A call from the trunk to a pool number enters Stasis; we look up the live session for
(caller's real number, dialed pool number), create the leg to the other participant
showing only the pool number, bridge the two and supervise them until one side hangs up.
The states are named after what the caller hears.

Some things end a call in every state: the bridge cuts it (a block, a participant leaving
the order, its maximum duration), the caller hangs up, the other phone hangs up. They are
decided in one place (`_common`, with the outcome each state gives them in `_OUTCOMES`),
which every loop asks first, the order-code prompt's included; each loop then handles only
what is its own (an answer, a key, the end of a prompt).
"""

from __future__ import annotations

import asyncio
import enum
import functools
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Protocol

import structlog

from bridge.ari import AriClient, AriConflict, AriError, AriNotFound
from bridge import metrics
from bridge.calls.events import (
    Answered, CallEvent, Cut, Hangup, Hold, Ignored, InStasis, Key, PlaybackDone, RawEvent, Reaped, Ringing, read,
)
from bridge.calls.flood import FLOOD_CAUSE
from bridge.calls.order_code import CodePrompt, KeypadTiming
from bridge.calls.outcomes import CUT_OUTCOMES
from bridge.calls.recording import CallRecording, RecordingStore, recording_name
from bridge.languages import sounds_of
from bridge.phone import InvalidNumber, mask, normalize
from bridge.sessions import Route
from bridge.store.errors import database_unreachable
from bridge.store.queries import NewCall
from bridge.terms import Terms

log = structlog.get_logger(__name__)

UNKNOWN_CALLER_SOUND = "ss-noservice"
SESSION_CLOSED_SOUND = "ss-noservice"
BLOCKED_SOUND = "cannot-complete-as-dialed"
UNAVAILABLE_SOUND = "all-circuits-busy-now"  # as the dialplan plays when the bridge is down
BLOCK_CONFIRMED_SOUND = "auth-thankyou"  # to the client who blocked the other party
CONSENT_SOUND = "conf-now-recording"  # "this call is now being recorded", to both parties
TRY_LATER_SOUND = "im-sorry,pls-try-call-later"  # call limit reached, quiet hours, locked out
# Order-code numbers: "Please enter your personal identification number followed by the
# pound, or hash key"; after a wrong code "Password incorrect. Please enter your password
# followed by the pound key"; after the last "You have entered too many invalid personal
# identification numbers". (In both languages' sound packages.)
ORDER_CODE_PROMPT = "confbridge-pin"
WRONG_CODE_SOUND = "auth-incorrect"
TOO_MANY_WRONG_CODES_SOUND = "confbridge-pin-bad"
# confirm_answer: "You have an incoming call. Press 1 to accept this call, or 2 to reject it."
CONFIRM_PROMPT = "followme/no-recording,followme/options"
CONFIRM_KEY, REJECT_KEY = "1", "2"

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
# A call the bridge ends before the answer (a cut; one a restarted bridge finds unconfirmed):
# the caller's phone is told "temporarily unavailable" (31, normal unspecified: SIP 480), not
# "declined" (SIP 603: what Asterisk sends for an unanswered call hung up without a cause).
CUT_CAUSE_TO_CALLER = 31
NO_ANSWER_CAUSE, REJECTED_CAUSE = 19, 21
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


# Events one call keeps waiting before it drops a phone's keys and holds (MaskedCall.feed).
MAX_QUEUED_EVENTS = 256
# Asterisk not answering when the ring timeout falls due: its answer is waited for so long, again
# and again, before the call is taken for unanswered (PBX_ANSWER_SECONDS for the question itself).
PBX_GRACE_SECONDS = 2.0
PBX_ANSWER_SECONDS = 2.0
# The caller's leg refused to be answered (its hangup crossed the other phone's answer): how
# long its hangup event may take to follow.
CALLER_GONE_SECONDS = 2.0
# A deadline noticed this much late (the bridge was frozen, or its event loop held up) is not
# taken at once: what happened meanwhile may still wait unread in the event stream's socket (an
# answer, a hangup, a key), and it comes first; CATCH_UP_SECONDS at most for it to arrive (the
# stream may have to reconnect).
LATE_SECONDS = 1.0
CATCH_UP_SECONDS = 2.0


def caller_cause(cause: int | None) -> int:
    """What the caller is hung up with when the other phone's network refused the call."""
    if cause in _REFUSALS:
        return cause
    return REDIRECTED_CAUSE_TO_CALLER if cause == REDIRECTED_CAUSE else FAILED_CAUSE_TO_CALLER


class CallState(enum.Enum):
    ROUTING = "routing"  # a few ms of silence while the session is looked up
    ENTERING_CODE = "entering_code"  # an order-code number: the caller is asked for the order's code
    RINGING = "ringing"  # the caller hears the other phone ring
    CONFIRMING = "confirming"  # confirm_answer: it answered and is asked to press 1; the caller still hears ringback
    CONSENT = "consent"  # answered; both hear that the call is recorded, each on their own
    CONNECTED = "connected"  # they talk
    ANNOUNCING = "announcing"  # the caller hears why the call cannot be put through
    ENDED = "ended"


# What the things that can happen in every state end a call as, by state: the caller
# leaving (outcome, whether their hangup cause is kept), the other phone leaving (None:
# decided by the state itself), a cut before the answer (by its reason, CUT_OUTCOMES) or
# after it ("answered").
@dataclass(frozen=True)
class _Outcomes:
    caller_left: str | None  # None: the announcement's own outcome
    keep_cause: bool  # the caller's hangup cause is recorded
    callee_left: str | None  # None: the state decides (the other phone's refusal, or not confirmed)
    answered: bool  # a cut ends an answered call


_OUTCOMES = {
    CallState.ROUTING: _Outcomes("caller_cancelled", False, None, False),
    CallState.ENTERING_CODE: _Outcomes("caller_cancelled", False, None, False),
    CallState.RINGING: _Outcomes("caller_cancelled", False, None, False),
    CallState.CONFIRMING: _Outcomes("caller_cancelled", False, None, False),
    CallState.CONSENT: _Outcomes("answered", True, "answered", True),
    CallState.CONNECTED: _Outcomes("answered", True, "answered", True),
    CallState.ANNOUNCING: _Outcomes(None, False, None, False),
}


class Router(Protocol):
    async def route(self, caller: str, pool_number: str, record: NewCall | None = None) -> Route: ...
    async def route_by_code(self, caller: str, pool_number: str, order_code: str) -> Route: ...
    async def block_by_client(self, session_id: uuid.UUID, participant_id: uuid.UUID, by: uuid.UUID) -> None: ...


class CallStore(RecordingStore, Protocol):
    async def insert_call(self, call_id: uuid.UUID, **fields: Any) -> bool | None: ...
    async def call_put_through(self, call_id: uuid.UUID, **fields: Any) -> bool | None: ...
    async def call_confirming(self, call_id: uuid.UUID) -> None: ...
    async def call_connected(self, call_id: uuid.UUID) -> None: ...
    async def call_announcing(self, call_id: uuid.UUID, **fields: Any) -> None: ...
    async def call_entering_code(self, call_id: uuid.UUID) -> None: ...
    async def ended_calls(self, call_ids: list[uuid.UUID]) -> set[uuid.UUID]: ...
    async def call_ended(
        self, call_id: uuid.UUID, outcome: str, hangup_by: str, cause: int | None, cut_reason: str | None = None,
        *, rung: bool = True, ended_at: datetime | None = None, unanswered: bool = False,
    ) -> bool: ...


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
    keypad: KeypadTiming = field(default_factory=KeypadTiming)  # order codes: length and timeouts of the entry
    order_code_attempts: int = 3  # codes a caller may key in one call
    confirm_wait: float = 6.0  # confirm_answer: seconds after the prompt for the called phone's key
    confirm_prompts: int = 2  # confirm_answer: how many times it is asked


# What both parties hear before the bridge ends a call at its maximum duration: three short
# 1400 Hz beeps (a tone no phone of the simulated carrier plays, so tests can hear it).
# ("!" plays a segment once; without it Asterisk repeats the tone until it is stopped.)
DURATION_WARNING_TONE = "tone:!1400/250,!0/250,!1400/250,!0/250,!1400/250"


class CallFailed(Exception):
    """The call cannot go on as it should (the flow's own checks): it ends as failed."""


def caller_id(number: str) -> str:
    """A leg's caller ID (CALLERID(all)) that is this number alone, as name and number."""
    return f'"{number}" <{number}>'


def masked_identity(shown: str) -> dict[str, str]:
    """The variables a new leg to the other participant is created with: its only identity
    `shown`, the pool number (chan_pjsip builds From, PAI and RPID from it), kept so by the
    interception routines whatever updates come."""
    return {"CALLERID(num)": shown, "CALLERID(name)": shown, "CONNECTEDLINE(num)": shown,
            "CONNECTEDLINE(name)": shown, "MASK_NUMBER": shown, **IDENTITY_SUBS}


def _caller_id_not_masked(failed: AriError) -> None:
    """The caller's leg refused its new caller ID: said, unless the leg is gone (the caller
    left: nothing of it is left to mask)."""
    if not isinstance(failed, AriNotFound):
        log.warning("call.caller_id_not_masked", error=str(failed))


LATE_WRITE_FIRST_WAIT = 1.0  # seconds before a call's end is written again; doubling, up to
LATE_WRITE_LONGEST_WAIT = 30.0
LATE_WRITE_LAST_TRY = 5.0  # seconds the bridge's stop gives the ends still to be written
_late_writes: dict[asyncio.Task[None], tuple[uuid.UUID, Callable[[], Awaitable[object]]]] = {}


def ends_pending() -> set[uuid.UUID]:
    """The calls whose end this process is still to write: a reconcile leaves their rows alone
    (it would say the system ended them)."""
    return {call_id for call_id, _ in _late_writes.values()}


async def last_try_of_late_ends() -> None:
    """At the bridge's stop: each end still to be written is sent once more, all at once,
    within LATE_WRITE_LAST_TRY seconds. Those the database still does not take are left to the next
    bridge's reconcile (which can only say the system ended them, when it finds them)."""
    pending = dict(_late_writes)
    if not pending:
        return
    for waiting in pending:
        waiting.cancel()
    await asyncio.gather(*pending, return_exceptions=True)

    async def once(write: Callable[[], Awaitable[object]]) -> bool:
        try:
            await write()
        except Exception as exc:  # noqa: BLE001 - any failure leaves it to the next bridge (said below)
            log.warning("call.end_not_written_at_stop", error=type(exc).__name__)
            return False
        return True

    tries = {asyncio.create_task(once(write)): call_id for call_id, write in pending.values()}
    done, late = await asyncio.wait(tries, timeout=LATE_WRITE_LAST_TRY)
    for task in late:
        task.cancel()
    await asyncio.gather(*late, return_exceptions=True)
    lost = sorted(str(tries[t]) for t in tries if t not in done or not t.result())
    (log.warning if lost else log.info)("call.ends_at_stop", written=len(tries) - len(lost), lost=len(lost),
                                        call_ids=lost)


async def write_late(write: Callable[[], Awaitable[object]]) -> None:
    """Send `write` (a call's end) again until the database takes it. A bridge stopped first
    leaves the row to the next one's reconcile, as a call it finds still open."""
    wait, attempts = LATE_WRITE_FIRST_WAIT, 1
    while True:
        await asyncio.sleep(wait)  # the database did not answer: give it time
        attempts += 1
        try:
            await write()
        except Exception as exc:
            if not database_unreachable(exc):
                log.exception("call.end_not_written", attempts=attempts)
                return
            wait = min(wait * 2, LATE_WRITE_LONGEST_WAIT)
            continue
        log.info("call.end_written", attempts=attempts)
        return


def _later(call_id: uuid.UUID, write: Callable[[], Awaitable[object]]) -> None:
    task = asyncio.create_task(write_late(write), name="call-end-late")
    _late_writes[task] = (call_id, write)
    task.add_done_callback(lambda done: _late_writes.pop(done, None))


class MaskedCall:
    """The state machine of one call. Events arrive through `feed`, in order, and are
    handled by the single task running `run`."""

    def __init__(
        self,
        call_id: uuid.UUID,
        inbound: RawEvent,
        dialed: str,
        ari: AriClient,
        store: CallStore,
        settings: FlowSettings,
        register: Callable[[str, "MaskedCall"], None],
        router: Router | None = None,
        recently_cut: Callable[[set[uuid.UUID], float], str | None] | None = None,
        masked: bool = True,
        unknown_callers: Callable[[str], str | None] | None = None,
    ) -> None:
        self.id = call_id
        self.router = router
        self._recently_cut = recently_cut or (lambda _ids, _since: None)
        self.masked = masked  # the dialplan masked the caller's leg (MASKED_ARG)
        # Whether an unknown caller of a pool number is announced (None) or refused, and by
        # which limit (bridge.calls.flood.UnknownCallers.admit).
        self._unknown_callers = unknown_callers or (lambda _pool: None)
        self.inbound_id: str = inbound["id"]
        self.inbound = inbound
        self.dialed = dialed
        self.outbound_id = self.outbound_of(call_id)
        self.bridge_id = self.bridge_of(call_id)
        self.ari = ari
        self.store = store
        self.settings = settings
        self._register = register
        self.state = CallState.ROUTING
        self._events: asyncio.Queue[CallEvent] = asyncio.Queue()
        self._bridge_created = False
        self._outbound_created = False
        self._hung_up: set[str] = set()  # channels this call hung up itself
        self._late = False  # a deadline was noticed late (said once)
        self._caller_up = False  # Asterisk said the caller's leg was answered
        self._answer_refused = False  # the caller's leg refused its answer, and the call waits on it
        self._talked_before = 0.0  # seconds a resumed call had been connected before this process
        self.route: Route | None = None
        self._announcing = "unknown_caller"  # the outcome of the announcement being played
        self._client_digits = ""
        self.recording = CallRecording(call_id, self.bridge_id, ari, store)
        self._began = time.monotonic()  # the caller's call reached the bridge (StasisStart)
        self._rang = False  # the post-dial delay is measured (the other phone rang or answered)
        self._connected_at: float | None = None
        self._row_written = False  # the call's row is in the database
        self._dialed = False  # the other leg was dialed: someone may have been rung
        self._started: dict[str, Any] | None = None  # the call.started line, until written

    # --- plumbing ------------------------------------------------------------------

    @staticmethod
    def outbound_of(call_id: uuid.UUID) -> str:
        """The id of a call's leg to the other participant."""
        return f"{call_id}-callee"

    @staticmethod
    def bridge_of(call_id: uuid.UUID) -> str:
        return str(call_id)

    @property
    def participant_ids(self) -> set[uuid.UUID]:
        """Who is on this call (pseudonymous ids), once it is routed: a block of either ends it."""
        route = self.route
        if route is None:
            return set()
        return {p for p in (route.caller_participant_id, route.callee_participant_id) if p}

    def feed(self, event: RawEvent) -> None:
        call_event = read(event)
        # Bounded: what a phone can send at will (keys, holds) and what the flow never reads
        # is dropped once this many events wait; a hangup, an answer or a playback's end is not.
        if self._events.qsize() >= MAX_QUEUED_EVENTS and isinstance(call_event, Key | Hold | Ignored):
            return
        self._events.put_nowait(call_event)

    def cut(self, reason: str) -> None:
        """End this call now, whatever its state (it is ended by the bridge: hangup_by system)."""
        self._events.put_nowait(Cut(reason))

    def reaped(self) -> None:
        """Its row was ended by another node's reaper: hang its phones up, leave the row."""
        self._events.put_nowait(Reaped())

    def channel_ids(self) -> list[str]:
        return [self.inbound_id, self.outbound_id]

    def keys(self) -> list[str]:
        """What the dispatcher finds this call by: its channels, and its bridge (for the
        events of the bridge's recording)."""
        return [*self.channel_ids(), f"bridge:{self.bridge_id}"]

    def _enter(self, state: CallState) -> None:
        """The one place the call changes state (logged at debug: call.started, call.ringing,
        call.connected and call.ended tell its story at info, at a fraction of the cost)."""
        if state is not self.state:
            log.debug("call.state", old=self.state.value, new=state.value)
            self.state = state

    async def _next(self, deadline: float | None) -> CallEvent | None:
        """The next event of this call, or None once `deadline` (monotonic) has passed. (Notes
        when Asterisk says the caller's leg is answered: with both legs in the bridge, its core
        answers the caller as soon as the other phone answers, before the bridge asks it to.)"""
        event = await self._next_event(deadline)
        if isinstance(event, Answered) and event.channel == self.inbound_id:
            self._caller_up = True
        return event

    async def _next_event(self, deadline: float | None) -> CallEvent | None:
        if deadline is None:
            return await self._events.get()
        remaining = deadline - time.monotonic()
        if remaining > 0:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
            # arrives together with an event, and a stopping bridge would then go on to hang
            # up calls it should leave up for the next process.
            try:
                async with asyncio.timeout(remaining):
                    return await self._events.get()
            except TimeoutError:
                pass
        # What already happened comes before the deadline: a hangup or an answer that is
        # queued when it passes is handled as such.
        if not self._events.empty():
            return self._events.get_nowait()
        late = time.monotonic() - deadline
        if late < LATE_SECONDS:
            return None
        # Noticed late (the bridge frozen, its loop held up): what happened meanwhile may still
        # be unread in the event stream's socket, and comes first.
        if not self._late:
            self._late = True
            log.warning("call.deadline_late", seconds=round(late, 1), state=self.state.value)
        try:
            async with asyncio.timeout(CATCH_UP_SECONDS):
                return await self._events.get()
        except TimeoutError:
            return None

    async def _ended_meanwhile(self) -> bool:
        """Handle the queued events that end the call (a hangup, a cut); the others stay
        queued, in order. True when the call has ended."""
        pending: list[CallEvent] = []
        while not self._events.empty():
            pending.append(self._events.get_nowait())
        kept = []
        for event in pending:
            if isinstance(event, (Cut, Hangup, Reaped)) and await self._common(event):
                return True
            kept.append(event)
        for event in kept:
            self._events.put_nowait(event)
        return False

    def _caller_left_already(self) -> bool:
        """Whether a hangup of the caller is among the events queued so far."""
        pending: list[CallEvent] = []
        left = False
        while not self._events.empty():
            event = self._events.get_nowait()
            left = left or (isinstance(event, Hangup) and event.channel == self.inbound_id)
            pending.append(event)
        for event in pending:
            self._events.put_nowait(event)
        return left

    async def _hangup(self, channel_id: str, reason: str = "normal", code: int | None = None) -> None:
        self._hung_up.add(channel_id)  # (before the request: its event may come before its answer)
        try:
            await self.ari.hangup(channel_id, reason, code)
        except AriNotFound:
            pass  # already gone: the outcome we wanted

    async def _hang_up_both(self, *, caller_cause: int | None = None) -> None:
        if self._outbound_created:
            await self._hangup(self.outbound_id)
        if caller_cause is None:
            await self._hangup(self.inbound_id)
        else:
            await self._hangup(self.inbound_id, "congestion", code=caller_cause)

    def _log_started(self) -> None:
        """The call.started line (what _route found), once."""
        if self._started is not None:
            log.info("call.started", **self._started)
            self._started = None

    async def _end(self, outcome: str, hangup_by: str, cause: int | None, cut_reason: str | None = None,
                   *, ended_at: datetime | None = None, unanswered: bool = False) -> None:
        self._log_started()
        self._enter(CallState.ENDED)
        route = self.route
        metrics.CALLS.labels(outcome, metrics.direction(route.caller_role if route else None,
                                                       route.callee_role if route else None)).inc()
        if cut_reason:
            metrics.CALLS_CUT.labels(cut_reason).inc()
        if outcome == "answered" and self._connected_at is not None:
            metrics.CALL_DURATION.observe(time.monotonic() - self._connected_at + self._talked_before)
        # (a call that ended before its other leg was dialed rang nobody: it names no callee)
        write = functools.partial(self.store.call_ended, self.id, outcome, hangup_by, cause, cut_reason,
                                  rung=self._dialed, unanswered=unanswered)
        # (sent again, it says when the call ended, not when the database took it)
        again = functools.partial(write, ended_at=ended_at or datetime.now(timezone.utc))
        try:
            await write(ended_at=ended_at)
        except asyncio.CancelledError:
            # The bridge stops while the database takes its time: the stop tries it once more
            # (last_try_of_late_ends), with the others (adversary, issue 14).
            _later(self.id, again)
            raise
        except Exception as exc:
            if not database_unreachable(exc):
                raise
            # The database did not take it (stalled, restarting): the row would say the call
            # goes on until a bridge connects to Asterisk again. It is written as soon as the
            # database answers, with the moment it ended (the write is idempotent).
            log.warning("call.end_deferred", error=type(exc).__name__)
            _later(self.id, again)
        log.info("call.ended", outcome=outcome, hangup_by=hangup_by, cause=cause, cut_reason=cut_reason)

    # --- what holds in every state ---------------------------------------------------

    async def _common(self, event: CallEvent) -> bool:
        """The rules of every state: a cut, the caller leaving, the other phone leaving. True
        when the event ended the call."""
        outcomes = _OUTCOMES.get(self.state)
        if outcomes is None:
            return False  # ended already
        unanswered = self.state in (CallState.ROUTING, CallState.RINGING, CallState.CONFIRMING)
        if isinstance(event, Reaped):
            # Given up by another node while this bridge was silent (its row says node_lost,
            # its call.ended was sent): it must not go on unrecorded. The row stays as written.
            log.warning("call.reaped", state=self.state.value)
            await self._hang_up_both(caller_cause=CUT_CAUSE_TO_CALLER if unanswered else None)
            self._log_started()
            self._enter(CallState.ENDED)
            return True
        if isinstance(event, Cut) and event.reason == "session_ended" and self.state is CallState.ANNOUNCING:
            # The caller is being told why the call cannot go through (the order finished, most
            # likely the very end this cut is about: a periodic check of the departed, or the
            # sweep closing the session, comes while it plays): the announcement goes on. It
            # had been cut to silence (make test, once).
            return False
        if isinstance(event, Cut):
            log.info("call.cut", reason=event.reason)
            # A caller not answered yet is told the other side is unavailable (480), not that it
            # refused (603, which a plain hangup of an unanswered call would say).
            await self._hang_up_both(caller_cause=CUT_CAUSE_TO_CALLER if unanswered else None)
            outcome = "answered" if outcomes.answered else CUT_OUTCOMES.get(event.reason, "failed")
            await self._end(outcome, "system", None, event.reason)
            return True
        if isinstance(event, Hangup) and event.pbx_lost:
            # Its Asterisk died under it and was started again: neither phone hung up, and
            # both legs are gone with the process. (Not the caller's hangup: support would
            # read the row as the caller's doing.)
            log.warning("call.pbx_lost", state=self.state.value, shutdown=event.soft)
            await self._end("node_lost", "system", None, ended_at=event.at)
            return True
        if isinstance(event, Hangup) and event.soft and event.channel not in self._hung_up and (
                event.channel == self.inbound_id or (self._outbound_created and event.channel == self.outbound_id)):
            # Asterisk hung a leg up itself, neither phone did (an operator's `channel request
            # hangup`, an ARI client other than this bridge, a timeout): the system's doing, and
            # no cause, whichever leg (not a busy, a refusal or an unconfirmed answer of the other
            # phone: those come as its network's answer, never as a soft hangup).
            log.warning("call.hung_up_by_pbx", leg="caller" if event.channel == self.inbound_id else "callee",
                        state=self.state.value)
            await self._hang_up_both(caller_cause=CUT_CAUSE_TO_CALLER if unanswered else None)
            outcome = "answered" if outcomes.answered else \
                self._announcing if self.state is CallState.ANNOUNCING else "failed"
            await self._end(outcome, "system", None, ended_at=event.at)
            return True
        if isinstance(event, Hangup) and event.channel == self.inbound_id:
            if self._outbound_created:
                await self._hangup(self.outbound_id)  # (cancels the other phone while it rings)
            if self._answer_refused:
                # Its hangup crossed the other phone's answer: the caller never heard it.
                await self._end("caller_cancelled", "caller", None, ended_at=event.at, unanswered=True)
                return True
            await self._end(outcomes.caller_left or self._announcing, "caller",
                            event.cause if outcomes.keep_cause else None, ended_at=event.at)
            return True
        if isinstance(event, Hangup) and event.final and event.channel == self.outbound_id:
            if outcomes.callee_left is not None:
                await self._hangup(self.inbound_id)
                await self._end(outcomes.callee_left, "callee", event.cause, ended_at=event.at)
            elif self.state is CallState.RINGING:
                # The other phone's network refused the call: the caller hears why (a plain
                # failure for anything but busy, no answer, rejected or unreachable).
                outcome = _REFUSALS.get(event.cause or 0, "redirected" if event.cause == REDIRECTED_CAUSE else "failed")
                await self._hangup(self.inbound_id, "congestion", code=caller_cause(event.cause))
                await self._end(outcome, "callee", event.cause, ended_at=event.at)
            elif self.state is CallState.CONFIRMING:
                # It answered and hung up without confirming: as if it never answered.
                await self._hangup(self.inbound_id, "congestion", code=NO_ANSWER_CAUSE)
                await self._end("not_confirmed", "callee", event.cause, ended_at=event.at)
            else:
                return False
            return True
        return False

    # --- the flow ------------------------------------------------------------------

    async def run(self) -> None:
        structlog.contextvars.bind_contextvars(call_id=str(self.id))
        try:
            await self._route()
        except Exception:
            self._log_started()
            log.exception("call.failed", state=self.state.value)
            try:
                if self.state in (CallState.ROUTING, CallState.ENTERING_CODE) or (
                        self.state is CallState.RINGING and not self._dialed):
                    # Nothing rang yet (e.g. the database is down): the caller is told the
                    # service is unavailable, not left with silence.
                    if self._outbound_created:
                        await self._hangup(self.outbound_id)  # (never dialed: nothing left the PBX)
                    await self._close_bridge()
                    await self._unavailable()
                await self._hang_up_both(caller_cause=FAILED_CAUSE_TO_CALLER)
            except Exception:
                log.warning("call.hangup_failed", exc_info=True)
            if self.state is not CallState.ENDED:
                try:
                    if not self._row_written:
                        # The statement that was to write it failed (the database stalled): the
                        # attempt is kept all the same, as a call that failed.
                        await self._write_unrouted_row()
                    await self._end("failed", "system", FAILED_CAUSE_TO_CALLER)
                except Exception:
                    log.exception("call.row_not_ended")
        finally:
            await self._after_safely()

    async def _after_safely(self) -> None:
        try:
            await self._after()
        except Exception:
            log.exception("call.cleanup_failed")  # (a bridge or recording left: the next reconcile looks again)

    async def _after(self) -> None:
        """Once the call has ended: its recording finished, its bridge destroyed. (A bridge
        process that is stopped, task cancelled, leaves both to the next process, which
        resumes the call: StasisDispatcher.reconcile.)"""
        if self.state is not CallState.ENDED:
            return
        await self.recording.finish(self._next)
        await self._close_bridge()

    def _sounds(self) -> str:
        """The sounds directory of the language the caller is told things in."""
        return sounds_of(self.route.language if self.route is not None else self.settings.default_language)

    async def _play_and_wait(self, channel_id: str, media: str, playback_id: str) -> bool:
        """Play to one leg until the end of the playback; False if the call ended meanwhile."""
        try:
            await self.ari.play(channel_id, media, playback_id, self._sounds())
        except (AriNotFound, AriConflict):
            pass  # that leg hung up meanwhile: its hangup is among the events
        deadline = time.monotonic() + self.settings.announcement_timeout
        while (event := await self._next(deadline)) is not None:
            if await self._common(event):
                return False
            if isinstance(event, PlaybackDone) and event.playback == playback_id:
                break
        return True

    async def _unavailable(self) -> None:
        """The service cannot take the call (the database is down, the dialplan is too old):
        the caller hears that all circuits are busy."""
        playback_id = f"{self.id}-unavailable"
        try:
            await self.ari.answer(self.inbound_id)
            await self.ari.play(self.inbound_id, f"sound:{UNAVAILABLE_SOUND}", playback_id, self._sounds())
        except AriError:
            return
        deadline = time.monotonic() + self.settings.announcement_timeout
        while (event := await self._next(deadline)) is not None:
            if (isinstance(event, Hangup) and event.channel == self.inbound_id) or (
                    isinstance(event, PlaybackDone) and event.playback == playback_id):
                return

    async def _write_unrouted_row(self, caller_masked: str | None = None) -> None:
        """The row of a call no route lookup wrote (the numbers are no numbers, or the lookup
        failed)."""
        raw_caller = (self.inbound.get("caller") or {}).get("number") or ""
        await self.store.insert_call(
            self.id, session_id=None, pool_number=mask(self.dialed[:32]), caller_role=None,
            caller_masked=caller_masked or mask(raw_caller or "anonymous"), inbound_channel_id=self.inbound_id,
            state=CallState.ROUTING.value,
        )
        self._row_written = True

    def _take_route(self, route: Route, lookup_began: float) -> Route:
        """The call's route, known at once, so that a cut from now on finds this call
        (StasisDispatcher.cut_calls); and a cut applied while the route was looked up (since
        `lookup_began`: a block, a participant leaving) is honoured too."""
        self.route = route
        cut = self._recently_cut(self.participant_ids, lookup_began) if route.kind == "connect" else None
        if cut is not None:
            self.route = Route("blocked" if CUT_OUTCOMES.get(cut) == "blocked" else "finished",
                               session_id=route.session_id, caller_role=route.caller_role,
                               caller_participant_id=route.caller_participant_id, language=route.language)
        return self.route

    def _over_cap(self, route: Route) -> Route:
        """The call's session reached a cap between the route lookup and the call's row (a
        call on another node, or in another task, got the last one): refused as any call over
        the cap is."""
        log.info("call.over_cap_at_commit")
        self.route = Route("call_limit", session_id=route.session_id, caller_role=route.caller_role,
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
            self._enter(CallState.ENDED)
            return
        if self.router is None:
            raise CallFailed("a new call needs a router")
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
        looked_up = time.perf_counter()
        lookup_began = time.monotonic()
        caller_masked = mask(caller or raw_caller or "anonymous")
        route: Route | None = None
        if caller and pool:
            # The lookup writes the call's row too (one round trip on the way to the other phone).
            route = await self.router.route(caller, pool, NewCall(self.id, mask(pool), caller_masked, self.inbound_id))
            self._row_written = True
            metrics.ROUTE_LOOKUP.labels("number").observe(time.perf_counter() - looked_up)
            route = self._take_route(route, lookup_began)
        else:
            await self._write_unrouted_row(caller_masked)
        route_ms = round((time.perf_counter() - looked_up) * 1000, 2)
        # A number that is not one of our pool numbers could be a person's number: it is
        # kept masked.
        known = route is not None and route.pool_known
        self._started = {
            "caller": caller_masked,
            "pool_number": pool if pool and known else mask(pool or self.dialed[:32]),
            "route": route.kind if route else "unknown",
            "route_ms": route_ms,
        }
        if route is None or route.kind != "connect":
            self._log_started()
        # (A call that rings the other phone says so once the INVITE has left: writing the
        # line costs the way there a fifth of a millisecond. Any end before that says it first.)
        if route is None or caller is None or pool is None or route.kind == "unknown":
            refused_by = self._unknown_callers(pool or self.dialed[:32])
            if refused_by is not None:
                await self._refuse_unknown_caller(refused_by)
                return
            await self._announce("unknown_caller", UNKNOWN_CALLER_SOUND)
            return
        if route.kind == "locked_out":
            await self._announce("locked_out", TRY_LATER_SOUND)
            return
        if route.kind == "order_code":
            # A caller who is none of the number's orders' people can key no code that routes:
            # a stranger there, counted as unknown callers are (a flood on a shared number is
            # refused unanswered as one on any other).
            refused_by = None if route.known_caller else self._unknown_callers(pool)
            if refused_by is not None:
                await self._refuse_unknown_caller(refused_by)
                return
            coded = await self._enter_order_code(caller, pool)
            if coded is None:
                return  # the call ended (wrong codes, or the caller left)
            route = coded
        await self._put_through(route, pool)

    async def _refuse_unknown_caller(self, limit: str) -> None:
        """Too many unknown callers lately (on this pool number, or in all): this one is
        hung up unanswered, and their network answers 403; no announcement, no minutes."""
        log.info("call.unknown_caller_refused", limit=limit)
        metrics.UNKNOWN_CALLERS_REFUSED.labels(limit).inc()
        await self._hangup(self.inbound_id, "congestion", code=FLOOD_CAUSE)
        await self._end("unknown_caller", "system", FLOOD_CAUSE)

    async def _put_through(self, route: Route, pool: str) -> None:
        """Ring the other participant, or tell the caller why not."""
        if route.kind != "connect":
            self._log_started()
        announcements = {
            "unknown": ("unknown_caller", UNKNOWN_CALLER_SOUND),
            "blocked": ("blocked", BLOCKED_SOUND),
            "call_limit": ("call_limit", TRY_LATER_SOUND),
            "quiet_hours": ("quiet_hours", TRY_LATER_SOUND),
            "finished": ("session_closed", SESSION_CLOSED_SOUND),
        }
        if route.kind in announcements:
            await self._announce(*announcements[route.kind])
            return
        await self._ring(route, pool)

    async def _enter_order_code(self, caller: str, pool: str) -> Route | None:
        """A shared (order-code) number: the caller is answered and asked for the order's
        code, up to `order_code_attempts` times. Returns the route the right code gave
        (the call row now names its session), or None once the call has ended: too many
        wrong codes (outcome wrong_code), or the caller hung up (caller_cancelled)."""
        router = self.router
        if router is None:
            raise CallFailed("a call to an order-code number needs a router")
        self._enter(CallState.ENTERING_CODE)
        await self.store.call_entering_code(self.id)
        try:
            await self.ari.answer(self.inbound_id)
        except (AriNotFound, AriConflict):
            pass  # the caller hung up meanwhile: their hangup is among the events
        keypad = CodePrompt(self.ari, self.inbound_id, self._next, self._common, self.settings.keypad, self._sounds())
        sound = ORDER_CODE_PROMPT
        for attempt in range(1, self.settings.order_code_attempts + 1):
            keyed = await keypad.ask(f"sound:{sound}", f"{self.id}-code-{attempt}")
            if keyed.ended:
                log.info("call.ended_during_code", attempt=attempt)
                return None
            if not keyed.digits:
                log.info("call.no_code_keyed", attempt=attempt)
                continue  # nothing keyed in time: asked again (not a wrong code)
            lookup_began = time.monotonic()
            route = await router.route_by_code(caller, pool, keyed.digits)
            metrics.ROUTE_LOOKUP.labels("order_code").observe(time.monotonic() - lookup_began)
            if route.kind == "locked_out":
                log.info("call.wrong_code", attempt=attempt, locked_out=True)
                metrics.ORDER_CODE_LOCKOUTS.inc()
                break
            if route.kind == "wrong_code":
                log.info("call.wrong_code", attempt=attempt)
                sound = WRONG_CODE_SOUND
                continue
            route = self._take_route(route, lookup_began)
            log.info("call.order_code_accepted", route=route.kind, attempt=attempt)
            return route
        await self._announce("wrong_code", TOO_MANY_WRONG_CODES_SOUND)
        return None

    async def _announce(self, outcome: str, sound: str) -> None:
        """Tell the caller why the call cannot be put through, then hang up."""
        self._announcing = outcome
        self._enter(CallState.ANNOUNCING)
        route = self.route
        await self.store.call_announcing(
            self.id, session_id=route.session_id if route else None, caller_role=route.caller_role if route else None,
            caller_participant_id=route.caller_participant_id if route else None,
        )
        try:
            await self.ari.answer(self.inbound_id)
        except (AriNotFound, AriConflict):
            pass  # the caller hung up meanwhile: their hangup is among the events
        media = ",".join(f"sound:{name}" for name in sound.split(","))
        if not await self._play_and_wait(self.inbound_id, media, f"{self.id}-announcement"):
            return
        await self._hangup(self.inbound_id, "normal")
        await self._end(outcome, "system", None)

    async def _open_bridge(self) -> None:
        await self.ari.create_bridge(self.bridge_id, name=f"call-{self.id}")
        self._bridge_created = True

    async def _join_and_dial(self, shown: str) -> bool:
        """Both legs into the bridge, in one request, and then the other leg dialed: from then
        on the caller hears the other phone ring (its network's ringing and early media pass
        through). The requests go in one write on one connection, which Asterisk serves one
        request at a time: the dial runs once the join is done, without the round trip to
        the bridge and back between them (0.8 ms of post-dial delay); then the caller's leg
        forgets its caller's identity (_forget_callers_identity, after the dial: not on the
        way of the call's setup, and no request of its own). False when the caller had gone:
        the join failed, and the other phone, dialed anyway, is to be hung up. (The caller's
        own leg was masked by the dialplan: it knows the other side only as the number it
        dialed, whatever the other network says.)"""
        joined, dialed, forgot = await self.ari.in_turn([
            self.ari.join_call(self.bridge_id, [self.inbound_id, self.outbound_id]),
            self.ari.dial_call(self.outbound_id, timeout=int(self.settings.ring_timeout) + 5),
            self.ari.set_variable_call(self.inbound_id, "CALLERID(all)", caller_id(shown)),
        ])
        if isinstance(joined, AriError) and not await self._join_apart(joined):
            return False
        if isinstance(dialed, AriError):
            raise dialed
        if isinstance(forgot, AriError):
            _caller_id_not_masked(forgot)
        return True

    async def _join_apart(self, failed: AriError) -> bool:
        """Both legs joining at once failed: one of them is gone. Each on its own: False when it
        is the caller's."""
        log.info("call.join_retried", error=str(failed))
        try:
            await self.ari.add_to_bridge(self.bridge_id, self.inbound_id)
        except (AriNotFound, AriConflict):
            return False
        except AriError as exc:
            if exc.status == 400:  # "Channel not found"
                return False
            raise
        await self.ari.add_to_bridge(self.bridge_id, self.outbound_id)
        return True

    async def _close_bridge(self) -> None:
        if self._bridge_created:
            try:
                await self.ari.destroy_bridge(self.bridge_id)
            except AriError:
                pass  # gone already
            self._bridge_created = False

    async def _ring(self, route: Route, pool: str) -> None:
        """Create the leg to the other participant, masked, and let the caller hear it ring.
        A recorded call's legs, and those of a call the other phone must confirm, are held
        apart until then: the caller hears the PBX's ringback."""
        self._enter(CallState.RINGING)
        apart = bool(route.terms.record or route.terms.confirm_answer)
        if self._caller_left_already():
            await self._end("caller_cancelled", "caller", None)
            return
        self._register(self.outbound_id, self)
        # The new leg's only identity is the pool number (masked_identity). No `originator`,
        # no `caller` on dial: both would copy the caller's real identity onto this leg.
        # The callee is shown the pool number they themselves would dial to reach the
        # caller (after a courier reassignment it can differ from the one the caller dialed).
        shown = route.shown_number or pool
        # Three things at once, none waiting for another (each is a round trip): the new leg
        # is created, the bridge is made, and the call's row says whom it rings (and whether
        # the session's caps still let it). Nothing has left the PBX yet: the leg is dialed
        # once all three are done and both legs are in the bridge. (The leg is asked for
        # first, as its StasisStart is what the dial waits on; aiohttp may still put the
        # bridge's request on the wire first, about 0.2 ms apart in a kernel trace.)
        self._outbound_created = True
        created, bridged, admitted = await asyncio.gather(
            self.ari.create_channel(
                f"PJSIP/{route.callee_number}@{self.settings.trunk_endpoint}",
                self.outbound_id,
                ["outbound", str(self.id)],
                masked_identity(shown),
            ),
            self._open_bridge(),
            self.store.call_put_through(
                self.id, session_id=route.session_id, caller_role=route.caller_role,
                caller_participant_id=route.caller_participant_id, callee_role=route.callee_role,
                callee_participant_id=route.callee_participant_id, terms=route.terms,
                outbound_channel_id=self.outbound_id, bridge_id=self.bridge_id,
            ),
            return_exceptions=True,
        )
        if isinstance(admitted, BaseException):
            await self._hangup(self.outbound_id)  # (never dialed: nothing left the PBX)
            raise admitted
        if isinstance(created, BaseException):
            if not isinstance(created, AriError):
                raise created
            self._log_started()
            log.warning("call.outbound_failed", error=str(created))
            # The request may have failed after Asterisk created the leg (a lost answer).
            await self._hangup(self.outbound_id)
            await self._hangup(self.inbound_id, "congestion")
            await self._end("failed", "system", None)
            return
        if isinstance(bridged, BaseException):
            await self._hangup(self.outbound_id)
            raise bridged
        if admitted is False:
            # The session reached a cap since the lookup (a call on another node, or in
            # another task, got the last one): the undialed leg and the bridge go, and the
            # caller hears why, as any call over the cap does.
            await self._hangup(self.outbound_id)
            self._outbound_created = False
            await self._close_bridge()
            await self._put_through(self._over_cap(route), pool)
            return
        metrics.CALLS_PUT_THROUGH.labels(metrics.direction(route.caller_role, route.callee_role)).inc()

        # The new leg must be in Stasis before it can join the bridge.
        deadline = time.monotonic() + self.settings.stasis_start_timeout
        while True:
            event = await self._next(deadline)
            if event is None:
                raise CallFailed("outbound leg never entered Stasis")
            if await self._common(event):
                return
            if isinstance(event, InStasis) and event.channel == self.outbound_id:
                break
        # What happened while the legs were made (the caller hung up, a block or the session's
        # end cut the call) is handled before anything leaves for the other phone.
        if await self._ended_meanwhile():
            return
        self._dialed = True
        if apart:
            await self.ari.dial(self.outbound_id, timeout=int(self.settings.ring_timeout) + 5)
        elif not await self._join_and_dial(shown):
            # The caller left within the last round trip: the other phone saw the call come
            # and go.
            await self._hangup(self.outbound_id)
            await self._end("caller_cancelled", "caller", None)
            return
        metrics.CALL_SETUP.observe(time.monotonic() - self._began)
        self._log_started()
        if apart:
            # Held apart from the other leg, the caller is told it rings by signalling.
            try:
                await self.ari.ring(self.inbound_id)
            except (AriNotFound, AriConflict):
                pass  # the caller left: the loop below sees it
        log.info("call.ringing", callee=mask(route.callee_number or ""), callee_role=route.callee_role)
        if apart:
            await self._forget_callers_identity(shown)  # (joined: with the join and the dial)

        deadline = time.monotonic() + self.settings.ring_timeout
        deferred = False
        while True:
            event = await self._next(deadline)
            pbx = await self._pbx_state() if event is None else "up"
            if pbx == "down":
                # Asterisk does not answer (killed, or hung): whether the other phone rang out or
                # went down with it is known once it is back. A ring timeout taken meanwhile
                # would say no_answer, the other phone's doing.
                if not deferred:
                    log.warning("call.ring_timeout_deferred", reason="pbx_not_answering")
                deferred = True
                deadline = time.monotonic() + PBX_GRACE_SECONDS
                continue
            if pbx == "restarted":
                # Back, but another process (the event stream has not reconnected yet to say
                # so): this call's legs went down with the old one.
                await self._common(Hangup(self.inbound_id, None, final=True, pbx_lost=True, at=self.ari.lost_at))
                return
            if event is None:
                log.info("call.ring_timeout", seconds=self.settings.ring_timeout)
                await self._hangup(self.outbound_id, "no_answer")
                await self._hangup(self.inbound_id, "no_answer")
                await self._end("no_answer", "system", NO_ANSWER_CAUSE)
                return
            if await self._common(event):
                return
            if isinstance(event, Key) and await self._client_blocks(event, outcome="blocked"):
                return  # a client calling back blocked the other party while it rang
            if isinstance(event, Ringing | Answered) and event.channel == self.outbound_id and not self._rang:
                self._rang = True
                metrics.POST_DIAL_DELAY.observe(time.monotonic() - self._began)
            if isinstance(event, Answered) and event.channel == self.outbound_id:
                break
        if route.terms.confirm_answer and not await self._confirm():
            return
        await self._talk()

    async def _pbx_state(self) -> str:
        """Asterisk now: "down" (no answer within PBX_ANSWER_SECONDS), "restarted" (it answers
        with another startup time than the event stream's last connection found), or "up"."""
        try:
            async with asyncio.timeout(PBX_ANSWER_SECONDS):
                started = await self.ari.startup_time()
        except (AriError, TimeoutError):
            return "down"
        return "restarted" if self.ari.restarted(started) else "up"

    async def _forget_callers_identity(self, shown: str) -> None:
        """The caller's leg keeps the caller's real number as its caller ID, which Asterisk
        hands the other leg whenever the bridge is rebuilt (the interception routine masks it;
        this is the layer under it): from now on it holds the pool number only. (After the
        other phone's INVITE has left: not on the way of the call's setup.)"""
        try:
            await self.ari.set_variable(self.inbound_id, "CALLERID(all)", caller_id(shown))
        except AriError as exc:
            _caller_id_not_masked(exc)

    async def _confirm(self) -> bool:
        """The other phone answered and must confirm (confirm_answer): it hears that it has
        a call and is asked to press 1, while the caller still hears ringback. True once it
        pressed 1; False when the call ended: 2 (rejected), no key in time (not_confirmed: a
        voicemail or an answering machine, whose greeting never reached the caller), or
        either side hung up."""
        self._enter(CallState.CONFIRMING)
        await self.store.call_confirming(self.id)
        for attempt in range(1, self.settings.confirm_prompts + 1):
            playback_id = f"{self.id}-confirm-{attempt}"
            try:
                media = ",".join(f"sound:{name}" for name in CONFIRM_PROMPT.split(","))
                await self.ari.play(self.outbound_id, media, playback_id, self._sounds())
            except (AriNotFound, AriConflict):
                pass  # it hung up meanwhile: its hangup is among the events
            playing, deadline = True, time.monotonic() + self.settings.announcement_timeout
            while True:
                event = await self._next(deadline)
                if event is None:
                    if playing:  # the prompt never said it ended: the wait counts from now
                        playing, deadline = False, time.monotonic() + self.settings.confirm_wait
                        continue
                    break  # no key in time: asked again
                if await self._common(event):
                    return False
                if isinstance(event, PlaybackDone) and event.playback == playback_id and playing:
                    playing, deadline = False, time.monotonic() + self.settings.confirm_wait
                elif isinstance(event, Key) and event.channel == self.outbound_id and event.digit in (
                        CONFIRM_KEY, REJECT_KEY):
                    if playing:
                        try:
                            await self.ari.stop_playback(playback_id)
                        except AriError:
                            pass  # it had just finished
                    if event.digit == CONFIRM_KEY:
                        log.info("call.confirmed", attempt=attempt)
                        return True
                    log.info("call.rejected_by_callee", attempt=attempt)
                    await self._hangup(self.outbound_id)
                    await self._hangup(self.inbound_id, "congestion", code=REJECTED_CAUSE)
                    await self._end("rejected", "callee", REJECTED_CAUSE)
                    return False
                elif isinstance(event, Key):
                    await self._client_blocks(event, outcome="blocked")
                    if self.state is CallState.ENDED:
                        return False
        log.info("call.not_confirmed", prompts=self.settings.confirm_prompts)
        await self._hangup(self.outbound_id)
        await self._hangup(self.inbound_id, "congestion", code=NO_ANSWER_CAUSE)
        await self._end("not_confirmed", "system", NO_ANSWER_CAUSE)
        return False

    async def _talk(self) -> None:
        """The other phone answered (and confirmed, where it must): connect the caller and
        wait for either side to hang up."""
        self._enter(CallState.CONNECTED)
        self._connected_at = time.monotonic()
        # Stored before the caller hears the answer: a bridge process stopped from here on
        # leaves a row that says connected, and the next process resumes the call.
        await self.store.call_connected(self.id)
        if not await self._answer_caller() and await self._caller_gone():
            return
        route = self.route
        if route is not None and route.terms.record:
            if not await self._consent():
                return
            await self._join(record=True)
        elif route is not None and route.terms.confirm_answer:
            await self._join(record=False)
        log.info("call.connected")
        await self._supervise()

    async def _answer_caller(self) -> bool:
        """Answer the caller's leg; False when Asterisk would not: the caller left at that
        moment (its hangup event follows)."""
        try:
            await self.ari.answer(self.inbound_id)
        except (AriNotFound, AriConflict):
            return False  # the caller's leg is gone, or going
        except AriError as exc:
            # Asterisk answers 500 when the channel is already being hung up (a soft hangup
            # pending: the caller left just now); its hangup event follows.
            log.warning("call.answer_failed", error=str(exc))
            return False
        return True

    async def _caller_gone(self) -> bool:
        """After the caller's leg refused its answer, unless Asterisk had answered it itself
        (its core passes the other leg's answer on; the caller got its 200 OK: answered,
        however soon it hangs up): the caller's hangup crossed the other phone's answer, and
        the caller never heard it. True once an event ended the call (that hangup: the
        caller's cancel, no answer time, the other phone hung up; any other: as in a connected
        call); False when none came within CALLER_GONE_SECONDS (the call goes on as connected)."""
        deadline = time.monotonic() + CALLER_GONE_SECONDS
        self._answer_refused = True  # (_common ends the caller's own hangup as its cancel)
        try:
            while not self._caller_up:
                event = await self._next(deadline)
                if event is None or self._caller_up:  # (the caller's answer itself needs no handling)
                    return False
                if await self._common(event):
                    return True
            return False
        finally:
            self._answer_refused = False

    async def _consent(self) -> bool:
        """Both parties hear that the call is recorded, each on their own leg while the two
        are held apart, before they hear each other. False when the call ended meanwhile
        (either hung up: the call ends as answered, by them)."""
        self._enter(CallState.CONSENT)
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
                raise CallFailed("the consent announcement did not finish")
            if await self._common(event):
                return False
            if isinstance(event, PlaybackDone):
                pending.pop(event.playback, None)
        self._enter(CallState.CONNECTED)
        return True

    async def _join(self, *, record: bool, resumed: bool = False) -> None:
        """Put both legs in the bridge, recording it as one file when asked: the recording
        starts first, on the empty bridge, so that it misses nothing they say. (A resumed call
        joins whichever leg the earlier process did not.)"""
        if record:
            self._register(f"bridge:{self.bridge_id}", self)  # the recording's events
            await self.recording.start()
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
                event = Cut("max_duration")
            if await self._common(event):
                return
            if isinstance(event, Key) and await self._client_blocks(event):
                return
            if isinstance(event, Hold):
                await self._hold_music(event)

    async def _hold_music(self, event: Hold) -> None:
        """One phone put the call on hold (its re-INVITE: a=sendonly) or took it off: the
        other party hears music on hold meanwhile. (Asterisk's own hold passing through the
        bridge did start it, but not every time: the held caller sometimes heard silence.)"""
        if event.channel not in (self.inbound_id, self.outbound_id):
            return
        held = self.outbound_id if event.channel == self.inbound_id else self.inbound_id
        try:
            if event.on:
                await self.ari.start_moh(held)
            else:
                await self.ari.stop_moh(held)
        except AriError as exc:
            log.warning("call.hold_music_failed", error=str(exc))
        by = "caller" if event.channel == self.inbound_id else "callee"
        log.info("call.hold" if event.on else "call.resume", by=by)

    async def _client_blocks(self, event: Key, outcome: str = "answered") -> bool:
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
        if event.channel != client_leg:
            return False
        self._client_digits = (self._client_digits + event.digit)[-16:]
        if not self._client_digits.endswith(self.settings.block_keys):
            return False
        client = route.caller_participant_id if client_is_caller else route.callee_participant_id
        other = route.callee_participant_id if client_is_caller else route.caller_participant_id
        if other is None or client is None or self.router is None:
            return False
        try:
            await self.router.block_by_client(route.session_id, other, client)
        except Exception:
            log.exception("call.block_by_client_failed")
            self._client_digits = ""
            return False
        log.info("call.blocked_by_client")
        metrics.BLOCKS.labels("client").inc()
        await self._hangup(self.outbound_id if client_is_caller else self.inbound_id)
        playback_id = f"{self.id}-blocked"
        try:
            await self.ari.play(client_leg, f"sound:{BLOCK_CONFIRMED_SOUND}", playback_id, self._sounds())
            deadline = time.monotonic() + self.settings.announcement_timeout
            while (next_event := await self._next(deadline)) is not None:
                if (isinstance(next_event, Hangup) and next_event.channel == client_leg) or (
                        isinstance(next_event, PlaybackDone) and next_event.playback == playback_id):
                    break
        except (AriNotFound, AriConflict):
            pass  # the client hung up meanwhile
        await self._hangup(client_leg)
        await self._end(outcome, "system", None, "blocked_by_client")
        return True

    # --- a call an earlier bridge process left connected -------------------------------

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
        call._connected_at = time.monotonic()
        call._outbound_created = True
        call._dialed = True
        call._row_written = True
        # Who is who (for blocks and the client's keypad), and the terms the call keeps (its
        # maximum duration still counts from the answer, however long the restart took).
        call.route = Route(
            "connect", session_id=row.get("session_id"), caller_role=row.get("caller_role"),
            caller_participant_id=row.get("caller_participant_id"), callee_role=row.get("callee_role"),
            callee_participant_id=row.get("callee_participant_id"), language=language or settings.default_language,
            terms=Terms.from_columns(row, Terms.on_call_row_names()),
        )
        if row.get("recording_name"):
            call.recording.name = row["recording_name"]
        if row.get("answered_at") is not None:
            call._talked_before = (datetime.now(timezone.utc) - row["answered_at"]).total_seconds()
        call._bridge_created = row["bridge_id"] is not None
        return call

    async def run_resumed(self) -> None:
        structlog.contextvars.bind_contextvars(call_id=str(self.id))
        log.info("call.resumed")
        try:
            # The earlier process may have stopped between the answer and answering the
            # caller (the other phone answered while no bridge process ran): answered now.
            await self._answer_caller()
            terms = self.route.terms if self.route is not None else Terms()
            if terms.record:
                if self.recording.name is None:
                    # The earlier process stopped before the recording began: the parties may
                    # not have heard the whole announcement, so they hear it (again) first.
                    if not await self._consent():
                        return
                # It may also have stopped after the recording's row, before Asterisk began
                # it or before both legs were joined: the recording runs (is started, or
                # taken over) and both legs are in the bridge.
                await self._join(record=True, resumed=True)
            elif terms.confirm_answer:
                await self._join(record=False, resumed=True)
            await self._supervise()
        except Exception:
            log.exception("call.failed", state=self.state.value)
            try:
                await self._hang_up_both()
            except Exception:
                log.warning("call.hangup_failed", exc_info=True)
            if self.state is not CallState.ENDED:
                await self._end("answered", "system", None)
        finally:
            await self._after_safely()


__all__ = ["CallState", "FlowSettings", "MaskedCall", "Router", "caller_cause", "recording_name"]
