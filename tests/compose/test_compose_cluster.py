"""docker-compose.yml with docker-compose.cluster.yml, built and run: Kamailio in front of two
nodes (an Asterisk and its bridge each), every service healthy and hardened; calls from the
simulated carrier through Kamailio land on both nodes, masked; with node 2's bridge stopped,
calls go to node 1."""

from __future__ import annotations

import asyncio
import collections
import os
import uuid
from collections.abc import AsyncIterator, Iterator

import aiohttp
import asyncpg
import pytest

from bridge.devstack import media_guard
from bridge.devstack.carrier import Carrier
from bridge.devstack.settings import DEFAULTS, Stack, load
from tests.compose import stack as compose_stack
from tests.compose.conftest import _cleanup
from tests.compose.stack import PROJECT_DIR, ComposeStack
from tests.compose.test_compose_stack import call_json, open_session

pytestmark = pytest.mark.compose

CLUSTER_FILE = PROJECT_DIR / "docker-compose.cluster.yml"
CLUSTER_TEST_OVERRIDE = PROJECT_DIR / "tests" / "compose" / "docker-compose.cluster.test.yml"
SERVICES = ("postgres", "kamailio", "asterisk", "bridge", "asterisk-2", "bridge-2")

# Clear of the other compose test (127.0.0.41/.42) and of the local stacks.
# MB_COMPOSE_CLUSTER_<name without MB_> moves one.
SETTINGS = {
    "MB_KAM_ADDRESS": "127.0.0.45",  # Kamailio: the carrier's peer
    "MB_PBX_SIP_BIND": "127.0.0.46",  # node 1
    "MB_ARI_BIND": "127.0.0.46",
    "MB_API_BIND": "127.0.0.46",
    "MB_NODE2_ADDRESS": "127.0.0.47",  # node 2
    "MB_TRUNK_HOST": "127.0.0.48",  # the simulated carrier
    "MB_PG_PORT": "15473",
    "MB_RTP_START": "52000",
    "MB_RTP_END": "52499",
    "MB_NODE2_RTP_START": "52500",
    "MB_NODE2_RTP_END": "52999",
    "MB_CARRIER_RTP_START": "53000",
    "MB_CARRIER_RTP_END": "53999",
    "MB_RING_TIMEOUT": "10",
}


def settings() -> tuple[Stack, Stack]:
    """(what the compose files are given; the simulated carrier's stack, whose PBX is Kamailio)."""
    values = {name: os.environ.get("MB_COMPOSE_CLUSTER_" + name[3:], value) for name, value in SETTINGS.items()}
    environ = {**values, "MB_STACK_DIR": str(PROJECT_DIR / ".stack" / "compose-cluster"),
               "MB_ROOTFS": os.environ.get("MB_ROOTFS", DEFAULTS["MB_ROOTFS"][0])}
    base = load(environ)
    compose = Stack(env={**base.env, **values})
    carrier = Stack(env={**base.env, "MB_PBX_SIP_BIND": values["MB_KAM_ADDRESS"]})
    return compose, carrier


def node_2(compose: Stack) -> Stack:
    """The settings of node 2's media guard: node 2's RTP range."""
    env = compose.env
    return Stack(env={**env, "MB_RTP_START": env["MB_NODE2_RTP_START"], "MB_RTP_END": env["MB_NODE2_RTP_END"]})


@pytest.fixture(scope="module")
def cluster(engine: None) -> Iterator[tuple[ComposeStack, Stack]]:
    compose_env, carrier_env = settings()
    stack = ComposeStack(compose_env, extra=(CLUSTER_FILE, CLUSTER_TEST_OVERRIDE), profiles=(), name="cluster")
    try:
        stack.up()
        compose_stack.start_carrier(carrier_env)
        yield stack, carrier_env
    finally:
        _cleanup("docker compose down (cluster)", stack.down)
        _cleanup("removing node 2's media guard", lambda: media_guard.remove(node_2(stack.stack)))
        _cleanup("stopping the cluster's simulated carrier", lambda: compose_stack.stop_carrier(carrier_env))


@pytest.fixture
async def carrier(cluster: tuple[ComposeStack, Stack]) -> AsyncIterator[Carrier]:
    async with Carrier(cluster[1]) as net:
        yield net


@pytest.fixture
async def api(cluster: tuple[ComposeStack, Stack]) -> AsyncIterator[aiohttp.ClientSession]:
    compose, _ = cluster
    headers = {"Authorization": f"Bearer {compose.stack.env['MB_API_TOKEN']}"}
    async with aiohttp.ClientSession(base_url=compose.api, headers=headers) as http:
        yield http


@pytest.fixture
async def db(cluster: tuple[ComposeStack, Stack]) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(cluster[0].stack.database_url)
    yield conn
    await conn.close()


def test_each_node_has_its_media_guard(cluster: tuple[ComposeStack, Stack]) -> None:
    """Each node's RTP range takes UDP from the carrier only (media does not pass Kamailio),
    and each node's PBX waits for its own guard's word after a reboot (the volume its guard
    writes, read only), not the other node's."""
    compose, _ = cluster
    for service, pbx, node in (("media-guard", "asterisk", compose.stack),
                               ("media-guard-2", "asterisk-2", node_2(compose.stack))):
        assert compose.container(service)["State"]["Health"]["Status"] == "healthy", service
        assert media_guard.check(node) == "", service
        written = {m["Name"] for m in compose.container(service)["Mounts"]
                   if m["Destination"] == "/srv/maskbridge/guard" and m["RW"]}
        read = {m["Name"] for m in compose.container(pbx)["Mounts"]
                if m["Destination"] == "/srv/maskbridge/guard" and not m["RW"]}
        assert len(written) == 1 and read == written, (service, written, pbx, read)


def test_every_service_of_the_cluster_is_up_healthy_and_hardened(cluster: tuple[ComposeStack, Stack]) -> None:
    compose, _ = cluster
    for service in SERVICES:
        inspected = compose.container(service)
        host, config = inspected["HostConfig"], inspected["Config"]
        assert inspected["State"]["Health"]["Status"] == "healthy", service
        assert config["User"] not in ("", "root", "0"), f"{service} runs as root"
        assert host["ReadonlyRootfs"] and host["Init"], service
        assert host["CapDrop"] == ["ALL"] and not host["CapAdd"], service
        assert "no-new-privileges:true" in host["SecurityOpt"], service
    assert compose.compose("exec", "-T", "kamailio", "id", "-un").stdout.strip() == "kamailio"
    listed = compose.compose("exec", "-T", "kamailio", "kamcmd", "-s", "unix:/run/kamailio/kamailio_ctl",
                             "dispatcher.list").stdout
    for address in (compose.stack.env["MB_PBX_SIP_BIND"], compose.stack.env["MB_NODE2_ADDRESS"]):
        assert f"sip:{address}:5060" in listed
    # Each node's Asterisk has its own system name (the prefix of its unique ids).
    for service, name in (("asterisk", "node-1"), ("asterisk-2", "node-2")):
        settings_shown = compose.compose("exec", "-T", service, "asterisk", "-rx", "core show settings").stdout
        assert name in settings_shown, service


async def masked_call(carrier: Carrier, api: aiohttp.ClientSession, db: asyncpg.Connection) -> str:
    """A courier's call through Kamailio to the client of a new session, answered and hung
    up; returns the node that carried it."""
    session, courier, client = await open_session(api)
    carrier.phone(client, action="answer", answer_after=0.1, hangup_after=0.5, listen=False)
    leg = await carrier.call(courier, session["pool_number"], listen=False)
    callee = await asyncio.wait_for(carrier.incoming.get(), 15)
    await asyncio.wait_for(leg.ended.wait(), 15)
    assert callee.number == client
    assert (callee.shown_number, callee.shown_name or callee.shown_number) == (session["pool_number"],) * 2
    async with asyncio.timeout(10):
        while (row := await db.fetchrow("SELECT node, outcome FROM calls WHERE session_id = $1",
                                        uuid.UUID(session["id"]))) is None or row["outcome"] is None:
            await asyncio.sleep(0.1)  # wait-ok: polling the database the bridges write to
    assert row["outcome"] == "answered"
    return str(row["node"])


async def test_calls_through_kamailio_land_on_both_nodes_masked(
    cluster: tuple[ComposeStack, Stack], carrier: Carrier, api: aiohttp.ClientSession, db: asyncpg.Connection
) -> None:
    nodes = collections.Counter([await masked_call(carrier, api, db) for _ in range(4)])
    assert nodes == {"node-1": 2, "node-2": 2}


async def test_with_node_2s_bridge_stopped_calls_go_to_node_1(
    cluster: tuple[ComposeStack, Stack], carrier: Carrier, api: aiohttp.ClientSession, db: asyncpg.Connection
) -> None:
    compose, _ = cluster
    compose.compose("stop", "bridge-2")
    try:
        assert [await masked_call(carrier, api, db) for _ in range(3)] == ["node-1"] * 3
    finally:
        compose.compose("start", "bridge-2")
    status, health = await call_json(api, "GET", "/healthz")
    assert status == 200, health
