"""Abuse controls of a session: call caps per hour and per day, and quiet hours during which
nobody is put through to the client."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, time
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from bridge.errors import InvalidInput

_CLOCK = re.compile(r"^([01][0-9]|2[0-3]):([0-5][0-9])$")
MAX_CAP = 10_000


@dataclass(frozen=True)
class QuietHours:
    start: time
    end: time
    timezone: str

    def covers(self, moment: datetime) -> bool:
        """Whether `moment` (aware) falls in the window; a window may run over midnight."""
        local = moment.astimezone(ZoneInfo(self.timezone)).time()
        if self.start <= self.end:
            return self.start <= local < self.end
        return local >= self.start or local < self.end

    def to_json(self) -> dict[str, str]:
        return {"from": self.start.strftime("%H:%M"), "to": self.end.strftime("%H:%M"), "timezone": self.timezone}


def _clock(field: str, raw: object) -> time:
    m = _CLOCK.match(raw) if isinstance(raw, str) else None
    if m is None:
        raise InvalidInput(f"{field} must be a time of day like 22:00", field="quiet_hours")
    return time(int(m.group(1)), int(m.group(2)))


def quiet_hours(raw: object) -> QuietHours | bool | None:
    """{"from": "22:00", "to": "08:00", "timezone": "Europe/Moscow"}; false: none; None: the default."""
    if raw is None or raw is False:
        return raw
    if not isinstance(raw, dict) or set(raw) != {"from", "to", "timezone"}:
        raise InvalidInput('quiet_hours must be {"from": "22:00", "to": "08:00", "timezone": "Europe/Moscow"} '
                           "or false", field="quiet_hours")
    zone = raw["timezone"]
    try:
        if not isinstance(zone, str) or len(zone) > 64:
            raise ZoneInfoNotFoundError(zone)
        ZoneInfo(zone)
    except (ZoneInfoNotFoundError, ValueError, OSError):  # OSError: "Europe" is a directory
        raise InvalidInput("quiet_hours.timezone must be a time zone like Europe/Moscow", field="quiet_hours") from None
    start, end = _clock("quiet_hours.from", raw["from"]), _clock("quiet_hours.to", raw["to"])
    if start == end:
        raise InvalidInput("quiet_hours.from and quiet_hours.to must differ", field="quiet_hours")
    return QuietHours(start, end, zone)


def parse_quiet_setting(text: str) -> QuietHours | None:
    """MB_QUIET_HOURS: "22:00-08:00 Europe/Moscow", or empty for none."""
    if not text.strip():
        return None
    try:
        window, zone = text.split()
        start, end = window.split("-")
    except ValueError:
        raise InvalidInput('MB_QUIET_HOURS must look like "22:00-08:00 Europe/Moscow"') from None
    parsed = quiet_hours({"from": start, "to": end, "timezone": zone})
    assert isinstance(parsed, QuietHours)
    return parsed


def cap(field: str, raw: object) -> int | None:
    if raw is None:
        return None
    if isinstance(raw, bool) or not isinstance(raw, int) or not 0 <= raw <= MAX_CAP:
        raise InvalidInput(f"{field} must be a whole number from 0 (no cap) to {MAX_CAP}", field=field)
    return raw


def stored_quiet(value: Any) -> QuietHours | bool | None:
    """The session's quiet_hours column, as read back (json text, false or null)."""
    if isinstance(value, str):
        import json

        value = json.loads(value)
    return quiet_hours(value) if value is not None else None
