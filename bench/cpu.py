"""CPU seconds and state of the stack's processes, read from /proc and the PBX's ARI.

CPU per call is what carries from this shared 2-core machine to a real server: the seconds
each process spent (user + system, /proc/<pid>/stat) over a window of steady load, less
what it spends idle, divided by the calls of the window.
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from bench.measure import asterisk_pid, rss_mb
from bridge.devstack import processes
from bridge.devstack.settings import Stack

_TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return text[text.rindex(")") + 2:].split()  # fields from the third (state) on


def process_seconds(pid: int | None, children: bool = False) -> float:
    """utime + stime of a process (all its threads); with `children`, plus the children it
    has waited for (a Postgres backend that exited is counted by its postmaster)."""
    fields = _stat(pid) if pid is not None else None
    if fields is None:
        return 0.0
    ticks = int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    if children:
        ticks += int(fields[13]) + int(fields[14])  # cutime, cstime
    return ticks / _TICK


def postmaster_pid(stack: Stack) -> int | None:
    try:
        return int((stack.pg_dir / "postmaster.pid").read_text().split("\n", 1)[0])
    except (FileNotFoundError, ValueError):
        return None


def postgres_seconds(stack: Stack) -> float:
    """Every process of the stack's Postgres cluster: the postmaster, the children it has
    reaped, and every live child (backends, checkpointer, walwriter, ...)."""
    master = postmaster_pid(stack)
    if master is None:
        return 0.0
    total = process_seconds(master, children=True)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat(int(entry))
            if fields is not None and int(fields[1]) == master:  # ppid
                total += (int(fields[11]) + int(fields[12])) / _TICK
    return total


@dataclass(frozen=True)
class Pids:
    bridge: int | None
    pbx: int | None

    @classmethod
    def of(cls, stack: Stack) -> "Pids":
        return cls(processes.bridge_pid(stack), asterisk_pid(stack, "pbx"))


def snapshot(stack: Stack, pids: Pids, load_generator: int | None) -> dict[str, float]:
    """CPU seconds so far of the bridge, the PBX, Postgres (the whole cluster) and the
    long-running part of the load generator (SIPp's callee)."""
    return {
        "bridge": process_seconds(pids.bridge),
        "pbx": process_seconds(pids.pbx),
        "postgres": postgres_seconds(stack),
        "load_generator": process_seconds(load_generator),
    }


def _machine_ticks() -> list[int] | None:
    """The whole machine's CPU ticks so far, every CPU (/proc/stat's first line: user nice
    system idle iowait irq softirq steal); None where it cannot be read."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    return [int(f) for f in fields[1:9]] if len(fields) > 8 and fields[0] == "cpu" else None


def steal_seconds() -> float | None:
    """CPU time the hypervisor took from this machine so far, all CPUs (/proc/stat: steal);
    None where it cannot be read."""
    ticks = _machine_ticks()
    return None if ticks is None else ticks[7] / _TICK


def machine_seconds() -> tuple[float, float] | None:
    """(busy, all) CPU seconds of the whole machine so far, every CPU (all but idle and
    iowait are busy); None where it cannot be read."""
    ticks = _machine_ticks()
    if ticks is None:
        return None
    return (sum(ticks) - ticks[3] - ticks[4]) / _TICK, sum(ticks) / _TICK


def since(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before[k] for k in before}


# --- state the soak watches --------------------------------------------------------------------


async def pbx_counts(stack: Stack) -> dict[str, int]:
    """Channels and bridges the PBX holds now (ARI)."""
    e = stack.env
    base = f"http://{e['MB_ARI_BIND']}:{e['MB_ARI_PORT']}/ari"
    credentials = base64.b64encode(f"{e['MB_ARI_USER']}:{e['MB_ARI_PASSWORD']}".encode()).decode()
    headers = {"Authorization": f"Basic {credentials}"}
    async with aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=10)) as http:
        out = {}
        for what in ("channels", "bridges"):
            async with http.get(f"{base}/{what}") as resp:
                resp.raise_for_status()
                out[what] = len(await resp.json())
        return out


def bridge_rss_mb(pids: Pids) -> float | None:
    return rss_mb(pids.bridge)
