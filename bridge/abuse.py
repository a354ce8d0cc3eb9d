"""Abuse controls of a session: call caps per hour and per day (bridge.terms), and quiet
hours during which nobody is put through to the client."""

from __future__ import annotations

from datetime import datetime, time
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from bridge.errors import InvalidInput

CLOCK_PATTERN = r"^([01][0-9]|2[0-3]):[0-5][0-9]$"


class QuietHours(BaseModel):
    """A daily window in a time zone (it may run over midnight): nobody is put through to the
    client in it. As the API writes it: {"from": "22:00", "to": "08:00", "timezone":
    "Europe/Moscow"}."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, populate_by_name=True)

    start: str = Field(alias="from", pattern=CLOCK_PATTERN, description="Start, local time (HH:MM).")
    end: str = Field(alias="to", pattern=CLOCK_PATTERN, description="End, local time (HH:MM), not included.")
    timezone: str = Field(max_length=64, examples=["Europe/Moscow"], description="An IANA time zone.")

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, zone: str) -> str:
        try:
            ZoneInfo(zone)
        except (ZoneInfoNotFoundError, ValueError, OSError):  # OSError: "Europe" is a directory
            raise ValueError("must be a time zone like Europe/Moscow") from None
        return zone

    @model_validator(mode="after")
    def _not_empty(self) -> "QuietHours":
        if self.start == self.end:
            raise ValueError("from and to must differ")
        return self

    def covers(self, moment: datetime) -> bool:
        """Whether `moment` (aware) falls in the window."""
        local = moment.astimezone(ZoneInfo(self.timezone)).time()
        start, end = _clock(self.start), _clock(self.end)
        if start <= end:
            return start <= local < end
        return local >= start or local < end


def _clock(text: str) -> time:
    hours, minutes = text.split(":")
    return time(int(hours), int(minutes))


def parse_quiet_setting(text: str) -> QuietHours | None:
    """MB_QUIET_HOURS: "22:00-08:00 Europe/Moscow", or empty for none."""
    if not text.strip():
        return None
    try:
        window, zone = text.split()
        start, end = window.split("-")
        return QuietHours.model_validate({"from": start, "to": end, "timezone": zone})
    except ValueError:  # pydantic's ValidationError is a ValueError
        raise InvalidInput('MB_QUIET_HOURS must look like "22:00-08:00 Europe/Moscow"') from None
