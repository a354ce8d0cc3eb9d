"""The benchmark's report: Markdown with the figures, PNG plots, and the raw results as JSON."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from bridge.devstack import postgres
from bridge.devstack.settings import PROJECT_DIR, Stack



def _shares(shares: list[float] | None) -> str:
    """" (0.91, 0.88)": the tone shares of a step's audio samples, or nothing."""
    return " (" + ", ".join(f"{x:.2f}" for x in shares) + ")" if shares else ""

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
    }


def _ms(p: dict[str, Any], key: str) -> str:
    return f"{p[key]:.1f}" if key in p else "-"


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


def plots(results: dict[str, Any], out: Path) -> list[str]:
    delay, ramp, memory = results["delay"], results["ramp"], results["concurrency"]
    top = max(delay["bridge_ms"] + delay["baseline_ms"] + [1.0])
    bins = [top * i / 40 for i in range(41)]

    def delays(ax: Any) -> None:
        ax.hist(delay["baseline_ms"], bins=bins, alpha=0.6, label="baseline: dialplan Dial")
        ax.hist(delay["bridge_ms"], bins=bins, alpha=0.6, label="bridge: ARI")

    def success(ax: Any) -> None:
        for path in ("bridge", "baseline"):
            steps = [s for s in ramp if s["path"] == path]
            ax.plot([s["rate"] for s in steps], [100 * s["success"] for s in steps], marker="o", label=path)
        ax.axhline(99, color="grey", linestyle="--", linewidth=1)

    def rss(ax: Any) -> None:
        calls = [s["calls"] for s in memory]
        ax.plot(calls, [s["bridge_mb"] or 0 for s in memory], marker="o", label="bridge (Python)")
        ax.plot(calls, [s["pbx_mb"] or 0 for s in memory], marker="o", label="PBX (Asterisk)")

    return [
        _figure(out, "delay.png", f"Post-dial delay at {delay['rate']:g} calls/s, paths alternating",
                "post-dial delay, INVITE out to INVITE in at the carrier (ms)", "calls", delays),
        _figure(out, "ramp.png", "Throughput ramp", "offered call rate (calls/s)", "calls that succeeded (%)", success),
        _figure(out, "memory.png", "Memory against simultaneous calls", "simultaneous bridged calls",
                "resident memory (MiB)", rss),
    ]


def write(results: dict[str, Any], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    plots(results, out)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    d = results["delay"]
    api = results["sessions"]
    ramp = results["ramp"]
    conc = results["concurrency"]
    lines = [
        "# maskbridge benchmark",
        "",
        f"Run on {results['started']} ({results['mode']} run, {results['seconds']:.0f} s). "
        "Produced by `make bench`; the raw figures are in `results.json`.",
        "",
        "Everything ran on this one machine: Postgres, the PBX (Asterisk), the bridge, and the "
        "simulated carrier (a second Asterisk plus its Python driver), which places and answers "
        "every call with real SIP and RTP. The load generator competes with what it measures for "
        "the same cores, so the rates are a floor for a machine that carries the PBX alone.",
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
        f"- Simultaneous bridged calls held with audio flowing, all ending normally: **{results['max_concurrent']}**.",
        f"- Session API: **{api['creates_per_second']:.0f}** creates/s; the routing query takes "
        f"{_ms(results['route_sql'], 'p50')} ms at the median and {_ms(results['route_sql'], 'p99')} ms at p99 "
        "inside Postgres under load.",
        "",
        "## Added post-dial delay",
        "",
        f"{d['calls']} calls at {d['rate']:g} calls/s, alternating the bridge (courier dials the pool "
        "number; the bridge routes it over ARI) and the baseline (the PBX's dialplan alone Dials the "
        "same kind of callee with the same caller ID). Delay: from the caller's INVITE leaving the "
        "carrier to the callee's INVITE reaching it, both stamped by the carrier's SIP log (ms). "
        f"Failed calls: {d['failed']}.",
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
        "Before the bridge's INVITE leaves, it runs the routing query, writes the call's row, and "
        "makes its ARI requests in turn (the caller's connected line, the bridge, the new leg, "
        "adding it, dialing), and waits for the new leg's StasisStart: each is a round trip on "
        "loopback, and they add up to the difference.",
        "",
        "![delay](delay.png)",
        "",
        "## Throughput",
        "",
        "Each step offers calls at a fixed rate for a few seconds; each call is answered, talks "
        f"{results['params']['hold']:g} s and is hung up by the caller. A call succeeds when both phones were "
        "when the other phone rang within 3 s of dialing, both phones answered and both legs ended "
        "normally. A path "
        "stops at its first step under 99 %. *Achieved* is the rate the load generator really "
        "offered; a step it could not offer (under 95 % of the target) does not count as sustained.",
        "",
        "| rate (calls/s) | achieved | path | calls | succeeded | dial to ring p50 / p99 (ms) | failures |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        *[
            f"| {s['rate']:g} | {s['achieved']:.0f} | {s['path']} | {s['calls']} | {100 * s['success']:.1f} % | "
            f"{_ms(s['setup_ms'], 'p50')} / {_ms(s['setup_ms'], 'p99')} | "
            f"{', '.join(f'{k}: {v}' for k, v in s['failures'].items()) or '-'} |"
            for s in ramp
        ],
        "",
        f"Highest rate sustained (>= 99 %): bridge **{results['sustained']['bridge']}** calls/s, "
        f"baseline **{results['sustained']['baseline']}** calls/s"
        + (" (the top of the ramp: neither path failed)." if results["sustained"]["top"] else "."),
        "",
        "![ramp](ramp.png)",
        "",
        "## Simultaneous calls",
        "",
        "Bridged calls are set up and held, step by step; at each step a sample of "
        f"{results['params']['sample']} callers records {results['params']['listen_seconds']} s of what it "
        "hears and must hear the callee's 1000 Hz tone (share of energy > 0.5).",
        "",
        "| calls held | established | audio flowing (tone share of each sample) | ended normally | "
        "bridge RSS (MiB) | PBX RSS (MiB) |",
        "| --- | --- | --- | --- | --- | --- |",
        *[
            f"| {s['calls']} | {s['established']} | "
            f"{'-' if s['audio_ok'] is None else ('yes' if s['audio_ok'] else 'NO')}"
            f"{_shares(s.get('tone_shares'))} | "
            f"{s.get('ended_ok', '-')} | {(s['bridge_mb'] or 0):.0f} | {(s['pbx_mb'] or 0):.0f} |"
            for s in conc
        ],
        "",
        f"Held with audio flowing and every call ending normally: **{results['max_concurrent']}** simultaneous calls"
        + (" (the largest step tried)." if results["concurrency_top"] else "."),
        "",
        "![memory](memory.png)",
        "",
        "## The session API",
        "",
        f"{api['sessions']} sessions opened over HTTP, {api['concurrency']} at a time: "
        f"**{api['creates_per_second']:.0f} creates/s** (request latency p50 {_ms(api['latency_ms'], 'p50')} ms, "
        f"p99 {_ms(api['latency_ms'], 'p99')} ms).",
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
    ]
    report = out / "README.md"
    report.write_text("\n".join(lines))
    return report
