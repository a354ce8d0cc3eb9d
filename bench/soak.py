"""The leak check: calls at a steady rate for a long time (`make bench SOAK=1800`), watching
what a leak would grow: the bridge's memory, Postgres connections, the PBX's channels and
bridges, and call rows left open. Read at the start, every few seconds, and at the end
once the last call ended; the report shows what was left behind and how memory moved.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import asyncpg

from bench import cpu, load, measure, report, sipp
from bridge.devstack.settings import Stack

FULL: dict[str, Any] = {"rate": 20.0, "hold": 3.0, "every": 30.0, "sessions": 200}
TINY: dict[str, Any] = {"rate": 2.0, "hold": 0.5, "every": 2.0, "sessions": 6}
SETTLE_SECONDS = 30.0  # after the last call, at most, for the PBX to let its channels go


async def sample(stack: Stack, pids: cpu.Pids, db: asyncpg.Connection, t0: float) -> dict[str, Any]:
    counts = await cpu.pbx_counts(stack)
    return {
        "t": time.monotonic() - t0,
        "bridge_rss_mb": measure.rss_mb(pids.bridge),
        "pbx_rss_mb": measure.rss_mb(pids.pbx),
        "pg_connections": await db.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid <> pg_backend_pid() "
                                            "AND backend_type = 'client backend'"),
        "channels": counts["channels"],
        "bridges": counts["bridges"],
        "open_calls": await db.fetchval("SELECT count(*) FROM calls WHERE state <> 'ended'"),
    }


async def run(stack: Stack, params: dict[str, Any], out: Path) -> Path:
    """Bridged calls at params['rate'] per second for params['seconds'], each talking
    params['hold'] seconds with audio both ways; writes OUT/soak.json and OUT/soak.png."""
    token = measure.run_id()
    pairs, _ = await measure.open_sessions(stack, params["sessions"], 8, token)
    pids = cpu.Pids.of(stack)
    db = await asyncpg.connect(stack.database_url)
    t0 = time.monotonic()
    result: dict[str, Any] = {
        "started": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "params": params, "samples": [],
        "machine": report.machine(stack),
    }
    try:
        result["start"] = await sample(stack, pids, db, t0)
        count = max(1, int(params["rate"] * params["seconds"]))
        routes = [pairs.bridge[i % len(pairs.bridge)] for i in range(count)]
        with sipp.phones(stack, load.work_dir(stack)) as (phones, _callee):
            runner = asyncio.create_task(asyncio.to_thread(
                sipp.caller_run, phones, [(r.caller, r.dialed) for r in routes], params["rate"],
                int(params["hold"] * 1000), "soak"))
            while not runner.done():
                await asyncio.wait({runner}, timeout=params["every"])
                result["samples"].append(await sample(stack, pids, db, t0))
                print(f"bench: soak {result['samples'][-1]}", file=sys.stderr)
            run = runner.result()
        result["calls"] = {"placed": count, "successful": run.successful, "failed": run.failed,
                           "load_generator_exit": run.returncode}
        deadline = time.monotonic() + SETTLE_SECONDS
        while True:  # the last calls' channels go within moments of their BYE
            end = await sample(stack, pids, db, t0)
            if (end["channels"] <= result["start"]["channels"] and end["open_calls"] <= result["start"]["open_calls"]) \
                    or time.monotonic() >= deadline:
                break
            await asyncio.sleep(1)  # wait-ok: polling the PBX for the last channels to go
        result["end"] = end
    finally:
        await db.close()
        await measure.close_sessions(stack, token, params["sessions"])
    s, e = result["start"], result["end"]
    result["leaked"] = {k: max(0, e[k] - s[k]) for k in ("channels", "bridges", "open_calls", "pg_connections")}
    result["rss_growth_mb"] = (e["bridge_rss_mb"] or 0) - (s["bridge_rss_mb"] or 0)
    result["rss_slope_mb_per_hour"] = slope_second_half(result["samples"])
    save(result, out)
    return out / "soak.json"


def save(result: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(result, indent=1))
    plot(result, out)


def slope_second_half(samples: list[dict[str, Any]], key: str = "bridge_rss_mb") -> float | None:
    """A process's memory trend over the second half of the soak (MB per hour, least
    squares; the bridge's unless `key` names another): what is left once it has warmed up."""
    half = [(x["t"], x[key]) for x in samples[len(samples) // 2:] if x.get(key) is not None]
    if len(half) < 3:
        return None
    n = len(half)
    mt = sum(t for t, _ in half) / n
    mr = sum(r for _, r in half) / n
    var = sum((t - mt) ** 2 for t, _ in half)
    return sum((t - mt) * (r - mr) for t, r in half) / var * 3600 if var else None


def plot(result: dict[str, Any], out: Path) -> None:
    from bench.report import plt

    samples = [result["start"], *result["samples"], result["end"]]
    t = [x["t"] / 60 for x in samples]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    top.plot(t, [x["bridge_rss_mb"] or 0 for x in samples], marker=".", label="bridge RSS (MiB)")
    top.plot(t, [x.get("pbx_rss_mb") or 0 for x in samples], marker=".", label="PBX RSS (MiB)")
    top.set_ylabel("MiB")
    top.set_title(f"Soak: {result['params']['rate']:g} calls/s for {result['params']['seconds'] / 60:.0f} min")
    top.legend()
    for key, label in (("channels", "PBX channels"), ("bridges", "PBX bridges"),
                       ("pg_connections", "Postgres connections"), ("open_calls", "open call rows")):
        bottom.plot(t, [x[key] for x in samples], marker=".", label=label)
    bottom.set_xlabel("minutes")
    bottom.set_ylabel("count")
    bottom.legend()
    fig.tight_layout()
    fig.savefig(out / "soak.png", dpi=100)
    plt.close(fig)
