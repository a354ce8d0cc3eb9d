"""`make bench NODES=2`: does a second node double what the cluster carries?

    python -m bench.scaleout [--tiny] [--quota CORES] [--out DIR]

Needs the local stack running with two nodes (make bench NODES=2 starts it). Each node's
Asterisk and bridge are put in a cgroup (v1 cpu controller) limited to the same CPU share
(--quota, in cores), so that on a 2-core machine that also runs the load generator,
Kamailio and Postgres, the nodes are what saturates. Then the same ramp of call rates (the
bridge path of `make bench`: masked calls, answered, talked, hung up) runs with node 2
disabled in Kamailio, and with both nodes. The report gives the highest rate each carried
with 99 % of calls succeeding, their ratio, and the CPU-seconds per call of every process
(Kamailio, each Asterisk, each bridge, Postgres, the load generator) at a fixed rate both
nodes carry, measured from /proc (utime + stime).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bench import measure, report
from bridge import logs
from bridge.devstack import kamailio, processes
from bridge.devstack.carrier import Carrier
from bridge.devstack.settings import PROJECT_DIR, Stack, load

CGROUP_ROOT = Path("/sys/fs/cgroup/cpu")
PERIOD_US = 100_000
TICK = os.sysconf("SC_CLK_TCK")

# A node's share is small enough that the nodes, not the load generator (which costs about as
# much CPU per call as a node) or this process, are what saturates on a 2-core machine; the
# rates go up one call a second at a time, so that the ratio is not an artefact of the steps.
FULL: dict[str, Any] = {"quota": 0.15, "rates": [float(r) for r in range(3, 25)],
                        "seconds": 8.0, "hold": 1.0, "cpu_rate": 5.0, "cpu_calls": 120, "sessions": 200}
TINY: dict[str, Any] = {"quota": 0.5, "rates": [2.0], "seconds": 2.0, "hold": 0.3, "cpu_rate": 2.0, "cpu_calls": 4,
                        "sessions": 8}


# --- CPU limits and accounting -----------------------------------------------------------------


@contextmanager
def quotas(stack: Stack, cores: float) -> Iterator[dict[str, list[int]]]:
    """Each node's Asterisk and bridge in a cgroup of its own, limited to `cores` of CPU;
    moved back to the root group afterwards. Yields node id -> its pids."""
    groups: dict[str, list[int]] = {}
    made: list[Path] = []
    try:
        for node in stack.nodes:
            pids = [p for p in (measure.asterisk_pid(node, "pbx"), processes.bridge_pid(node)) if p]
            group = CGROUP_ROOT / f"maskbridge-{stack.instance_tag}-{node.env['MB_NODE_ID']}"
            group.mkdir(exist_ok=True)
            made.append(group)
            (group / "cpu.cfs_period_us").write_text(str(PERIOD_US))
            (group / "cpu.cfs_quota_us").write_text(str(int(cores * PERIOD_US)))
            for pid in pids:
                (group / "cgroup.procs").write_text(str(pid))
            groups[node.env["MB_NODE_ID"]] = pids
        yield groups
    finally:
        for group in made:
            for member in (group / "cgroup.procs").read_text().split():
                try:
                    (CGROUP_ROOT / "cgroup.procs").write_text(member)
                except OSError:
                    pass  # gone meanwhile
            group.rmdir()


def _ticks(pid: int, children: bool = False) -> int:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, IndexError):
        return 0
    used = int(fields[11]) + int(fields[12])  # utime, stime
    if children:
        used += int(fields[13]) + int(fields[14])  # cutime, cstime: children waited for
    return used


def _processes_where(field: int, value: int) -> list[int]:
    """Every process whose /proc stat field (after the command) `field` is `value`: 1 its
    parent, 2 its process group."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[field]) == value:
                    found.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    return found


def processes_to_account(stack: Stack) -> dict[str, tuple[list[int], list[int]]]:
    """name -> (pids counted alone, pids counted with their children waited for)."""
    postmaster = int((stack.pg_dir / "postmaster.pid").read_text().split()[0])
    kam = kamailio.pid(stack)
    out: dict[str, tuple[list[int], list[int]]] = {
        "kamailio": (_processes_where(2, kam) if kam else [], []),
        "postgres": (_processes_where(1, postmaster), [postmaster]),
        "load generator (carrier Asterisk)": ([p for p in [measure.asterisk_pid(stack, "carrier")] if p], []),
    }
    for node in stack.nodes:
        out[f"{node.env['MB_NODE_ID']} Asterisk"] = ([p for p in [measure.asterisk_pid(node, "pbx")] if p], [])
        out[f"{node.env['MB_NODE_ID']} bridge"] = ([p for p in [processes.bridge_pid(node)] if p], [])
    return out


def cpu_seconds(accounted: dict[str, tuple[list[int], list[int]]]) -> dict[str, float]:
    return {name: (sum(_ticks(p) for p in alone) + sum(_ticks(p, children=True) for p in whole)) / TICK
            for name, (alone, whole) in accounted.items()}


# --- Kamailio: which nodes take calls -----------------------------------------------------------


def set_node(stack: Stack, node: Stack, enabled: bool) -> None:
    """Node in or out of Kamailio's rotation (disabled: no calls, no probes)."""
    uri = f"sip:{node.env['MB_PBX_SIP_BIND']}:{node.env['MB_PBX_SIP_PORT']}"
    out = kamailio.rpc(stack, "dispatcher.set_state", "ap" if enabled else "d", "1", uri)
    if out.returncode != 0:
        raise RuntimeError(f"kamcmd dispatcher.set_state failed: {out.stderr or out.stdout}")


# --- the run ------------------------------------------------------------------------------------


async def run(stack: Stack, params: dict[str, Any]) -> dict[str, Any]:
    if stack.size != 2:
        raise SystemExit("bench.scaleout needs the two-node stack: make bench NODES=2")
    results: dict[str, Any] = {"started": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                               "params": params, "machine": report.machine(stack)}
    token = measure.run_id()
    pairs, _opened = await measure.open_sessions(stack, params["sessions"], 16, token)
    routes = pairs.of("bridge")
    node2 = stack.nodes[1]
    try:
        with quotas(stack, params["quota"]):
            async with Carrier(stack) as carrier:
                calls = measure.Calls(carrier)
                try:
                    set_node(stack, node2, enabled=False)
                    print("bench.scaleout: one node", file=sys.stderr)
                    results["one_node"] = await measure.ramp_path(calls, routes, params["rates"], params["seconds"],
                                                                  params["hold"], "one node")
                    set_node(stack, node2, enabled=True)
                    print("bench.scaleout: two nodes", file=sys.stderr)
                    results["two_nodes"] = await measure.ramp_path(calls, routes, params["rates"], params["seconds"],
                                                                   params["hold"], "two nodes")
                    print("bench.scaleout: CPU per call", file=sys.stderr)
                    accounted = processes_to_account(stack)
                    before, began = cpu_seconds(accounted), time.monotonic()
                    hold = params["hold"]
                    outcomes = await measure.at_rate(params["cpu_rate"], params["cpu_calls"],
                                                     lambda i: calls.place(routes[i % len(routes)], hold=hold))
                    after, spent = cpu_seconds(accounted), time.monotonic() - began
                    ok = sum(o.ok for o in outcomes)
                    results["cpu"] = {"rate": params["cpu_rate"], "calls": len(outcomes), "ok": ok, "seconds": spent,
                                      "ms_per_call": {k: (after[k] - before[k]) * 1000 / max(ok, 1) for k in after}}
                finally:
                    set_node(stack, node2, enabled=True)
                    await calls.close()
    finally:
        await measure.close_sessions(stack, token, params["sessions"])
    one = measure.sustained(results["one_node"], "one node")
    two = measure.sustained(results["two_nodes"], "two nodes")
    results["sustained"] = {"one_node": one, "two_nodes": two,
                            "ratio": (two / one) if one and two else None,
                            "top": two == max(params["rates"])}
    per_call = results["cpu"]["ms_per_call"]
    nodes_ms = sum(v for k, v in per_call.items() if k.startswith("node-")) / 2  # (each call uses one node)
    results["projection"] = {
        "node_cpu_ms_per_call": nodes_ms,
        "calls_per_s_per_core_on_a_node": 1000 / nodes_ms if nodes_ms else None,
        "kamailio_calls_per_s_per_core": 1000 / per_call["kamailio"] if per_call.get("kamailio") else None,
        "postgres_calls_per_s_per_core": 1000 / per_call["postgres"] if per_call.get("postgres") else None,
    }
    return results


def write(results: dict[str, Any], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "scaleout.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    s, p, cpu = results["sustained"], results["projection"], results["cpu"]
    lines = [
        "# Scale-out: Kamailio in front of one node, then two",
        "",
        f"Run {results['started']} on {results['machine']['cpu']} (commit {results['machine']['maskbridge commit']}).",
        f"Each node's Asterisk and bridge limited to {results['params']['quota']} of a core (cgroup v1 cpu quota); "
        "Kamailio, Postgres and the load generator unlimited. Calls: masked bridge calls, answered, "
        f"{results['params']['hold']} s of talk, hung up; a rate counts when 99 % of its calls succeed.",
        "",
        "| | highest rate carried (calls/s) |",
        "| --- | --- |",
        f"| one node | {s['one_node']} |",
        f"| two nodes | {s['two_nodes']}{' (the top rate tried)' if s['top'] else ''} |",
        f"| ratio | {s['ratio']:.2f} |" if s["ratio"] else "| ratio | - |",
        "",
        f"CPU per call at {cpu['rate']} calls/s on two nodes ({cpu['ok']} of {cpu['calls']} calls ok):",
        "",
        "| process | CPU ms per call |",
        "| --- | --- |",
        *(f"| {name} | {ms:.1f} |" for name, ms in cpu["ms_per_call"].items()),
        "",
        f"A node (its Asterisk and bridge) spends {p['node_cpu_ms_per_call']:.1f} ms of CPU per call: about "
        f"{p['calls_per_s_per_core_on_a_node'] or 0:.0f} calls/s per core of node. Kamailio: about "
        f"{p['kamailio_calls_per_s_per_core'] or 0:.0f} calls/s per core; Postgres about "
        f"{p['postgres_calls_per_s_per_core'] or 0:.0f} calls/s per core.",
        "",
    ]
    path = out / "scaleout.md"
    path.write_text("\n".join(lines))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scaleout")
    parser.add_argument("--tiny", action="store_true", help="a smoke run: a few calls each")
    parser.add_argument("--quota", type=float, help="CPU share of each node, in cores")
    parser.add_argument("--out", type=Path, default=PROJECT_DIR / "docs" / "bench")
    args = parser.parse_args(argv)
    logs.configure("warning")
    stack = load()
    params = dict(TINY if args.tiny else FULL)
    if args.quota:
        params["quota"] = args.quota
    for node in stack.nodes:
        processes.wait_healthy(node)
    results = asyncio.run(run(stack, params))
    path = write(results, args.out)
    print(f"bench.scaleout: {results['sustained']}; report written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
