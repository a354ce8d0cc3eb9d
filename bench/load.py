"""The measurements of `make bench` under SIPp's load (bench/sipp.py), read off the wire
(bench/capture.py) and /proc (bench/cpu.py).

Two paths carry the same kind of call from a caller to a callee on the trunk:
- bridge:   courier dials the session's pool number; the bridge routes it over ARI;
- baseline: caller dials +7999NNNNNNN; the PBX's dialplan alone Dials +7916NNNNNNN
            (asterisk-config/bench), showing the same pool number.
"""

from __future__ import annotations

import asyncio
import itertools
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import capture, cpu, sipp
from bench.capture import Call, Capture
from bench.measure import Pairs, Route, calls_shed, percentiles, rss_mb
from bench.sipp import CALLEE_TONE, CALLER_TONE, Callee, CallerRun, Phones
from bridge.devstack.audio import tone_share
from bridge.devstack.settings import Stack

HEARD = 0.5  # share of a side's received energy in the other side's tone, at least


@dataclass
class Load:
    """SIPp's phones on the stack, and the numbers they call with."""

    stack: Stack
    phones: Phones
    callee: Callee
    pairs: Pairs

    @property
    def callees(self) -> dict[str, str]:
        return {r.caller: r.callee for r in self.pairs.bridge + self.pairs.baseline}

    def sip_capture(self, tag: str) -> Capture:
        p = self.phones
        return Capture(p.work / f"{tag}.pcap",
                       f"udp and host {p.host} and (port {p.caller_port} or port {p.callee_port})")

    def read(self, cap: Capture) -> list[Call]:
        return capture.calls(cap.path, self.phones, self.callees)

    async def place(self, routes: list[Route], rate: float, hold_ms: int, tag: str, sample: int = 0,
                    listen_seconds: float = 0.0) -> tuple[list[Call], CallerRun, dict[str, Any] | None]:
        """Place the calls at `rate` per second, each talking `hold_ms`; returns them as SIP
        showed them once all ended, what SIPp's caller reported, and, with `sample`, what
        both sides of that many calls heard while they were up."""
        cap = self.sip_capture(tag).start()
        try:
            runner = asyncio.create_task(asyncio.to_thread(
                sipp.caller_run, self.phones, [(r.caller, r.dialed) for r in routes], rate, hold_ms, tag))
            heard = None
            if sample:
                up = await self.up_at_once(cap, sample, timeout=len(routes) / rate + 5, stop=runner)
                heard = await listen(self, up, sample, listen_seconds, tag)
            run = await runner
            await self.settled(cap)
        finally:
            cap.stop()
        return self.read(cap), run, heard

    async def up_at_once(self, cap: Capture, n: int, timeout: float,
                         stop: "asyncio.Task[Any] | None" = None) -> list[Call]:
        """The calls up at once, as soon as `n` are (or what is up at `timeout`, or when
        `stop` is done)."""
        deadline = time.monotonic() + timeout
        while True:
            up = [c for c in self.read(cap) if c.up]
            if len(up) >= n or time.monotonic() >= deadline or (stop is not None and stop.done()):
                return up
            await asyncio.sleep(0.2)  # wait-ok: polling the capture as calls are set up

    async def settled(self, cap: Capture, timeout: float = 5.0) -> None:
        """Until every leg that was answered, on either side, has had its BYE answered (the
        PBX hangs the callee up just after the caller), or `timeout`: tcpdump is stopped
        only once it has written the last hangups."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            legs = [leg for c in self.read(cap) for leg in (c.caller, c.callee) if leg is not None and leg.answered]
            if all(leg.bye_ok for leg in legs):
                return
            await asyncio.sleep(0.2)  # wait-ok: polling the capture for the last hangups


def achieved(calls: list[Call]) -> float | None:
    """The rate SIPp really offered: calls placed over the span of their INVITEs."""
    times = sorted(c.caller.invite for c in calls if c.caller.invite is not None)
    if len(times) < 2 or times[-1] <= times[0]:
        return None
    return (len(times) - 1) / (times[-1] - times[0])


def failures(calls: list[Call]) -> dict[str, int]:
    reasons: dict[str, int] = {}
    for c in calls:
        why = c.why_not()
        if why:
            reasons[why] = reasons.get(why, 0) + 1
    return reasons


# --- post-dial delay ----------------------------------------------------------------------------


async def post_dial_delay(load: Load, rate: float, per_path: int, tag: str = "delay") -> dict[str, Any]:
    """Each path at `rate` calls per second, the two alternating (the PBX carries 2 x `rate`);
    each call's delay runs from its INVITE leaving the caller to the callee's INVITE reaching
    the callee (one clock: the kernel's, on the loopback both cross)."""
    pairs = load.pairs
    order = [r for i in range(per_path) for r in (pairs.bridge[i], pairs.baseline[i])]
    path_of = {r.caller: r.path for r in order}
    calls, run, _ = await load.place(order, 2 * rate, 500, tag)
    delays: dict[str, list[float]] = {"bridge": [], "baseline": []}
    placed: list[tuple[str, float]] = []
    for c in calls:
        setup = c.setup_ms
        if not c.why_not() and setup is not None:
            delays[path_of[c.caller.number]].append(setup)
            placed.append((path_of[c.caller.number], setup))
    # Each bridge call against the baseline call placed just before it.
    diffs = [b - a for (pa, a), (pb, b) in itertools.pairwise(placed) if pa == "baseline" and pb == "bridge"]
    return {
        "rate": rate,  # each path's
        "offered": 2 * rate,
        "calls": len(order),
        "failed": len(order) - sum(len(v) for v in delays.values()),
        "failures": failures(calls),
        "bridge_ms": delays["bridge"],
        "baseline_ms": delays["baseline"],
        "bridge": percentiles(delays["bridge"]),
        "baseline": percentiles(delays["baseline"]),
        "added": percentiles(diffs),
        "added_median_ms": (statistics.median(delays["bridge"]) - statistics.median(delays["baseline"]))
        if delays["bridge"] and delays["baseline"] else None,
        "load_generator_exit": run.returncode,
    }


# --- throughput ---------------------------------------------------------------------------------


def calls_per_step(rates: list[float], seconds: float) -> int:
    """The calls of a ramp's largest step."""
    return max(max(1, int(rate * seconds)) for rate in rates)


async def ramp(load: Load, rates: list[float], seconds: float, hold: float, sample: int,
               paths: tuple[str, ...] = ("bridge", "baseline"), tag: str = "ramp") -> list[dict[str, Any]]:
    """For each rate, each path: calls for `seconds` at that rate; a path stops at the
    first rate where fewer than 99 % of its calls succeed. In each step, both sides of
    `sample` calls are listened to for half their talk time. Each step's capture is
    `{tag}-{path}-{rate}.pcap` in the work directory (a stand-in's ramp names its own, so
    that it does not write over the bridge's)."""
    steps: list[dict[str, Any]] = []
    active = set(paths)
    for rate in rates:
        for path in paths:
            if path not in active:
                continue
            routes = load.pairs.of(path)
            count = max(1, int(rate * seconds))
            if count > len(routes):
                raise ValueError(f"a ramp step of {count} calls needs as many pairs ({len(routes)} opened): a pair "
                                 "calling again while its last call is still being set up cannot be told apart")
            chosen = routes[:count]
            shed_before = await calls_shed(load.stack) if path == "bridge" else None
            calls, run, heard = await load.place(chosen, rate, int(hold * 1000), f"{tag}-{path}-{rate:g}",
                                                 sample=sample, listen_seconds=hold / 2)
            shed_after = await calls_shed(load.stack) if shed_before is not None else None
            if shed_after is not None and shed_before is not None and shed_after < shed_before:
                shed_after = None  # (the bridge started again meanwhile: its count did too)
            ok = sum(not c.why_not() for c in calls)
            steps.append({
                "path": path, "rate": rate, "achieved": achieved(calls), "calls": count, "ok": ok,
                "success": ok / count, "failures": failures(calls),
                "setup_ms": percentiles([s for c in calls if (s := c.setup_ms) is not None]),
                "answer_ms": percentiles([s for c in calls if (s := c.answer_ms) is not None]),
                "load_generator_cpu_s": run.cpu_seconds,
                # (the calls the bridge shed, a 503 each: its limit of calls routing at once; None
                # where no bridge ran. A 503 may also come from the PBX's call limit, or from the
                # bridge failing a call.)
                "shed_by_bridge": None if shed_after is None or shed_before is None else int(shed_after - shed_before),
                "audio_ok": heard["audio_ok"] if heard else None,
                "tone_shares": heard["tone_shares"] if heard else [],
            })
            if steps[-1]["success"] < 0.99:
                active.discard(path)
        if not active:
            break
    return steps


# --- CPU per call ---------------------------------------------------------------------------------


PATHS = ("bridge", "baseline")


async def cpu_per_call(load: Load, rate: float, seconds: float, hold: float, idle_seconds: float,
                       long_hold: float | None = None, rounds: int = 1) -> dict[str, Any]:
    """Per path: the CPU seconds of each process over a window of calls at a steady `rate`,
    less what the process spends idle over as long (measured just before), per call that
    succeeded; and the calls per second one core carries at that cost.

    With `long_hold`, each path carries the same calls again, talking `long_hold` seconds
    instead of `hold`: the difference is what a second of talk costs (the audio both ways),
    and what is left of a call's cost without it is its setup and hangup (`split`). The two
    differ in kind: setup bounds calls per second, talk bounds calls held at once.

    With `rounds`, every window is measured that many times, in turn (bridge, baseline, then
    the same talking longer, and again), and each figure is the median of its rounds. On this
    machine the same window measured again differs by up to 20 %, for every process at once,
    the load generator included, with no steal time reported (the PBX on the dialplan path,
    6 s of talk: 18.1, 22.1, 24.1 ms a call): one window alone once made a bridged call look
    dearer with 2 s of talk than with 6. Each round's figures stay in the results."""
    pids = cpu.Pids.of(load.stack)
    holds = [hold] + ([long_hold] if long_hold is not None and long_hold > hold else [])
    windows: dict[tuple[str, float], list[dict[str, Any]]] = {(path, h): [] for h in holds for path in PATHS}
    for _ in range(max(1, rounds)):
        for h in holds:
            for path in PATHS:
                windows[(path, h)].append(await _cpu_window(load, pids, path, rate, seconds, h, idle_seconds))
    out: dict[str, Any] = {"rate": rate, "seconds": seconds, "hold": hold, "idle_seconds": idle_seconds,
                           "rounds": max(1, rounds)}
    for path in PATHS:
        out[path] = median_window(windows[(path, hold)])
    if len(holds) > 1:
        out["long"] = {"hold": long_hold, **{path: median_window(windows[(path, holds[1])]) for path in PATHS}}
        out["split"] = {path: paired_split(out[path]["rounds"], out["long"][path]["rounds"], hold, holds[1])
                        for path in PATHS}
    return out


def paired_split(shorts: list[dict[str, Any]], longs: list[dict[str, Any]], hold: float,
                 long_hold: float) -> dict[str, Any]:
    """Setup and talk apart, round by round (a round's short and long windows follow each
    other, so a drift of the machine's speed between rounds cancels out), then each process's
    median over the rounds; every round's split kept under `rounds`."""
    splits = [talk_split(short, long, hold, long_hold) for short, long in zip(shorts, longs, strict=True)]
    path = shorts[0]["path"]
    setup = {k: statistics.median(sp["setup_ms_per_call"][k] for sp in splits) for k in splits[0]["setup_ms_per_call"]}
    talk = {k: statistics.median(sp["talk_ms_per_second"][k] for sp in splits) for k in splits[0]["talk_ms_per_second"]}
    return {
        **_split_figures(setup, talk, path),
        "rounds": [{k: sp[k] for k in ("system_setup_ms_per_call", "system_talk_ms_per_second")} for sp in splits],
    }


def median_window(windows: list[dict[str, Any]]) -> dict[str, Any]:
    """One window's figures from the rounds of it: each process's CPU per call the median of
    its rounds (so the system's figure is the sum of medians), the calls summed, every round
    kept under `rounds`."""
    first = windows[0]
    per_call = {k: statistics.median(w["cpu_ms_per_call"][k] for w in windows) for k in first["cpu_ms_per_call"]}
    system = _system(per_call, first["path"])
    return {
        "path": first["path"], "hold": first["hold"],
        "calls": sum(w["calls"] for w in windows), "ok": sum(w["ok"] for w in windows),
        "wall_seconds": sum(w["wall_seconds"] for w in windows),
        "steal_seconds": None if any(w.get("steal_seconds") is None for w in windows)
        else sum(w["steal_seconds"] for w in windows),
        "cpu_ms_per_call": per_call,
        "system_ms_per_call": system,
        "calls_per_second_per_core": 1000 / system if system > 0 else None,
        "rounds": [{k: w[k] for k in ("path", "hold", "calls", "ok", "wall_seconds", "steal_seconds", "cpu_seconds",
                                      "idle_cpu_per_second", "cpu_ms_per_call", "system_ms_per_call") if k in w}
                   for w in windows],
    }


def _system(per_call: dict[str, float], path: str) -> float:
    """What the system under test spends: the PBX and Postgres, and the bridge on its path."""
    return per_call["pbx"] + per_call["postgres"] + (per_call["bridge"] if path == "bridge" else 0.0)


def talk_split(short: dict[str, Any], long: dict[str, Any], hold: float, long_hold: float) -> dict[str, Any]:
    """A call's CPU as a straight line in its talk time, through the two windows' figures:
    the slope is a second of talk, the intercept the call without talk (setup and hangup).
    A slope under zero is noise (a process that does no work per second of talk): 0."""
    talk = {k: max(0.0, (long["cpu_ms_per_call"][k] - short["cpu_ms_per_call"][k]) / (long_hold - hold))
            for k in short["cpu_ms_per_call"]}
    setup = {k: max(0.0, short["cpu_ms_per_call"][k] - talk[k] * hold) for k in talk}
    return _split_figures(setup, talk, short["path"])


def _split_figures(setup: dict[str, float], talk: dict[str, float], path: str) -> dict[str, Any]:
    """Each process's setup (ms per call) and talk (ms per second of talk), with the system
    under test's and what one core carries of each."""
    system_setup, system_talk = _system(setup, path), _system(talk, path)
    return {
        "setup_ms_per_call": setup,
        "talk_ms_per_second": talk,
        "system_setup_ms_per_call": system_setup,
        "system_talk_ms_per_second": system_talk,
        "setups_per_second_per_core": 1000 / system_setup if system_setup > 0 else None,
        "talking_calls_per_core": 1000 / system_talk if system_talk > 0 else None,
    }


async def _cpu_window(load: Load, pids: cpu.Pids, path: str, rate: float, seconds: float, hold: float,
                      idle_seconds: float) -> dict[str, Any]:
    before = cpu.snapshot(load.stack, pids, load.callee.pid)
    await asyncio.sleep(idle_seconds)  # wait-ok: the idle window the busy one is compared to
    idle = cpu.since(before, cpu.snapshot(load.stack, pids, load.callee.pid))
    idle_rate = {k: v / idle_seconds for k, v in idle.items()}
    routes = load.pairs.of(path)
    count = max(1, int(rate * seconds))
    chosen = [routes[i % len(routes)] for i in range(count)]
    started = time.monotonic()
    before = cpu.snapshot(load.stack, pids, load.callee.pid)
    stolen = cpu.steal_seconds()
    calls, run, _ = await load.place(chosen, rate, int(hold * 1000), f"cpu-{path}-{hold:g}")
    busy = cpu.since(before, cpu.snapshot(load.stack, pids, load.callee.pid))
    stolen_after = cpu.steal_seconds()
    steal = None if stolen is None or stolen_after is None else stolen_after - stolen
    wall = time.monotonic() - started
    busy["load_generator"] += run.cpu_seconds
    ok = sum(not c.why_not() for c in calls)
    per_call = {k: max(0.0, busy[k] - idle_rate[k] * wall) * 1000 / max(ok, 1) for k in busy}
    system = _system(per_call, path)
    return {
        "path": path, "hold": hold,
        "calls": count, "ok": ok, "wall_seconds": wall, "steal_seconds": steal,
        "cpu_seconds": busy, "idle_cpu_per_second": idle_rate,
        "cpu_ms_per_call": per_call,
        "system_ms_per_call": system,
        "calls_per_second_per_core": 1000 / system if system > 0 else None,
    }


# --- simultaneous calls -----------------------------------------------------------------------------


async def concurrency(load: Load, steps: list[int], setup_rate: float, sample: int,
                      listen_seconds: float) -> list[dict[str, Any]]:
    """Hold N bridged calls at once, for growing N; once all are up, a sample of calls is
    listened to on the wire: each side must hear the other's tone. The step's calls then
    end, and count if they ended normally."""
    pids = cpu.Pids.of(load.stack)
    results: list[dict[str, Any]] = [{"calls": 0, "established": 0, "audio_ok": None,
                                      "bridge_mb": rss_mb(pids.bridge), "pbx_mb": rss_mb(pids.pbx)}]
    for n in steps:
        if n > len(load.pairs.bridge):
            break
        setup_window = n / setup_rate + 10
        hold_ms = int((setup_window + listen_seconds + 5) * 1000)
        cap = load.sip_capture(f"concurrency-{n}").start()
        try:
            before, machine_before, climb_started = (cpu.snapshot(load.stack, pids, load.callee.pid),
                                                     cpu.machine_seconds(), time.monotonic())
            runner = asyncio.create_task(asyncio.to_thread(
                sipp.caller_run, load.phones, [(r.caller, r.dialed) for r in load.pairs.bridge[:n]],
                setup_rate, hold_ms, f"concurrency-{n}"))
            up = await load.up_at_once(cap, n, setup_window)
            step: dict[str, Any] = {"calls": n, "established": len(up)}
            step["climb"] = climb_load(before, cpu.snapshot(load.stack, pids, load.callee.pid), machine_before,
                                       cpu.machine_seconds(), time.monotonic() - climb_started)
            step.update(await listen(load, up if len(up) == n else [], sample, listen_seconds, f"{n}"))
            step["audio_ok"] = len(up) == n and step["audio_ok"]
            step["bridge_mb"], step["pbx_mb"] = rss_mb(pids.bridge), rss_mb(pids.pbx)
            await runner
            await load.settled(cap)
        finally:
            cap.stop()
        calls = load.read(cap)
        step["ended_ok"] = sum(not c.why_not() for c in calls)
        step["failures"] = failures(calls)
        step.update(setup_times(calls))
        results.append(step)
        if len(up) < n or not step["audio_ok"]:
            break
    return results


def climb_load(before: dict[str, float], after: dict[str, float], machine_before: tuple[float, float] | None,
               machine_after: tuple[float, float] | None, seconds: float) -> dict[str, Any]:
    """How busy the machine was while a step's calls were being set up (SIPp's caller placing
    them, the calls already up sending audio): each process's cores (CPU seconds per second;
    SIPp's callee as the load generator, its caller not counted) and the machine's busy share."""
    used = cpu.since(before, after)
    busy = None
    if machine_before and machine_after and machine_after[1] > machine_before[1]:
        busy = (machine_after[0] - machine_before[0]) / (machine_after[1] - machine_before[1])
    return {"seconds": round(seconds, 2),
            "cores": {k: round(v / seconds, 3) for k, v in used.items()} if seconds > 0 else {},
            "machine_busy": None if busy is None else round(busy, 3)}


def setup_times(calls: list[Call]) -> dict[str, Any]:
    """How long a step's calls took to set up, to tell a slow step's cause: `setup_ms`, the
    caller's INVITE to the callee's (the bridge's decision and the PBX's new leg);
    `answer_ms`, the caller's INVITE to its 200. For the calls answered after the limit,
    `late`: when they were dialed (seconds after the step's first INVITE), and where their
    time went (before the callee's INVITE, or from the callee's 200 to the caller's)."""
    placed = [c.caller.invite for c in calls if c.caller.invite is not None]
    first = min(placed, default=0.0)
    late = [c for c in calls if c.answered_late]
    out: dict[str, Any] = {
        "setup_ms": percentiles([c.setup_ms for c in calls if c.setup_ms is not None]),
        "answer_ms": percentiles([c.answer_ms for c in calls if c.answer_ms is not None]),
        "late": None,
    }
    if late:
        dialed = [c.caller.invite - first for c in late if c.caller.invite is not None]
        passed_back = [(c.caller.answered - c.callee.answered) * 1000 for c in late
                       if c.callee and c.callee.answered is not None and c.caller.answered is not None]
        out["late"] = {
            "calls": len(late),
            "dialed_from_s": round(min(dialed), 2),
            "dialed_to_s": round(max(dialed), 2),
            "setup_ms": percentiles([c.setup_ms for c in late if c.setup_ms is not None]),
            "callee_answer_to_caller_answer_ms": percentiles(passed_back),
        }
    return out


async def listen(load: Load, up: list[Call], sample: int, seconds: float, tag: str) -> dict[str, Any]:
    """Record `seconds` of what the PBX sends to both sides of `sample` of the calls in
    `up` (spread over them) and check that the caller heard the callee's tone and the callee
    the caller's."""
    chosen = up[:: max(1, len(up) // sample)][:sample] if sample else []
    legs: dict[int, tuple[str, str]] = {}
    for c in chosen:
        if c.caller.pbx_media and c.callee and c.callee.pbx_media:
            legs[c.caller.pbx_media] = (c.caller.number, "caller")
            legs[c.callee.pbx_media] = (c.caller.number, "callee")
    if not legs:
        return {"audio_ok": False, "tone_shares": [], "sampled": 0}
    path = load.phones.work / f"audio-{tag}.pcap"
    with Capture(path, capture.rtp_filter(load.phones.pbx[0], sorted(legs))):
        await asyncio.sleep(seconds)  # wait-ok: the listening window itself
    heard = capture.audio(path, load.phones.pbx[0], legs)
    shares: list[dict[str, float]] = []
    for c in chosen:
        h = heard.get(c.caller.number)
        shares.append({
            "caller_heard_callee": tone_share(h.caller_heard, 8000, CALLEE_TONE) if h else 0.0,
            "callee_heard_caller": tone_share(h.callee_heard, 8000, CALLER_TONE) if h else 0.0,
        })
    ok = bool(shares) and all(min(s.values()) > HEARD for s in shares)
    return {"audio_ok": ok, "tone_shares": shares, "sampled": len(chosen)}


def work_dir(stack: Stack) -> Path:
    return stack.dir / "bench"
