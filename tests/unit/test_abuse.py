"""Quiet hours and call caps: their checks (bridge/abuse.py, bridge/terms.py) and the time window."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from bridge.abuse import QuietHours, parse_quiet_setting
from bridge.errors import InvalidInput
from bridge.requests import OpenSession, parse
from bridge.terms import Terms

BASE = {"order_id": "o-1", "courier_number": "+79161234567", "client_number": "+79161234568"}


def at(hh: int, mm: int = 0) -> datetime:
    return datetime(2026, 11, 25, hh, mm, tzinfo=timezone.utc)


def quiet_hours(raw: object) -> QuietHours | bool | None:
    """The quiet hours a session would be opened with."""
    terms = parse(OpenSession, {**BASE, "quiet_hours": raw}).terms()
    return terms.quiet_hours


def test_a_window_over_midnight_in_the_clients_time_zone():
    night = quiet_hours({"from": "22:00", "to": "08:00", "timezone": "Europe/Moscow"})  # UTC+3
    assert isinstance(night, QuietHours)
    assert night.covers(at(19, 0)) and night.covers(at(4, 59))  # 22:00 and 07:59 in Moscow
    assert not night.covers(at(18, 59)) and not night.covers(at(5, 0))  # 21:59 and 08:00


def test_a_window_within_a_day():
    lunch = quiet_hours({"from": "13:00", "to": "14:00", "timezone": "UTC"})
    assert isinstance(lunch, QuietHours)
    assert lunch.covers(at(13, 30)) and not lunch.covers(at(14, 0)) and not lunch.covers(at(12, 59))


@pytest.mark.parametrize(
    "raw",
    [
        {"from": "25:00", "to": "08:00", "timezone": "UTC"},
        {"from": "22:00", "to": "22:00", "timezone": "UTC"},
        {"from": "22:00", "to": "08:00", "timezone": "Mars/Olympus"},
        {"from": "22:00", "to": "08:00", "timezone": "Europe"},
        {"from": "22:00", "to": "08:00"},
        {"from": "22:00", "to": "08:00", "timezone": "UTC", "extra": 1},
        "22:00-08:00",
        True,
    ],
)
def test_bad_quiet_hours_are_refused(raw):
    with pytest.raises(InvalidInput) as refused:
        quiet_hours(raw)
    assert refused.value.details["field"] == "quiet_hours"


def test_none_and_false_are_kept_apart():
    assert quiet_hours(None) is None  # the bridge's default applies
    assert quiet_hours(False) is False  # none for this session


def test_defaults_from_the_environment_and_caps():
    assert parse_quiet_setting("") is None
    setting = parse_quiet_setting("22:00-08:00 Europe/Moscow")
    assert setting == QuietHours.model_validate({"from": "22:00", "to": "08:00", "timezone": "Europe/Moscow"})
    with pytest.raises(InvalidInput):
        parse_quiet_setting("nights")
    assert Terms.defaults_from_env({}).calls_per_hour == 0
    assert parse(OpenSession, {**BASE, "calls_per_hour": 0}).calls_per_hour == 0
    # JSON Schema's integer, as the OpenAPI document says: 2.0 is 2; true, "3" and 2.5 are not numbers of calls.
    assert parse(OpenSession, {**BASE, "calls_per_hour": 2.0}).calls_per_hour == 2
    for bad in (-1, True, "3", 10**6, 2.5, float("inf"), float("nan")):
        with pytest.raises(InvalidInput):
            parse(OpenSession, {**BASE, "calls_per_hour": bad})
    for bad in (0, 1, 0.0, "", "22:00-08:00", []):
        with pytest.raises(InvalidInput):
            parse(OpenSession, {**BASE, "quiet_hours": bad})
