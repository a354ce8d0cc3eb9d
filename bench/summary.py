"""docs/bench/summary.json: issue 14's headline figures, exactly these keys, each read from
the file that measured it (SOURCES says which); a figure not measured yet is null."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# key -> (file in docs/bench, what it is there)
SOURCES: dict[str, tuple[str, str]] = {
    "commit": ("results.json", "machine['maskbridge commit']: the commit `make bench` measured"),
    "pdd_added_p50_ms": ("results.json", "delay.added.p50: bridge minus baseline post-dial delay, call by call, "
                         "at delay_rate calls/s"),
    "pdd_added_p99_ms": ("results.json", "delay.added.p99"),
    "cps_bridge": ("results.json", "sustained.bridge: highest ramp rate with >= 99 % of calls set up within 3 s "
                   "and ended normally"),
    "cps_baseline": ("results.json", "sustained.baseline"),
    "concurrent_calls_bridge": ("results.json", "max_concurrent: most simultaneous bridged calls, two-way audio "
                                "in every sample, all ended normally, at that step and every smaller one"),
    "cpu_ms_per_call_bridge": ("results.json", "cpu.bridge.cpu_ms_per_call.bridge: the bridge process, per call, "
                               "idle subtracted, the median of cpu.rounds windows"),
    "cpu_ms_per_call_pbx_bridge_path": ("results.json", "cpu.bridge.cpu_ms_per_call.pbx: the PBX Asterisk, per "
                                        "bridged call (median of the rounds)"),
    "cpu_ms_per_call_pbx_baseline_path": ("results.json", "cpu.baseline.cpu_ms_per_call.pbx: the PBX Asterisk, per "
                                          "dialplan call (median of the rounds)"),
    "session_opens_per_s": ("sizes.json", "steps[largest past_participants].opens.per_second (make bench-sizes): "
                            "through the session service, no HTTP; through the HTTP API: http_opens, in sizes.md"),
    "session_open_p99_ms": ("sizes.json", "steps[largest past_participants].opens.latency_ms.p99"),
    "route_lookup_p99_ms_at_1m": ("sizes.json", "steps[past_participants = 1,000,000].route_lookup_ms.p99"),
    "soak_leaked_channels": ("soak.json", "leaked.channels: PBX channels at the end minus at the start "
                             "(make bench SOAK=1800)"),
    "soak_rss_growth_mb": ("soak.json", "rss_growth_mb: the bridge's RSS at the end minus at the start"),
}
KEYS = tuple(SOURCES)


def _read(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _dig(data: Any, *keys: Any) -> Any:
    for key in keys:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def _round(value: Any) -> Any:
    return round(value, 3) if isinstance(value, float) else value


def figures(results: dict[str, Any], sizes: dict[str, Any] | None, soak: dict[str, Any] | None) -> dict[str, Any]:
    steps = [s for s in (_dig(sizes, "steps") or []) if isinstance(s, dict) and "past_participants" in s]
    largest = max(steps, key=lambda s: s["past_participants"]) if steps else None
    at_1m = next((s for s in steps if s["past_participants"] == 1_000_000), None)
    out = {
        "commit": _dig(results, "machine", "maskbridge commit"),
        "pdd_added_p50_ms": _dig(results, "delay", "added", "p50"),
        "pdd_added_p99_ms": _dig(results, "delay", "added", "p99"),
        "cps_bridge": _dig(results, "sustained", "bridge"),
        "cps_baseline": _dig(results, "sustained", "baseline"),
        "concurrent_calls_bridge": results.get("max_concurrent"),
        "cpu_ms_per_call_bridge": _dig(results, "cpu", "bridge", "cpu_ms_per_call", "bridge"),
        "cpu_ms_per_call_pbx_bridge_path": _dig(results, "cpu", "bridge", "cpu_ms_per_call", "pbx"),
        "cpu_ms_per_call_pbx_baseline_path": _dig(results, "cpu", "baseline", "cpu_ms_per_call", "pbx"),
        "session_opens_per_s": _dig(largest, "opens", "per_second"),
        "session_open_p99_ms": _dig(largest, "opens", "latency_ms", "p99"),
        "route_lookup_p99_ms_at_1m": _dig(at_1m, "route_lookup_ms", "p99"),
        "soak_leaked_channels": _dig(soak, "leaked", "channels"),
        "soak_rss_growth_mb": _dig(soak, "rss_growth_mb"),
    }
    if tuple(out) != KEYS:
        raise RuntimeError(f"summary keys out of step with SOURCES: {sorted(set(out) ^ set(KEYS))}")
    return {k: _round(v) for k, v in out.items()}


def write(results: dict[str, Any], out: Path) -> dict[str, Any]:
    """Write OUT/summary.json from the run's results and OUT/sizes.json, OUT/soak.json."""
    summary = figures(results, _read(out / "sizes.json"), _read(out / "soak.json"))
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary
