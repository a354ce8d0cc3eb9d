"""Fixtures of the live tests: the running stack (started if needed), the simulated
carrier, the bridge's HTTP API, fresh real numbers, and what the carrier received."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import json
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import asyncpg
import pytest
from aiohttp import web

from bridge.ari import AriClient
from bridge.crypto import NumberVault
from bridge.devstack import asterisk, network, processes
from bridge.devstack.network import HostileNetwork
from bridge.pools import Pools
from bridge.requests import OpenSession, parse
from bridge.sessions import Policy, Sessions
from bridge.store import Store, migrate
from bridge.devstack.carrier import Carrier
from bridge.devstack.settings import Stack, load
from bridge.devstack.audio import rms, samples
from bridge.phone import mask
from tests.live.siplog import SipLog

pytestmark = pytest.mark.live

# Every real number a live test used; the log test checks none of them reached a log line.
USED_NUMBERS: list[str] = []
# Where the bridge's log stood when this run began (a checkout's log outlives its runs).
BRIDGE_LOG_START: list[int] = []
_counter = itertools.count(random.randrange(0, 10_000_000))  # runs on one database rarely meet


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # The log audit reads what every other live test wrote: it runs last.
    items.sort(key=lambda item: item.name.startswith("test_no_real_number_in_"))


@pytest.fixture(scope="session")
def stack() -> Stack:
    stack = load()
    if not (processes.health(stack) or {}).get("ari"):
        from bridge.devstack.__main__ import start_services

        start_services(stack)
        processes.start_bridge(stack)
    processes.wait_healthy(stack)
    log = processes.bridge_log(stack)
    BRIDGE_LOG_START[:] = [log.stat().st_size if log.exists() else 0]
    return stack


@pytest.fixture
def real_number() -> Callable[[], str]:
    """A fresh Russian mobile number nobody else in this run uses."""

    def make() -> str:
        number = f"+7916{next(_counter) % 10_000_000:07d}"
        USED_NUMBERS.append(number)
        return number

    return make


_pool_counter = itertools.count(random.randrange(7_000_000, 9_800_000))  # clear of demo and bench numbers


@pytest.fixture
def new_pool_number() -> Callable[[], str]:
    """A pool number nobody has used in this run (the pool is shared by all live tests)."""
    return lambda: f"+7495{next(_pool_counter):07d}"


@pytest.fixture
async def fresh_region(db: asyncpg.Connection) -> str:
    """A region no pool number has yet, so a test can own every number in it."""
    rng = random.Random()
    while True:
        region = "ZZ-" + "".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ0123456789") for _ in range(3))
        if not await db.fetchval("SELECT EXISTS (SELECT 1 FROM pool_numbers WHERE region = $1)", region):
            return region


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

    async def open_session(self, order_id: str, courier: str, client: str, **terms: Any) -> dict[str, Any]:
        """Open (terms: region, ttl_seconds, ...) and close it again after the test."""
        status, body = await self.request(
            "POST",
            "/v1/sessions",
            json={"order_id": order_id, "courier_number": courier, "client_number": client, **terms},
        )
        assert status in (200, 201), body
        self.opened.append(body["id"])
        return body

    async def metrics(self) -> str:
        """The bridge's /metrics (no token needed)."""
        async with self.http.get(self.base + "/metrics") as resp:
            assert resp.status == 200
            return await resp.text()

    async def close_session(self, session_id: str, **body: Any) -> dict[str, Any]:
        status, answer = await self.request("POST", f"/v1/sessions/{session_id}/close", json=body)
        assert status == 200, answer
        return answer

    async def import_pool(self, numbers: list[str], region: str) -> dict[str, Any]:
        status, body = await self.request(
            "POST", "/v1/pool-numbers", json={"numbers": [{"number": n, "region": region} for n in numbers]}
        )
        assert status in (200, 201), body
        return body


@contextlib.asynccontextmanager
async def api_of(stack: Stack) -> AsyncIterator[Api]:
    """The API of a stack's (first) bridge, with its token; the sessions it opened are
    closed afterwards."""
    headers = {"Authorization": f"Bearer {stack.env['MB_API_TOKEN']}"}
    base = f"http://{stack.env['MB_API_BIND']}:{stack.env['MB_API_PORT']}"
    async with aiohttp.ClientSession(headers=headers) as http:
        client = Api(http, base)
        yield client
        for session_id in client.opened:
            await client.request("POST", f"/v1/sessions/{session_id}/close")


@pytest.fixture
async def api(stack: Stack) -> AsyncIterator[Api]:
    async with api_of(stack) as client:
        yield client


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


async def announced(carrier: Carrier, caller: str, pool: str) -> Any:
    """Call `pool` from `caller` and check that no phone rang and the caller was answered
    with an announcement (not silence) and then hung up by the PBX."""
    leg = await carrier.call(caller, pool)
    await asyncio.wait_for(leg.ended.wait(), 30)
    await asyncio.wait_for(leg.recorded.wait(), 10)
    assert carrier.incoming.empty(), "no phone may ring"
    assert leg.answered_at is not None, "the PBX answered to play the announcement"
    assert leg.cause == 16, "the PBX hung up after the announcement"
    heard, _ = samples(carrier.recording_path(leg))
    assert rms(heard) > 100, "the caller heard an announcement, not silence"
    return leg


async def last_call_of(db: asyncpg.Connection, pool: str, caller: str) -> dict[str, Any]:
    """The latest call row from `caller` (matched by its masked form) to `pool`, once ended."""
    masked = mask(caller)
    async with asyncio.timeout(10):
        while True:
            row = await db.fetchrow(
                "SELECT * FROM calls WHERE pool_number = $1 AND caller_masked = $2 ORDER BY started_at DESC LIMIT 1",
                pool, masked,
            )
            if row is not None and row["state"] == "ended":
                return dict(row)
            await asyncio.sleep(0.05)  # wait-ok: polling the database the bridge writes to


class PbxTrunk:
    """The PBX's trunk settings for the running test: its identity settings (send_pai, ...)
    and whether it points at the hostile network relay. Each change reloads the PBX."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.identity: dict[str, str] = {}
        self.via_relay = False

    def apply(self) -> None:
        overrides = dict(self.identity)
        if self.via_relay:
            overrides["MB_TRUNK_PORT"] = self.stack.env["MB_RELAY_PORT"]
        asterisk.reload(self.stack, "pbx", overrides)


@pytest.fixture(scope="session")
def pbx_trunk(stack: Stack) -> Iterator[PbxTrunk]:
    trunk = PbxTrunk(stack)
    yield trunk
    trunk.identity, trunk.via_relay = {}, False
    trunk.apply()


@pytest.fixture(scope="session")
def trunk_identity(pbx_trunk: PbxTrunk) -> Callable[[dict[str, str]], None]:
    """Switch the PBX trunk's identity settings (send_pai, ...) for a test; restored after
    the run (each test that cares sets its own)."""

    def apply(overrides: dict[str, str]) -> None:
        pbx_trunk.identity = dict(overrides)
        pbx_trunk.apply()

    return apply


@pytest.fixture
async def hostile_network(stack: Stack, pbx_trunk: PbxTrunk) -> AsyncIterator[HostileNetwork]:
    """The hostile network between the PBX and the simulated carrier for this test
    (bridge/devstack/network.py): the PBX's trunk points at the relay, and calls the carrier
    places with `via_network=True` go through it too."""
    async with network.for_stack(stack.env) as net:
        pbx_trunk.via_relay = True
        pbx_trunk.apply()
        try:
            yield net
        finally:
            pbx_trunk.via_relay = False
            pbx_trunk.apply()


def opening(order_id: str, courier: str, client: str, **fields: Any) -> OpenSession:
    """The request to open an order's session, checked as the API checks it."""
    return parse(OpenSession, {"order_id": order_id, "courier_number": courier, "client_number": client, **fields})


SCRATCH_KEY = "scratch-schema-key-scratch-schema-key-0123"


def histogram_totals(histogram: Any) -> tuple[float, float]:
    """(observations, their sum) so far of a histogram of the bridge's metrics, in this process."""
    count = sum_ = 0.0
    for metric in histogram.collect():
        for sample in metric.samples:
            if sample.name.endswith("_count"):
                count = sample.value
            elif sample.name.endswith("_sum"):
                sum_ = sample.value
    return count, sum_


class Harness:
    """The session and pool services over a schema of their own in the stack's Postgres,
    on an event loop of their own: for tests that must own every row they look at."""

    def __init__(self, loop: asyncio.AbstractEventLoop, pool: asyncpg.Pool) -> None:
        self.loop = loop
        self.pool = pool
        self.store = Store(pool)
        self.vault = NumberVault(SCRATCH_KEY, self.store.number_keys)
        loop.run_until_complete(self.vault.start())
        policy = Policy(pair_cooloff=3600, number_cooling=3600, retention_days=30)
        self.sessions = Sessions(self.store, self.vault, policy)
        self.pools = Pools(self.store, policy)

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)


@pytest.fixture(scope="module")
def scratch_db(stack: Stack, request: pytest.FixtureRequest) -> Iterator[Harness]:
    schema = "scratch_" + request.module.__name__.rsplit(".", 1)[-1]
    loop = asyncio.new_event_loop()

    async def setup() -> asyncpg.Pool:
        admin = await asyncpg.connect(stack.database_url)
        await admin.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema}")
        await admin.close()
        pool = await asyncpg.create_pool(
            stack.database_url, min_size=1, max_size=4, server_settings={"search_path": schema}
        )
        assert pool is not None
        await migrate(pool, NumberVault(SCRATCH_KEY))
        return pool

    pool = loop.run_until_complete(setup())
    yield Harness(loop, pool)

    async def teardown() -> None:
        await pool.execute(f"DROP SCHEMA {schema} CASCADE")
        await pool.close()

    loop.run_until_complete(teardown())
    loop.close()


class WebhookReceiver:
    """The order system's webhook endpoint (MB_WEBHOOK_URL of make test): it keeps every
    delivery, and refuses the first delivery of each event of the calls in `flaky`."""

    def __init__(self) -> None:
        self.deliveries: list[dict[str, Any]] = []
        self.flaky: set[str] = set()
        self._refused: set[str] = set()
        self.changed = asyncio.Condition()

    async def handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        body = json.loads(raw)
        refuse = body["data"].get("call_id") in self.flaky and body["id"] not in self._refused
        if refuse:
            self._refused.add(body["id"])
        self.deliveries.append({"headers": dict(request.headers), "raw": raw, "body": body,
                                "status": 503 if refuse else 204})
        async with self.changed:
            self.changed.notify_all()
        return web.Response(status=503 if refuse else 204)

    async def events_of(self, call_id: str, kinds: set[str], timeout: float = 20) -> list[dict[str, Any]]:
        """The accepted deliveries of a call, once every kind in `kinds` has arrived."""
        async with asyncio.timeout(timeout), self.changed:
            while True:
                got = [d for d in self.deliveries if d["status"] == 204 and d["body"]["data"].get("call_id") == call_id]
                if kinds <= {d["body"]["type"] for d in got}:
                    return got
                await self.changed.wait()


@pytest.fixture(scope="session", autouse=True)
async def webhooks(stack: Stack) -> AsyncIterator[WebhookReceiver]:
    """Listens for the whole live run, so that every call's events are delivered at once."""
    # Where the bridge under test sends them (the Makefile's TEST_ENV sets MB_WEBHOOK_URL).
    async with webhook_receiver(stack.env["MB_WEBHOOK_URL"] or "http://127.0.0.1:8099/hooks") as receiver:
        yield receiver


@contextlib.asynccontextmanager
async def webhook_receiver(where: str) -> AsyncIterator[WebhookReceiver]:
    receiver = WebhookReceiver()
    app = web.Application()
    app.router.add_post("/hooks", receiver.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    url = urlsplit(where)
    await web.TCPSite(runner, url.hostname, url.port).start()
    try:
        yield receiver
    finally:
        await runner.cleanup()


def pbx_ari(stack: Stack) -> AriClient:
    """A client of the PBX's ARI, as the bridge's application (for the tests' own requests)."""
    env = stack.env
    return AriClient(f"http://{env['MB_ARI_BIND']}:{env['MB_ARI_PORT']}", env["MB_ARI_USER"], env["MB_ARI_PASSWORD"],
                     env["MB_ARI_APP"])


@contextlib.asynccontextmanager
async def max_calls(stack: Stack, value: int) -> AsyncIterator[None]:
    """The PBX's MAX_CALLS set to `value` while the block runs, then what it was."""
    env = stack.env
    pbx = pbx_ari(stack)
    try:
        before = (await pbx.request("GET", "/asterisk/variable", {"variable": "MAX_CALLS"}))["value"]
        assert before == env["MB_PBX_MAX_CALLS"], "the dialplan holds the configured limit"
        await pbx.request("POST", "/asterisk/variable", {"variable": "MAX_CALLS", "value": str(value)})
        try:
            yield
        finally:
            await pbx.request("POST", "/asterisk/variable", {"variable": "MAX_CALLS", "value": before})
    finally:
        await pbx.close()
