"""Session opens and the route lookup as the data grows (issue 14: "it must stay flat").

    python -m bench.sizes [--tiny] [--out DIR]

In a database of its own on the local stack's Postgres (the stack's data is not touched):
a pool of --numbers pool numbers, then past participants (closed sessions, their people
left long ago) added up to each size of --sizes; at each size, --opens session opens through
the session service (bridge.sessions: the allocator and its SQL, no HTTP), 32 in flight, and
the route lookup of every call (bridge.store.sessions.ROUTE_SQL) timed inside Postgres
(EXPLAIN ANALYZE's execution time) for a sample of the participants just opened. Writes
sizes.json, sizes.md and sizes.png to --out (default docs/bench).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import asyncpg

from bench import measure, report
from bridge import logs
from bridge.crypto import NumberVault
from bridge.devstack import postgres
from bridge.devstack.settings import PROJECT_DIR, Stack, load
from bridge.pools import Pools
from bridge.requests import OpenSession, parse
from bridge.sessions import Policy, Sessions
from bridge.store import Store, connect, migrate
from bridge.store.sessions import ROUTE_SQL

DATABASE = "maskbridge_bench_sizes"
KEY = "bench-sizes-key-bench-sizes-key-0123456789"
FULL: dict[str, Any] = {"numbers": 10_000, "sizes": [10_000, 100_000, 1_000_000], "opens": 2000, "in_flight": 32,
                        "lookups": 300}
TINY: dict[str, Any] = {"numbers": 50, "sizes": [200, 1000], "opens": 40, "in_flight": 8, "lookups": 10}
BATCH = 50_000  # past sessions per statement


async def add_past_participants(pool: asyncpg.Pool, numbers: list[str], have: int, want: int) -> None:
    """Closed sessions of long ago, two participants each (who left; numbers sealed as
    random bytes: nobody opens them here), until `want` participants are in the table."""
    start = have // 2
    for first in range(start, want // 2, BATCH):
        last = min(first + BATCH, want // 2) - 1
        await pool.execute(
            """
            WITH s AS (
                INSERT INTO sessions (order_id, pool_number, status, created_at, expires_at, closed_at, end_reason)
                SELECT 'past-' || g, ($1::text[])[1 + g % array_length($1::text[], 1)], 'closed',
                       now() - interval '20 days', now() - interval '19 days', now() - interval '19 days', 'closed'
                FROM generate_series($2::int, $3::int) g
                RETURNING id, pool_number
            )
            INSERT INTO participants (session_id, role, number_idx, number_enc, pool_number, joined_at, left_at,
                                      holds, held_until)
            SELECT s.id, r.role, decode(md5(random()::text) || md5(random()::text), 'hex'),
                   decode(md5(random()::text) || md5(random()::text), 'hex'), s.pool_number,
                   now() - interval '20 days', now() - interval '19 days', false, now() - interval '18 days'
            FROM s CROSS JOIN (VALUES ('courier'), ('client')) AS r(role)
            """,
            numbers, first, last, timeout=3600,
        )
    await pool.execute("ANALYZE", timeout=3600)


async def opens(sessions: Sessions, count: int, in_flight: int, run: str) -> tuple[dict[str, Any], list[str]]:
    """`count` opens of new pairs, `in_flight` at a time: opens per second, latency, and the
    couriers' numbers (for the route lookups)."""
    gate = asyncio.Semaphore(in_flight)
    latencies: list[float] = []
    couriers: list[str] = []

    async def one(i: int) -> None:
        courier, client = f"+7926{random.randrange(10**7):07d}", f"+7936{random.randrange(10**7):07d}"
        request = parse(OpenSession, {"order_id": f"{run}-{i}", "courier_number": courier, "client_number": client})
        async with gate:
            began = time.perf_counter()
            await sessions.open(request)
            latencies.append(time.perf_counter() - began)
        couriers.append(courier)

    began = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(count)))
    spent = time.perf_counter() - began
    return {"opens": count, "per_second": count / spent,
            "latency_ms": measure.percentiles([x * 1000 for x in latencies])}, couriers


async def route_lookups(pool: asyncpg.Pool, vault: NumberVault, couriers: list[str], count: int) -> dict[str, float]:
    """ROUTE_SQL for a sample of the couriers just opened, timed inside Postgres (ms)."""
    times: list[float] = []
    for courier in random.sample(couriers, min(count, len(couriers))):
        idx = vault.index(courier)
        pool_number = await pool.fetchval(
            "SELECT pool_number FROM participants WHERE number_idx = $1 AND left_at IS NULL", idx)
        plan = await pool.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) {ROUTE_SQL}", idx, pool_number)
        times.append(float(json.loads(plan)[0]["Execution Time"]))
    return measure.percentiles(times)


async def run(stack: Stack, params: dict[str, Any]) -> dict[str, Any]:
    url = postgres.fresh_database(stack, DATABASE)
    results: dict[str, Any] = {"started": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                               "params": params, "machine": report.machine(stack), "steps": []}
    pool = await connect(url, max_size=params["in_flight"] + 2, command_timeout=None)
    try:
        vault = NumberVault(KEY)
        await migrate(pool, vault)
        store = Store(pool)
        policy = Policy(pair_cooloff=3600, number_cooling=3600)
        numbers = [f"+7495{n:07d}" for n in range(1, params["numbers"] + 1)]
        await Pools(store, policy).import_numbers(
            [{"number": n, "region": ("RU-MOW", "RU-SPE")[i % 2]} for i, n in enumerate(numbers)])
        sessions = Sessions(store, vault, policy)
        have = 0
        for size in params["sizes"]:
            print(f"bench.sizes: {size} past participants", file=sys.stderr)
            began = time.perf_counter()
            await add_past_participants(pool, numbers, have, size)
            have = size
            loaded = time.perf_counter() - began
            opened, couriers = await opens(sessions, params["opens"], params["in_flight"], f"open-{size}")
            lookups = await route_lookups(pool, vault, couriers, params["lookups"])
            participants = await pool.fetchval("SELECT count(*) FROM participants")
            results["steps"].append({"past_participants": size, "participants": participants, "load_seconds": loaded,
                                     "opens": opened, "route_lookup_ms": lookups})
    finally:
        await pool.close()
        postgres.drop_database(stack, DATABASE)
    return results


def write(results: dict[str, Any], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    (out / "sizes.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    steps = results["steps"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    sizes = [s["past_participants"] for s in steps]
    left.plot(sizes, [s["opens"]["per_second"] for s in steps], marker="o")
    left.set(xscale="log", xlabel="past participants", ylabel="session opens per second",
             title=f"Opens ({results['params']['in_flight']} in flight)")
    left.set_ylim(bottom=0)
    right.plot(sizes, [s["opens"]["latency_ms"].get("p99", 0) for s in steps], marker="o", label="open p99")
    right.plot(sizes, [s["route_lookup_ms"].get("p99", 0) for s in steps], marker="o", label="route lookup p99")
    right.set(xscale="log", yscale="log", xlabel="past participants", ylabel="ms", title="Latency")
    right.legend()
    fig.tight_layout()
    fig.savefig(out / "sizes.png", dpi=100)
    plt.close(fig)
    lines = [
        "# Session opens and the route lookup as the data grows",
        "",
        f"Run {results['started']} on {results['machine']['cpu']} (commit {results['machine']['maskbridge commit']}): "
        f"a pool of {results['params']['numbers']} numbers; at each size, {results['params']['opens']} opens of new "
        f"pairs through the session service, {results['params']['in_flight']} in flight (no HTTP), and the route "
        "lookup timed inside Postgres (EXPLAIN ANALYZE) for a sample of them.",
        "",
        "| past participants | opens/s | open p50 ms | open p99 ms | route lookup p50 ms | route lookup p99 ms |",
        "| --- | --- | --- | --- | --- | --- |",
        *(f"| {s['past_participants']:,} | {s['opens']['per_second']:.0f}"
          f" | {s['opens']['latency_ms'].get('p50', 0):.1f} | {s['opens']['latency_ms'].get('p99', 0):.1f}"
          f" | {s['route_lookup_ms'].get('p50', 0):.2f} | {s['route_lookup_ms'].get('p99', 0):.2f} |" for s in steps),
        "",
        "![opens and lookups against size](sizes.png)",
        "",
    ]
    path = out / "sizes.md"
    path.write_text("\n".join(lines))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sizes")
    parser.add_argument("--tiny", action="store_true", help="a smoke run: small sizes, a few opens")
    parser.add_argument("--out", type=Path, default=PROJECT_DIR / "docs" / "bench")
    args = parser.parse_args(argv)
    logs.configure("warning")
    results = asyncio.run(run(load(), TINY if args.tiny else FULL))
    print(f"bench.sizes: report written to {write(results, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
