"""The CPU of a call split into its setup and its talk (bench.load.talk_split)."""

from __future__ import annotations

import pytest

from bench.load import median_window, paired_split, talk_split
from bench.report import _rounds_text


def _run(path: str, hold: float, **per_call: float) -> dict:
    return {"path": path, "hold": hold, "cpu_ms_per_call": per_call}


def test_the_slope_is_a_second_of_talk_and_the_intercept_the_setup():
    short = _run("bridge", 2.0, bridge=8.0, pbx=20.0, postgres=3.0, load_generator=2.0)
    long = _run("bridge", 6.0, bridge=8.4, pbx=28.0, postgres=3.0, load_generator=4.0)
    split = talk_split(short, long, 2.0, 6.0)
    assert split["talk_ms_per_second"] == pytest.approx({"bridge": 0.1, "pbx": 2.0, "postgres": 0.0,
                                                         "load_generator": 0.5})
    assert split["setup_ms_per_call"] == pytest.approx({"bridge": 7.8, "pbx": 16.0, "postgres": 3.0,
                                                        "load_generator": 1.0})
    # The system under test is the bridge, the PBX and Postgres: never the load generator.
    assert split["system_setup_ms_per_call"] == pytest.approx(26.8)
    assert split["system_talk_ms_per_second"] == pytest.approx(2.1)
    assert split["setups_per_second_per_core"] == pytest.approx(1000 / 26.8)
    assert split["talking_calls_per_core"] == pytest.approx(1000 / 2.1)


def test_the_baseline_path_does_not_count_the_bridge_and_noise_is_no_negative_talk():
    short = _run("baseline", 2.0, bridge=0.2, pbx=10.0, postgres=0.5, load_generator=2.0)
    long = _run("baseline", 6.0, bridge=0.1, pbx=12.0, postgres=0.3, load_generator=3.0)
    split = talk_split(short, long, 2.0, 6.0)
    assert split["talk_ms_per_second"]["bridge"] == 0.0 and split["talk_ms_per_second"]["postgres"] == 0.0
    assert split["setup_ms_per_call"]["pbx"] == pytest.approx(9.0)
    assert split["system_setup_ms_per_call"] == pytest.approx(9.0 + 0.5)
    assert split["system_talk_ms_per_second"] == pytest.approx(0.5)


def _round(path: str, ok: int, **per_call: float) -> dict:
    system = per_call["pbx"] + per_call["postgres"] + (per_call["bridge"] if path == "bridge" else 0.0)
    return {"path": path, "hold": 2.0, "calls": 400, "ok": ok, "wall_seconds": 21.0, "steal_seconds": 0.01,
            "cpu_ms_per_call": per_call, "system_ms_per_call": system}


def test_a_window_measured_in_rounds_is_the_median_of_each_process():
    rounds = [
        _round("bridge", 400, bridge=7.5, pbx=22.3, postgres=4.1, load_generator=3.2),
        _round("bridge", 399, bridge=7.1, pbx=19.3, postgres=2.7, load_generator=2.7),  # a cheap round
        _round("bridge", 400, bridge=9.6, pbx=21.8, postgres=3.1, load_generator=3.5),  # the bridge dear
    ]
    window = median_window(rounds)
    assert window["cpu_ms_per_call"] == {"bridge": 7.5, "pbx": 21.8, "postgres": 3.1, "load_generator": 3.2}
    # The system's figure is the sum of the medians (not the median of the sums: 33.9 here).
    assert window["system_ms_per_call"] == pytest.approx(7.5 + 21.8 + 3.1)
    assert window["calls_per_second_per_core"] == pytest.approx(1000 / 32.4)
    assert (window["calls"], window["ok"], window["wall_seconds"]) == (1200, 1199, 63.0)
    assert window["steal_seconds"] == pytest.approx(0.03)
    assert [r["system_ms_per_call"] for r in window["rounds"]] == [r["system_ms_per_call"] for r in rounds]
    # One round: its own figures.
    assert median_window(rounds[:1])["cpu_ms_per_call"] == rounds[0]["cpu_ms_per_call"]


def test_setup_and_talk_are_split_round_by_round_then_the_median_taken():
    """Each round's short and long window are paired: the slope of each round, then the median.
    Here round 1 ran at the machine's usual speed (10 ms setup + 2 ms per second of talk), round
    2 20 % slower throughout, and round 3 sped up between its two windows."""
    def rounds(hold: float, *pbx: float) -> list[dict]:
        return [{"path": "baseline", "hold": hold, "cpu_ms_per_call": {"bridge": 0.0, "pbx": v, "postgres": 0.0,
                                                                       "load_generator": 1.0}} for v in pbx]
    shorts = rounds(2.0, 14.0, 16.8, 14.7)
    longs = rounds(6.0, 22.0, 26.4, 20.9)
    split = paired_split(shorts, longs, 2.0, 6.0)
    assert [r["system_talk_ms_per_second"] for r in split["rounds"]] == pytest.approx([2.0, 2.4, 1.55])
    assert split["talk_ms_per_second"]["pbx"] == pytest.approx(2.0)
    assert split["setup_ms_per_call"]["pbx"] == pytest.approx(11.6)  # the median of 10, 12 and 11.6
    assert split["system_setup_ms_per_call"] == pytest.approx(11.6)  # (the bridge is not on this path)
    # The windows' medians taken apart (14.7 and 22.0, from different rounds) would give 1.825.
    assert talk_split(median_window_of(shorts), median_window_of(longs), 2.0, 6.0)["talk_ms_per_second"]["pbx"] \
        == pytest.approx(1.825)
    with pytest.raises(ValueError):
        paired_split(shorts, longs[:2], 2.0, 6.0)  # rounds must pair up


def median_window_of(rounds: list[dict]) -> dict:
    return median_window([{**r, "calls": 1, "ok": 1, "wall_seconds": 1.0, "system_ms_per_call": 0.0}
                          for r in rounds])


def test_the_report_says_how_far_the_rounds_spread_in_this_run():
    def window(path: str, *system: float, steal: float | None = 0.0) -> dict:
        return {"path": path, "steal_seconds": steal, "rounds": [{"system_ms_per_call": v} for v in system]}
    c = {"rounds": 3, "bridge": window("bridge", 30.0, 33.0, 36.0), "baseline": window("baseline", 10.0, 10.5, 11.0),
         "long": {"bridge": window("bridge", 45.0, 46.0, 47.0), "baseline": window("baseline", 20.0, 21.0, 22.0)}}
    text = _rounds_text(c)
    assert "measured 3 times" in text and "differed by up to 18 %" in text  # (36 - 30) / 33
    assert "no steal time" in text
    c["long"]["bridge"]["steal_seconds"] = 0.25
    assert "0.25 s of steal time" in _rounds_text(c)
    c["baseline"]["steal_seconds"] = None
    assert "could not be read" in _rounds_text(c)
    assert _rounds_text({"rounds": 1}) == ""
