"""`make bench` still runs: every measurement, a handful of real calls each. The figures
are read from the report, never asserted here."""

from __future__ import annotations

import json

from bench.__main__ import TINY, run


async def test_the_benchmark_runs_end_to_end(stack, tmp_path):
    report = await run(stack, TINY, "tiny", tmp_path)
    text = report.read_text()
    for section in ("## Added post-dial delay", "## Throughput", "## Simultaneous calls", "## The session API"):
        assert section in text
    for plot in ("delay.png", "ramp.png", "memory.png"):
        assert (tmp_path / plot).read_bytes().startswith(b"\x89PNG")
    results = json.loads((tmp_path / "results.json").read_text())
    # Every call of the smoke run was measured on both paths and went through.
    assert results["delay"]["failed"] == 0
    assert results["delay"]["bridge"]["n"] == results["delay"]["baseline"]["n"] == TINY["delay_per_path"]
    assert all(step["success"] == 1.0 for step in results["ramp"])
    assert results["concurrency"][-1]["audio_ok"] is True
    assert results["route"]["n"] >= TINY["delay_per_path"]


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
