"""The bench counts the 503s the bridge itself sent (its calls shed) apart from the PBX's, from
the bridge's own /metrics."""

from __future__ import annotations

import socket
from types import SimpleNamespace
from typing import Any

from aiohttp import web

from bench.measure import calls_shed
from bench.report import _step_failures
from bridge import metrics


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_the_calls_the_bridge_shed_are_read_from_its_metrics() -> None:
    async def serve(_: web.Request) -> web.Response:
        return web.Response(body=metrics.render(), content_type="text/plain")

    app = web.Application()
    app.router.add_get("/metrics", serve)
    runner = web.AppRunner(app)
    await runner.setup()
    port = _free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    stack: Any = SimpleNamespace(env={"MB_API_BIND": "127.0.0.1", "MB_API_PORT": str(port)})
    try:
        before = await calls_shed(stack)
        assert before is not None
        metrics.CALLS_SHED.inc(3)
        assert await calls_shed(stack) == before + 3
    finally:
        await runner.cleanup()
    assert await calls_shed(stack) is None  # (no bridge: a stand-in runs)


def test_a_steps_failures_say_how_many_503s_the_bridge_shed() -> None:
    step = {"failures": {"no callee (caller got 503)": 517, "answered after more than 3 s": 21}, "shed_by_bridge": 517}
    assert _step_failures(step) == ("no callee (caller got 503): 517, answered after more than 3 s: 21; "
                                    "calls the bridge shed (503): 517")
    assert _step_failures({"failures": {}, "shed_by_bridge": 0}) == "-; calls the bridge shed (503): 0"
    assert _step_failures({"failures": {}, "shed_by_bridge": None}) == "-"  # (a stand-in ran: not counted)
