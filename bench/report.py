"""The benchmark's report: Markdown with the figures, PNG plots, and the raw results as JSON."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from bench import summary
from bridge.calls.flood import ROUTING_LIMIT
from bridge.devstack import postgres
from bridge.devstack.settings import PROJECT_DIR, Stack

PROCESSES = ("bridge", "pbx", "postgres", "load_generator")
# What a run measures: a commit after the last that touched these measures the same system.
# (asterisk-config/bench is the benchmark's own dialplan, loaded only while make bench runs, and
# measured by each run itself: what the soak and the sizes measure does not depend on it)
# (not the simulated carrier, bridge/devstack/carrier.py: make bench leaves it alone, SIPp plays the phones)
MEASURED = ("bridge", ":(exclude)bridge/devstack/carrier.py", "sql", "asterisk-config",
            ":(exclude)asterisk-config/bench", "pyproject.toml")
PROCESS_NAMES = {"bridge": "bridge (Python)", "pbx": "PBX (Asterisk)", "postgres": "Postgres (whole cluster)",
                 "load_generator": "load generator (SIPp, both sides)"}


def _shares(shares: list[Any] | None) -> str:
    """" (0.99/0.98, 1.00/0.97)": what each sampled call's caller and callee heard of the
    other's tone (share of energy), or nothing. Older runs kept the caller's share alone."""
    if not shares:
        return ""
    return " (" + ", ".join(
        f"{x['caller_heard_callee']:.2f}/{x['callee_heard_caller']:.2f}" if isinstance(x, dict) else f"{x:.2f}"
        for x in shares) + ")"

def _run(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def machine(stack: Stack) -> dict[str, str]:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    mem = next(ln.split()[1] for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal"))
    host_os = _run(["sh", "-c", ". /etc/os-release && echo $PRETTY_NAME"])
    return {
        "cpu": f"{cpu}, {os.cpu_count()} cores",
        "memory": f"{int(mem) / 1024 / 1024:.1f} GiB",
        "kernel": platform.release(),
        "host OS": host_os,
        "Asterisk": _run(["chroot", str(stack.rootfs), "asterisk", "-V"]),
        "Asterisk root file system": (stack.rootfs / "etc/debian_version").read_text().strip()
        if (stack.rootfs / "etc/debian_version").exists() else "?",
        "Postgres": _run([postgres._bin("postgres"), "--version"]),
        "Python": platform.python_version(),
        "maskbridge commit": _run(["git", "-C", str(PROJECT_DIR), "rev-parse", "--short", "HEAD"]),
        # (the last commit that changed what is measured: the bridge, its SQL, the PBX's
        # configuration; a commit after it that touched only the bench or the docs measures the same)
        "code commit": code_commit(),
    }


def code_commit() -> str:
    return _run(["git", "-C", str(PROJECT_DIR), "log", "-1", "--format=%h", "--", *MEASURED])


def _ms(p: dict[str, Any], key: str, fmt: str = "{:.1f}") -> str:
    return fmt.format(p[key]) if key in p else "-"


def _figure(out: Path, name: str, title: str, xlabel: str, ylabel: str, draw: Any) -> str:
    fig, ax = plt.subplots(figsize=(7, 4))
    draw(ax)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / name, dpi=100)
    plt.close(fig)
    return name


def _before(out: Path) -> dict[str, Any] | None:
    return summary.read(out / "before.json")


def plots(results: dict[str, Any], out: Path, before: dict[str, Any] | None) -> list[str]:
    delay, ramp, memory = results["delay"], results["ramp"], results["concurrency"]
    top = max(delay["bridge_ms"] + delay["baseline_ms"] + [1.0])
    bins = [top * i / 40 for i in range(41)]
    was = before or {}

    def delays(ax: Any) -> None:
        ax.hist(delay["baseline_ms"], bins=bins, alpha=0.6, label="baseline: dialplan Dial")
        ax.hist(delay["bridge_ms"], bins=bins, alpha=0.6, label="bridge: ARI")

    def success(ax: Any) -> None:
        for path in ("bridge", "baseline"):
            steps = [s for s in ramp if s["path"] == path]
            ax.plot([s["rate"] for s in steps], [100 * s["success"] for s in steps], marker="o", label=path)
            old = [s for s in was.get("ramp", []) if s["path"] == path]
            if old:
                ax.plot([s["rate"] for s in old], [100 * s["success"] for s in old], linestyle="--", marker=".",
                        alpha=0.6, label=f"{path}, before ({was['machine']['maskbridge commit']})")
        ax.axhline(99, color="grey", linestyle="--", linewidth=1)

    def rss(ax: Any) -> None:
        calls = [s["calls"] for s in memory]
        ax.plot(calls, [s["bridge_mb"] or 0 for s in memory], marker="o", label="bridge (Python)")
        ax.plot(calls, [s["pbx_mb"] or 0 for s in memory], marker="o", label="PBX (Asterisk)")
        old = was.get("concurrency", [])
        if old:
            ax.plot([s["calls"] for s in old], [s["bridge_mb"] or 0 for s in old], linestyle="--", alpha=0.6,
                    label="bridge, before")
            ax.plot([s["calls"] for s in old], [s["pbx_mb"] or 0 for s in old], linestyle="--", alpha=0.6,
                    label="PBX, before")

    def cpu(ax: Any) -> None:
        c = results["cpu"]
        paths = ["bridge", "baseline"]
        bottom = [0.0, 0.0]
        for proc in PROCESSES:
            values = [c[p]["cpu_ms_per_call"][proc] for p in paths]
            ax.bar(paths, values, bottom=bottom, label=PROCESS_NAMES[proc])
            bottom = [b + v for b, v in zip(bottom, values, strict=True)]

    return [
        _figure(out, "delay.png", f"Post-dial delay, each path at {delay['rate']:g} calls/s, alternating",
                "post-dial delay, caller's INVITE out to callee's INVITE in (ms)", "calls", delays),
        _figure(out, "ramp.png", "Throughput ramp", "offered call rate (calls/s)", "calls that succeeded (%)", success),
        _figure(out, "cpu.png", f"CPU per call at {results['cpu']['rate']:g} calls/s", "path",
                "CPU ms per call", cpu),
        _figure(out, "memory.png", "Memory against simultaneous calls", "simultaneous bridged calls",
                "resident memory (MiB)", rss),
    ]


def _step_failures(step: dict[str, Any]) -> str:
    """A ramp step's failures by reason, then the calls the bridge shed (a 503 each) where
    they were counted (0 too: then any 503 was not a shed)."""
    text = ", ".join(f"{k}: {v}" for k, v in step["failures"].items()) or "-"
    if step.get("shed_by_bridge") is not None:
        text += f"; calls the bridge shed (503): {step['shed_by_bridge']}"
    return text


def _num(value: Any, fmt: str = "{:.1f}") -> str:
    return "-" if value is None else fmt.format(value) if isinstance(value, (int, float)) else str(value)


def _hops(hops: dict[str, Any] | None) -> list[str]:
    """What one round trip to another process costs on this machine (measure.hop_costs)."""
    if not hops:
        return []
    idle = f"{hops['idle_ms']:g}"
    rows = (("one byte over a local socket, to another process and back", "socket"),
            ("`SELECT 1` from asyncpg, as the bridge queries", "select_1"),
            ("the bridge's routing query (read only) from asyncpg", "route"))

    def ratio(entry: dict[str, Any]) -> str:
        warm, cold = entry["warm"].get("p50"), entry["idle"].get("p50")
        return f"{cold / warm:.1f}x" if warm and cold else "-"

    return [
        f"What one hop to another process costs on this machine: the round trip's p50 in ms, back to back and "
        f"after {idle} ms with nothing to do (as between two calls at {1000 / float(idle):g} calls/s), "
        f"{hops['samples']} of each:",
        "",
        f"| round trip | back to back | after {idle} ms idle | idle / back to back |",
        "| --- | --- | --- | --- |",
        *[f"| {label} | {_ms(hops[key]['warm'], 'p50', '{:.3f}')} | {_ms(hops[key]['idle'], 'p50', '{:.3f}')} "
          f"| {ratio(hops[key])} |" for label, key in rows if key in hops],
        "",
        *([f"After {idle} ms of idleness the routing query's round trip takes "
           f"{hops['route']['idle']['p50'] - hops['route']['warm']['p50']:.2f} ms more than back to back "
           f"({ratio(hops['route'])}): the same work, started cold. A call on the bridge path makes that "
           "round trip, two to Asterisk, and waits for two of Asterisk's events, between the caller's INVITE and "
           "the callee's; the dialplan path crosses to no other process before its INVITE leaves.", ""]
          if hops.get("route", {}).get("warm", {}).get("p50") and hops["route"].get("idle", {}).get("p50") else []),
    ]


def _comparison(results: dict[str, Any], before: dict[str, Any] | None) -> list[str]:
    if before is None:
        return []
    b = before
    rows = [
        ("added post-dial delay p50 (ms)", b["delay"]["added"].get("p50"), results["delay"]["added"].get("p50")),
        ("added post-dial delay p99 (ms)", b["delay"]["added"].get("p99"), results["delay"]["added"].get("p99")),
        ("highest rate sustained, bridge (calls/s)", b["sustained"]["bridge"], results["sustained"]["bridge"]),
        ("highest rate sustained, baseline (calls/s)", b["sustained"]["baseline"], results["sustained"]["baseline"]),
        ("bridge / baseline rate", _num(_ratio(b["sustained"]), "{:.2f}"),
         _num(_ratio(results["sustained"]), "{:.2f}")),
        ("simultaneous bridged calls with audio", b["max_concurrent"], results["max_concurrent"]),
        ("session creates over HTTP (per s)", b["sessions"]["creates_per_second"],
         results["sessions"]["creates_per_second"]),
        ("routing query inside Postgres under load, p99 (ms)", b["route_sql"].get("p99"),
         results["route_sql"].get("p99")),
    ]
    return [
        "## Before and after",
        "",
        f"*Before*: the report of commit {b['machine']['maskbridge commit']} ({b['started']}, kept as "
        "`before.json`), when a second Asterisk driven from Python placed and answered every call (it "
        "burned about as much CPU as the PBX it measured, on the same two cores, as issue 14 found; that "
        "run measured no CPU per call, so there is no before for it). *After*: "
        "this run, with SIPp as the phones. The delay is now stamped by the kernel on the loopback "
        "(before: the carrier Asterisk's SIP log, to the millisecond), and audio is checked both ways "
        "(before: the caller's side only). Dashed lines in the plots below are the before run. The two "
        "runs are not like for like: another day, another kernel build of the host "
        f"({b['machine'].get('kernel', '?')} then, {results['machine'].get('kernel', '?')} now), and the "
        "baseline path, whose code is Asterisk's alone, moved as much as the bridge did: compare the "
        "ratio row, not the rates.",
        "",
        f"| figure | before ({b['machine']['maskbridge commit']}) | "
        f"after ({results['machine']['maskbridge commit']}) |",
        "| --- | --- | --- |",
        *[f"| {name} | {_num(old)} | {_num(new)} |" for name, old, new in rows],
        "",
    ]


def _ratio(sustained: dict[str, Any]) -> float | None:
    bridge, baseline = sustained.get("bridge"), sustained.get("baseline")
    return round(bridge / baseline, 2) if bridge and baseline else None


def _floor_headline(results: dict[str, Any]) -> list[str]:
    f, h = results.get("floor"), results.get("floor_dialplan")
    if not f:
        return []
    line = (f"- The ARI floor (a stand-in making the bridge's ARI requests and nothing else): "
            f"**{_ms(f['delay']['added'], 'p50')} ms** added at the median (p99 {_ms(f['delay']['added'], 'p99')}), "
            f"highest rate **{_num(f['sustained'], '{:g}')}** calls/s")
    if h:
        line += (f"; handing each call back to the dialplan instead (one ARI request a call): "
                 f"{_ms(h['delay']['added'], 'p50')} ms and {_num(h['sustained'], '{:g}')} calls/s")
    line += (". What routing a call with these ARI requests costs on this machine, with no application "
             "work at all (see *The ARI floor*)")
    a, af = results.get("agi"), results.get("agi_floor")
    if a and af:
        line += (f". The dialplan dialing and asking the bridge's decision over AGI instead: "
                 f"{_ms(a['delay']['added'], 'p50')} ms (p99 {_ms(a['delay']['added'], 'p99')}), "
                 f"{_num(a['sustained'], '{:g}')} calls/s; the AGI exchange alone "
                 f"{_ms(af['delay']['added'], 'p50')} ms")
    return [line + "."]


_FLOOR_ROWS = (
    ("floor", "the ARI floor: a stand-in making the bridge's ARI requests, nothing else"),
    ("floor_dialplan", "a stand-in handing each call back to the dialplan, which dials it"),
    ("agi", "decided over AGI: the dialplan dials, asking the bridge's decision"),
    ("agi_floor", "decided over AGI from a table: the AGI exchange alone"),
)


def _floor_section(results: dict[str, Any]) -> list[str]:
    """The same delay and ramp with bench/floor.py's stand-ins in the bridge's place."""
    f = results.get("floor")
    if not f:
        return []
    d, fd = results["delay"], f["delay"]
    rows = [("the bridge (above)", d["added"], results["sustained"]["bridge"])] + [
        (name, results[key]["delay"]["added"], results[key]["sustained"]) for key, name in _FLOOR_ROWS
        if results.get(key)]
    own = None if d["added"].get("p50") is None or fd["added"].get("p50") is None else (
        d["added"]["p50"] - fd["added"]["p50"])
    lines = [
        "## The ARI floor",
        "",
        "What the bridge adds to a call holds its own work (the route looked up and the call's row "
        "written in Postgres, its Python, its checks) and what its ARI requests cost, whatever the "
        "application does between them: Asterisk taking the call into Stasis and telling the application, making the "
        "new leg, the bridge and the join, and the round trips between them. To tell them apart, right "
        "after the bridge's delay run and ramp (before the CPU and concurrency steps, which leave the PBX "
        "at its largest) the bridge was stopped and a stand-in (bench/floor.py) took its place as "
        "the same ARI application: for each call it makes the bridge's ARI requests, grouped and ordered "
        "as the bridge does (the leg with the same masked identity and the bridge at once, then the join, "
        "the dial and the caller's caller ID in one write; the caller answered once the callee answers), "
        "but finds the callee in a table it was handed: no database, no checks, no log line. The delay "
        f"run ({fd['calls']} calls, {fd['failed']} failed) and the ramp (the stand-in's path alone; "
        "the dialplan's rates are those above) were made again with it. Its figures are the floor "
        "under any application that routes calls with these ARI requests on this machine (the stand-in "
        "has none of the bridge's handling of races; it hangs up what is left when a request fails).",
        "",
    ]
    h = results.get("floor_dialplan")
    if h:
        lines += [
            "A second stand-in does less still: it hands each call back to the dialplan (one request, "
            "`continue`), which dials the callee showing the number the caller dialed (asterisk-config/bench, "
            "`[floor-dial]`): no bridge and no leg of ARI's, the least an application that decides over "
            f"ARI can cost ({h['delay']['calls']} calls, {h['delay']['failed']} failed). The bridge does not route "
            "this way: the call would leave the application, and with it what the bridge does while a "
            "call lasts (the client's keypad block, cuts when a session ends or a cap is reached, "
            "hold, recording, the answer confirmed).",
            "",
        ]
    a, af = results.get("agi"), results.get("agi_floor")
    if a and af:
        decision = summary.dig(a, "delay", "added", "p50")
        exchange = summary.dig(af, "delay", "added", "p50")
        lines += [
            "Two more stand-ins measure the other design, in which the PBX's dialplan dials the callee and "
            "asks the bridge only where the call goes (bench/agi.py; asterisk-config/bench, "
            "`extensions_bench_agi.conf`): the call to the pool number is masked as `[from-trunk]` masks it, "
            "the dialplan asks a stand-in over FastAGI, then dials the callee showing the pool number, the "
            "callee's leg inheriting the interception routines. The first stand-in answers with the bridge's "
            "own decision (`Sessions.route`: the route looked up and the call's row written in one round "
            "trip, the callee's number unsealed; "
            f"{a['delay']['calls']} calls, {a['delay']['failed']} failed); the second from a table it was "
            f"handed, what the AGI exchange alone costs ({af['delay']['calls']} calls, {af['delay']['failed']} "
            "failed). The decision's own part, roughly: "
            + _num(None if decision is None or exchange is None else decision - exchange, "{:.1f}")
            + " ms at the median. What the design would have to bring back another way: everything the "
            "bridge does while a call lasts (as above), and the call's row after its route (rung, "
            "answered, ended).",
            "",
        ]
    return [
        *lines,
        "| path | added delay p50 (ms) | p95 | p99 | highest rate sustained (calls/s) |",
        "| --- | --- | --- | --- | --- |",
        *[f"| {name} | {_ms(p, 'p50')} | {_ms(p, 'p95')} | {_ms(p, 'p99')} | {_num(rate, '{:g}')} |"
          for name, p, rate in rows],
        f"| the dialplan alone (baseline) | 0 | 0 | 0 | {_num(results['sustained']['baseline'], '{:g}')} |",
        "",
        f"The bridge's own part of the added delay, roughly: {_num(own, '{:.1f}')} ms (the bridge's median "
        "difference less the floor's, two runs of the same calls a few minutes apart). The stand-ins' "
        "ramps: " + "; ".join(
            f"{name.split(':')[0]}: " + ", ".join(f"{s['rate']:g} calls/s {100 * s['success']:.1f} %"
                                               for s in results[key]["ramp"])
            for key, name in _FLOOR_ROWS if results.get(key)) + ".",
        "",
    ]


def _cpu_section(results: dict[str, Any]) -> list[str]:
    c = results["cpu"]
    lines = [
        "## CPU per call",
        "",
        f"Each path in turn carries calls at a steady {c['rate']:g} calls/s for {c['seconds']:g} s, each talking "
        f"{c['hold']:g} s with audio both ways{_rounds_text(c)}. Every process's CPU time (user + system, "
        "from /proc/<pid>/stat; "
        "for Postgres the postmaster, every backend and the children it reaped; for SIPp the callee's "
        "/proc and the caller's rusage) is read before and after; what the process spends idle over as "
        f"long (measured for {c['idle_seconds']:g} s just before) is taken off, and the rest is divided by "
        "the calls that succeeded. CPU seconds depend far less than rates on what else runs on the "
        "machine, so this is the figure that carries to a real server; far less is not at all: a shared "
        "host's caches and frequency move them too (see the rounds below). *Calls/s per core* is 1000 "
        "divided by what the system "
        "under test spends per call (the bridge, the PBX and Postgres; not the load generator).",
        "",
        f"| path | talking | calls ok{' (all rounds)' if int(c.get('rounds', 1)) > 1 else ''} | "
        + " | ".join(f"{PROCESS_NAMES[p]} ms/call" for p in PROCESSES)
        + " | system under test ms/call | calls/s per core | system ms/call, each round |",
        "| --- | --- | --- | " + " | ".join("---" for _ in PROCESSES) + " | --- | --- | --- |",
    ]
    for path in ("bridge", "baseline"):
        # (with the setup and talk apart, the same calls talking longer follow)
        for p in (c[path], c["long"][path]) if "long" in c else (c[path],):
            each = ", ".join(f"{r['system_ms_per_call']:.1f}" for r in p.get("rounds", [p]))
            lines.append(f"| {path} | {p.get('hold', c['hold']):g} s | {p['ok']} / {p['calls']} | "
                         + " | ".join(f"{p['cpu_ms_per_call'][k]:.2f}" for k in PROCESSES)
                         + f" | {p['system_ms_per_call']:.2f} | {_num(p['calls_per_second_per_core'], '{:.0f}')} "
                         + f"| {each} |")
    lg = c["bridge"]["cpu_ms_per_call"]["load_generator"]
    sut = c["bridge"]["system_ms_per_call"]
    lines += [
        "",
        f"On the bridge path the load generator costs {lg:.2f} ms per call against {sut:.2f} ms for the "
        "system under test" + (" (less, as it should)." if lg < sut else " (more: its figures are a floor)."),
        "",
        "![cpu](cpu.png)",
        "",
        *_talk_split_section(c),
    ]
    return lines


def _windows(c: dict[str, Any]) -> list[dict[str, Any]]:
    return [c[path] for path in ("bridge", "baseline")] + (
        [c["long"][path] for path in ("bridge", "baseline")] if "long" in c else [])


def _rounds_text(c: dict[str, Any]) -> str:
    rounds = int(c.get("rounds", 1))
    if rounds < 2:
        return ""
    spread = max(
        (max(each) - min(each)) / statistics.median(each) * 100
        for w in _windows(c) if (each := [r["system_ms_per_call"] for r in w["rounds"]]) and min(each) > 0
    )
    steals = [w.get("steal_seconds") for w in _windows(c)]
    steal = ("the host reported no steal time" if all(x == 0 for x in steals) else
             "steal time could not be read" if any(x is None for x in steals) else
             f"the host reported {sum(x or 0.0 for x in steals):.2f} s of steal time over all the windows")
    return (f"; every window is measured {rounds} times, in turn, and each process's figure is the median of "
            f"its rounds, the system's the sum of the processes' medians (in this run the same window measured "
            f"again differed by up to {spread:.0f} %, the last column shows each round; {steal})")


def _split_headline(c: dict[str, Any]) -> list[str]:
    if "split" not in c:
        return []
    b, d = c["split"]["bridge"], c["split"]["baseline"]
    return [
        f"- Setup and talk apart (system under test): a bridged call's setup and hangup "
        f"{b['system_setup_ms_per_call']:.2f} ms and {b['system_talk_ms_per_second']:.2f} ms per second of talk; "
        f"on the dialplan path {d['system_setup_ms_per_call']:.2f} ms and {d['system_talk_ms_per_second']:.2f} ms "
        "(the bridge's audio passes through Asterisk's core so that the client's keys reach it; see *CPU per "
        "call*).",
    ]


def _talk_split_section(c: dict[str, Any]) -> list[str]:
    """Setup and talk apart, from the same calls talking two lengths of time."""
    if "split" not in c:
        return []
    hold, long_hold = c["hold"], c["long"]["hold"]
    lines = [
        "### Setup and talk apart",
        "",
        f"The same calls again, each talking {long_hold:g} s instead of {hold:g} s (the table above): what "
        f"the longer talk costs more, divided by the {long_hold - hold:g} s, is a second of talk (the audio "
        "both ways); what is left of a call without it is its setup and hangup. Setup bounds the calls per "
        "second a core carries; talk bounds the calls a core holds at once. (A process whose figures differ "
        "by noise alone gets 0 per second of talk.)",
        "",
        "| path | " + " | ".join(f"{PROCESS_NAMES[p]}: setup ms / talk ms per s" for p in PROCESSES)
        + " | system under test: setup ms / talk ms per s | setups/s per core | calls held per core |",
        "| --- | " + " | ".join("---" for _ in PROCESSES) + " | --- | --- | --- |",
    ]
    for path in ("bridge", "baseline"):
        sp = c["split"][path]
        lines.append(f"| {path} | "
                     + " | ".join(f"{sp['setup_ms_per_call'][k]:.2f} / {sp['talk_ms_per_second'][k]:.2f}"
                                  for k in PROCESSES)
                     + f" | {sp['system_setup_ms_per_call']:.2f} / {sp['system_talk_ms_per_second']:.2f}"
                     + f" | {_num(sp['setups_per_second_per_core'], '{:.0f}')}"
                     + f" | {_num(sp['talking_calls_per_core'], '{:.0f}')} |")
    b, d = c["split"]["bridge"], c["split"]["baseline"]
    lines += [
        "",
        f"The PBX spends {b['talk_ms_per_second']['pbx']:.2f} ms per second of a bridged call's talk against "
        f"{d['talk_ms_per_second']['pbx']:.2f} ms on the dialplan path. The dialplan's Dial lets Asterisk "
        "forward the RTP between the legs natively (packet to packet, never through its core); the bridge's "
        "legs carry their audio through Asterisk's core, because the client's keys (the keypad block) must "
        "reach the bridge and each leg's stream must be re-originated by the PBX (bridge type "
        "`mixing,proxy_media`; bridge/ari/client.py). Natively forwarded, the keys would pass to the other "
        "phone unseen.",
        "",
    ]
    return lines


def _soak_section(soak: dict[str, Any] | None) -> list[str]:
    if soak is None:
        return ["## Soak", "", "Not run yet: `make bench SOAK=1800` (30 minutes) writes it.", ""]
    s, e, p = soak["start"], soak["end"], soak["params"]
    keys = (("bridge_rss_mb", "bridge RSS (MiB)"), ("pbx_rss_mb", "PBX RSS (MiB)"),
            ("pg_connections", "Postgres client connections"), ("channels", "PBX channels (ARI)"),
            ("bridges", "PBX bridges (ARI)"), ("open_calls", "call rows not ended"))
    return [
        "## Soak",
        "",
        f"`make bench SOAK={p['seconds']:g}` ({soak['started']}, code commit "
        f"{summary.dig(soak, 'machine', 'code commit') or 'not recorded'}): bridged calls at {p['rate']:g} calls/s for "
        f"{p['seconds']:g} s, each talking {p['hold']:g} s with audio both ways; {soak['calls']['placed']} calls "
        f"placed, {_num(soak['calls']['successful'], '{}')} ran to their end as SIPp saw them, "
        f"{_num(soak['calls']['failed'], '{}')} failed. Read at the start, every {p['every']:g} s, and at "
        "the end once the last call ended.",
        "",
        "| | start | end | left behind |",
        "| --- | --- | --- | --- |",
        *[f"| {name} | {_num(s[k])} | {_num(e[k])} | {_left(soak, k)} |" for k, name in keys],
        "",
        f"Bridge memory: {soak['rss_growth_mb']:+.1f} MiB from start to end; trend over the second half "
        f"{_num(soak.get('rss_slope_mb_per_hour'), '{:+.1f}')} MiB per hour.",
        "",
        *_pbx_memory(soak),
        "![soak](soak.png)",
        "",
    ]


def _pbx_memory(soak: dict[str, Any]) -> list[str]:
    """The PBX's memory over the soak: the table's start is Asterisk idle before the first
    call, its end after the last one; the trend says whether it still grew once warmed up."""
    from bench.soak import slope_second_half

    samples = soak.get("samples") or []
    calls = [x["pbx_rss_mb"] for x in samples if x.get("pbx_rss_mb") is not None]
    if not calls:
        return []
    return [
        f"PBX memory (Asterisk): {_num(soak['start'].get('pbx_rss_mb'), '{:.1f}')} MiB idle before the first call, "
        f"{min(calls):.1f} to {max(calls):.1f} MiB while the calls ran, "
        f"{_num(soak['end'].get('pbx_rss_mb'), '{:.1f}')} once the last call ended; trend over the second half "
        f"{_num(slope_second_half(samples, 'pbx_rss_mb'), '{:+.1f}')} MiB per hour.",
        "",
    ]


def _left(soak: dict[str, Any], key: str) -> str:
    """What the soak left behind of `key`: its count, or for memory the change."""
    if key in soak["leaked"]:
        return _num(soak["leaked"][key], "{}")
    start, end = soak["start"][key], soak["end"][key]
    return _num(end - start if start is not None and end is not None else None, "{:+.1f}")


def _floor(value: Any, handed_back: Any, fmt: str, over_agi: Any = None) -> str:
    """The stand-ins' figures after a target's, when measured (see _floor_section)."""
    if value is None:
        return ""
    back = "" if handed_back is None else f"; handed back to the dialplan: {fmt.format(handed_back)}"
    agi = "" if over_agi is None else f"; decided over AGI: {fmt.format(over_agi)}"
    return f" (ARI floor: {fmt.format(value)}{back}{agi})"


def targets(results: dict[str, Any], figures: dict[str, Any], sizes: dict[str, Any] | None,
            soak: dict[str, Any] | None) -> list[tuple[str, str, bool | None]]:
    """Issue 14's targets against this run: (target, measured, met); met None: not measured."""
    def at_most(value: Any, limit: float) -> bool | None:
        return None if value is None else value <= limit

    ratio = _ratio(results.get("sustained") or {})
    c = results.get("cpu") or {}
    lg = summary.dig(c, "bridge", "cpu_ms_per_call", "load_generator")
    sut = summary.dig(c, "bridge", "system_ms_per_call")
    steps = (sizes or {}).get("steps") or []
    at_1m = next((s for s in steps if s.get("past_participants") == 1_000_000), None)
    service = summary.dig(at_1m, "opens", "per_second")
    flat = growth(steps)
    slope = summary.dig(soak, "rss_slope_mb_per_hour")
    half = None if slope is None or soak is None else slope * soak["params"]["seconds"] / 2 / 3600
    left = None if soak is None or figures["soak_leaked_channels"] is None else sum(
        soak["leaked"][k] for k in ("channels", "bridges", "open_calls"))
    concurrent = figures["concurrent_calls_bridge"]
    return [
        ("post-dial delay added, p50 <= 3 ms", _num(figures["pdd_added_p50_ms"], "{:.1f} ms") + _floor(
            summary.dig(results, "floor", "delay", "added", "p50"),
            summary.dig(results, "floor_dialplan", "delay", "added", "p50"), "{:.1f} ms",
            summary.dig(results, "agi", "delay", "added", "p50")),
         at_most(figures["pdd_added_p50_ms"], 3)),
        ("post-dial delay added, p99 <= 15 ms", _num(figures["pdd_added_p99_ms"], "{:.1f} ms") + _floor(
            summary.dig(results, "floor", "delay", "added", "p99"),
            summary.dig(results, "floor_dialplan", "delay", "added", "p99"), "{:.1f} ms",
            summary.dig(results, "agi", "delay", "added", "p99")),
         at_most(figures["pdd_added_p99_ms"], 15)),
        ("highest call rate, bridge >= 0.9 x dialplan",
         f"{_num(figures['cps_bridge'], '{:g}')} / {_num(figures['cps_baseline'], '{:g}')} = {_num(ratio, '{:.2f}')}"
         + _floor(_ratio({"bridge": summary.dig(results, "floor", "sustained"), "baseline": figures["cps_baseline"]}),
                  _ratio({"bridge": summary.dig(results, "floor_dialplan", "sustained"),
                          "baseline": figures["cps_baseline"]}), "{:.2f}",
                  _ratio({"bridge": summary.dig(results, "agi", "sustained"), "baseline": figures["cps_baseline"]})),
         None if ratio is None else ratio >= 0.9),
        ("500 simultaneous bridged calls with audio", _num(concurrent, "{}")
         + (" (the largest step tried)" if results.get("concurrency_top") else ""),
         None if concurrent is None else concurrent >= 500),
        ("load generator costs less than the system under test", f"{_num(lg, '{:.2f}')} against "
         f"{_num(sut, '{:.2f}')} ms per call", None if lg is None or sut is None else lg < sut),
        ("1,000 session opens/s at 1M past participants (HTTP)",
         "-" if figures["session_opens_per_s"] is None else
         f"{figures['session_opens_per_s']:.0f}/s (session service without HTTP: {_num(service, '{:.0f}/s')})",
         None if figures["session_opens_per_s"] is None else figures["session_opens_per_s"] >= 1000),
        ("route lookup p99 <= 2 ms inside Postgres at 1M (opens running)",
         _num(figures["route_lookup_p99_ms_at_1m"], "{:.2f} ms"), at_most(figures["route_lookup_p99_ms_at_1m"], 2)),
        ("cost per open flat with size (largest / smallest <= 1.25)", _num(flat, "{:.2f}"), at_most(flat, 1.25)),
        ("soak: nothing left behind (channels, bridges, open calls)", _num(left, "{}"),
         None if left is None else left == 0),
        ("soak: bridge memory flat (<= 1 MiB over the second half)",
         "-" if half is None else
         f"{half:+.1f} MiB ({_num(figures['soak_rss_growth_mb'], '{:+.1f}')} from start to end)",
         at_most(half, 1.0)),
    ]


def open_cost(step: dict[str, Any], phase: str) -> float:
    """CPU ms per open of the system under test in a bench-sizes step: Postgres and the process
    that opens (the session service's caller for "opens", the bridge behind HTTP for
    "http_opens"); not the HTTP client."""
    each = summary.dig(step, phase, "cpu_ms_per_open") or {}
    return float(each.get("postgres", 0) + each.get("this process" if phase == "opens" else "bridge process", 0))


def growth(steps: list[dict[str, Any]], phase: str = "http_opens") -> float | None:
    """CPU per open at the largest size over that at the smallest: 1.0 is flat."""
    if len(steps) < 2 or not open_cost(steps[0], phase):
        return None
    return open_cost(steps[-1], phase) / open_cost(steps[0], phase)


def _targets_section(rows: list[tuple[str, str, bool | None]]) -> list[str]:
    met = sum(1 for *_, ok in rows if ok)
    return [
        "## Issue 14's targets",
        "",
        f"{met} of {len(rows)} met in this run (each from the figures below; summary.json's code commit "
        "for sizes and soak, or not measured).",
        "",
        "| target | measured | met |",
        "| --- | --- | --- |",
        *[f"| {name} | {value} | {'-' if ok is None else 'yes' if ok else '**no**'} |" for name, value, ok in rows],
        "",
    ]


RUNS = "runs.json"  # the earlier full runs of the code results.json measured: their targets


def run_entry(results: dict[str, Any], sizes: dict[str, Any] | None,
              soak: dict[str, Any] | None) -> dict[str, Any]:
    """One full run's targets as its own report gave them: its make bench (`results`), with
    the soak and the sizes that measured the same code."""
    sizes_used, soak_used = summary.usable(results, sizes, soak)
    rows = targets(results, summary.figures(results, sizes, soak), sizes_used, soak_used)
    return {"started": results.get("started"), "commit": summary.dig(results, "machine", "maskbridge commit"),
            "soak started": summary.dig(soak_used, "started"), "sizes started": summary.dig(sizes_used, "started"),
            "host": _host(results),
            "targets": [{"target": name, "measured": value, "met": ok} for name, value, ok in rows]}


def _host(results: dict[str, Any]) -> str:
    """The machine of the run, and how fast it ran calls in the figures whose code is
    Asterisk's alone: the dialplan baseline's highest rate and the ARI floor's added delay at
    the median."""
    floor = summary.dig(results, "floor", "delay", "added", "p50")
    return (f"{summary.dig(results, 'machine', 'cpu') or '-'}; dialplan "
            f"{_num(summary.dig(results, 'sustained', 'baseline'), '{:g}')} calls/s, ARI floor "
            + ("-" if floor is None else f"{floor:.1f} ms"))


def earlier_runs(out: Path, results: dict[str, Any]) -> list[dict[str, Any]]:
    """The earlier full runs of the code `results` measured (`out`/runs.json), oldest first.
    Called before `results` is written: when `out` still holds another full run of the same
    code (its results.json, soak.json and sizes.json), that run joins them (whatever run
    takes its place: a smoke run written there too). Runs of other
    code are dropped (the table compares one code's runs: what moves is the host)."""
    code = summary.dig(results, "machine", "code commit")
    kept = summary.read(out / RUNS) or {}
    same = bool(code) and kept.get("code commit") == code
    runs = [r for r in kept.get("runs") or [] if isinstance(r, dict)] if same else []
    held = summary.read(out / "results.json")
    if (code and held is not None and held.get("mode") == "full"
            and held.get("started") != results.get("started")
            and summary.dig(held, "machine", "code commit") == code
            and all(r.get("started") != held.get("started") for r in runs)):
        runs.append(run_entry(held, summary.read(out / "sizes.json"), summary.read(out / "soak.json")))
    return runs


def _short(measured: str) -> str:
    """A measured figure without its note in parentheses."""
    return measured.split(" (", 1)[0]


def _runs_section(rows: list[tuple[str, str, bool | None]], runs: list[dict[str, Any]],
                  results: dict[str, Any]) -> list[str]:
    """This run's targets beside the earlier full runs' of the same code."""
    if not runs:
        return []

    def cell(measured: str, ok: bool | None) -> str:
        return f"{_short(measured)} ({'-' if ok is None else 'met' if ok else '**not met**'})"

    earlier = [{r["target"]: r for r in run.get("targets") or []} for run in runs]
    heads = [f"run of {run.get('started')} ({run.get('commit')})" for run in runs]
    return [
        "### The same code in other full runs",
        "",
        "Several targets sit close to their limits, and what a run measures moves with the machine it ran "
        "on (its CPU, and the host's load at the hour: the dialplan baseline and the ARI floor, whose code is "
        "Asterisk's alone, move with them; the last row). Every earlier full run of "
        f"this code (code commit {summary.dig(results, 'machine', 'code commit')}), each with its own soak and "
        "sizes, as its report gave it (runs.json):",
        "",
        f"| target | this run ({results.get('started')}) | {' | '.join(heads)} |",
        f"| --- | --- |{' --- |' * len(runs)}",
        *[f"| {name} | {cell(value, ok)} | "
          + " | ".join(cell(e[name]["measured"], e[name]["met"]) if name in e else "-" for e in earlier) + " |"
          for name, value, ok in rows],
        f"| the machine, and what Asterisk alone did | {_host(results)} | "
        + " | ".join(str(run.get("host") or "-") for run in runs) + " |",
        f"| met | {sum(1 for *_, ok in rows if ok)} of {len(rows)} | "
        + " | ".join(f"{sum(1 for r in run.get('targets') or [] if r.get('met'))} of {len(run.get('targets') or [])}"
                     for run in runs) + " |",
        "",
    ]


def _summary_section(figures: dict[str, Any]) -> list[str]:
    return [
        "## Headline figures (summary.json)",
        "",
        "`summary.json` holds issue 14's headline figures, each read from the file that measured it "
        "(null: not measured yet, or not by a full run, or on other code: each file's machine names its "
        "code commit, the last that changed the bridge, its SQL or the PBX's configuration). "
        "`sizes.json` is written by `make bench-sizes`, `soak.json` by "
        "`make bench SOAK=1800`, `results.json` by `make bench`.",
        "",
        "| key | value | from |",
        "| --- | --- | --- |",
        *[f"| `{k}` | {_num(v, '{:.2f}') if isinstance(v, float) else _num(v, '{}')} | "
          f"`{summary.SOURCES[k][0]}`: {summary.SOURCES[k][1]} |" for k, v in figures.items()],
        "",
    ]


def _spread(p: dict[str, float] | None) -> str:
    """p50 / p99 / max of a step's times, or - when it had none (or ran before they were kept)."""
    if not p or not p.get("n"):
        return "-"
    return f"{p['p50']:.0f} / {p['p99']:.0f} / {p['max']:.0f}"


def _climb(climb: dict[str, Any] | None) -> str:
    """How busy the machine was while a step's calls were set up, or - when not measured."""
    if not climb or climb.get("machine_busy") is None:
        return "-"
    cores = climb.get("cores", {})
    return (f"{climb['machine_busy']:.0%}, {cores.get('pbx', 0):.2f} / {cores.get('load_generator', 0):.2f}")


def _late_calls(conc: list[dict[str, Any]]) -> list[str]:
    """For each step with calls answered after the limit: when they were dialed and where
    their time went, so a stall can be told from a slow decision."""
    lines = []
    for s in conc:
        late = s.get("late")
        if not late:
            continue
        lines += [
            f"The {s['calls']} step's {late['calls']} calls answered late were dialed "
            f"{late['dialed_from_s']:g} to {late['dialed_to_s']:g} s after its first; the callee's INVITE came "
            f"{_spread(late['setup_ms'])} ms (p50 / p99 / max) after theirs, and the caller's 200 "
            f"{_spread(late['callee_answer_to_caller_answer_ms'])} ms after the callee's.",
            "",
        ]
    return lines


def _held_any(results: dict[str, Any]) -> str:
    """A larger step that passed after a smaller one failed (the machine at its edge), said."""
    held, held_any = results["max_concurrent"], results.get("max_concurrent_any", results["max_concurrent"])
    if held_any <= held:
        return ""
    failed = next(s for s in results["concurrency"] if s["calls"] > held)
    why = ", ".join(f"{n} {reason}" for reason, n in (failed.get("failures") or {}).items()) or "no two-way audio"
    return (f"; the {failed['calls']} step failed ({why}) and a larger step, {held_any}, passed: the machine is at "
            f"its edge there")


def write(results: dict[str, Any], out: Path) -> Path:
    """The report (README.md), its plots, results.json and summary.json, in `out`. Its
    comparison is against `out`/before.json when there is one."""
    out.mkdir(parents=True, exist_ok=True)
    before = _before(out)
    plots(results, out, before)
    runs = earlier_runs(out, results)  # (before results.json is written again)
    (out / RUNS).write_text(json.dumps({"code commit": summary.dig(results, "machine", "code commit"),
                                        "runs": runs}, indent=1) + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    sizes, soak = summary.read(out / "sizes.json"), summary.read(out / "soak.json")
    figures = summary.write(results, sizes, soak, out)
    aimed = targets(results, figures, *summary.usable(results, sizes, soak))
    d = results["delay"]
    api = results["sessions"]
    ramp = results["ramp"]
    conc = results["concurrency"]
    lines = [
        "# maskbridge benchmark",
        "",
        f"Run on {results['started']} ({results['mode']} run, {results['seconds']:.0f} s). "
        "Produced by `make bench`; the raw figures are in `results.json`, the headline figures in "
        "`summary.json`.",
        "",
        "Everything ran on this one machine: Postgres, the PBX (Asterisk) and the bridge, and SIPp "
        "(`sip-tester`) as the carrier's phones: one SIPp places every call from the trunk's address, "
        "as the carrier does, another answers every leg the PBX sends to the trunk; both send a tone "
        "over RTP for as long as the call lasts (the caller 600 Hz, the callee 1000 Hz). SIPp still "
        "shares the cores with what it measures, so the rates are a floor for a machine that carries "
        "the PBX alone; CPU per call (below) is the figure that carries over.",
        "",
        "| | |",
        "| --- | --- |",
        *[f"| {k} | {v} |" for k, v in results["machine"].items()],
        "",
        "## In short",
        "",
        f"- The bridge adds **{_ms(d['added'], 'p50')} ms** of post-dial delay at the median "
        f"(p95 {_ms(d['added'], 'p95')}, p99 {_ms(d['added'], 'p99')} ms) over plain Asterisk routing the same call.",
        f"- Highest call rate sustained: bridge **{results['sustained']['bridge']}** calls/s, dialplan baseline "
        f"**{results['sustained']['baseline']}** calls/s.",
        *_floor_headline(results),
        f"- CPU per bridged call: bridge {results['cpu']['bridge']['cpu_ms_per_call']['bridge']:.2f} ms, PBX "
        f"{results['cpu']['bridge']['cpu_ms_per_call']['pbx']:.2f} ms (baseline path: "
        f"{results['cpu']['baseline']['cpu_ms_per_call']['pbx']:.2f} ms), Postgres "
        f"{results['cpu']['bridge']['cpu_ms_per_call']['postgres']:.2f} ms: **"
        f"{_num(results['cpu']['bridge']['calls_per_second_per_core'], '{:.0f}')}** bridged calls/s per core "
        f"({_num(results['cpu']['baseline']['calls_per_second_per_core'], '{:.0f}')} on the dialplan path).",
        *_split_headline(results["cpu"]),
        f"- Simultaneous bridged calls held with two-way audio, all ending normally (at that step and every "
        f"smaller one): **{results['max_concurrent']}**{_held_any(results)}.",
        f"- Session API: **{api['creates_per_second']:.0f}** creates/s; the routing query takes "
        f"{_ms(results['route_sql'], 'p50')} ms at the median and {_ms(results['route_sql'], 'p99')} ms at p99 "
        "inside Postgres under load.",
        "",
        *_targets_section(aimed),
        *_runs_section(aimed, runs, results),
        *_comparison(results, before),
        "## Added post-dial delay",
        "",
        f"{d['calls']} calls, each path at {d['rate']:g} calls/s ({_num(d.get('offered'), '{:g}')} calls/s in "
        "all), alternating the bridge (courier dials the pool "
        "number; the bridge routes it over ARI) and the baseline (the PBX's dialplan alone Dials the "
        "same kind of callee with the same caller ID). Delay: from the caller's INVITE leaving SIPp's "
        "caller to the callee's INVITE reaching SIPp's callee, both stamped by the kernel as they cross "
        f"the loopback (one capture, one clock). Calls that failed: {d['failed']}"
        + (f" ({', '.join(f'{k}: {v}' for k, v in d['failures'].items())})" if d.get("failures") else "") + ".",
        "",
        "| path | n | p50 | p95 | p99 | max |",
        "| --- | --- | --- | --- | --- | --- |",
        *[
            f"| {name} | {p['n']} | {_ms(p, 'p50')} | {_ms(p, 'p95')} | {_ms(p, 'p99')} | {_ms(p, 'max')} |"
            for name, p in (
                ("baseline", d["baseline"]), ("bridge", d["bridge"]), ("difference, call by call", d["added"])
            )
        ],
        "",
        "The difference row pairs each bridge call with the baseline call placed just before it. "
        "Before the bridge's INVITE leaves, three round trips follow each other: one statement "
        "looks the route up and writes the call's row (its commit does not wait for the disk: the "
        "call's next write does); then, at the same time, the row says whom the call rings (and "
        "whether the session's caps let it), the bridge is made and the new leg is created; once "
        "the new leg is in Stasis, both legs join the bridge and the leg is dialed, in one write on "
        "one connection, which Asterisk serves in turn (the dial once the join is done; the caller's "
        "leg then forgets its caller's identity, in the same write). (Before issue 14 there were "
        "eight, one after the other: the lookup, the row, the bridge, the caller joining it, the new "
        "leg, the row again, the leg joining it, and the dial.) Not measured by this run: timed "
        "once in an instrumented build (150 calls at 20 calls/s, commit edf2c55, before the lookup's "
        "commit stopped waiting for the disk, medians): the lookup and the row 2.95 ms (the "
        "statement 2.7 ms seen from the bridge, about 1 ms of it executing inside Postgres, 0.5 ms "
        "the commit's wait for the disk); the three at once 2.9 ms (the new leg 1.8 ms, the bridge "
        "0.7 ms, the row 1.6 ms); the join and the dial 2.0 ms. Each step costs a loopback round trip "
        "plus the work at both ends, and a queue "
        "behind the other calls' work in the bridge's one event loop; the rest of the "
        "difference is Asterisk's own: taking the call into Stasis and telling the bridge, "
        "making the new leg and its StasisStart (about 1.5 ms together, kernel stamps), and "
        "building the INVITE once dialed (0.5 to 1.4 ms).",
        "",
        *_hops(results.get("hops")),
        "![delay](delay.png)",
        "",
        "## Throughput",
        "",
        f"Each step offers calls at a fixed rate for {results['params']['ramp_seconds']:g} s; each call is "
        "answered at once, talks "
        f"{results['params']['hold']:g} s with audio both ways and is hung up by the caller. A call succeeds "
        "when the callee's INVITE arrived and the caller was answered within 3 s of dialing, and both legs "
        "ended normally (the caller's BYE answered, the PBX's BYE to the callee answered). A path stops at "
        "its first step under 99 %; a step is sustained when at least 99 % succeeded and the calls listened "
        "to had audio both ways. *Achieved* is the rate SIPp really offered (from its INVITEs on the "
        "wire); a step it could not offer (under 95 % of the target) does not count as sustained. In each "
        f"step {results['params'].get('ramp_sample', 0)} call(s) are listened to on the wire for half their "
        "talk time: *two-way audio* gives the share of the other side's tone each side heard (caller/callee). "
        "A 503 comes from the bridge (it sheds a new call when "
        f"{ROUTING_LIMIT} are already waiting for their route lookup, bridge.calls.flood, or fails a call it "
        "cannot set up) or from the PBX (more calls from the trunk than MB_PBX_MAX_CALLS; on UDP an overloaded "
        "PBX ignores new requests, and SIPp sends them again). The calls the bridge shed are counted from its "
        "/metrics in each of its steps (*calls the bridge shed*; in runs since aaab3b9).",
        "",
        "| rate (calls/s) | achieved | path | calls | succeeded | dial to callee's INVITE p50 / p99 (ms) | "
        "two-way audio | failures |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
        *[
            f"| {s['rate']:g} | {_num(s['achieved'], '{:.0f}')} | {s['path']} | {s['calls']} | "
            f"{100 * s['success']:.1f} % | {_ms(s['setup_ms'], 'p50')} / {_ms(s['setup_ms'], 'p99')} | "
            f"{'-' if s.get('audio_ok') is None else ('yes' if s['audio_ok'] else 'NO')}"
            f"{_shares(s.get('tone_shares'))} | "
            f"{_step_failures(s)} |"
            for s in ramp
        ],
        "",
        f"Highest rate sustained (>= 99 %): bridge **{results['sustained']['bridge']}** calls/s, "
        f"baseline **{results['sustained']['baseline']}** calls/s"
        + (" (the top of the ramp: neither path failed)." if results["sustained"]["top"] else "."),
        "",
        "![ramp](ramp.png)",
        "",
        *_floor_section(results),
        *_cpu_section(results),
        "## Simultaneous calls",
        "",
        "Bridged calls are set up and held, step by step; once all of a step's calls are up, "
        f"{results['params']['sample']} of them are listened to for {results['params']['listen_seconds']:g} s "
        "on the wire (the RTP the PBX sends to each side, decoded): the caller must hear the callee's "
        "1000 Hz tone and the callee the caller's 600 Hz (share of energy > 0.5 each; caller/callee below).",
        "",
        "| calls held | established | two-way audio (tone shares, caller/callee) | "
        "set up within 3 s and ended normally | callee's INVITE after, p50 / p99 / max (ms) | "
        "answered after, p50 / p99 / max (ms) | while setting up: machine busy, PBX / SIPp's callee cores | "
        "bridge RSS (MiB) | PBX RSS (MiB) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        *[
            f"| {s['calls']} | {s['established']} | "
            f"{'-' if s['audio_ok'] is None else ('yes' if s['audio_ok'] else 'NO')}"
            f"{_shares(s.get('tone_shares'))} | "
            f"{s.get('ended_ok', '-')} | {_spread(s.get('setup_ms'))} | {_spread(s.get('answer_ms'))} | "
            f"{_climb(s.get('climb'))} | "
            f"{(s['bridge_mb'] or 0):.0f} | {(s['pbx_mb'] or 0):.0f} |"
            for s in conc
        ],
        "",
        *_late_calls(conc),
        f"Held with two-way audio and every call ending normally, at that step and every smaller one: "
        f"**{results['max_concurrent']}** simultaneous calls"
        + (" (the largest step tried)" if results["concurrency_top"] else "") + _held_any(results) + ".",
        "",
        "![memory](memory.png)",
        "",
        *_soak_section(soak),
        "## The session API",
        "",
        f"{api['sessions']} sessions opened over HTTP, {api['concurrency']} at a time: "
        f"**{api['creates_per_second']:.0f} creates/s** (request latency p50 {_ms(api['latency_ms'], 'p50')} ms, "
        f"p99 {_ms(api['latency_ms'], 'p99')} ms). Session opens as the data grows (10,000 pool numbers, up to "
        "1,000,000 past participants) are measured apart by `make bench-sizes` ([sizes.md](sizes.md)).",
        "",
        "Route lookup, the bridge's decision for an incoming call, measured two ways during the "
        "delay and throughput runs:",
        "",
        "| measured | n | p50 (ms) | p99 (ms) | max (ms) |",
        "| --- | --- | --- | --- | --- |",
        f"| the routing query inside Postgres (EXPLAIN ANALYZE, every 50 ms during the ramp) | "
        f"{results['route_sql']['n']} | {_ms(results['route_sql'], 'p50')} | {_ms(results['route_sql'], 'p99')} | "
        f"{_ms(results['route_sql'], 'max')} |",
        f"| the whole decision, timed inside the bridge, every call | {results['route']['n']} | "
        f"{_ms(results['route'], 'p50')} | {_ms(results['route'], 'p99')} | {_ms(results['route'], 'max')} |",
        "",
        "The second includes every wait of the bridge's event loop and connection pool: under a "
        "load that saturates the machine it measures queueing, not the lookup.",
        "",
        *_summary_section(figures),
    ]
    report = out / "README.md"
    report.write_text("\n".join(lines))
    return report
