"""`make bench`: what the bridge costs next to plain Asterisk, in one run.

    python -m bench [--tiny] [--out DIR]
    python -m bench --soak SECONDS [--tiny] [--out DIR]

Needs the local stack running (make bench starts it). SIPp places and answers the calls
(bench/sipp.py); the simulated carrier is left alone. --tiny is the smoke run `make test`
uses: every measurement, a handful of calls each. --soak runs the leak check alone (steady
calls for SECONDS) and writes the report again with it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bench import agi, floor, load, measure, report, sipp, soak
from bridge import logs
from bridge.devstack import asterisk, processes
from bridge.devstack.settings import PROJECT_DIR, Stack, load as load_stack

FULL: dict[str, Any] = {
    "sessions": 1000, "api_concurrency": 32,
    # (delay_rate: each path's own rate; the two paths alternate, so the PBX carries twice that)
    "delay_rate": 20.0, "delay_per_path": 600, "hop_samples": 100,
    "ramp_rates": [10.0, 20.0, 40.0, 60.0, 80.0, 100.0, 120.0, 150.0, 200.0], "ramp_seconds": 20.0, "hold": 1.0,
    "ramp_sample": 2,
    "cpu_rate": 20.0, "cpu_seconds": 20.0, "cpu_hold": 2.0, "cpu_long_hold": 6.0, "idle_seconds": 5.0,
    "cpu_rounds": 3,
    "concurrency_steps": [25, 50, 100, 200, 300, 400, 500], "setup_rate": 25.0,
    "sample": 3, "listen_seconds": 2.0,
}
TINY: dict[str, Any] = {
    "sessions": 12, "api_concurrency": 4,
    "delay_rate": 2.0, "delay_per_path": 4, "hop_samples": 5,
    "ramp_rates": [2.0], "ramp_seconds": 2.0, "hold": 1.0,
    "ramp_sample": 1,
    "cpu_rate": 2.0, "cpu_seconds": 2.0, "cpu_hold": 0.5, "cpu_long_hold": 1.5, "idle_seconds": 1.0,
    "cpu_rounds": 2,
    "concurrency_steps": [2], "setup_rate": 4.0,
    "sample": 1, "listen_seconds": 1.0,
}


async def run(stack: Stack, params: dict[str, Any], mode: str, out: Path) -> Path:
    started = time.monotonic()
    results: dict[str, Any] = {
        "started": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "mode": mode,
        "params": params,
        "machine": report.machine(stack),
    }
    token = measure.run_id()
    # (Each call of a ramp step has a pair of its own: a pair that called again while its last
    # call was still being set up could not be told apart on the wire, bench.capture.pair.)
    count = max(params["sessions"], params["delay_per_path"], max(params["concurrency_steps"]),
                load.calls_per_step(params["ramp_rates"], params["ramp_seconds"]))
    print(f"bench: opening {count} sessions", file=sys.stderr)
    pairs, results["sessions"] = await measure.open_sessions(stack, count, params["api_concurrency"], token)
    bridge_log = processes.bridge_log(stack)
    log_offset = bridge_log.stat().st_size
    try:
        with sipp.phones(stack, load.work_dir(stack)) as (phones, callee), asterisk.bench_route(stack):
            bench = load.Load(stack, phones, callee, pairs)
            print("bench: post-dial delay", file=sys.stderr)
            results["delay"] = await load.post_dial_delay(bench, params["delay_rate"], params["delay_per_path"])
            results["hops"] = await measure.hop_costs(stack, pairs, params["hop_samples"])
            print("bench: throughput ramp", file=sys.stderr)
            with measure.RouteProbe(stack, pairs, every=0.05) as probe:
                results["ramp"] = await load.ramp(bench, params["ramp_rates"], params["ramp_seconds"],
                                                  params["hold"], params["ramp_sample"])
            results["route"] = measure.route_lookups(bridge_log, log_offset)
            results["route_sql"] = measure.percentiles(probe.times)
            # Right after the bridge's own delay and ramp (before the concurrency step leaves the
            # PBX at its largest): the bridge is stopped meanwhile, and started again after.
            routes = [(r.caller, r.dialed, r.callee) for r in pairs.bridge]
            for key, hand_back in (("floor", False), ("floor_dialplan", True)):
                print(f"bench: the ARI floor{' (handed back to the dialplan)' if hand_back else ''}", file=sys.stderr)
                async with floor.standing_in(stack, routes, load.work_dir(stack), hand_back):
                    results[key] = {
                        "delay": await load.post_dial_delay(bench, params["delay_rate"], params["delay_per_path"],
                                                            f"delay-{key}"),
                        "ramp": await load.ramp(bench, params["ramp_rates"], params["ramp_seconds"], params["hold"],
                                                params["ramp_sample"], paths=("bridge",), tag=f"ramp-{key}"),
                    }
                results[key]["sustained"] = measure.sustained(results[key]["ramp"], "bridge")
            # The other design: the dialplan dials, asking over AGI for the bridge's decision
            # (bench/agi.py), then for a table's (what AGI alone costs).
            for key, table in (("agi", None), ("agi_floor", routes)):
                print(f"bench: decided over AGI{' (from a table)' if table else ''}", file=sys.stderr)
                async with agi.standing_in(stack, load.work_dir(stack), table):
                    results[key] = {
                        "delay": await load.post_dial_delay(bench, params["delay_rate"], params["delay_per_path"],
                                                            f"delay-{key}"),
                        "ramp": await load.ramp(bench, params["ramp_rates"], params["ramp_seconds"], params["hold"],
                                                params["ramp_sample"], paths=("bridge",), tag=f"ramp-{key}"),
                    }
                results[key]["sustained"] = measure.sustained(results[key]["ramp"], "bridge")
            print("bench: CPU per call", file=sys.stderr)
            results["cpu"] = await load.cpu_per_call(bench, params["cpu_rate"], params["cpu_seconds"],
                                                     params["cpu_hold"], params["idle_seconds"],
                                                     params.get("cpu_long_hold"), params.get("cpu_rounds", 1))
            print("bench: simultaneous calls", file=sys.stderr)
            results["concurrency"] = await load.concurrency(bench, params["concurrency_steps"], params["setup_rate"],
                                                            params["sample"], params["listen_seconds"])
    finally:
        await measure.close_sessions(stack, token, count)
    top_rate = max(params["ramp_rates"])
    results["sustained"] = {
        "bridge": measure.sustained(results["ramp"], "bridge"),
        "baseline": measure.sustained(results["ramp"], "baseline"),
    }
    results["sustained"]["top"] = results["sustained"]["bridge"] == top_rate == results["sustained"]["baseline"]
    summarise(results)
    results["seconds"] = time.monotonic() - started
    return report.write(results, out)


def summarise(results: dict[str, Any]) -> None:
    """The most simultaneous calls held: the largest step that, as every smaller step, had
    every call set up, two-way audio in every sample, and every call ending normally (a step
    where some calls could not be hung up cleanly, or were answered late, has failed). At the
    machine's edge a step can fail and a larger one pass: `max_concurrent_any` is the largest
    step that passed, whatever the smaller ones did."""
    steps = [s for s in results["concurrency"] if s["calls"]]

    def passed(step: dict[str, Any]) -> bool:
        return bool(step["audio_ok"]) and step.get("ended_ok") == step["calls"]

    held = 0
    for step in steps:
        if not passed(step):
            break
        held = step["calls"]
    results["max_concurrent"] = held
    results["max_concurrent_any"] = max([s["calls"] for s in steps if passed(s)], default=0)
    results["concurrency_top"] = held == max(results["params"]["concurrency_steps"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("--tiny", action="store_true", help="a smoke run: every measurement, a few calls each")
    parser.add_argument("--soak", type=float, metavar="SECONDS",
                        help="the leak check alone: steady calls for SECONDS, then the report again")
    parser.add_argument("--out", type=Path, default=PROJECT_DIR / "docs" / "bench")
    parser.add_argument("--report-only", action="store_true", help="write the report again from OUT/results.json")
    args = parser.parse_args(argv)
    if args.report_only:
        results = json.loads((args.out / "results.json").read_text())
        summarise(results)
        print(report.write(results, args.out))
        return 0
    logs.configure("warning")
    stack = load_stack()
    processes.wait_healthy(stack)
    if args.soak is not None:
        params = dict(soak.TINY if args.tiny else soak.FULL, seconds=args.soak)
        path = asyncio.run(soak.run(stack, params, args.out))
        print(f"bench: soak written to {path}")
        if (args.out / "results.json").exists():
            results = json.loads((args.out / "results.json").read_text())
            summarise(results)
            print(f"bench: report written to {report.write(results, args.out)}")
        return 0
    path = asyncio.run(run(stack, TINY if args.tiny else FULL, "tiny" if args.tiny else "full", args.out))
    print(f"bench: report written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
