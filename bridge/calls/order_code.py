"""Asking the caller of an order-code number for the order's code.

The caller hears a prompt and keys digits; a digit keyed while the prompt plays stops it,
so callers who know the drill can type over it. The entry ends with `#`, once the code's
length is keyed, or when the caller pauses too long; `*` starts it again. Nothing here
knows about orders: the flow (flow.py) decides what the digits mean.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from bridge.ari import AriClient, AriConflict, AriNotFound
from bridge.calls.events import CallEvent, Key, PlaybackDone


@dataclass(frozen=True)
class KeypadTiming:
    length: int = 6  # digits of a code: the entry ends once this many are keyed
    first_digit: float = 10.0  # seconds after the prompt for the first digit
    between_digits: float = 5.0  # seconds for each next digit
    whole_entry: float = 30.0  # seconds for the whole entry, from the end of the prompt
    prompt_guard: float = 30.0  # a prompt that never reports its end is taken as finished then


@dataclass(frozen=True)
class Keyed:
    """What came of one prompt: the digits keyed ('' for none in time), or the call ended
    meanwhile (the caller left, or the bridge cut it)."""

    digits: str = ""
    ended: bool = False


class CodePrompt:
    """One caller's keypad, read through the call's own (ordered) event queue. Every event
    that is not the prompt's goes to `common`, the rules that hold in every state of the
    call (flow.py): when it says the call ended, so does the prompt."""

    def __init__(
        self,
        ari: AriClient,
        channel_id: str,
        next_event: Callable[[float | None], Awaitable[CallEvent | None]],
        common: Callable[[CallEvent], Awaitable[bool]],
        timing: KeypadTiming,
        sounds: str,
    ) -> None:
        self.ari = ari
        self.channel_id = channel_id
        self._next = next_event
        self._common = common
        self.timing = timing
        self.sounds = sounds

    async def _stop(self, playback_id: str) -> None:
        try:
            await self.ari.stop_playback(playback_id)
        except AriNotFound:
            pass  # it had just finished

    async def ask(self, media: str, playback_id: str) -> Keyed:
        """Play `media` (ARI media URIs, comma separated) and collect the digits keyed."""
        try:
            await self.ari.play(self.channel_id, media, playback_id, self.sounds)
        except (AriNotFound, AriConflict):
            pass  # the caller hung up meanwhile: their hangup is among the events
        timing = self.timing
        playing = True
        digits = ""
        now = time.monotonic()
        prompt_over = now + timing.prompt_guard  # while it plays: only the guard
        last_key = now
        while True:
            if playing:
                deadline = prompt_over
            else:
                pause = timing.between_digits if digits else timing.first_digit
                deadline = min(last_key + pause, prompt_over + timing.whole_entry)
            event = await self._next(deadline)
            now = time.monotonic()
            if event is None:
                if playing:  # the guard passed: count the entry from now
                    playing, prompt_over, last_key = False, now, now
                    continue
                return Keyed(digits)
            if isinstance(event, PlaybackDone) and event.playback == playback_id and playing:
                playing, prompt_over, last_key = False, now, now
                continue
            if not (isinstance(event, Key) and event.channel == self.channel_id):
                if await self._common(event):
                    return Keyed(digits, ended=True)
                continue
            if playing:  # the caller types over the prompt
                playing, prompt_over = False, now
                await self._stop(playback_id)
            last_key = now
            if event.digit == "#":
                return Keyed(digits)
            if event.digit == "*":
                digits = ""  # start again
                continue
            if event.digit.isdigit():
                digits += event.digit
                if len(digits) >= timing.length:
                    return Keyed(digits)
