"""The bench's capture pairs each call with its callee's leg (bench.capture.pair): a call the
PBX refused does not take the leg of the same pair's next call."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from bench.capture import Leg, pair
from bench.load import calls_per_step, ramp
from bench.measure import Pairs, Route

CALLEES = {"+79151000001": "+79161000001"}


def _caller(call_id: str, dialed: float, final: int, final_at: float, bye: float | None = None) -> Leg:
    return Leg(call_id, "+79151000001", invite=dialed, final=final, final_at=final_at,
               answered=final_at if final == 200 else None, bye=bye, bye_ok=bye is not None)


def _callee(call_id: str, invited: float, answered: float, bye: float) -> Leg:
    return Leg(call_id, "+79161000001", invite=invited, final=200, final_at=answered, answered=answered,
               bye=bye, bye_from_pbx=True, bye_ok=True)


def test_a_refused_call_does_not_take_the_next_calls_callee():
    """The pair calls twice, 1.7 s apart (the bench's pairs repeat within a run); the PBX
    refuses the first (503), the second is set up: one failure, one success. (Paired first
    come, first served, the refused call took the second's callee leg and both failed.)"""
    refused = _caller("a", 100.0, 503, 100.01)
    placed = _caller("b", 101.7, 200, 101.72, bye=103.0)
    its_callee = _callee("e-b", 101.705, 101.715, 103.01)
    calls = pair([placed, refused], [its_callee], CALLEES)
    assert [c.caller.call_id for c in calls] == ["a", "b"]
    assert calls[0].callee is None and calls[0].why_not() == "no callee (caller got 503)"
    assert calls[1].callee is its_callee and calls[1].why_not() == ""


def test_a_callee_leg_after_the_caller_hung_up_is_a_later_calls():
    """A call answered (an announcement) and hung up before any callee leg of its pair: the
    leg invited after that is the next call's."""
    announced = _caller("a", 100.0, 200, 100.01, bye=100.5)
    placed = _caller("b", 101.7, 200, 101.72, bye=103.0)
    its_callee = _callee("e-b", 101.705, 101.715, 103.01)
    calls = pair([announced, placed], [its_callee], CALLEES)
    assert calls[0].callee is None
    assert calls[1].callee is its_callee and calls[1].why_not() == ""


def test_a_refusal_after_the_callee_was_rung_keeps_its_callee():
    """The PBX rang the callee, then failed the caller (its callee leg came first): they are
    one call, a failed one."""
    failed = _caller("a", 100.0, 503, 100.5)
    rung = Leg("e-a", "+79161000001", invite=100.01, final=487, final_at=100.5)
    calls = pair([failed], [rung], CALLEES)
    assert calls[0].callee is rung and calls[0].why_not() == "caller not answered (503)"


async def test_a_ramp_step_with_more_calls_than_pairs_is_refused_before_any_call():
    """Each call of a ramp step has a pair of its own (a pair calling again while its last call
    is set up cannot be told apart); a bench that opened too few says so, placing nothing."""
    routes = [Route("bridge", f"+79151{i:06d}", "+74950000000", f"+79161{i:06d}") for i in range(3)]
    bench: Any = SimpleNamespace(pairs=Pairs(bridge=routes), stack=None)
    with pytest.raises(ValueError, match="a ramp step of 4 calls needs as many pairs"):
        await ramp(bench, [2.0], 2.0, 1.0, 0, paths=("bridge",))
    assert calls_per_step([10.0, 200.0], 20.0) == 4000
