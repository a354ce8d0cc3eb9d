"""Session opens and the route lookup as the data grows (issue 14: "it must stay flat").

    python -m bench.sizes [--tiny] [--out DIR]

In a database of its own on the local stack's Postgres (the stack's data is not touched):
a pool of --numbers pool numbers, then past participants (closed sessions, their people
left long ago) added up to each size of --sizes. At each size, after a few opens of each
kind not measured (the first on each connection), the first two of these taking turns three
times (the run of median opens/s is reported, with the opens/s of every run):
  * --opens session opens through the session service (bridge.sessions: the allocator and
    its SQL, no HTTP), --in-flight at a time;
  * --opens more through the HTTP API (POST /v1/sessions) of a second bridge process that
    serves this database, from a light client of our own (raw HTTP/1.1 on kept-alive
    connections, requests written beforehand), --in-flight connections, with a named token
    (bridge.tokens: looked up in the database by each request, as an order system's is);
  * the route lookup of every call (bridge.store.sessions.ROUTE_SQL) timed inside Postgres
    (EXPLAIN ANALYZE's execution time) for a sample of the participants just opened.
The CPU each phase took (this process, the bridge process, the stack's Postgres) is read
from /proc, per open, with the machine's load average: the machine may be shared. Writes
sizes.json (its "summary": the figures at the largest size), sizes.md and sizes.png to
--out (default docs/bench).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import secrets
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import asyncpg

from bench import measure, report
from bridge import logs
from bridge.crypto import NumberVault
from bridge.store.number_keys import NumberKeyRepo
from bridge.devstack import postgres
from bridge.devstack.settings import PROJECT_DIR, Stack, load
from bridge.pools import Pools
from bridge.requests import OpenSession, parse
from bridge.sessions import Policy, Sessions
from bridge.store import Store, connect, migrate
from bridge.store.sessions import ROUTE_SQL
from bridge.store.tokens import TokenRepo
from bridge.tokens import Tokens

DATABASE = "maskbridge_bench_sizes"
KEY = "bench-sizes-key-bench-sizes-key-0123456789"
FULL: dict[str, Any] = {"numbers": 10_000, "sizes": [10_000, 100_000, 1_000_000], "opens": 2000, "warmup": 200,
                        "repeats": 3, "in_flight": 32, "lookups": 300}
TINY: dict[str, Any] = {"numbers": 50, "sizes": [200, 1000], "opens": 40, "warmup": 8, "repeats": 1,
                        "in_flight": 8, "lookups": 10}
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
    # (What autovacuum would have done by then to a history that grew over months: else its
    # vacuum of the rows just loaded runs during the opens measured, and takes their CPU.)
    await pool.execute("VACUUM ANALYZE", timeout=3600)


def _cpu_seconds(pid: int) -> float:
    """user + system CPU of a process so far (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def postgres_pids(stack: Stack) -> Callable[[], list[int]]:
    """The stack's Postgres as it is when asked: its postmaster and every process it runs."""
    postmaster = int((stack.pg_dir / "postmaster.pid").read_text().split()[0])

    def pids() -> list[int]:
        return [postmaster, *map(int, Path(f"/proc/{postmaster}/task/{postmaster}/children").read_text().split())]
    return pids


class Cpu:
    """CPU per open of the processes of a phase (those that start during it counted whole),
    and the machine's load when it began."""

    def __init__(self, named: dict[str, Callable[[], list[int]]]) -> None:
        self.named = named
        self.load = os.getloadavg()[0]
        self.began = {name: {pid: _cpu_seconds(pid) for pid in pids()} for name, pids in named.items()}
        self.process_began = time.process_time()

    def per_open_ms(self, count: int) -> dict[str, float]:
        spent = {name: sum(_cpu_seconds(pid) - self.began[name].get(pid, 0.0) for pid in pids())
                 for name, pids in self.named.items()}
        spent["this process"] = time.process_time() - self.process_began
        return {"load_average_1m_at_start": self.load, **{name: 1000 * v / count for name, v in spent.items()}}


async def opens(sessions: Sessions, count: int, in_flight: int, run: str,
                cpu: dict[str, Callable[[], list[int]]]) -> tuple[dict[str, Any], list[str]]:
    """`count` opens of new pairs through the session service, `in_flight` at a time: opens
    per second, latency, CPU per open, and the couriers' numbers (for the route lookups)."""
    gate = asyncio.Semaphore(in_flight)
    latencies: list[float] = []
    couriers: list[str] = []
    requests = [(f"+7926{random.randrange(10**7):07d}", f"+7936{random.randrange(10**7):07d}") for _ in range(count)]

    async def one(i: int) -> None:
        courier, client = requests[i]
        request = parse(OpenSession, {"order_id": f"{run}-{i}", "courier_number": courier, "client_number": client})
        async with gate:
            began = time.perf_counter()
            await sessions.open(request)
            latencies.append(time.perf_counter() - began)
        couriers.append(courier)

    meter = Cpu(cpu)
    began = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(count)))
    spent = time.perf_counter() - began
    return {"opens": count, "per_second": count / spent,
            "latency_ms": measure.percentiles([x * 1000 for x in latencies]),
            "cpu_ms_per_open": meter.per_open_ms(count)}, couriers


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run of median opens/s, with every run's opens/s."""
    ordered = sorted(runs, key=lambda r: r["per_second"])
    return {**ordered[len(ordered) // 2], "per_second_of_each_run": [r["per_second"] for r in runs]}


@dataclass(frozen=True)
class Bridge:
    host: str
    port: int
    token: str
    pid: int


@contextlib.asynccontextmanager
async def bridge_process(stack: Stack, url: str, log: Path, token: str) -> AsyncIterator[Bridge]:
    """A second bridge (python -m bridge) on the bench's database, with the bench's number
    key, on a free port of the stack's API address and an ARI application of its own; the
    requests go with `token`, a named token (the kind an order system is given: each
    request looks it up in the database)."""
    host = stack.env["MB_API_BIND"]
    with socket.socket() as sock:
        sock.bind((host, 0))
        port = int(sock.getsockname()[1])
    env = {**os.environ, **stack.bridge_env(), "MB_DATABASE_URL": url, "MB_ARI_APP": "maskbridge-bench-sizes",
           "MB_API_PORT": str(port), "MB_API_TOKEN": secrets.token_urlsafe(24), "MB_NUMBER_KEY": KEY,
           "MB_WEBHOOK_URL": "",
           # (the per-token limits on, but above any rate measured here: their cost is on the path;
           # the conflict budget is taken by every open in flight, 32 here)
           "MB_API_RATE": "100000", "MB_API_BURST": "100000",
           "MB_API_CONFLICT_RATE": "100000", "MB_API_CONFLICT_BURST": "100000"}
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bridge", cwd=PROJECT_DIR, env=env,
            stdout=out, stderr=asyncio.subprocess.STDOUT, stdin=asyncio.subprocess.DEVNULL)
    try:
        async with asyncio.timeout(60):
            while True:
                if proc.returncode is not None:
                    raise RuntimeError(f"the bridge under test exited: see {log}")
                with contextlib.suppress(OSError):
                    status, _ = await _request(host, port, b"GET /healthz HTTP/1.1\r\nHost: bench\r\n\r\n")
                    if status == 200:
                        break
                await asyncio.sleep(0.2)  # (polling a process that is starting)
        yield Bridge(host, port, token, proc.pid)
    finally:
        await _stop(proc)


async def _stop(proc: asyncio.subprocess.Process) -> None:
    """SIGTERM; SIGKILL if it has not exited 15 s later."""
    proc.terminate()
    exited = asyncio.ensure_future(proc.wait())
    if not (await asyncio.wait([exited], timeout=15))[0]:
        proc.kill()
        await exited


async def _answer(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    return int(head.split(b" ", 2)[1]), await reader.readexactly(length)


async def _request(host: str, port: int, request: bytes) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(request)
        return await _answer(reader)
    finally:
        writer.close()


async def http_opens(bridge: Bridge, count: int, in_flight: int, run: str,
                     cpu: dict[str, Callable[[], list[int]]]) -> dict[str, Any]:
    """`count` POST /v1/sessions of new pairs on `in_flight` kept-alive connections: opens
    per second, latency, CPU per open. The client is raw HTTP/1.1 with every request written
    beforehand, so that it takes little of the CPU the bridge and Postgres need."""
    requests = []
    for i in range(count):
        body = json.dumps({"order_id": f"{run}-{i}", "courier_number": f"+7946{random.randrange(10**7):07d}",
                           "client_number": f"+7956{random.randrange(10**7):07d}"}).encode()
        requests.append(b"POST /v1/sessions HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer "
                        + bridge.token.encode() + b"\r\nContent-Type: application/json\r\nContent-Length: "
                        + str(len(body)).encode() + b"\r\n\r\n" + body)
    latencies: list[float] = []
    failures: list[tuple[int, bytes]] = []
    pending = iter(requests)

    async def connection() -> None:
        reader, writer = await asyncio.open_connection(bridge.host, bridge.port)
        try:
            for request in pending:
                began = time.perf_counter()
                writer.write(request)
                status, body = await _answer(reader)
                latencies.append(time.perf_counter() - began)
                if status != 201:
                    failures.append((status, body[:300]))
        finally:
            writer.close()

    meter = Cpu(cpu)
    began = time.perf_counter()
    await asyncio.gather(*(connection() for _ in range(in_flight)))
    spent = time.perf_counter() - began
    if failures:
        raise RuntimeError(f"{len(failures)} opens through the API failed, e.g. {failures[:2]}")
    return {"opens": count, "connections": in_flight, "per_second": count / spent,
            "latency_ms": measure.percentiles([x * 1000 for x in latencies]),
            "cpu_ms_per_open": meter.per_open_ms(count)}


async def route_lookups(pool: asyncpg.Pool, vault: NumberVault, couriers: list[str], count: int) -> dict[str, float]:
    """ROUTE_SQL for a sample of the couriers just opened, timed inside Postgres (ms), with
    nothing else running."""
    times = [await _lookup_ms(pool, idx, pool_number)
             for idx, pool_number in await lookup_targets(pool, vault, couriers, count)]
    return measure.percentiles(times)


async def _lookup_ms(pool: asyncpg.Pool, idx: bytes, pool_number: str) -> float:
    plan = await pool.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) {ROUTE_SQL}", idx, pool_number)
    return float(json.loads(plan)[0]["Execution Time"])


async def lookup_targets(pool: asyncpg.Pool, vault: NumberVault, couriers: list[str],
                         count: int) -> list[tuple[bytes, str]]:
    """(blind index, pool number) of a sample of the couriers just opened, for route lookups."""
    targets = []
    for courier in random.sample(couriers, min(count, len(couriers))):
        idx = vault.index(courier)
        pool_number = await pool.fetchval(
            "SELECT pool_number FROM participants WHERE number_idx = $1 AND left_at IS NULL", idx)
        targets.append((idx, pool_number))
    return targets


async def lookups_while(pool: asyncpg.Pool, targets: list[tuple[bytes, str]], done: asyncio.Event) -> list[float]:
    """ROUTE_SQL timed inside Postgres (ms), one every 50 ms until `done`: the lookup while
    the opens run (their locks, their writes, their CPU)."""
    times: list[float] = []
    while targets and not done.is_set():
        times.append(await _lookup_ms(pool, *random.choice(targets)))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), 0.05)  # the probe's own schedule
    return times


async def run(stack: Stack, params: dict[str, Any]) -> dict[str, Any]:
    url = postgres.fresh_database(stack, DATABASE)
    results: dict[str, Any] = {"started": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                               "params": params, "machine": report.machine(stack), "steps": [],
                               "api_db_connections": int(stack.env["MB_API_DB_CONNECTIONS"])}
    pool = await connect(url, max_size=params["in_flight"] + 2, command_timeout=None)
    try:
        vault = NumberVault(KEY, NumberKeyRepo(pool))
        await migrate(pool, vault)
        await vault.start()
        store = Store(pool)
        policy = Policy(pair_cooloff=3600, number_cooling=3600)
        numbers = [f"+7495{n:07d}" for n in range(1, params["numbers"] + 1)]
        await Pools(store, policy).import_numbers(
            [{"number": n, "region": ("RU-MOW", "RU-SPE")[i % 2]} for i, n in enumerate(numbers)])
        sessions = Sessions(store, vault, policy)
        in_postgres = postgres_pids(stack)
        have = 0
        _, token = await Tokens(TokenRepo(pool)).add("bench-sizes", ["sessions:write"])
        with tempfile.TemporaryDirectory() as tmp:
            async with bridge_process(stack, url, Path(tmp) / "bridge.log", token) as bridge:
                for size in params["sizes"]:
                    print(f"bench.sizes: {size} past participants", file=sys.stderr)
                    began = time.perf_counter()
                    await add_past_participants(pool, numbers, have, size)
                    have = size
                    loaded = time.perf_counter() - began
                    # (Not measured: the first opens on each connection of the two pools, and the
                    # first reads of what the load just wrote.)
                    await opens(sessions, params["warmup"], params["in_flight"], f"warm-{size}", {})
                    await http_opens(bridge, params["warmup"], params["in_flight"], f"api-warm-{size}", {})
                    # Each kind --repeats times, taking turns; the run of median opens/s is reported
                    # (the machine may be shared: the others show how much that moved).
                    service_runs, api_runs, couriers = [], [], []
                    under_load: list[float] = []
                    for i in range(params["repeats"]):
                        opened, opened_for = await opens(sessions, params["opens"], params["in_flight"],
                                                         f"open-{size}-{i}", {"postgres": in_postgres})
                        service_runs.append(opened)
                        couriers += opened_for
                        # (the route lookup timed inside Postgres meanwhile, every 50 ms)
                        targets = await lookup_targets(pool, vault, couriers, params["lookups"])
                        done = asyncio.Event()
                        probe = asyncio.create_task(lookups_while(pool, targets, done))
                        try:
                            api_runs.append(await http_opens(
                                bridge, params["opens"], params["in_flight"], f"api-{size}-{i}",
                                {"bridge process": lambda: [bridge.pid], "postgres": in_postgres}))
                        finally:
                            done.set()
                            under_load += await probe
                    opened, through_api = _median_run(service_runs), _median_run(api_runs)
                    lookups = await route_lookups(pool, vault, couriers, params["lookups"])
                    participants = await pool.fetchval("SELECT count(*) FROM participants")
                    results["steps"].append({"past_participants": size, "participants": participants,
                                             "load_seconds": loaded, "opens": opened, "http_opens": through_api,
                                             "route_lookup_ms": lookups,
                                             "route_lookup_under_load_ms": measure.percentiles(under_load)})
    finally:
        await pool.close()
        postgres.drop_database(stack, DATABASE)
    last = results["steps"][-1]
    # What a summary reads: the figures at the largest size.
    results["summary"] = {
        "past_participants": last["past_participants"],
        "opens_per_second": last["opens"]["per_second"],
        "open_p50_ms": last["opens"]["latency_ms"]["p50"],
        "open_p99_ms": last["opens"]["latency_ms"]["p99"],
        "http_opens_per_second": last["http_opens"]["per_second"],
        "http_open_p99_ms": last["http_opens"]["latency_ms"]["p99"],
        "route_lookup_p99_ms": last["route_lookup_ms"]["p99"],
        "route_lookup_under_load_p99_ms": last["route_lookup_under_load_ms"].get("p99"),
    }
    return results


def _api_pool(results: dict[str, Any]) -> str:
    """What the bridge's API had of database connections (MB_API_DB_CONNECTIONS), when the run says."""
    n = results.get("api_db_connections")
    return f"; the bridge's API runs its statements on {n} database connections, MB_API_DB_CONNECTIONS" if n else ""


def _runs(phase: dict[str, Any]) -> str:
    return ", ".join(f"{x:.0f}" for x in phase.get("per_second_of_each_run", [phase["per_second"]]))


def _cpu(step: dict[str, Any], phase: str, name: str) -> str:
    return f"{step[phase]['cpu_ms_per_open'].get(name, 0):.2f}"


def write(results: dict[str, Any], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    (out / "sizes.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    steps, params = results["steps"], results["params"]
    fig, (left, right, cost) = plt.subplots(1, 3, figsize=(14, 4))
    sizes = [s["past_participants"] for s in steps]
    left.plot(sizes, [s["opens"]["per_second"] for s in steps], marker="o", label="session service")
    left.plot(sizes, [s["http_opens"]["per_second"] for s in steps], marker="o", label="HTTP API")
    left.set(xscale="log", xlabel="past participants", ylabel="session opens per second",
             title=f"Opens ({params['in_flight']} in flight)")
    left.set_ylim(bottom=0)
    left.legend()
    right.plot(sizes, [s["opens"]["latency_ms"].get("p99", 0) for s in steps], marker="o", label="open p99 (service)")
    right.plot(sizes, [s["http_opens"]["latency_ms"].get("p99", 0) for s in steps], marker="o", label="open p99 (HTTP)")
    right.plot(sizes, [s["route_lookup_ms"].get("p99", 0) for s in steps], marker="o", label="route lookup p99")
    right.plot(sizes, [s.get("route_lookup_under_load_ms", {}).get("p99", 0) for s in steps], marker="o",
               label="route lookup p99, opens running")
    right.set(xscale="log", xlabel="past participants", ylabel="ms", title="Latency (p99)")
    right.set_ylim(bottom=0)
    right.legend()
    cost.plot(sizes, [report.open_cost(s, "opens") for s in steps], marker="o", label="service + Postgres")
    cost.plot(sizes, [report.open_cost(s, "http_opens") for s in steps], marker="o", label="bridge + Postgres (HTTP)")
    cost.set(xscale="log", xlabel="past participants", ylabel="CPU ms per open", title="Cost per open")
    cost.set_ylim(bottom=0)
    cost.legend()
    fig.tight_layout()
    fig.savefig(out / "sizes.png", dpi=100)
    plt.close(fig)
    lines = [
        "# Session opens and the route lookup as the data grows",
        "",
        f"Run {results['started']} on {results['machine']['cpu']} (commit {results['machine']['maskbridge commit']}): "
        f"a pool of {params['numbers']} numbers; at each size, after {params['warmup']} opens of each kind not "
        f"measured, {params['repeats']} runs (taking turns) of {params['opens']} opens of new pairs through the "
        f"session service ({params['in_flight']} in flight, no HTTP) and as many through the HTTP API "
        f"(POST /v1/sessions to a bridge process with a named token, which each request looks up in the database, "
        f"{params['in_flight']} kept-alive connections from a light raw "
        f"HTTP client{_api_pool(results)}), the run of median opens/s of each kind shown; and the route lookup "
        "timed inside Postgres (EXPLAIN ANALYZE) for a sample of them, with nothing else running and, every "
        "50 ms, while the HTTP opens ran. A size is the past participants loaded before its opens; the opens "
        "add their own (the table's last column counts them all). "
        "The machine's cores may be shared with other work: the load average at the start of each phase, and the "
        "CPU each process took per open, say how much.",
        "",
        "| past participants | opens/s | open p50 ms | open p99 ms | opens/s HTTP | HTTP p50 ms | HTTP p99 ms "
        "| route lookup p50 ms | route lookup p99 ms | lookup p99 ms, opens running | participants |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        *(f"| {s['past_participants']:,} | {s['opens']['per_second']:.0f}"
          f" | {s['opens']['latency_ms'].get('p50', 0):.1f} | {s['opens']['latency_ms'].get('p99', 0):.1f}"
          f" | {s['http_opens']['per_second']:.0f}"
          f" | {s['http_opens']['latency_ms'].get('p50', 0):.1f} | {s['http_opens']['latency_ms'].get('p99', 0):.1f}"
          f" | {s['route_lookup_ms'].get('p50', 0):.2f} | {s['route_lookup_ms'].get('p99', 0):.2f}"
          f" | {s.get('route_lookup_under_load_ms', {}).get('p99', 0):.2f} | {s.get('participants', 0):,} |"
          for s in steps),
        "",
        "Opens/s of every run, service and HTTP: " + "; ".join(
            f"{s['past_participants']:,}: {_runs(s['opens'])} and {_runs(s['http_opens'])}" for s in steps) + ".",
        "",
        "CPU per open, ms (service: this process is the caller and the session service; HTTP: this process is the "
        "client only), and the 1-minute load average at the start of the phase:",
        "",
        "| past participants | service: this process | service: Postgres | service: load | HTTP: client "
        "| HTTP: bridge | HTTP: Postgres | HTTP: load |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
        *(f"| {s['past_participants']:,} | {_cpu(s, 'opens', 'this process')} | {_cpu(s, 'opens', 'postgres')}"
          f" | {_cpu(s, 'opens', 'load_average_1m_at_start')} | {_cpu(s, 'http_opens', 'this process')}"
          f" | {_cpu(s, 'http_opens', 'bridge process')} | {_cpu(s, 'http_opens', 'postgres')}"
          f" | {_cpu(s, 'http_opens', 'load_average_1m_at_start')} |" for s in steps),
        "",
        "CPU per open of the system under test (Postgres and the process that opens), largest size over "
        f"smallest: {_num(report.growth(steps, 'opens'))} through the session service, "
        f"{_num(report.growth(steps, 'http_opens'))} through HTTP (1.00 is flat; the same code at every size, so "
        "what moves it is the data, the index depths, and the host).",
        "",
        "![opens and lookups against size](sizes.png)",
        "",
    ]
    path = out / "sizes.md"
    path.write_text("\n".join(lines))
    return path


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sizes")
    parser.add_argument("--tiny", action="store_true", help="a smoke run: small sizes, a few opens")
    parser.add_argument("--out", type=Path, default=PROJECT_DIR / "docs" / "bench")
    args = parser.parse_args(argv)
    logs.configure("warning")
    results = asyncio.run(run(load(), TINY if args.tiny else FULL))
    print(f"bench.sizes: report written to {write(results, args.out)}")
    if (args.out / "results.json").exists():
        # summary.json and the main report read sizes.json: written again with it
        print(f"bench.sizes: {report.write(json.loads((args.out / 'results.json').read_text()), args.out)} "
              "written again")
    return 0


if __name__ == "__main__":
    sys.exit(main())
