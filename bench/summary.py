"""docs/bench/summary.json: issue 14's headline figures, exactly these keys, each read from
the file that measured it (SOURCES says which). A figure is null when it was not measured
yet, or not by a full run, or on other code than results.json's (its machine's "code commit":
the last commit that changed the bridge, its SQL or the PBX's configuration)."""

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
    "session_opens_per_s": ("sizes.json", "steps[past_participants = 1,000,000].http_opens.per_second (make "
                            "bench-sizes): POST /v1/sessions, as the order system opens them; through the "
                            "session service without HTTP: opens, in sizes.md"),
    "session_open_p99_ms": ("sizes.json", "steps[past_participants = 1,000,000].http_opens.latency_ms.p99"),
    "route_lookup_p99_ms_at_1m": ("sizes.json", "steps[past_participants = 1,000,000].route_lookup_under_load_ms"
                                  ".p99: inside Postgres while the HTTP opens run (with nothing else running: "
                                  "route_lookup_ms, in sizes.md)"),
    "soak_leaked_channels": ("soak.json", "leaked.channels: PBX channels at the end minus at the start "
                             "(make bench SOAK=1800; a soak of at least 1800 s)"),
    "soak_rss_growth_mb": ("soak.json", "rss_growth_mb: the bridge's RSS at the end minus at the start"),
}
KEYS = tuple(SOURCES)


def read(path: Path) -> dict[str, Any] | None:
    """A json object of the report's directory; None when missing or not one."""
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def dig(data: Any, *keys: Any) -> Any:
    """data[keys[0]][keys[1]]...; None where a level is missing."""
    for key in keys:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def _round(value: Any) -> Any:
    return round(value, 3) if isinstance(value, float) else value


SOAK_SECONDS = 1800


def same_code(results: dict[str, Any], other: dict[str, Any] | None) -> bool:
    """Whether `other` (sizes.json, soak.json) measured the code results.json measured."""
    code = dig(results, "machine", "code commit")
    return other is not None and code is not None and dig(other, "machine", "code commit") == code


def usable(results: dict[str, Any], sizes: dict[str, Any] | None,
           soak: dict[str, Any] | None) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """sizes.json and soak.json as the headline may use them: each only when it measured the
    code results.json measured, the soak only when it ran SOAK_SECONDS or more."""
    return (sizes if same_code(results, sizes) else None,
            soak if same_code(results, soak) and (dig(soak, "params", "seconds") or 0) >= SOAK_SECONDS else None)


def figures(results: dict[str, Any], sizes: dict[str, Any] | None, soak: dict[str, Any] | None) -> dict[str, Any]:
    if results.get("mode") != "full":
        results = {"machine": results.get("machine")}  # (a smoke run's figures are no headline)
    sizes, soak = usable(results, sizes, soak)
    steps = [s for s in (dig(sizes, "steps") or []) if isinstance(s, dict) and "past_participants" in s]
    at_1m = next((s for s in steps if s["past_participants"] == 1_000_000), None)
    out = {
        "commit": dig(results, "machine", "maskbridge commit"),
        "pdd_added_p50_ms": dig(results, "delay", "added", "p50"),
        "pdd_added_p99_ms": dig(results, "delay", "added", "p99"),
        "cps_bridge": dig(results, "sustained", "bridge"),
        "cps_baseline": dig(results, "sustained", "baseline"),
        "concurrent_calls_bridge": results.get("max_concurrent"),
        "cpu_ms_per_call_bridge": dig(results, "cpu", "bridge", "cpu_ms_per_call", "bridge"),
        "cpu_ms_per_call_pbx_bridge_path": dig(results, "cpu", "bridge", "cpu_ms_per_call", "pbx"),
        "cpu_ms_per_call_pbx_baseline_path": dig(results, "cpu", "baseline", "cpu_ms_per_call", "pbx"),
        "session_opens_per_s": dig(at_1m, "http_opens", "per_second"),
        "session_open_p99_ms": dig(at_1m, "http_opens", "latency_ms", "p99"),
        "route_lookup_p99_ms_at_1m": dig(at_1m, "route_lookup_under_load_ms", "p99"),
        "soak_leaked_channels": dig(soak, "leaked", "channels"),
        "soak_rss_growth_mb": dig(soak, "rss_growth_mb"),
    }
    if tuple(out) != KEYS:
        raise RuntimeError(f"summary keys out of step with SOURCES: {sorted(set(out) ^ set(KEYS))}")
    return {k: _round(v) for k, v in out.items()}


def write(results: dict[str, Any], sizes: dict[str, Any] | None, soak: dict[str, Any] | None,
          out: Path) -> dict[str, Any]:
    """Write OUT/summary.json from the run's results and its sizes.json and soak.json."""
    summary = figures(results, sizes, soak)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary
