"""summary.json's figures and the report's targets (bench.summary, bench.report.targets): each
figure from the run that measured it, and only when that run measured the same code."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench import summary
from bench.report import _runs_section, earlier_runs, growth, targets


def _machine(code: str) -> dict[str, str]:
    return {"cpu": "Test CPU, 2 cores", "maskbridge commit": "abc1234", "code commit": code}


def _opens(per_second: float, p99: float, bridge_ms: float, pg_ms: float) -> dict[str, Any]:
    return {"per_second": per_second, "latency_ms": {"p99": p99},
            "cpu_ms_per_open": {"bridge process": bridge_ms, "postgres": pg_ms, "this process": 0.1}}


def _results(mode: str = "full", code: str = "c0de") -> dict[str, Any]:
    return {
        "mode": mode, "machine": _machine(code),
        "delay": {"added": {"p50": 2.5, "p99": 16.0}},
        "sustained": {"bridge": 90.0, "baseline": 100.0},
        "max_concurrent": 500, "concurrency_top": True,
        "cpu": {"bridge": {"cpu_ms_per_call": {"bridge": 7.0, "pbx": 20.0, "postgres": 2.0, "load_generator": 3.0},
                           "system_ms_per_call": 29.0},
                "baseline": {"cpu_ms_per_call": {"bridge": 0.0, "pbx": 12.0, "postgres": 0.1, "load_generator": 3.0},
                             "system_ms_per_call": 12.1}},
    }


def _sizes(code: str = "c0de") -> dict[str, Any]:
    def step(size: int, http: float, bridge_ms: float) -> dict[str, Any]:
        return {"past_participants": size,
                "opens": {**_opens(1200.0, 40.0, 0.0, 1.2), "cpu_ms_per_open": {"this process": 0.5, "postgres": 1.2}},
                "http_opens": _opens(http, 90.0, bridge_ms, 1.2),
                "route_lookup_ms": {"p99": 0.5}, "route_lookup_under_load_ms": {"p99": 2.5}}
    return {"machine": _machine(code), "steps": [step(10_000, 800.0, 1.0), step(1_000_000, 700.0, 1.3)]}


def _soak(code: str = "c0de", seconds: float = 1800.0) -> dict[str, Any]:
    return {"machine": _machine(code), "params": {"seconds": seconds},
            "leaked": {"channels": 0, "bridges": 0, "open_calls": 0, "pg_connections": 0},
            "rss_growth_mb": 3.0, "rss_slope_mb_per_hour": 2.0}


def test_each_figure_from_its_run_the_opens_through_http_and_the_lookup_while_they_run():
    figures = summary.figures(_results(), _sizes(), _soak())
    assert tuple(figures) == summary.KEYS
    assert figures["commit"] == "abc1234"
    assert figures["session_opens_per_s"] == 700.0 and figures["session_open_p99_ms"] == 90.0
    assert figures["route_lookup_p99_ms_at_1m"] == 2.5
    assert figures["soak_leaked_channels"] == 0 and figures["soak_rss_growth_mb"] == 3.0


def test_a_run_of_other_code_a_short_soak_or_a_smoke_run_gives_no_figure():
    other = summary.figures(_results(), _sizes(code="01d"), _soak(code="01d"))
    assert other["session_opens_per_s"] is None and other["soak_leaked_channels"] is None
    assert other["pdd_added_p50_ms"] == 2.5  # (results.json's own figures stay)
    unstamped = _soak()
    del unstamped["machine"]["code commit"]
    assert summary.figures(_results(), None, unstamped)["soak_rss_growth_mb"] is None
    assert summary.figures(_results(), None, _soak(seconds=60))["soak_leaked_channels"] is None
    tiny = summary.figures(_results(mode="tiny"), _sizes(), _soak())
    assert tiny["commit"] == "abc1234"
    assert all(tiny[k] is None for k, (source, _) in summary.SOURCES.items() if source == "results.json"
               and k != "commit")
    assert tiny["session_opens_per_s"] == 700.0  # (a full bench-sizes run of the same code stays)
    tiny_sizes = _sizes()
    tiny_sizes["steps"] = [s for s in tiny_sizes["steps"] if s["past_participants"] < 1_000_000]
    assert summary.figures(_results(), tiny_sizes, None)["session_opens_per_s"] is None


def test_the_targets_say_met_not_met_or_not_measured():
    results = _results()
    figures = summary.figures(results, _sizes(), _soak())
    rows = {name: (value, met) for name, value, met in targets(results, figures, _sizes(), _soak())}
    assert rows["post-dial delay added, p50 <= 3 ms"] == ("2.5 ms", True)
    assert rows["post-dial delay added, p99 <= 15 ms"] == ("16.0 ms", False)
    assert rows["highest call rate, bridge >= 0.9 x dialplan"] == ("90 / 100 = 0.90", True)
    assert rows["500 simultaneous bridged calls with audio"] == ("500 (the largest step tried)", True)
    assert rows["load generator costs less than the system under test"][1] is True
    assert rows["1,000 session opens/s at 1M past participants (HTTP)"] == (
        "700/s (session service without HTTP: 1200/s)", False)
    assert rows["route lookup p99 <= 2 ms inside Postgres at 1M (opens running)"] == ("2.50 ms", False)
    # (1.3 + 1.2) / (1.0 + 1.2) = 1.14: flat enough
    assert rows["cost per open flat with size (largest / smallest <= 1.25)"] == ("1.14", True)
    assert rows["soak: nothing left behind (channels, bridges, open calls)"] == ("0", True)
    # 2 MiB/h over the second half of 30 min (15 min): +0.5 MiB
    assert rows["soak: bridge memory flat (<= 1 MiB over the second half)"] == (
        "+0.5 MiB (+3.0 from start to end)", True)
    nothing = {name: met for name, _, met in targets(results, summary.figures(results, None, None), None, None)}
    assert nothing["1,000 session opens/s at 1M past participants (HTTP)"] is None
    assert nothing["soak: nothing left behind (channels, bridges, open calls)"] is None


def test_cost_growth_with_size():
    assert growth(_sizes()["steps"]) == (1.3 + 1.2) / (1.0 + 1.2)
    assert growth(_sizes()["steps"], "opens") == 1.0
    assert growth(_sizes()["steps"][:1]) is None


def test_the_soak_reports_the_pbx_memory_idle_while_calls_ran_after_and_its_trend():
    """Asterisk idle before the first call, the range while the calls ran, after the last one,
    and the trend of the second half (flat here once warmed up: the growth is early)."""
    from bench.report import _pbx_memory

    samples = [{"t": t, "pbx_rss_mb": rss} for t, rss in
               ((30, 216.0), (60, 240.0), (90, 260.0), (120, 280.0), (150, 281.0), (180, 280.0), (210, 281.0))]
    soak = {"start": {"pbx_rss_mb": 75.3}, "end": {"pbx_rss_mb": 281.2}, "samples": samples}
    (line, _) = _pbx_memory(soak)
    assert line.startswith("PBX memory (Asterisk): 75.3 MiB idle before the first call, 216.0 to 281.0 MiB "
                           "while the calls ran, 281.2 once the last call ended; trend over the second half ")
    assert line.endswith(" MiB per hour.") and abs(float(line.split("half ")[1].split(" ")[0])) < 30
    assert _pbx_memory({"start": {}, "end": {}, "samples": [{"t": 30, "pbx_rss_mb": None}]}) == []


def _full_run(directory: Path, started: str, code: str = "c0de", p50: float = 2.5) -> dict[str, Any]:
    """A full run's three files in `directory`, as make bench, its soak and bench-sizes leave them."""
    results = {**_results(code=code), "started": started}
    results["delay"] = {"added": {"p50": p50, "p99": 16.0}}
    for name, data in (("results.json", results), ("sizes.json", {**_sizes(code), "started": f"{started} sizes"}),
                       ("soak.json", {**_soak(code), "started": f"{started} soak"})):
        (directory / name).write_text(json.dumps(data))
    return results


def test_an_earlier_full_run_of_the_same_code_is_kept_once_with_its_own_targets(tmp_path: Path):
    """The run the directory holds joins runs.json when another full run of the same code comes
    (once, whatever rewrites the report after it); a run of other code starts the list again."""
    _full_run(tmp_path, "day 1 10:00", p50=4.0)
    new = {**_results(), "started": "day 1 12:00"}
    runs = earlier_runs(tmp_path, new)
    assert [r["started"] for r in runs] == ["day 1 10:00"]
    assert runs[0]["soak started"] == "day 1 10:00 soak" and runs[0]["sizes started"] == "day 1 10:00 sizes"
    rows = {r["target"]: (r["measured"], r["met"]) for r in runs[0]["targets"]}
    assert rows["post-dial delay added, p50 <= 3 ms"] == ("4.0 ms", False)  # (its own figure, not the new run's)
    assert rows["soak: nothing left behind (channels, bridges, open calls)"] == ("0", True)
    assert runs[0]["host"] == "Test CPU, 2 cores; dialplan 100 calls/s, ARI floor -"

    (tmp_path / "runs.json").write_text(json.dumps({"code commit": "c0de", "runs": runs}))
    (tmp_path / "results.json").write_text(json.dumps(new))
    assert [r["started"] for r in earlier_runs(tmp_path, new)] == ["day 1 10:00"]  # (the soak's rewrite)
    third = {**_results(), "started": "day 2 09:00"}
    assert [r["started"] for r in earlier_runs(tmp_path, third)] == ["day 1 10:00", "day 1 12:00"]
    assert earlier_runs(tmp_path, {**_results(code="n3w"), "started": "day 3"}) == []
    smoke = earlier_runs(tmp_path, {**_results(mode="tiny"), "started": "day 3"})
    assert [r["started"] for r in smoke] == ["day 1 10:00", "day 1 12:00"]  # (the full run it replaces is kept)


def test_the_report_shows_this_run_beside_the_earlier_ones():
    results = {**_results(), "started": "day 1 12:00"}
    rows = targets(results, summary.figures(results, _sizes(), _soak()), _sizes(), _soak())
    earlier = {"started": "day 1 10:00", "commit": "0ld1234", "targets": [
        {"target": "post-dial delay added, p50 <= 3 ms", "measured": "4.0 ms (ARI floor: 3.1 ms)", "met": False},
        {"target": "soak: nothing left behind (channels, bridges, open calls)", "measured": "0", "met": True}]}
    lines = _runs_section(rows, [earlier], results)
    assert "| target | this run (day 1 12:00) | run of day 1 10:00 (0ld1234) |" in lines
    assert "| post-dial delay added, p50 <= 3 ms | 2.5 ms (met) | 4.0 ms (**not met**) |" in lines
    assert "| 500 simultaneous bridged calls with audio | 500 (met) | - |" in lines
    met = sum(1 for *_, ok in rows if ok)
    assert f"| met | {met} of {len(rows)} | 1 of 2 |" in lines
    assert "| the machine, and what Asterisk alone did | Test CPU, 2 cores; dialplan 100 calls/s, ARI floor - | - |" in lines
    assert _runs_section(rows, [], results) == []
