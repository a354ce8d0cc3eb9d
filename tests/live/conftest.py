"""Fixtures of the live tests: the running stack (started if needed), the simulated
carrier, the bridge's HTTP API, fresh real numbers, and what the carrier received."""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import aiohttp
import asyncpg
import pytest

from bridge.devstack import asterisk, processes
from bridge.devstack.carrier import Carrier
from bridge.devstack.settings import Stack, load
from tests.live.siplog import SipLog

pytestmark = pytest.mark.live

# Every real number a live test used; the log test checks none of them reached a log line.
USED_NUMBERS: list[str] = []
_counter = itertools.count(random.randrange(1000, 9000) * 100)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # The log audit reads what every other live test wrote: it runs last.
    items.sort(key=lambda item: "test_no_real_number_in_logs" in item.name)


@pytest.fixture(scope="session")
def stack() -> Stack:
    stack = load()
    if not (processes.health(stack) or {}).get("ari"):
        from bridge.devstack.__main__ import start_services

        start_services(stack)
        processes.start_bridge(stack)
    processes.wait_healthy(stack)
    return stack


@pytest.fixture
def real_number() -> Callable[[], str]:
    """A fresh Russian mobile number nobody else in this run uses."""

    def make() -> str:
        number = f"+7916{next(_counter) % 10_000_000:07d}"
        USED_NUMBERS.append(number)
        return number

    return make


@pytest.fixture
async def carrier(stack: Stack) -> AsyncIterator[Carrier]:
    async with Carrier(stack) as net:
        yield net


@pytest.fixture
def sip_log(stack: Stack) -> SipLog:
    return SipLog(asterisk.host_path(stack, "carrier", "log", "sip.log"))


class Api:
    def __init__(self, session: aiohttp.ClientSession, base: str) -> None:
        self.http = session
        self.base = base
        self.opened: list[str] = []

    async def request(self, method: str, path: str, **kw: Any) -> tuple[int, Any]:
        async with self.http.request(method, self.base + path, **kw) as resp:
            return resp.status, await resp.json(content_type=None)

    async def open_session(self, order_id: str, courier: str, client: str) -> dict[str, Any]:
        status, body = await self.request(
            "POST", "/v1/sessions", json={"order_id": order_id, "courier_number": courier, "client_number": client}
        )
        assert status in (200, 201), body
        self.opened.append(body["id"])
        return body

    async def close_session(self, session_id: str) -> dict[str, Any]:
        status, body = await self.request("POST", f"/v1/sessions/{session_id}/close")
        assert status == 200, body
        return body


@pytest.fixture
async def api(stack: Stack) -> AsyncIterator[Api]:
    headers = {"Authorization": f"Bearer {stack.env['MB_API_TOKEN']}"}
    base = f"http://{stack.env['MB_API_BIND']}:{stack.env['MB_API_PORT']}"
    async with aiohttp.ClientSession(headers=headers) as http:
        client = Api(http, base)
        yield client
        for session_id in client.opened:
            await client.request("POST", f"/v1/sessions/{session_id}/close")


@pytest.fixture
async def db(stack: Stack) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(stack.database_url)
    yield conn
    await conn.close()


async def wait_for_call_row(
    db: asyncpg.Connection, session_id: str, state: str = "ended", timeout: float = 10
) -> dict[str, Any]:
    """The session's latest call row once it is in `state` (the bridge writes it as the call goes)."""
    async with asyncio.timeout(timeout):
        while True:
            row = await db.fetchrow(
                "SELECT * FROM calls WHERE session_id = $1 ORDER BY started_at DESC LIMIT 1", session_id
            )
            if row is not None and row["state"] == state:
                return dict(row)
            await asyncio.sleep(0.05)  # wait-ok: polling the database the bridge writes to


@pytest.fixture(scope="session")
def trunk_identity(stack: Stack) -> Iterator[Callable[[dict[str, str]], None]]:
    """Switch the PBX trunk's identity settings (send_pai, ...) for a test; restored after."""

    def apply(overrides: dict[str, str]) -> None:
        asterisk.reload(stack, "pbx", overrides)

    yield apply
    asterisk.reload(stack, "pbx")
