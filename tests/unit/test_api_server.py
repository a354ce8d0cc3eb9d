"""The API's guarded socket (bridge.api.server): connections over the limit are closed as they
arrive, a connection that does not bring a whole request in time is closed, and requests that
do are answered as usual. Real sockets, a small limit and a short timeout."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from structlog.testing import capture_logs

from bridge.api import http
from bridge.api.server import ConnectionGuard, serve

LIMIT, TIMEOUT = 5, 0.5


async def hello(_request: web.Request) -> web.Response:
    return web.Response(text="hello")


@contextlib.asynccontextmanager
async def serving(guard: ConnectionGuard, app: web.Application | None = None) -> AsyncIterator[int]:
    """An app (by default one answering GET /hello) behind `guard`, on a free port of
    127.0.0.1: the port."""
    if app is None:
        app = web.Application(middlewares=[http._measured])
        app.router.add_get("/hello", hello)
    app[http.GUARD] = guard
    runner = web.AppRunner(app)
    await runner.setup()
    listening = await serve(runner, "127.0.0.1", 0, guard)
    try:
        yield listening.sockets[0].getsockname()[1]
    finally:
        listening.close()
        await runner.cleanup()


@pytest.fixture
async def server() -> AsyncIterator[tuple[int, ConnectionGuard]]:
    guard = ConnectionGuard(max_connections=LIMIT, request_timeout=TIMEOUT, max_per_address=LIMIT)
    async with serving(guard) as port:
        yield port, guard


async def closed_by_server(reader: asyncio.StreamReader, within: float) -> bool:
    """Whether the server closes the connection within `within` seconds."""
    try:
        async with asyncio.timeout(within):
            return await reader.read() == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


async def get_hello(port: int) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return answer


async def test_a_connection_trickling_its_headers_is_closed_and_others_are_served(server):
    port, guard = server
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /hello HTTP/1.1\r\nHost: x\r\n")  # ... and the rest never comes
    await writer.drain()
    assert b"hello" in await get_hello(port), "served meanwhile"
    assert await closed_by_server(reader, TIMEOUT * 10)
    assert guard.timed_out >= 1
    writer.close()


async def test_connections_over_the_limit_are_closed_as_they_arrive(server):
    port, guard = server
    held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(LIMIT)]
    async with asyncio.timeout(5):
        while len(guard.connections) < LIMIT:
            await asyncio.sleep(0.01)  # wait-ok: the server accepts them asynchronously
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    assert await closed_by_server(reader, 5), "the connection over the limit is closed"
    assert guard.refused >= 1
    writer.close()
    # The held ones bring no request: closed after the timeout, and the API serves again.
    for held_reader, _ in held:
        assert await closed_by_server(held_reader, TIMEOUT * 10)
    assert b"hello" in await get_hello(port)
    for _, held_writer in held:
        held_writer.close()


async def test_a_kept_alive_connection_gets_the_timeout_again_after_each_answer(server):
    port, _ = server
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for _ in range(3):
        writer.write(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"hello"), 5)
        assert head.startswith(b"HTTP/1.1 200")
    assert await closed_by_server(reader, TIMEOUT * 10), "idle after its last answer: closed"
    writer.close()


async def test_one_address_holds_at_most_its_share_and_others_are_still_served():
    """A client holding every connection it may (slow or idle ones) from one address leaves
    the rest to other clients (127.0.0.2 here: another address on the loopback)."""
    guard = ConnectionGuard(max_connections=8, request_timeout=5.0, max_per_address=3)
    async with serving(guard) as port:
        held = [await asyncio.open_connection("127.0.0.1", port, local_addr=("127.0.0.3", 0)) for _ in range(3)]
        async with asyncio.timeout(5):
            while guard.by_address.get("127.0.0.3") != 3:
                await asyncio.sleep(0.01)  # wait-ok: the server accepts them asynchronously
        reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=("127.0.0.3", 0))
        assert await closed_by_server(reader, 5), "a fourth from the same address is closed"
        assert guard.refused == 1
        writer.close()
        assert b"hello" in await get_hello(port), "another address is served meanwhile"
        for _, held_writer in held:
            held_writer.close()
        async with asyncio.timeout(5):
            while "127.0.0.3" in guard.by_address:
                await asyncio.sleep(0.01)  # wait-ok: the server sees them close asynchronously
        assert all(g.address != "127.0.0.3" for g in guard.connections.values())


@pytest.mark.parametrize("bad", [
    b"Authorization: Bearer mbt_abcdefabcdef_SECRET\x01rest",  # a control character in a value
    b"X-Number: +79161234567\x7f",
    b"Bad Header Name: +79161234567",
])
async def test_a_request_that_cannot_be_parsed_is_answered_in_json_without_repeating_it(server, bad):
    """aiohttp's own answer quotes the line it could not read: a token's secret, a number."""
    port, _ = server
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /hello HTTP/1.1\r\nHost: x\r\n" + bad + b"\r\n\r\n")
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") or head.startswith(b"HTTP/1.0 400"), head
    assert b"application/json" in head
    assert json.loads(body) == {"error": {"code": "bad_request", "message": "the request is not valid HTTP/1.1"}}
    assert b"SECRET" not in answer and b"1234567" not in answer
    # (and the server goes on)
    assert (await get_hello(port)).endswith(b"hello")


async def echo_length(request: web.Request) -> web.Response:
    return web.Response(text=str(len(await http._read(request, 100))))


@pytest.fixture
async def api() -> AsyncIterator[int]:
    """The API's own middleware (its errors) behind the guard, with a body read as the API
    reads one (at most 100 bytes; aiohttp's own ceiling 1000): the port."""
    app = web.Application(middlewares=[http._measured, http._errors], client_max_size=1000)
    app.router.add_get("/hello", hello)
    app.router.add_post("/echo", echo_length)
    async with serving(ConnectionGuard(max_connections=LIMIT, request_timeout=5, max_per_address=LIMIT),
                       app) as port:
        yield port


async def exchange(port: int, request: bytes) -> tuple[bytes, dict]:
    """One request on a connection of its own: the answer's head, and its JSON body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    async with asyncio.timeout(5):
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:")))
        body = await reader.readexactly(length)
    writer.close()
    return head, json.loads(body)


@pytest.mark.parametrize("path", [b"/hello", b"/nowhere"])
async def test_an_expectation_other_than_100_continue_gets_a_json_417_that_repeats_nothing(api, path):
    """aiohttp answers it itself, before any middleware, with a text that quotes the header."""
    with capture_logs() as logs:
        head, body = await exchange(api, b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n"
                                         b"Expect: 100-continue, mbt_abcdefabcdef_SECRET +79161234567\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 417"), head
    assert body == {"error": {"code": "expectation_failed", "message": "only Expect: 100-continue is understood"}}
    assert b"SECRET" not in head and b"1234567" not in head
    assert [(e["event"], e["status"]) for e in logs if e["event"] == "api.request"] == [("api.request", 417)]


async def test_expect_100_continue_is_still_answered_continue(api):
    reader, writer = await asyncio.open_connection("127.0.0.1", api)
    writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-Continue\r\n"
                 b"Connection: close\r\n\r\n")
    await writer.drain()
    async with asyncio.timeout(5):
        assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"hello")
        answer = await reader.read()
    writer.close()
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"\r\n\r\n5"), answer


async def test_a_body_that_does_not_decode_as_its_content_encoding_says_is_the_clients_fault(api):
    """(It was a 500.) An encoding aiohttp does not decode at all (br) is refused with the
    request's head, as any request it cannot parse."""
    for encoding in (b"gzip", b"deflate", b"br"):
        head, body = await exchange(api, b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Encoding: " + encoding
                                         + b"\r\nContent-Length: 10\r\nConnection: close\r\n\r\n+791612345")
        assert head.split(b" ")[1] == b"400", (encoding, head)
        assert body["error"]["code"] == "bad_request"
        assert b"791612345" not in head + json.dumps(body).encode()


async def test_a_compressed_body_that_inflates_past_the_limit_is_413_as_any_other(api):
    for size in (500, 5000):  # (past the API's 100, and past aiohttp's own 1000)
        packed = gzip.compress(b"0" * size)
        head, body = await exchange(api, b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Encoding: gzip\r\n"
                                         b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(packed) + packed)
        assert head.startswith(b"HTTP/1.1 413"), (size, head)
        assert body == {"error": {"code": "body_too_large", "message": "the body must be at most 100 bytes"}}


async def test_a_client_gone_mid_body_is_not_the_databases_trouble(api):
    """(It was logged api.database_unavailable, a 503 in the metrics.)"""
    with capture_logs() as logs:
        reader, writer = await asyncio.open_connection("127.0.0.1", api)
        writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789")
        await writer.drain()
        writer.close()
        async with asyncio.timeout(5):
            while not any(e["event"] == "api.request" for e in logs):
                await asyncio.sleep(0.01)  # wait-ok: the server sees the connection close asynchronously
    assert [e["status"] for e in logs if e["event"] == "api.request"] == [400]
    assert not any(e["event"] in ("api.database_unavailable", "api.failed") for e in logs)
