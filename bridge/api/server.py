"""The API's listening socket, guarded: at most MAX_CONNECTIONS at once, and at most
MAX_PER_ADDRESS of them from one address (one more is closed as it arrives), and a
connection must bring a whole request (its line and headers) within REQUEST_TIMEOUT seconds
of opening, and the next one within as long of the last answer.

aiohttp's server has neither: 3000 connections that trickle their headers were all still
open after 80 s, and a client that opens enough of them exhausts the process's file
descriptors, which the bridge needs for ARI and Postgres: calls then fail. (The body of a
request is read by the handlers, with a limit of its own: bridge.api.http._read.)
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, cast

import structlog
from aiohttp import hdrs, web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from bridge.api.errors import error_body, status_code

log = structlog.get_logger(__name__)

MAX_CONNECTIONS = 1000
# One address may hold a quarter of them: a client that holds every connection it may (slow
# or idle ones, re-opened as they are cut) leaves the rest to the order system and to health
# checks. (Without it, one address held all 1000 and every other client was refused.)
MAX_PER_ADDRESS = MAX_CONNECTIONS // 4
REQUEST_TIMEOUT = 10.0  # seconds


class ConnectionGuard:
    def __init__(self, max_connections: int = MAX_CONNECTIONS, request_timeout: float = REQUEST_TIMEOUT,
                 max_per_address: int = MAX_PER_ADDRESS) -> None:
        self.max_connections = max_connections
        self.max_per_address = max_per_address
        self.request_timeout = request_timeout
        self.connections: dict[asyncio.BaseTransport, _Guarded] = {}
        self.by_address: dict[str, int] = {}
        self.refused = 0
        self.timed_out = 0

    def admit(self, address: str) -> bool:
        """Whether a connection from `address` may open (counted if so: see release)."""
        held = self.by_address.get(address, 0)
        if len(self.connections) >= self.max_connections or held >= self.max_per_address:
            self.refused += 1
            if self.refused % 1000 == 1:
                log.warning("api.connections_refused", open=len(self.connections), refused=self.refused,
                            from_this_address=held, limit="per_address" if held >= self.max_per_address else "all")
            return False
        self.by_address[address] = held + 1
        return True

    def release(self, address: str) -> None:
        held = self.by_address.get(address, 0) - 1
        if held > 0:
            self.by_address[address] = held
        else:
            self.by_address.pop(address, None)

    def factory(self, server: web.Server) -> Any:
        return lambda: _Guarded(_plain_errors(server()), self)

    # The API's outermost middleware says when a request has arrived whole and when it is answered.
    def request_started(self, transport: asyncio.BaseTransport | None) -> None:
        guarded = self.connections.get(transport) if transport is not None else None
        if guarded is not None:
            guarded.disarm()

    def request_answered(self, transport: asyncio.BaseTransport | None) -> None:
        guarded = self.connections.get(transport) if transport is not None else None
        if guarded is not None:
            guarded.arm()


class _PlainErrors(RequestHandler):
    """aiohttp's handler for one connection, answering a request it cannot parse (a control
    character in a header, a line too long) the API's way: a JSON error that names its status
    alone. aiohttp's own answer repeats the line it could not read, a token's secret or a
    phone number as it came. (aiohttp still logs it, as bridge.logs has it, and closes the
    connection.)"""

    __slots__ = ()

    def handle_error(self, request: BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        answered = super().handle_error(request, status, exc, message)
        if status >= 500:
            return answered
        response = web.json_response(error_body(status_code(status), "the request is not valid HTTP/1.1"),
                                     status=status)
        response.force_close()
        return response


def _plain_errors(handler: RequestHandler) -> RequestHandler:
    handler.__class__ = _PlainErrors  # (aiohttp makes the handler; its class has slots, none added here)
    return handler


class _Guarded(asyncio.Protocol):
    """aiohttp's protocol for one connection, with the guard's limits around it."""

    def __init__(self, inner: Any, guard: ConnectionGuard) -> None:
        self.inner = inner
        self.guard = guard
        self.transport: asyncio.Transport | None = None
        self.deadline: asyncio.TimerHandle | None = None
        self.refused = False
        self.address = ""

    def connection_made(self, base: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, base)  # (a TCP server's transports are)
        peer = transport.get_extra_info("peername")
        self.address = str(peer[0]) if isinstance(peer, tuple) and peer else ""
        if not self.guard.admit(self.address):
            self.refused = True
            transport.abort()
            return
        self.transport = transport
        self.guard.connections[transport] = self
        self.arm()
        self.inner.connection_made(transport)

    def arm(self) -> None:
        self.disarm()
        self.deadline = asyncio.get_running_loop().call_later(self.guard.request_timeout, self._too_slow)

    def disarm(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None

    def _too_slow(self) -> None:
        self.deadline = None
        self.guard.timed_out += 1
        if self.transport is not None:
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        result: bool | None = self.inner.eof_received()
        return result

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.refused:
            return
        self.disarm()
        self.guard.release(self.address)
        if self.transport is not None:
            self.guard.connections.pop(self.transport, None)
        self.inner.connection_lost(exc)


# A request's key set when it came with an Expect header other than 100-continue: the API's
# middleware answers it 417 in JSON (bridge.api.http), as any error.
UNMET_EXPECTATION = web.RequestKey("unmet_expectation", bool)


def _expectations(handle: Callable[[BaseRequest], Awaitable[web.StreamResponse]]) -> Callable[
        [BaseRequest], Awaitable[web.StreamResponse]]:
    """The app's handler, but a request expecting anything other than 100-continue reaches it
    without its Expect header and marked (UNMET_EXPECTATION): aiohttp would answer it itself,
    before the API's middleware (no log line, no metric), in text that repeats the header as
    it came - whatever the client put there, a token's secret or a phone number."""
    async def handler(request: BaseRequest) -> web.StreamResponse:
        expect = request.headers.get(hdrs.EXPECT)
        if expect is not None and expect.strip().lower() != "100-continue":
            headers = request.headers.copy()
            headers.popall(hdrs.EXPECT)
            request = request.clone(headers=headers)
            request[UNMET_EXPECTATION] = True
        return await handle(request)

    return handler


async def serve(runner: web.AppRunner, host: str, port: int, guard: ConnectionGuard) -> asyncio.Server:
    """Listen for the runner's app (after `runner.setup()`), through the guard."""
    server = runner.server
    if server is None:
        raise RuntimeError("the runner is not set up")
    server.request_handler = _expectations(server.request_handler)
    return await asyncio.get_running_loop().create_server(guard.factory(server), host, port, reuse_address=True)
