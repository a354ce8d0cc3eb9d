"""The CPU of a call split into its setup and its talk (bench.load.talk_split)."""

from __future__ import annotations

import pytest

from bench.load import median_window, talk_split


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
