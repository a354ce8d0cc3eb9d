"""The ARI floor: what routing a call with the bridge's ARI requests costs, measured with an
application that does nothing else.

`make bench` measures the bridge against the PBX's dialplan alone. The difference holds two
things: the bridge's own work (the route looked up and the call's row written in Postgres, its
Python, its checks) and what its ARI requests cost Asterisk and the round trips, whatever the
application does between them. This module tells them apart: a stand-in application takes the
bridge's place (the same ARI application name, so the PBX's dialplan hands it the same calls)
and makes the bridge's ARI requests for a plain call, grouped and ordered as the bridge does
(bridge.calls.flow: MaskedCall._ring and _join_and_dial) - the leg created with the same masked
identity and the bridge made at once, then the join, the dial and the caller's caller ID in one
write - but finds the callee in a table it was handed, and does nothing else: no database, no
checks, no log line, and none of the bridge's handling of races (it hangs up what is left when
a request fails). What it measures is the floor under any ARI application that routes calls
with these requests on this machine.

With --dialplan the stand-in does less still: it hands each call back to the dialplan
(POST /channels/{id}/continue into [floor-dial] of asterisk-config/bench), which dials the
callee with the caller's masked identity. No bridge, no leg of ARI's: one request per call,
the least an application that decides over ARI can cost (it gives up what the bridge does
while a call lasts - the client's keypad, cuts, caps, recording - which is why the bridge
does not route this way).

Run as `python -m bench.floor [--dialplan] ROUTES [READY]` (ROUTES: a JSON list of [caller,
dialed, callee]; a call not in it is hung up. READY: a file made once connected as the
application), which `standing_in` does, the bridge stopped meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from bridge import logs
from bridge.ari.client import AriClient
from bridge.ari.errors import AriError
from bridge.ari.events import EventStream
from bridge.calls.events import WANTED_EVENTS
from bridge.calls.flow import caller_id, masked_identity
from bridge.devstack import processes
from bridge.devstack.settings import PROJECT_DIR, Stack

REGISTER_TIMEOUT = 15.0  # seconds for the stand-in to connect as the ARI application
# The dialplan context that dials the callee of a call handed back (asterisk-config/bench).
HAND_BACK_CONTEXT = "floor-dial"


class FloorApp:
    """The stand-in: per call, the bridge's ARI requests and nothing else."""

    def __init__(self, ari: AriClient, routes: dict[tuple[str, str], str], trunk: str,
                 hand_back: bool = False) -> None:
        self.ari = ari
        self.routes = routes
        self.trunk = trunk
        self.hand_back = hand_back  # the dialplan dials (HAND_BACK_CONTEXT), not ARI
        # (the bridge's: the ring timeout and its margin)
        self.ring_timeout = int(float(os.environ.get("MB_RING_TIMEOUT", "30"))) + 5
        self.calls: dict[str, dict[str, Any]] = {}  # channel id (either leg) -> the call
        self.tasks: set[asyncio.Task[None]] = set()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _quietly(self, coro: Any) -> None:
        with contextlib.suppress(AriError):
            await coro

    def _callee(self, channel: dict[str, Any], dialed: str) -> str | None:
        return self.routes.get((channel.get("caller", {}).get("number", ""), dialed))

    def _register(self, channel: dict[str, Any], dialed: str, callee: str) -> dict[str, Any]:
        """The call of a caller just in Stasis, registered at once (before any later event of
        it is handled)."""
        call = {"in": channel["id"], "out": str(uuid.uuid4()), "bridge": str(uuid.uuid4()), "callee": callee,
                "shown": dialed, "in_stasis": asyncio.get_running_loop().create_future(), "ended": False}
        self.calls[call["in"]] = self.calls[call["out"]] = call
        return call

    async def _hand_back(self, inbound: str, callee: str) -> None:
        await self._quietly(self.ari.request("POST", f"/channels/{inbound}/continue", {
            "context": HAND_BACK_CONTEXT, "extension": callee, "priority": "1"}))

    async def _start(self, call: dict[str, Any]) -> None:
        try:
            set_up = await self._set_up(call)
        except (AriError, TimeoutError):
            set_up = False
        if not set_up:
            call["ended"] = True
            self._clear(call, "")  # (both legs hung up, the bridge destroyed: nothing left in Stasis)

    async def _set_up(self, call: dict[str, Any]) -> bool:
        """The bridge's requests for the call; False when the caller left while the leg was
        made, or the join or the dial failed (a leg is gone): what was made goes."""
        inbound, shown = call["in"], call["shown"]
        await asyncio.gather(
            self.ari.create_channel(f"PJSIP/{call['callee']}@{self.trunk}", call["out"], ["outbound", "floor"],
                                    masked_identity(shown)),
            self.ari.create_bridge(call["bridge"], name=f"call-{call['out']}"),
        )
        await asyncio.wait_for(call["in_stasis"], 5.0)
        if call["ended"]:
            return False
        results = await self.ari.in_turn([
            self.ari.join_call(call["bridge"], [inbound, call["out"]]),
            self.ari.dial_call(call["out"], timeout=self.ring_timeout),
            self.ari.set_variable_call(inbound, "CALLERID(all)", caller_id(shown)),
        ])
        return not any(isinstance(r, AriError) for r in results[:2])

    def _end(self, call: dict[str, Any], gone: str) -> None:
        if not call["ended"]:
            call["ended"] = True
            self._clear(call, gone)

    def _clear(self, call: dict[str, Any], gone: str) -> None:
        """The call's legs (but the one already gone) hung up and its bridge destroyed."""
        for leg in (call["in"], call["out"]):
            self.calls.pop(leg, None)
            if leg != gone:
                self._spawn(self._quietly(self.ari.hangup(leg)))
        self._spawn(self._quietly(self.ari.destroy_bridge(call["bridge"])))

    async def handle(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        channel = event.get("channel") or {}
        call = self.calls.get(channel.get("id", ""))
        if kind == "StasisStart":
            args = event.get("args") or []
            if len(args) >= 2 and args[0] == "inbound":
                callee = self._callee(channel, args[1])
                if callee is None:
                    self._spawn(self._quietly(self.ari.hangup(channel["id"])))
                elif self.hand_back:
                    self._spawn(self._hand_back(channel["id"], callee))
                else:
                    self._spawn(self._start(self._register(channel, args[1], callee)))
            elif call is None:
                self._spawn(self._quietly(self.ari.hangup(channel["id"])))  # (a leg whose call ended)
            elif not call["in_stasis"].done():
                call["in_stasis"].set_result(None)
        elif kind == "ChannelStateChange" and call is not None:
            if channel["id"] == call["out"] and channel.get("state") == "Up":
                self._spawn(self._quietly(self.ari.answer(call["in"])))  # (as the bridge: once the callee answers)
        elif kind in ("StasisEnd", "ChannelDestroyed", "ChannelHangupRequest") and call is not None:
            self._end(call, channel["id"])


async def serve(routes: dict[tuple[str, str], str], ready: Path | None = None, hand_back: bool = False) -> None:
    env = os.environ
    ari = AriClient(env["MB_ARI_URL"], env["MB_ARI_USER"], env["MB_ARI_PASSWORD"], env["MB_ARI_APP"])
    app = FloorApp(ari, routes, env.get("MB_TRUNK_ENDPOINT", "trunk"), hand_back)
    stream = EventStream(ari, app.handle, event_types=WANTED_EVENTS)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    runner = asyncio.create_task(stream.run())
    if ready is not None:
        await stream.connected.wait()  # (the application registered and read back: calls come here)
        await asyncio.to_thread(ready.touch)
    await stop.wait()
    stream.stop()
    runner.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await runner
    await ari.close()


async def _ready(proc: subprocess.Popen[bytes], ready: Path, timeout: float) -> None:
    """Until the stand-in says it is connected as the application (or it died, or the time is up)."""
    async with asyncio.timeout(timeout):
        while not await asyncio.to_thread(ready.exists):
            if proc.poll() is not None:
                raise RuntimeError(f"the stand-in exited ({proc.returncode}) before it was ready (see floor.log)")
            await asyncio.sleep(0.05)  # wait-ok: polling for the stand-in's ready file


def _stand_in(stack: Stack, work: Path, argv: list[str]) -> subprocess.Popen[bytes]:
    """The bridge stopped, a stand-in started (`python -m ARGV... READY`; not yet ready)."""
    (work / "floor-ready").unlink(missing_ok=True)
    processes.stop_bridge(stack)
    with open(work / "floor.log", "ab") as log:
        return subprocess.Popen([sys.executable, "-m", *argv, str(work / "floor-ready")],
                                cwd=PROJECT_DIR, env={**os.environ, **stack.bridge_env()}, stdout=log,
                                stderr=log, stdin=subprocess.DEVNULL)


def _bridge_back(stack: Stack, proc: subprocess.Popen[bytes] | None, work: Path) -> None:
    """The stand-in gone, the bridge started again and healthy."""
    if proc is not None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    (work / "floor-ready").unlink(missing_ok=True)
    processes.start_bridge(stack)
    processes.wait_healthy(stack)


@contextlib.asynccontextmanager
async def stand_in(stack: Stack, work: Path, argv: list[str]) -> AsyncIterator[None]:
    """The bridge stopped and a stand-in (`python -m ARGV... READY`, which makes READY once
    it takes calls) in its place while the block runs; the bridge started again after (and
    healthy), whatever happened."""
    proc = None
    try:
        proc = await asyncio.to_thread(_stand_in, stack, work, argv)
        await _ready(proc, work / "floor-ready", REGISTER_TIMEOUT)
        yield
    finally:
        await asyncio.to_thread(_bridge_back, stack, proc, work)


@contextlib.asynccontextmanager
async def standing_in(stack: Stack, routes: list[tuple[str, str, str]], work: Path,
                      hand_back: bool = False) -> AsyncIterator[None]:
    """The ARI stand-in in the bridge's place while the block runs (hand_back: the one that
    hands each call back to the dialplan; needs the benchmark's dialplan,
    asterisk.bench_route)."""
    table = work / "floor-routes.json"
    table.write_text(json.dumps(routes))
    try:
        async with stand_in(stack, work, ["bench.floor", *(["--dialplan"] if hand_back else []), str(table)]):
            yield
    finally:
        table.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    hand_back = args[:1] == ["--dialplan"]
    args = args[1:] if hand_back else args
    if len(args) not in (1, 2):
        print("usage: python -m bench.floor [--dialplan] ROUTES_JSON [READY_FILE]", file=sys.stderr)
        return 2
    logs.configure("warning")  # (the bridge's JSON lines and redaction: nothing but warnings)
    table = json.loads(Path(args[0]).read_text())
    asyncio.run(serve({(caller, dialed): callee for caller, dialed, callee in table},
                      Path(args[1]) if len(args) == 2 else None, hand_back))
    return 0


if __name__ == "__main__":
    sys.exit(main())
