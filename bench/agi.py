"""Decided over AGI: what call setup would cost if the PBX's dialplan dialed the callee and
asked the bridge only for the decision.

The ARI floor (bench/floor.py) shows that the bridge's ARI requests alone, with no
application work, add more delay on this machine than the 3 ms the call-setup target allows:
no change inside the bridge can meet it while the bridge makes the callee's leg over ARI.
This stand-in measures the other design, to say what it would give before anyone builds it:
a call to the benchmark's pool number goes, while it runs, to [bench-agi] of
asterisk-config/bench instead of the bridge's Stasis application; the dialplan masks the
caller's leg as [from-trunk] does, asks this process over FastAGI where the call goes, and
dials the callee itself showing the pool number (the callee's leg with the identity
interception routines, as [floor-dial]). This process answers with the bridge's own routing
decision (bridge.sessions.Sessions.route, the call's row written in the same round trip,
the callee's number unsealed): the figure holds the decision's database and Python work,
and Asterisk's AGI exchange, and none of ARI. With --table it answers from a table it was
handed instead, as the ARI floor does: what the AGI exchange alone costs.

What it leaves out, and the design would have to bring back some other way: everything the
bridge does while a call lasts (the client's keypad block, cuts when a session ends, caps on
the call's length, hold, recording, the answer confirmed) and the call's row after its route
(rung, answered, ended: the rows it writes are ended with outcome failed when it stops).

Run as `python -m bench.agi HOST [--table ROUTES] READY` (HOST: the address it listens on,
port 4573; ROUTES: a JSON list of [caller, dialed, callee]; READY: a file made once it
listens), which `standing_in` does, the bridge stopped meanwhile (its call rows would look
like another process's to a running bridge of the same node).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

from bench import floor
from bridge import logs
from bridge.app import policy_of
from bridge.config import Settings
from bridge.crypto import MasterKeys, NumberVault
from bridge.devstack import asterisk
from bridge.devstack.settings import Stack
from bridge.phone import InvalidNumber, mask, normalize
from bridge.sessions import Sessions
from bridge.store import Store, connect
from bridge.store.number_keys import NumberKeyRepo
from bridge.store.queries import NewCall

AGI_PORT = 4573  # FastAGI's usual port, on the bridge's address (asterisk-config/bench/extensions_bench_agi.conf)
AGI_ROUTE = "extensions_bench_agi.conf"
READ_TIMEOUT = 5.0  # seconds for the PBX to send a request's environment, or answer a command
HANGUP_NORMAL = 16


class Decider:
    """Answers the dialplan's AGI requests with the bridge's routing decision."""

    def __init__(self, sessions: Sessions | None, region: str,
                 table: dict[tuple[str, str], str] | None = None) -> None:
        self.sessions = sessions  # None: answered from the table
        self.region = region
        self.table = table or {}
        self.rows: list[uuid.UUID] = []  # the call rows written, ended when it stops

    async def decide(self, env: dict[str, str]) -> dict[str, str]:
        """The variables the dialplan gets: ROUTE_CALLEE and ROUTE_SHOWN for a call that connects,
        nothing for any other (the dialplan hangs it up)."""
        if self.sessions is None:
            dialed = env.get("agi_extension", "")
            callee = self.table.get((env.get("agi_callerid", ""), dialed))
            return {"ROUTE_CALLEE": callee, "ROUTE_SHOWN": dialed} if callee else {}
        try:
            caller = normalize(env.get("agi_callerid", ""), self.region)
            pool = normalize(env.get("agi_extension", ""), self.region)
        except InvalidNumber:
            return {}
        call = NewCall(uuid.uuid4(), mask(pool), mask(caller), env.get("agi_uniqueid", ""))
        route = await self.sessions.route(caller, pool, call)
        self.rows.append(call.id)
        if route.kind != "connect" or not route.callee_number or not route.shown_number:
            return {}
        return {"ROUTE_CALLEE": route.callee_number, "ROUTE_SHOWN": route.shown_number}

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One FastAGI request: the environment (lines up to an empty one), a SET VARIABLE
        per answer, each waited for (200 result=1), then the connection closed: the dialplan
        goes on."""
        try:
            env: dict[str, str] = {}
            async with asyncio.timeout(READ_TIMEOUT):
                while (line := (await reader.readline()).decode("utf-8", "replace").strip()):
                    name, _, value = line.partition(":")
                    env[name.strip()] = value.strip()
            for name, value in (await self.decide(env)).items():
                writer.write(f'SET VARIABLE {name} "{value}"\n'.encode())
                async with asyncio.timeout(READ_TIMEOUT):
                    answer = await reader.readline()
                if not answer.startswith(b"200"):
                    break
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


async def serve(host: str, ready: Path | None = None, table: dict[tuple[str, str], str] | None = None) -> None:
    settings = Settings.from_env(services=False)
    pool = await connect(settings.database_url, max_size=4)
    try:
        vault = NumberVault(MasterKeys(settings.number_keys), NumberKeyRepo(pool))
        await vault.start()
        store = Store(pool, node=settings.node_id)
        sessions = None if table is not None else Sessions(store, vault, policy_of(settings))
        decider = Decider(sessions, settings.default_region, table)
        server = await asyncio.start_server(decider.serve, host, AGI_PORT)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        if ready is not None:
            await asyncio.to_thread(ready.touch)
        await stop.wait()
        server.close()
        await server.wait_closed()
        for call_id in decider.rows:  # (nothing left routing: a bridge of this node would end them)
            await store.call_ended(call_id, "failed", "system", HANGUP_NORMAL, rung=False)
    finally:
        await pool.close()


@contextlib.asynccontextmanager
async def standing_in(stack: Stack, work: Path,
                      routes: list[tuple[str, str, str]] | None = None) -> AsyncIterator[None]:
    """The bridge stopped, this stand-in answering the dialplan (routes: from that table, not
    the bridge's decision), and the benchmark's pool number routed through it
    (extensions_bench_agi.conf) while the block runs; the bridge's route and the bridge back
    after, whatever happened. Needs asterisk.bench_route around it."""
    table = work / "agi-routes.json"
    argv = ["bench.agi", stack.env["MB_ARI_BIND"]]
    if routes is not None:
        table.write_text(json.dumps(routes))
        argv += ["--table", str(table)]
    try:
        async with floor.stand_in(stack, work, argv):
            with asterisk.bench_route_also(stack, AGI_ROUTE):
                yield
    finally:
        table.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    routes = None
    if args[1:2] == ["--table"] and len(args) >= 3:
        routes = {(caller, dialed): callee for caller, dialed, callee in json.loads(Path(args[2]).read_text())}
        args = args[:1] + args[3:]
    if len(args) not in (1, 2):
        print("usage: python -m bench.agi HOST [--table ROUTES] [READY_FILE]", file=sys.stderr)
        return 2
    logs.configure("warning")
    asyncio.run(serve(args[0], Path(args[1]) if len(args) == 2 else None, routes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
