"""The benchmark's sessions (bench.measure.open_sessions): every pair on the bench's pool
number, or the run stops and says why. A pair that still has a live session on that number
from an earlier run is given another number; the routes through the dialplan (the AGI
design's among them) answer the bench's number alone, and its calls would fail as if the
design did (a full run's AGI figures were all failures that way)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest
from aiohttp import web

from bench.measure import BENCH_POOL_NUMBER, open_sessions
from bridge.devstack.settings import Stack


def _api(pool_number_of: Callable[[int], str]) -> web.Application:
    """An HTTP API that takes the pool number and gives the i-th session pool_number_of(i)."""
    opened: list[dict] = []

    async def pool_numbers(_request: web.Request) -> web.Response:
        return web.json_response({"added": 1}, status=201)

    async def sessions(request: web.Request) -> web.Response:
        body = await request.json()
        opened.append(body)
        return web.json_response({"id": f"s{len(opened)}", "pool_number": pool_number_of(len(opened) - 1)},
                                 status=201)

    app = web.Application()
    app.router.add_post("/v1/pool-numbers", pool_numbers)
    app.router.add_post("/v1/sessions", sessions)
    return app


@pytest.fixture
def serve() -> Callable[[web.Application], AsyncIterator[Stack]]:
    async def run(app: web.Application) -> AsyncIterator[Stack]:
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        try:
            yield Stack(env={"MB_API_BIND": "127.0.0.1", "MB_API_PORT": str(port), "MB_API_TOKEN": "t"})
        finally:
            await runner.cleanup()

    return run


async def test_every_pair_on_the_bench_number_is_a_bridge_route_on_it(serve) -> None:
    async for stack in serve(_api(lambda _i: BENCH_POOL_NUMBER)):
        pairs, opened = await open_sessions(stack, 5, 2, "run")
    assert opened["sessions"] == 5
    assert [r.dialed for r in pairs.bridge] == [BENCH_POOL_NUMBER] * 5


async def test_a_pair_given_another_number_stops_the_run_and_says_why(serve) -> None:
    async for stack in serve(_api(lambda i: "+74950000001" if i == 3 else BENCH_POOL_NUMBER)):
        with pytest.raises(RuntimeError, match=r"given \+74950000001, not the bench's pool number .*earlier run"):
            await open_sessions(stack, 5, 1, "run")
