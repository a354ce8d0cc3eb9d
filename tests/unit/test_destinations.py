"""Allowed destinations (MB_ALLOWED_DESTINATIONS): what the bridge may dial, read and checked
at start; a session open or reassignment outside it is refused before anything is written."""

from __future__ import annotations

import types
import uuid

import pytest

from bridge.config import ConfigError, Settings
from bridge.destinations import Destinations, never
from bridge.errors import DestinationNotAllowed
from bridge.requests import OpenSession, parse
from bridge.sessions import Policy, Sessions
from tests.unit.test_config import good_env, run_bridge

RU_MOBILE, MOSCOW, SPB, TOLL_FREE = "+79161234567", "+74951234567", "+78121234567", "+78001234567"
REVENUE_SHARE = {
    "premium 8-809": "+78091234567", "premium 8-803": "+78031234567", "international networks +882": "+88234567890",
    "+883": "+88312345678", "Inmarsat +870": "+870123456789", "international premium +979": "+97912345678",
}


def test_the_default_is_the_default_regions_mobile_and_geographic_numbers():
    allowed = Destinations.parse("")
    assert all(allowed.allows(n) for n in (RU_MOBILE, MOSCOW, SPB, "+73432123456"))
    assert not allowed.allows(TOLL_FREE), "8-800 is not a client's number: listed only on purpose"
    assert not allowed.allows("+77012345678"), "Kazakhstan shares +7, not Russia's ranges"
    assert not allowed.allows("+442071234567")


@pytest.mark.parametrize("number", REVENUE_SHARE.values(), ids=REVENUE_SHARE.keys())
def test_premium_and_international_network_numbers_are_never_allowed(number):
    assert never(number)
    wide = Destinations.parse("+7,+8,+9,RU:mobile,RU:geographic,RU:toll_free")
    assert not wide.allows(number), "not even under a prefix that covers them"


def test_prefixes_and_kinds_of_other_regions():
    allowed = Destinations.parse(" RU:mobile , +4420, toll_free", default_region="RU")
    assert allowed.allows(RU_MOBILE) and allowed.allows("+442071234567") and allowed.allows(TOLL_FREE)
    assert not allowed.allows(MOSCOW)
    assert Destinations.parse("mobile", default_region="GB").allows("+447400123456")
    assert not Destinations.parse("mobile", default_region="GB").allows(RU_MOBILE)


@pytest.mark.parametrize("value", ["+882", "+78091", "RU:premium", "XX:mobile", "mobile,,geographic", "7916", "+",
                                   "+0123", "ru:mobile"])
def test_a_bad_list_is_refused_at_start(monkeypatch, value):
    good_env(monkeypatch)
    monkeypatch.setenv("MB_ALLOWED_DESTINATIONS", value)
    with pytest.raises(ConfigError) as caught:
        Settings.from_env(services=False)
    assert [p for p in caught.value.problems if p.startswith("MB_ALLOWED_DESTINATIONS")], caught.value.problems


def test_the_setting_is_read_with_the_default_region(monkeypatch):
    good_env(monkeypatch)
    monkeypatch.setenv("MB_DEFAULT_REGION", "GB")
    monkeypatch.setenv("MB_ALLOWED_DESTINATIONS", "mobile,+7916")
    allowed = Settings.from_env(services=False).allowed_destinations
    assert allowed.allows("+447400123456") and allowed.allows(RU_MOBILE) and not allowed.allows(MOSCOW)


def test_a_kind_without_region_needs_a_default_region_of_the_numbering_plan(monkeypatch):
    good_env(monkeypatch)
    monkeypatch.setenv("MB_DEFAULT_REGION", "ZZ")
    with pytest.raises(ConfigError) as caught:
        Settings.from_env(services=False)
    assert [p for p in caught.value.problems if p.startswith("MB_ALLOWED_DESTINATIONS") and "ZZ" in p], \
        caught.value.problems
    monkeypatch.setenv("MB_ALLOWED_DESTINATIONS", "RU:mobile")
    assert Settings.from_env(services=False).allowed_destinations.allows(RU_MOBILE)


def test_a_support_number_outside_the_list_stops_the_bridge_with_exit_2():
    out = run_bridge(MB_SUPPORT_NUMBER="+78091234567")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "MB_SUPPORT_NUMBER is outside MB_ALLOWED_DESTINATIONS" in out.stderr, out.stderr
    out = run_bridge(MB_SUPPORT_NUMBER=TOLL_FREE, MB_ALLOWED_DESTINATIONS="+79")
    assert out.returncode == 2 and "MB_SUPPORT_NUMBER" in out.stderr, out.stderr
    out = run_bridge(MB_ALLOWED_DESTINATIONS="+883")
    assert out.returncode == 2 and "MB_ALLOWED_DESTINATIONS lists +883" in out.stderr, out.stderr


def _sessions(allowed: str = "") -> Sessions:
    # No store at all: the check comes before anything is read or written.
    store = types.SimpleNamespace(sessions=None)
    return Sessions(store, None, Policy(destinations=Destinations.parse(allowed)))  # type: ignore[arg-type]


@pytest.mark.parametrize(("field", "courier", "client"), [
    ("client_number", RU_MOBILE, "+78091234567"), ("courier_number", "+88234567890", RU_MOBILE),
    ("client_number", RU_MOBILE, "8 (800) 123-45-67"),
])
async def test_open_refuses_a_number_outside_the_list_before_anything_is_written(field, courier, client):
    request = parse(OpenSession, {"order_id": "order-1", "courier_number": courier, "client_number": client})
    with pytest.raises(DestinationNotAllowed) as refused:
        await _sessions().open(request)
    assert refused.value.http_status == 422 and refused.value.code == "destination_not_allowed"
    assert refused.value.details == {"field": field}
    assert "1234567" not in str(refused.value), "the message never repeats the number"


async def test_reassignment_refuses_a_number_outside_the_list():
    with pytest.raises(DestinationNotAllowed) as refused:
        await _sessions("RU:mobile").reassign_courier(uuid.uuid4(), MOSCOW, field="number")
    assert refused.value.details == {"field": "number"}


def test_abkhazias_ranges_inside_the_russian_plan_are_not_russian_numbers():
    """+7 840 and +7 940 are typed RU geographic and mobile by the numbering plan, but other
    networks run them and calls to them are billed as international: not in RU:mobile or
    RU:geographic; a deployment that serves them names them."""
    default = Destinations.parse("mobile,geographic")
    for number in ("+78402212345", "+78402312345", "+79401234567", "+79409876543"):
        assert not default.allows(number), number
    assert Destinations.parse("mobile,geographic,+7940").allows("+79401234567")
    assert default.allows("+79161234567") and default.allows("+74951234567")
