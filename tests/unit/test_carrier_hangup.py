"""The tests' simulated carrier: a hangup its Asterisk took but did not carry out is asked for
again while the leg lasts (Carrier.hangup), and no more once the leg has ended."""

from __future__ import annotations

import asyncio

import pytest

from bridge.ari import AriError, AriNotFound
from bridge.devstack import carrier as carrier_module
from bridge.devstack.carrier import HANGUP_TRIES, Carrier, Leg


class ForgetfulAri:
    """An ARI whose hangups answer with success; the leg ends only at the `ends_at`-th one
    (never, if None). `fails` maps a hangup's number to the error it raises instead."""

    def __init__(self, leg: Leg, ends_at: int | None, fails: dict[int, AriError] | None = None) -> None:
        self.leg = leg
        self.ends_at = ends_at
        self.fails = fails or {}
        self.calls: list[tuple[str, str, int | None]] = []

    async def hangup(self, channel_id: str, reason: str = "normal", code: int | None = None) -> None:
        self.calls.append((channel_id, reason, code))
        n = len(self.calls)
        if n in self.fails:
            raise self.fails[n]
        if n == self.ends_at:
            self.leg.ended.set()


def carrier_with(ari: ForgetfulAri) -> Carrier:
    carrier = Carrier.__new__(Carrier)  # no stack: only hangup and its timers are used
    carrier.ari = ari  # type: ignore[assignment]
    carrier._timers = set()
    return carrier


async def hang_up_and_settle(carrier: Carrier, leg: Leg, **kwargs: object) -> None:
    await carrier.hangup(leg, **kwargs)  # type: ignore[arg-type]
    # The retries run as the carrier's timer tasks: wait for them to finish, bounded.
    await asyncio.wait_for(asyncio.gather(*list(carrier._timers)), 10)


@pytest.fixture(autouse=True)
def quick_retry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(carrier_module, "HANGUP_AGAIN_SECONDS", 0.05)


def leg() -> Leg:
    return Leg(role="caller", channel_id="chan-1", number="+15550100")


async def test_a_hangup_carried_out_is_not_repeated() -> None:
    phone = leg()
    ari = ForgetfulAri(phone, ends_at=1)
    carrier = carrier_with(ari)
    await hang_up_and_settle(carrier, phone)
    assert ari.calls == [("chan-1", "normal", None)]
    assert phone.hung_up_itself


async def test_a_dropped_hangup_is_asked_for_again_with_the_same_cause() -> None:
    phone = leg()
    ari = ForgetfulAri(phone, ends_at=2)
    carrier = carrier_with(ari)
    await hang_up_and_settle(carrier, phone, reason="busy", code=17)
    assert ari.calls == [("chan-1", "busy", 17)] * 2
    assert phone.ended.is_set()


async def test_a_leg_that_never_ends_is_asked_for_a_bounded_number_of_times() -> None:
    phone = leg()
    ari = ForgetfulAri(phone, ends_at=None)
    carrier = carrier_with(ari)
    await hang_up_and_settle(carrier, phone)
    assert len(ari.calls) == HANGUP_TRIES
    assert not carrier._timers, "nothing is left running"


async def test_a_leg_already_gone_stops_the_retries() -> None:
    phone = leg()
    gone = AriNotFound("DELETE", "/channels/chan-1", 404, "Channel not found")
    ari = ForgetfulAri(phone, ends_at=None, fails={2: gone})
    carrier = carrier_with(ari)
    await hang_up_and_settle(carrier, phone)
    assert len(ari.calls) == 2


async def test_a_leg_gone_before_the_first_hangup_starts_no_retry() -> None:
    phone = leg()
    gone = AriNotFound("DELETE", "/channels/chan-1", 404, "Channel not found")
    ari = ForgetfulAri(phone, ends_at=None, fails={1: gone})
    carrier = carrier_with(ari)
    await carrier.hangup(phone)
    assert not carrier._timers
    assert len(ari.calls) == 1


async def test_another_ari_error_on_a_retry_does_not_stop_the_next() -> None:
    phone = leg()
    refused = AriError("DELETE", "/channels/chan-1", 500, "Internal Server Error")
    ari = ForgetfulAri(phone, ends_at=3, fails={2: refused})
    carrier = carrier_with(ari)
    await hang_up_and_settle(carrier, phone)
    assert len(ari.calls) == 3
    assert phone.ended.is_set()
