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
