"""What the benchmarks share: the numbers and sessions of a run, statistics, process
lookups, the route probe; and calls placed by the simulated carrier (its Asterisk and the
Python driving it), which `make bench NODES=2` (bench/scaleout.py) still uses. `make bench`
itself loads the stack with SIPp (bench/load.py).

Two paths carry the same kind of call from a caller to a callee on the carrier:
- bridge:   courier dials the session's pool number; the bridge routes it over ARI;
- baseline: caller dials +7999NNNNNNN; the PBX's dialplan alone Dials +7916NNNNNNN
            (asterisk-config/bench), showing the same pool number.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from bridge.crypto import NumberVault
from bridge.devstack.carrier import Carrier, Leg
from bridge.devstack.settings import Stack
from bridge.store.sessions import ROUTE_SQL

BENCH_POOL_NUMBER = "+74959990000"  # the baseline's caller ID too (asterisk-config/bench)
SETUP_LIMIT = 3.0  # seconds from dialing to the other phone ringing, at most, for a call to count
BENCH_REGION = "ZZ-BEN"
CALLER_TONE, CALLEE_TONE = 600, 1000


@dataclass(frozen=True)
class Route:
    """One caller -> callee pair on one path."""

    path: str  # bridge | baseline
    caller: str
    dialed: str
    callee: str


@dataclass
class Pairs:
    """Numbers for the calls of a run: sessions opened for the bridge, static for the baseline."""

    bridge: list[Route] = field(default_factory=list)
    baseline: list[Route] = field(default_factory=list)

    def of(self, path: str) -> list[Route]:
        return self.bridge if path == "bridge" else self.baseline


def _numbers(i: int) -> tuple[str, str, str, str]:
    """Unique per call: bridge courier and client, baseline caller and callee. The same
    index gets the same numbers in every run: a pair takes its pool number back at once."""
    tail = f"{i:06d}"
    return f"+79151{tail}", f"+79161{tail}", f"+79152{tail}", f"+79162{tail}"


# --- the session API ------------------------------------------------------------------------


class Api:
    def __init__(self, stack: Stack, http: aiohttp.ClientSession) -> None:
        self.base = f"http://{stack.env['MB_API_BIND']}:{stack.env['MB_API_PORT']}"
        self.http = http
        self.headers = {"Authorization": f"Bearer {stack.env['MB_API_TOKEN']}"}

    async def post(self, path: str, body: Any) -> tuple[int, Any]:
        async with self.http.post(self.base + path, json=body, headers=self.headers) as resp:
            return resp.status, await resp.json()


async def open_sessions(stack: Stack, count: int, concurrency: int, run: str) -> tuple[Pairs, dict[str, Any]]:
    """Open `count` sessions (one per pair, all on the bench pool number) through the HTTP
    API, `concurrency` at a time; returns the pairs and the creates per second."""
    pairs = Pairs()
    async with aiohttp.ClientSession() as http:
        api = Api(stack, http)
        status, body = await api.post("/v1/pool-numbers", {"numbers": [{"number": BENCH_POOL_NUMBER,
                                                                          "region": BENCH_REGION}]})
        assert status in (200, 201), body
        gate = asyncio.Semaphore(concurrency)
        latencies: list[float] = []

        async def one(i: int) -> None:
            courier, client, caller, callee = _numbers(i)
            async with gate:
                started = time.perf_counter()
                status, body = await api.post("/v1/sessions", {
                    "order_id": f"bench-{run}-{i}", "courier_number": courier, "client_number": client,
                    "region": BENCH_REGION, "ttl_seconds": 3600,
                })
                latencies.append(time.perf_counter() - started)
            assert status in (200, 201), body
            if body["pool_number"] != BENCH_POOL_NUMBER:
                # (The bench's routes through the dialplan, AGI's among them, answer that
                # number alone; a pair with a live session on it from another run is given
                # another, and those calls would fail as if the design did.)
                raise RuntimeError(
                    f"bench: session {i} was given {body['pool_number']}, not the bench's pool number "
                    f"{BENCH_POOL_NUMBER}: its courier and client probably have a live session on it "
                    "from an earlier run that did not close its sessions (they close at their ttl, an "
                    "hour), or were given another number while such sessions were open and keep it (a "
                    "pair is given the number it had last time: the local stack's database started "
                    "again, .stack/pg removed, has no such history)")
            pairs.bridge.append(Route("bridge", courier, body["pool_number"], client))
            pairs.baseline.append(Route("baseline", caller, "+7999" + callee[5:], callee))

        started = time.perf_counter()
        # Every open is let finish, even after one failed: an open cancelled on its way may
        # still be written by the API after the sessions are closed, and stay open.
        failed = [r for r in await asyncio.gather(*(one(i) for i in range(count)), return_exceptions=True)
                  if isinstance(r, BaseException)]
        if failed:
            # A run that stops here closes what it opened: left open (an hour), those
            # sessions would give the same pairs other numbers in the next run.
            await close_sessions(stack, run, count)
            raise failed[0]
        elapsed = time.perf_counter() - started
    pairs.bridge.sort(key=lambda r: r.caller)
    pairs.baseline.sort(key=lambda r: r.caller)
    return pairs, {
        "sessions": count,
        "concurrency": concurrency,
        "seconds": elapsed,
        "creates_per_second": count / elapsed,
        "latency_ms": percentiles([x * 1000 for x in latencies]),
    }


async def close_sessions(stack: Stack, run: str, count: int) -> None:
    async with aiohttp.ClientSession() as http:
        api = Api(stack, http)
        gate = asyncio.Semaphore(16)

        async def close(i: int) -> None:
            async with gate, http.get(f"{api.base}/v1/sessions?order_id=bench-{run}-{i}&status=open",
                                      headers=api.headers) as resp:
                items = (await resp.json())["items"]
            for s in items:
                await api.post(f"/v1/sessions/{s['id']}/close", {})

        await asyncio.gather(*(close(i) for i in range(count)))


# --- statistics ------------------------------------------------------------------------------


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"n": 0}
    ordered = sorted(values)

    def p(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]

    return {"n": len(values), "p50": p(0.5), "p95": p(0.95), "p99": p(0.99), "max": ordered[-1],
            "mean": statistics.fmean(values)}


# --- one call ----------------------------------------------------------------------------------


@dataclass
class Outcome:
    route: Route
    ok: bool
    why: str = ""
    caller: Leg | None = None
    callee: Leg | None = None
    setup: float | None = None  # seconds from dialing to the other phone ringing


class Calls:
    """Places calls and pairs each caller leg with the callee leg the carrier sees ring."""

    def __init__(self, carrier: Carrier) -> None:
        self.carrier = carrier
        self._callee_waiters: dict[str, asyncio.Future[Leg]] = {}
        self._pump = asyncio.create_task(self._route_incoming())

    async def _route_incoming(self) -> None:
        while True:
            leg = await self.carrier.incoming.get()
            waiter = self._callee_waiters.pop(leg.number, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(leg)

    async def close(self) -> None:
        self._pump.cancel()
        await asyncio.gather(self._pump, return_exceptions=True)

    async def place(self, route: Route, hold: float, timeout: float = 20.0,
                    held: Callable[[Outcome], Awaitable[None]] | None = None) -> Outcome:
        """Call, let the callee answer, talk `hold` seconds (or until `held` returns), hang up.
        ok: both phones were answered and both legs ended normally."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Leg] = loop.create_future()
        self._callee_waiters[route.callee] = waiter
        self.carrier.phone(route.callee, action="answer", answer_after=0.0, tone=CALLEE_TONE, listen=False)
        try:
            leg = await self.carrier.call(route.caller, route.dialed, tone=CALLER_TONE, listen=False)
        except Exception as exc:
            self._callee_waiters.pop(route.callee, None)
            return Outcome(route, False, f"originate: {exc}")
        outcome = Outcome(route, False, caller=leg)
        dialed = loop.time()
        try:
            async with asyncio.timeout(timeout):
                outcome.callee = await waiter
                outcome.setup = loop.time() - dialed
                await leg.answered.wait()
                if held is not None:
                    outcome.ok = True
                    await held(outcome)
                else:
                    await asyncio.sleep(hold)  # the call's own talk time, not a test wait
                if leg.ended.is_set():
                    outcome.ok, outcome.why = False, f"dropped, cause {leg.cause}"
                    return outcome
                await self.carrier.hangup(leg)
                await leg.ended.wait()
                await outcome.callee.ended.wait()
            outcome.ok = outcome.callee.cause == 16
            if not outcome.ok:
                outcome.why = f"callee cause {outcome.callee.cause}"
            elif outcome.setup is not None and outcome.setup > SETUP_LIMIT:
                outcome.ok, outcome.why = False, f"rang after more than {SETUP_LIMIT:g} s"
        except TimeoutError:
            outcome.ok = False
            outcome.why = "timeout: " + ("no callee" if outcome.callee is None else "not answered or not ended")
            await self.carrier.hangup(leg)
        finally:
            self._callee_waiters.pop(route.callee, None)
        return outcome


class Schedule:
    """Starts tasks at a fixed rate (an open-loop load: late starts are caught up, as
    callers would not wait for the system) and keeps the rate it really achieved."""

    def __init__(self) -> None:
        self.achieved: float | None = None

    async def run(self, rate: float, count: int, start: Callable[[int], Coroutine[Any, Any, Any]]) -> list[Any]:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        tasks: list[asyncio.Task[Any]] = []
        for i in range(count):
            delay = t0 + i / rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)  # the load's own schedule
            tasks.append(asyncio.create_task(start(i)))
        spent = loop.time() - t0
        self.achieved = (count - 1) / spent if count > 1 and spent > 0 else rate
        return await asyncio.gather(*tasks)


async def at_rate(rate: float, count: int, start: Callable[[int], Coroutine[Any, Any, Any]]) -> list[Any]:
    """Start `count` tasks at `rate` per second, on a fixed schedule; wait for all."""
    return await Schedule().run(rate, count, start)


# --- throughput ------------------------------------------------------------------------------


async def ramp_path(calls: Calls, routes: list[Route], rates: list[float], seconds: float, hold: float,
                    path: str) -> list[dict[str, Any]]:
    """One path (named `path` in the steps) up the rates, until fewer than 99 % succeed."""
    steps: list[dict[str, Any]] = []
    for rate in rates:
        steps.append(await ramp_step(calls, routes, rate, seconds, hold, path))
        if steps[-1]["success"] < 0.99:
            break
    return steps


async def ramp_step(calls: Calls, routes: list[Route], rate: float, seconds: float, hold: float,
                    path: str) -> dict[str, Any]:
    """Calls for `seconds` at `rate`: how many succeeded, why the others failed, setup times."""
    count = max(1, int(rate * seconds))
    schedule = Schedule()
    outcomes = await schedule.run(rate, count, lambda i: calls.place(routes[i % len(routes)], hold=hold))
    ok = sum(o.ok for o in outcomes)
    reasons: dict[str, int] = {}
    for o in outcomes:
        if not o.ok:
            reasons[o.why] = reasons.get(o.why, 0) + 1
    setups = [o.setup * 1000 for o in outcomes if o.setup is not None]
    return {"path": path, "rate": rate, "achieved": schedule.achieved, "calls": count, "ok": ok,
            "success": ok / count, "failures": reasons, "setup_ms": percentiles(setups)}


def sustained(steps: list[dict[str, Any]], path: str) -> float | None:
    """The highest rate the path carried with >= 99 % success, counting only steps where the
    load generator really offered (>= 95 % of) that rate, and where the calls listened to
    (if any) had audio both ways."""
    good = [s["rate"] for s in steps if s["path"] == path and s["success"] >= 0.99
            and (s.get("achieved") or 0) >= 0.95 * s["rate"] and s.get("audio_ok") is not False]
    return max(good) if good else None


# --- concurrency ------------------------------------------------------------------------------


def rss_mb(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except FileNotFoundError:
        return None
    return None


def asterisk_pid(stack: Stack, instance: str) -> int | None:
    """The PID of an Asterisk instance, found by its own asterisk.conf on the command line:
    the server, not a console attached to it (`asterisk -r`, `-rx`, `-rvvv`, which renames
    itself rasterisk: one left open once had the benchmark measure its CPU and memory, 0 ms
    per call and 2 MB, instead of the PBX's)."""
    conf = f"{stack.ast_dir(instance)}/etc/asterisk.conf".encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except (FileNotFoundError, PermissionError, ProcessLookupError):
            continue
        console = cmd[0].endswith(b"rasterisk") or any(arg.startswith(b"-r") or arg.startswith(b"-R") for arg in cmd)
        if cmd and cmd[0].endswith(b"asterisk") and conf in cmd and not console:
            return int(entry)
    return None


# --- route lookups -----------------------------------------------------------------------------


class RouteProbe:
    """While the load runs: the routing query's execution time inside Postgres (EXPLAIN
    ANALYZE of the bridge's own ROUTE_SQL for bench callers), free of any client's latency."""

    def __init__(self, stack: Stack, pairs: Pairs, every: float) -> None:
        self.stack = stack
        self.pairs = pairs
        self.every = every
        self.times: list[float] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        vault = NumberVault(self.stack.env["MB_NUMBER_KEY"])
        conn = await asyncpg.connect(self.stack.database_url)
        try:
            i = 0
            while True:
                route = self.pairs.bridge[i % len(self.pairs.bridge)]
                i += 1
                plan = await conn.fetchval(
                    "EXPLAIN (ANALYZE, FORMAT JSON) " + ROUTE_SQL, vault.index(route.caller), route.dialed
                )
                self.times.append(float(json.loads(plan)[0]["Execution Time"]))
                await asyncio.sleep(self.every)  # the probe's own pace
        finally:
            await conn.close()

    def __enter__(self) -> "RouteProbe":
        self._task = asyncio.create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()


# --- what a hop costs on this machine ------------------------------------------------------------

_ECHO = "import socket,sys\ns=socket.socket(fileno=int(sys.argv[1]))\nwhile d:=s.recv(64): s.send(d)\n"


def _socket_round_trips(samples: int, idle: float) -> list[float]:
    """ms per round trip of one byte to another process and back over a local socket, `idle` s
    apart (0: back to back)."""
    import socket
    import subprocess
    import sys

    mine, theirs = socket.socketpair()
    echo = subprocess.Popen([sys.executable, "-c", _ECHO, str(theirs.fileno())], pass_fds=[theirs.fileno()])
    theirs.close()
    try:
        mine.send(b"x")
        mine.recv(64)  # (it runs)
        times = []
        for _ in range(samples):
            if idle:
                time.sleep(idle)  # the idleness measured
            began = time.perf_counter()
            mine.send(b"x")
            mine.recv(64)
            times.append((time.perf_counter() - began) * 1000)
        return times
    finally:
        mine.close()
        echo.wait(10)


async def hop_costs(stack: Stack, pairs: Pairs, samples: int, idle: float = 0.05) -> dict[str, Any]:
    """What one round trip to another process costs on this machine (p50, ms), back to back and
    after `idle` s with nothing to do, as the bridge's path meets it between calls: a bare
    socket, `SELECT 1`, and the bridge's routing query (ROUTE_SQL, read only) from asyncpg as
    the bridge uses it. The dialplan path makes no such hop before its INVITE leaves."""
    out: dict[str, Any] = {"idle_ms": idle * 1000, "samples": samples}
    for gap, key in ((0.0, "warm"), (idle, "idle")):
        out.setdefault("socket", {})[key] = percentiles(await asyncio.to_thread(_socket_round_trips, samples, gap))
    vault = NumberVault(stack.env["MB_NUMBER_KEY"])
    route = pairs.bridge[0]
    conn = await asyncpg.connect(stack.database_url)
    try:
        for name, sql, args in (("select_1", "SELECT 1", ()),
                                ("route", ROUTE_SQL, (vault.index(route.caller), route.dialed))):
            statement = await conn.prepare(sql)
            await statement.fetch(*args)
            for gap, key in ((0.0, "warm"), (idle, "idle")):
                times = []
                for _ in range(samples):
                    if gap:
                        await asyncio.sleep(gap)  # the idleness measured
                    began = time.perf_counter()
                    await statement.fetch(*args)
                    times.append((time.perf_counter() - began) * 1000)
                out.setdefault(name, {})[key] = percentiles(times)
    finally:
        await conn.close()
    return out


def route_lookups(bridge_log: Path, offset: int) -> dict[str, float]:
    """The bridge's route lookup times (call.started route_ms) logged since `offset`."""
    values: list[float] = []
    with open(bridge_log, encoding="utf-8", errors="replace") as f:
        f.seek(offset)
        for line in f:
            if '"call.started"' in line and "route_ms" in line:
                try:
                    values.append(float(json.loads(line)["route_ms"]))
                except (ValueError, KeyError):
                    continue
    return percentiles(values)


def run_id() -> str:
    return uuid.uuid4().hex[:8]


# --- the bridge's own count of calls it shed (the ramp) ---------------------------------------


SHED_METRIC = "maskbridge_calls_shed_total"


def metric_value(text: str, name: str) -> float | None:
    """A metric without labels, from Prometheus's text format (None: not in it)."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


async def calls_shed(stack: Stack) -> float | None:
    """The bridge's count of new calls it shed (SIP 503 before the route lookup, more than
    its limit of calls routing at once: bridge.calls.flood), from its /metrics; None when
    no bridge answers (a stand-in runs instead)."""
    url = f"http://{stack.env['MB_API_BIND']}:{stack.env['MB_API_PORT']}/metrics"
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
            async with http.get(url) as resp:
                if resp.status != 200:
                    return None
                return metric_value(await resp.text(), SHED_METRIC)
    except (aiohttp.ClientError, TimeoutError):
        return None
