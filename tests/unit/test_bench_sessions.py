"""The benchmark's sessions (bench.measure.open_sessions): every pair on the bench's pool
number, or the run stops, says why and closes what it opened. A pair that still has a live
session on that number from an earlier run is given another number; the routes through the
dialplan (the AGI design's among them) answer the bench's number alone, and its calls would
fail as if the design did (a full run's AGI figures were all failures that way)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest
from aiohttp import web

from bench.measure import BENCH_POOL_NUMBER, open_sessions
from bridge.devstack.settings import Stack


@dataclass
class _Api:
    """An HTTP API that takes the pool number and gives the i-th session pool_number_of(i)."""

    pool_number_of: Callable[[int], str]
    open: dict[str, str] = field(default_factory=dict)  # order_id -> session id
    closed: list[str] = field(default_factory=list)

    def app(self) -> web.Application:
        async def pool_numbers(_request: web.Request) -> web.Response:
            return web.json_response({"added": 1}, status=201)

        async def new_session(request: web.Request) -> web.Response:
            body = await request.json()
            i = len(self.open) + len(self.closed)
            self.open[body["order_id"]] = f"s{i}"
            return web.json_response({"id": f"s{i}", "pool_number": self.pool_number_of(i)}, status=201)

        async def find(request: web.Request) -> web.Response:
            order_id = request.query["order_id"]
            items = [{"id": self.open[order_id]}] if order_id in self.open else []
            return web.json_response({"items": items})

        async def close(request: web.Request) -> web.Response:
            session_id = request.match_info["id"]
            self.open = {o: s for o, s in self.open.items() if s != session_id}
            self.closed.append(session_id)
            return web.json_response({"id": session_id, "status": "closed"})

        app = web.Application()
        app.router.add_post("/v1/pool-numbers", pool_numbers)
        app.router.add_post("/v1/sessions", new_session)
        app.router.add_get("/v1/sessions", find)
        app.router.add_post("/v1/sessions/{id}/close", close)
        return app


@contextlib.asynccontextmanager
async def _serving(api: _Api) -> AsyncIterator[Stack]:
    runner = web.AppRunner(api.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        host, port = runner.addresses[0][:2]
        yield Stack(env={"MB_API_BIND": host, "MB_API_PORT": str(port), "MB_API_TOKEN": "t"})
    finally:
        await runner.cleanup()


async def test_every_pair_on_the_bench_number_is_a_bridge_route_on_it() -> None:
    api = _Api(lambda _i: BENCH_POOL_NUMBER)
    async with _serving(api) as stack:
        pairs, opened = await open_sessions(stack, 5, 2, "run")
    assert opened["sessions"] == 5 and len(api.open) == 5 and not api.closed
    assert [r.dialed for r in pairs.bridge] == [BENCH_POOL_NUMBER] * 5


async def test_a_pair_given_another_number_stops_the_run_says_why_and_closes_what_it_opened() -> None:
    api = _Api(lambda i: "+74950000001" if i == 3 else BENCH_POOL_NUMBER)
    async with _serving(api) as stack:
        with pytest.raises(RuntimeError, match=r"given \+74950000001, not the bench's pool number .*earlier run"):
            await open_sessions(stack, 6, 1, "run")
    # Every open ran to its end (one cancelled on its way could be written after the closes)
    # and every session opened is closed: the one given the wrong number, and the others.
    assert api.open == {} and sorted(api.closed) == [f"s{i}" for i in range(6)]
