"""A cluster of its own for these tests: Kamailio in front of two nodes (an Asterisk and its
bridge each), one Postgres, the simulated carrier, on addresses and ports clear of the
stack the live tests use (MB_CLUSTER_<name without MB_> moves one, as for the compose test).
It is started once for the module's tests and stopped after them."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest

from bridge.devstack import media_guard, processes
from bridge.devstack.carrier import Carrier
from bridge.devstack.settings import DEFAULTS, PROJECT_DIR, Stack, load
from tests.live.conftest import Api, WebhookReceiver, api_of, webhook_receiver

pytestmark = pytest.mark.live

SETTINGS = {
    "MB_NODES": "2",
    "MB_PBX_SIP_BIND": "127.0.0.71",  # Kamailio: the carrier's peer
    "MB_ARI_BIND": "127.0.0.71",
    "MB_API_BIND": "127.0.0.71",  # node 1's API
    "MB_TRUNK_HOST": "127.0.0.72",  # the simulated carrier
    "MB_NODE_NET": "127.0.7",  # node i on 127.0.7.i
    "MB_PG_PORT": "15482",
    "MB_RTP_START": "48000",
    "MB_RTP_END": "49999",
    "MB_CARRIER_RTP_START": "50000",
    "MB_CARRIER_RTP_END": "51999",
    "MB_RING_TIMEOUT": "10",
    "MB_NODE_TIMEOUT": "6",
    "MB_WEBHOOK_URL": "http://127.0.0.71:8099/hooks",
}


def environ() -> dict[str, str]:
    values = {name: os.environ.get("MB_CLUSTER_" + name[3:], value) for name, value in SETTINGS.items()}
    values["MB_STACK_DIR"] = str(PROJECT_DIR / ".stack" / "cluster")
    values["MB_ROOTFS"] = os.environ.get("MB_ROOTFS", DEFAULTS["MB_ROOTFS"][0])
    base = {k: v for k, v in os.environ.items() if not k.startswith("MB_")}
    return {**base, **values}


def devstack(command: str, env: dict[str, str], timeout: float = 300) -> None:
    done = subprocess.run([sys.executable, "-m", "bridge.devstack", command], cwd=PROJECT_DIR, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"devstack {command}:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"


@pytest.fixture(scope="session")
def cluster() -> Iterator[Stack]:
    env = environ()
    devstack("stop", env)
    devstack("start", env)
    stack = load(env)
    try:
        yield stack
    finally:
        if not os.environ.get("MB_CLUSTER_KEEP"):  # (kept: to look at it after a failure)
            devstack("stop", env)
            media_guard.remove(stack)  # (the cluster's own range: `make stop` leaves a guard)


@pytest.fixture(scope="session", autouse=True)
async def webhooks(cluster: Stack) -> AsyncIterator[WebhookReceiver]:
    async with webhook_receiver(cluster.env["MB_WEBHOOK_URL"]) as receiver:
        yield receiver


@pytest.fixture
async def carrier(cluster: Stack) -> AsyncIterator[Carrier]:
    async with Carrier(cluster) as net:
        yield net


@pytest.fixture
async def api(cluster: Stack) -> AsyncIterator[Api]:
    async with api_of(cluster) as client:
        yield client


@pytest.fixture
async def db(cluster: Stack) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(cluster.database_url)
    yield conn
    await conn.close()


@pytest.fixture
def nodes_up(cluster: Stack) -> Iterator[list[Stack]]:
    """The two nodes, each with its Asterisk and its bridge running again after the test
    (a test may kill either)."""
    yield cluster.nodes
    env = environ()
    devstack("start", env)
    for node in cluster.nodes:
        processes.wait_healthy(node)
