"""A simultaneous-calls step's setup times (bench.load.setup_times): where a late call's time
went, so that a stall can be told from a slow decision."""

from __future__ import annotations

from bench.capture import Call, Leg
from bench.load import climb_load, setup_times
from bench.report import _climb, _late_calls


def _call(dialed: float, callee_invite: float | None, callee_answer: float | None,
          caller_answer: float | None) -> Call:
    caller = Leg("c-%s" % dialed, "+15550001", invite=dialed, answered=caller_answer)
    callee = Leg("e-%s" % dialed, "+15550002", invite=callee_invite, answered=callee_answer)
    return Call(caller, callee)


def test_calls_answered_after_the_limit_say_when_they_were_dialed_and_where_their_time_went():
    calls = [
        _call(100.0, 100.005, 100.010, 100.012),  # 12 ms
        _call(100.5, 100.505, 100.510, 103.600),  # answered 3.1 s later: the 200 passed back late
        _call(101.0, 104.500, 104.505, 104.507),  # answered 3.507 s later: its callee dialed late
        _call(101.5, None, None, None),  # never reached its callee: counted nowhere
    ]
    out = setup_times(calls)
    assert out["setup_ms"]["n"] == 3
    assert round(out["setup_ms"]["max"]) == 3500
    assert out["answer_ms"]["n"] == 3
    late = out["late"]
    assert late["calls"] == 2
    assert (late["dialed_from_s"], late["dialed_to_s"]) == (0.5, 1.0)
    assert round(late["setup_ms"]["max"]) == 3500 and round(late["setup_ms"]["p50"]) == 5
    assert round(late["callee_answer_to_caller_answer_ms"]["max"]) == 3090
    text = "\n".join(_late_calls([{"calls": 4, **out}]))
    assert "The 4 step's 2 calls answered late were dialed 0.5 to 1 s after its first" in text


def test_a_step_with_every_call_in_time_has_no_late_calls():
    out = setup_times([_call(10.0, 10.004, 10.006, 10.008)])
    assert out["late"] is None
    assert _late_calls([{"calls": 1, **out}]) == []


def test_how_busy_the_machine_was_while_a_step_climbed():
    before = {"bridge": 1.0, "pbx": 10.0, "postgres": 2.0, "load_generator": 5.0}
    after = {"bridge": 2.0, "pbx": 16.0, "postgres": 2.5, "load_generator": 7.0}
    out = climb_load(before, after, (100.0, 400.0), (117.0, 420.0), 10.0)
    assert out["cores"] == {"bridge": 0.1, "pbx": 0.6, "postgres": 0.05, "load_generator": 0.2}
    assert out["machine_busy"] == 0.85
    assert _climb(out) == "85%, 0.60 / 0.20"
    assert climb_load(before, after, None, None, 10.0)["machine_busy"] is None
    assert _climb(None) == "-"
