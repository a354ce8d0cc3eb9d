"""A bridge that cannot start as configured says why in one line and exits 2: a database that
refuses it, an unknown database host, an API address it cannot listen on. A database that
is still starting is waited for."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys

import pytest

from bridge.devstack import ports
from bridge.devstack.settings import PROJECT_DIR, Stack


def environ(stack: Stack, **settings: str) -> dict[str, str]:
    """A second bridge's: a node of its own (the stack's bridge holds node-1), another API
    port, and an ARI nobody answers on (it must not take the stack's Stasis application)."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith("MB_")}, **stack.bridge_env(),
            "MB_NODE_ID": "startup-test", "MB_API_PORT": str(int(stack.env["MB_API_PORT"]) + 9),
            "MB_ARI_URL": "http://127.0.0.1:9", **settings}


def bridge(stack: Stack, **settings: str) -> subprocess.Popen[str]:
    env = environ(stack, **settings)
    return subprocess.Popen([sys.executable, "-m", "bridge"], cwd=PROJECT_DIR, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def refused(stack: Stack, **settings: str) -> str:
    proc = bridge(stack, **settings)
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    return err


def test_a_database_that_refuses_the_bridge(stack):
    url = stack.database_url.replace(stack.env["MB_DB_PASSWORD"], "not-the-password")
    assert "the database refused the bridge" in refused(stack, MB_DATABASE_URL=url)


def test_an_unknown_database_host(stack):
    url = stack.database_url.replace("127.0.0.1", "no-such-host.invalid")
    assert "is unknown" in refused(stack, MB_DATABASE_URL=url)


@pytest.mark.parametrize("address", ["192.0.2.1", "no-such-host.invalid"])
def test_an_api_address_it_cannot_listen_on(stack, address):
    err = refused(stack, MB_API_BIND=address)
    assert f"the API cannot listen on {address}" in err, err


def test_a_bridge_of_another_node_on_the_stacks_asterisk(stack):
    """Two node ids, one Asterisk: the second bridge would take the Stasis application from
    the first. It is refused before it connects its event stream."""
    err = refused(stack, MB_ARI_URL=stack.bridge_env()["MB_ARI_URL"])
    assert "node 'node-1' already runs a bridge on this Asterisk" in err, err


def test_an_api_port_in_use(stack):
    err = refused(stack, MB_API_PORT=stack.env["MB_API_PORT"])  # the stack's own bridge has it
    assert "the API cannot listen on" in err, err


async def test_a_database_still_starting_is_waited_for(stack):
    """Nothing answers at first (the port is closed): the bridge says so and keeps trying,
    then starts once a database answers there (here: a port forwarded to the stack's
    Postgres once the bridge has said it waits)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = stack.database_url.replace(f":{stack.env['MB_PG_PORT']}/", f":{port}/")
    env = environ(stack, MB_DATABASE_URL=url)
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "bridge", cwd=PROJECT_DIR, env=env,
                                                stderr=asyncio.subprocess.PIPE)
    forward = None
    try:
        assert proc.stderr is not None
        await wait_line(proc.stderr, "db.unreachable_at_start")
        forward = await asyncio.create_subprocess_exec(sys.executable, "-c", FORWARD, str(port), stack.env["MB_PG_PORT"])
        await wait_line(proc.stderr, "bridge.started")
    finally:
        if forward is not None:
            forward.kill()
            await forward.wait()
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 30)


async def wait_line(stream: asyncio.StreamReader, event: str, timeout: float = 60) -> None:
    async with asyncio.timeout(timeout):
        while line := await stream.readline():
            if event.encode() in line:
                return
    raise AssertionError(f"the bridge exited before {event}")


# A TCP forwarder 127.0.0.1:<argv1> -> 127.0.0.1:<argv2>.
FORWARD = """
import asyncio, sys
async def pipe(r, w):
    try:
        while data := await r.read(65536):
            w.write(data); await w.drain()
    finally:
        w.close()
async def handle(r, w):
    r2, w2 = await asyncio.open_connection("127.0.0.1", int(sys.argv[2]))
    await asyncio.gather(pipe(r, w2), pipe(r2, w))
async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", int(sys.argv[1]))
    await server.serve_forever()
asyncio.run(main())
"""


def test_the_stack_s_postgres_port_is_never_given_to_an_outgoing_connection(stack):
    """`make run` / `make test` reserve the stack's listening ports of the ephemeral range
    (bridge/devstack/ports.py): a Postgres restarted mid-run finds its port free."""
    low, high = (int(v) for v in ports.PORT_RANGE.read_text().split())
    port = int(stack.env["MB_PG_PORT"])
    if not low <= port <= high:
        pytest.skip(f"Postgres's port {port} is outside the ephemeral range {low}-{high}")
    if not os.access(ports.RESERVED, os.W_OK):
        pytest.skip(f"{ports.RESERVED} is read-only here: the stack could only warn")
    assert port in ports.parse(ports.RESERVED.read_text())
