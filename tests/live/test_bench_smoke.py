"""`make bench` still runs: every measurement, a handful of real calls each, placed and
answered by SIPp. The figures are read from the report, never asserted here."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from bench import soak, summary
from bench.__main__ import TINY, run
from bridge.devstack import asterisk, processes
from bridge.devstack.settings import PROJECT_DIR


async def test_the_benchmark_runs_end_to_end(stack, tmp_path):
    shutil.copy(PROJECT_DIR / "docs" / "bench" / "before.json", tmp_path / "before.json")
    trunk = asterisk.host_path(stack, "pbx", "etc", "pjsip.conf").read_text()
    report = await run(stack, TINY, "tiny", tmp_path)
    # The PBX's trunk points at the carrier again, exactly as before.
    assert asterisk.host_path(stack, "pbx", "etc", "pjsip.conf").read_text() == trunk
    text = report.read_text()
    for section in ("## Before and after", "## Added post-dial delay", "## Throughput", "## The ARI floor",
                    "## CPU per call",
                    "## Simultaneous calls", "## Soak", "## The session API", "## Headline figures"):
        assert section in text
    for plot in ("delay.png", "ramp.png", "cpu.png", "memory.png"):
        assert (tmp_path / plot).read_bytes().startswith(b"\x89PNG")
    results = json.loads((tmp_path / "results.json").read_text())
    # Every call of the smoke run was measured on both paths and went through.
    assert results["delay"]["failed"] == 0
    assert results["delay"]["bridge"]["n"] == results["delay"]["baseline"]["n"] == TINY["delay_per_path"]
    assert all(step["success"] == 1.0 for step in results["ramp"])
    # Two-way audio: each sampled side heard the other's tone.
    assert all(step["audio_ok"] for step in results["ramp"])
    assert results["concurrency"][-1]["audio_ok"] is True
    assert results["concurrency"][-1]["ended_ok"] == TINY["concurrency_steps"][-1]
    # Each call of the step timed: its callee's INVITE and its answer; none late.
    last = results["concurrency"][-1]
    assert last["setup_ms"]["n"] == last["answer_ms"]["n"] == TINY["concurrency_steps"][-1]
    assert last["late"] is None
    assert 0 < last["climb"]["machine_busy"] <= 1 and last["climb"]["cores"]["pbx"] > 0
    for path in ("bridge", "baseline"):
        assert results["cpu"][path]["ok"] == results["cpu"][path]["calls"]
        # Each window measured in rounds, each kept; the figure is their median.
        assert len(results["cpu"][path]["rounds"]) == TINY["cpu_rounds"] == results["cpu"]["rounds"]
        assert set(results["cpu"][path]["cpu_ms_per_call"]) == {"bridge", "pbx", "postgres", "load_generator"}
        # The same calls talking longer: setup and talk apart.
        longer = results["cpu"]["long"][path]
        assert longer["hold"] == TINY["cpu_long_hold"] and longer["ok"] == longer["calls"]
        assert set(results["cpu"]["split"][path]["talk_ms_per_second"]) == {"bridge", "pbx", "postgres",
                                                                          "load_generator"}
    assert "### Setup and talk apart" in text
    # The ARI floor: the same calls through the stand-in, every one put through; so through
    # the dialplan asking over AGI (the bridge's decision, then a table's); then the bridge
    # is back, healthy, and the benchmark's dialplan gone from the PBX.
    for floor in (results["floor"], results["floor_dialplan"], results["agi"], results["agi_floor"]):
        assert floor["delay"]["failed"] == 0 and floor["delay"]["bridge"]["n"] == TINY["delay_per_path"]
        assert [s["path"] for s in floor["ramp"]] == ["bridge"] * len(TINY["ramp_rates"])
        assert all(step["success"] == 1.0 and step["audio_ok"] for step in floor["ramp"])
        assert floor["sustained"] == max(TINY["ramp_rates"])
    health = processes.health(stack)
    assert health and all(health.values())
    assert not asterisk.host_path(stack, "pbx", "etc", asterisk.BENCH_ROUTE).exists()
    assert "decided over AGI from a table: the AGI exchange alone |" in text
    assert f"every window is measured {TINY['cpu_rounds']} times" in text
    assert results["route"]["n"] >= TINY["delay_per_path"]
    figures = json.loads((tmp_path / "summary.json").read_text())
    assert tuple(figures) == summary.KEYS and len(figures) == 14


async def test_the_soak_runs(stack, tmp_path):
    """`make bench SOAK=...` in miniature: a few seconds of calls, read at start, during and end."""
    path = await soak.run(stack, dict(soak.TINY, seconds=4.0), tmp_path)
    result = json.loads(path.read_text())
    assert result["samples"], "read during the soak"
    for key in ("bridge_rss_mb", "pg_connections", "channels", "bridges", "open_calls"):
        assert key in result["start"] and key in result["end"]
    assert set(result["leaked"]) == {"channels", "bridges", "open_calls", "pg_connections"}
    assert result["calls"]["placed"] == int(soak.TINY["rate"] * 4.0)
    assert (tmp_path / "soak.png").read_bytes().startswith(b"\x89PNG")


async def test_the_size_benchmark_runs(stack, tmp_path):
    """`make bench-sizes` in miniature: a small pool, two sizes, a few opens each."""
    from bench import sizes

    results = await sizes.run(stack, sizes.TINY)
    report = sizes.write(results, tmp_path)
    assert [s["past_participants"] for s in results["steps"]] == sizes.TINY["sizes"]
    assert all(s["opens"]["opens"] == sizes.TINY["opens"] and s["route_lookup_ms"]["n"] for s in results["steps"])
    assert all(s["http_opens"]["opens"] == sizes.TINY["opens"] for s in results["steps"])
    # (another report reads these: the figures at the largest size)
    assert {"opens_per_second", "open_p99_ms", "route_lookup_p99_ms", "http_opens_per_second"} <= set(results["summary"])
    assert report.read_text().startswith("# Session opens")
    assert (tmp_path / "sizes.png").read_bytes().startswith(b"\x89PNG")


async def test_the_floor_stand_in_gives_the_bridge_back_whatever_happens(stack, tmp_path):
    """bench/floor.py's stand-in takes the bridge's place as the ARI application while its
    block runs; after, even when the block failed, the bridge runs again and is healthy, and
    the stand-in is gone (no ARI application of its own left registered to take calls)."""
    from bench import floor

    before = processes.bridge_pid(stack)
    with pytest.raises(RuntimeError, match="the block failed"):
        async with floor.standing_in(stack, [], tmp_path):
            assert processes.bridge_pid(stack) is None
            raise RuntimeError("the block failed")
    after = processes.bridge_pid(stack)
    assert after is not None and after != before
    health = processes.health(stack)
    assert health and all(health.values())
    assert not (tmp_path / "floor-routes.json").exists()
    assert not _stand_ins()


def _stand_ins() -> list[Path]:
    """Processes running bench.floor."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if b"bench.floor" in (proc / "cmdline").read_bytes():
                found.append(proc)
        except OSError:
            pass  # (gone meanwhile)
    return found
