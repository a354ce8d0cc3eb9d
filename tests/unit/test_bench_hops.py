"""The report's account of what a hop to another process costs (bench.report._hops)."""

from __future__ import annotations

from bench.report import _hops


def _p50(value: float) -> dict:
    return {"n": 3, "p50": value}


def test_each_round_trip_back_to_back_and_after_idling_and_the_routing_querys_difference():
    hops = {"idle_ms": 50.0, "samples": 100,
            "socket": {"warm": _p50(0.013), "idle": _p50(0.075)},
            "select_1": {"warm": _p50(0.12), "idle": _p50(0.43)},
            "route": {"warm": _p50(1.3), "idle": _p50(3.7)}}
    text = "\n".join(_hops(hops))
    assert "| one byte over a local socket, to another process and back | 0.013 | 0.075 | 5.8x |" in text
    assert "| `SELECT 1` from asyncpg, as the bridge queries | 0.120 | 0.430 | 3.6x |" in text
    assert "| the bridge's routing query (read only) from asyncpg | 1.300 | 3.700 | 2.8x |" in text
    assert "the routing query's round trip takes 2.40 ms more than back to back (2.8x)" in text
    assert "after 50 ms idle" in text and "100 of each" in text


def test_a_report_of_a_run_without_it_says_nothing_and_a_missing_figure_is_a_dash():
    assert _hops(None) == [] and _hops({}) == []
    text = "\n".join(_hops({"idle_ms": 50.0, "samples": 1, "socket": {"warm": {"n": 0}, "idle": {"n": 0}}}))
    assert "| one byte over a local socket, to another process and back | - | - | - |" in text
    assert "routing query's round trip" not in text
