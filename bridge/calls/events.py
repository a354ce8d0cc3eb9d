"""What happens to a call, as small typed events: ARI's JSON events of its channels, bridge
and recordings, read once here (`read`), plus the bridge's own (`Cut`). The flow matches on
these; nothing else in it looks inside ARI's JSON."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

RawEvent = dict[str, Any]

# A channel is on its way out at the first of these (each may come without the others).
_LEAVING = ("StasisEnd", "ChannelDestroyed", "ChannelHangupRequest")

# A soft hangup request is Asterisk's own (an ARI or CLI hangup, its shutdown, a timeout), never
# a phone's: its "cause" is why, as an AST_SOFTHANGUP_* bit, not a Q.850 cause. These two bits
# say the Asterisk itself is going away (`core stop now`, `core restart now`: a shutdown, and its
# modules unloading), and every channel with it.
_SOFTHANGUP_SHUTDOWN = 1 << 2
_SOFTHANGUP_APPUNLOAD = 1 << 4

# Every ARI event type `read` makes something of: the bridge asks Asterisk for these alone.
# (Of about 80 events a bridged call raised, 62 were of no use to it: a ChannelVarset for every
# variable the dialplan's masking set, a ChannelDialplan for every step, caller ID, connected
# line, dial and bridge membership updates. Each cost Asterisk a JSON channel snapshot sent
# over the websocket and the bridge its parsing.)
WANTED_EVENTS = (
    *_LEAVING, "StasisStart", "ChannelStateChange", "ChannelDtmfReceived", "PlaybackFinished",
    "ChannelHold", "ChannelUnhold", "RecordingFinished", "RecordingFailed",
)


@dataclass(frozen=True)
class CallEvent:
    """Something that happened to a call."""


@dataclass(frozen=True)
class Hangup(CallEvent):
    """A channel is going: `final` only for ChannelDestroyed, whose cause is the one that
    counts (a hangup request comes first and may carry none). `pbx_lost`: nobody hung it up,
    the Asterisk it was on died (found gone at a reconnect to an Asterisk started since) or
    is shutting down. `soft`: Asterisk itself asked for the hangup (no phone did; no cause).
    `at`: when it went, as Asterisk stamped it, or when the bridge lost its Asterisk (None:
    when the bridge reads it)."""

    channel: str
    cause: int | None
    final: bool
    pbx_lost: bool = False
    soft: bool = False
    at: datetime | None = None


@dataclass(frozen=True)
class Answered(CallEvent):
    channel: str


@dataclass(frozen=True)
class Ringing(CallEvent):
    """The phone of a channel rings (its network said 180 or 183)."""

    channel: str


@dataclass(frozen=True)
class InStasis(CallEvent):
    channel: str


@dataclass(frozen=True)
class Key(CallEvent):
    """A DTMF key from a phone."""

    channel: str
    digit: str


@dataclass(frozen=True)
class PlaybackDone(CallEvent):
    playback: str


@dataclass(frozen=True)
class Hold(CallEvent):
    """A phone put its call on hold (`on`), or took it off."""

    channel: str
    on: bool


@dataclass(frozen=True)
class RecordingDone(CallEvent):
    """A recording finished (or failed: either way it is closed)."""

    name: str


@dataclass(frozen=True)
class Cut(CallEvent):
    """The bridge's own: end this call now (a participant was blocked, or left the order)."""

    reason: str


@dataclass(frozen=True)
class Reaped(CallEvent):
    """The bridge's own: another node's reaper ended this call's row (node_lost) while this
    bridge was silent, frozen or cut off from the database; its phones may still be up."""


@dataclass(frozen=True)
class Ignored(CallEvent):
    """Any other event: nothing in the flow waits for it."""

    type: str


def moment(text: Any) -> datetime | None:
    """A time as Asterisk writes it ("2026-12-05T08:50:51.514+0000"); None if it is not one."""
    if not isinstance(text, str) or not text:
        return None
    try:
        at = datetime.fromisoformat(text)  # (70 times faster than strptime's same format)
    except ValueError:
        return None
    return at if at.tzinfo is not None else None


def _cause(raw: RawEvent) -> int | None:
    cause = raw.get("cause")
    return int(cause) if isinstance(cause, (int, str)) and str(cause).isdigit() else None


def read(raw: RawEvent) -> CallEvent:
    """The typed event of one of ARI's JSON events."""
    kind = str(raw.get("type", ""))
    channel = raw.get("channel")
    channel_id = str(channel.get("id", "")) if isinstance(channel, dict) else ""
    if kind in _LEAVING and channel_id:
        soft = kind == "ChannelHangupRequest" and raw.get("soft") is True
        going = soft and bool((_cause(raw) or 0) & (_SOFTHANGUP_SHUTDOWN | _SOFTHANGUP_APPUNLOAD))
        # When it went: when the bridge lost its Asterisk, for a channel found gone with it; else
        # when Asterisk says (the event's timestamp), however late the bridge reads it.
        lost = raw.get("lost_at")
        at = lost if isinstance(lost, datetime) else moment(raw.get("timestamp"))
        return Hangup(channel_id, None if soft else _cause(raw), final=kind == "ChannelDestroyed",
                      pbx_lost=raw.get("pbx_lost") is True or going, soft=soft, at=at)
    if kind == "ChannelStateChange" and channel_id and isinstance(channel, dict) and channel.get("state") == "Up":
        return Answered(channel_id)
    if kind == "ChannelStateChange" and channel_id and isinstance(channel, dict) and channel.get("state") == "Ringing":
        return Ringing(channel_id)
    if kind == "StasisStart" and channel_id:
        return InStasis(channel_id)
    if kind == "ChannelDtmfReceived" and channel_id:
        return Key(channel_id, str(raw.get("digit", "")))
    if kind == "PlaybackFinished":
        playback = raw.get("playback")
        return PlaybackDone(str(playback.get("id", ""))) if isinstance(playback, dict) else Ignored(kind)
    if kind in ("ChannelHold", "ChannelUnhold") and channel_id:
        return Hold(channel_id, on=kind == "ChannelHold")
    if kind in ("RecordingFinished", "RecordingFailed"):
        recording = raw.get("recording")
        return RecordingDone(str(recording.get("name", ""))) if isinstance(recording, dict) else Ignored(kind)
    return Ignored(kind)
