"""AriClient.in_turn: requests written at once on one kept-alive connection, served in turn,
against a raw HTTP/1.1 server scripted here (as Asterisk's: one request at a time per
connection, each answered with a Content-Length)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from bridge.ari import client as ari_client
from bridge.ari.client import AriClient, Call
from bridge.ari.errors import AriConflict, AriUnavailable

# (method, target) -> the raw answer; None: no answer (it hangs); b"": the connection is closed
# without one (the request was carried out, the answer lost)
Answer = Callable[[str, str], bytes | None]


def ok(body: Any = None, status: int = 200, close: bool = False) -> bytes:
    data = json.dumps(body).encode() if body is not None else b""
    reason = {200: "OK", 204: "No Content"}.get(status, "Error")
    head = f"HTTP/1.1 {status} {reason}\r\nContent-Length: {len(data)}\r\n"
    return (head + ("Connection: close\r\n" if close else "") + "\r\n").encode() + data


class RawServer:
    """Serves each connection's requests one at a time, in order, and records them."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.requests: list[tuple[int, str, str]] = []  # (connection number, method, target)
        self.bodies: list[bytes] = []  # each request's body, in order
        self.connections = 0
        self.writers: list[asyncio.StreamWriter] = []

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        number = self.connections
        self.writers.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                method, target, _ = head.split(b"\r\n", 1)[0].decode().split(" ", 2)
                self.requests.append((number, method, target))
                length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                self.bodies.append(await reader.readexactly(length))
                answer = self.answer(method, target)
                if answer is None:
                    await asyncio.Event().wait()  # hangs
                if answer == b"":
                    break
                writer.write(answer)
                await writer.drain()
                if b"Connection: close" in answer:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def drop_idle(self) -> None:
        """Close every connection (as Asterisk closes one idle past its keep-alive)."""
        for writer in self.writers:
            writer.close()


@pytest.fixture
async def raw() -> AsyncIterator[Callable[[Answer], Any]]:
    servers: list[asyncio.Server] = []
    clients: list[AriClient] = []

    async def make(answer: Answer) -> tuple[RawServer, AriClient]:
        state = RawServer(answer)
        server = await asyncio.start_server(state._serve, "127.0.0.1", 0)
        servers.append(server)
        port = server.sockets[0].getsockname()[1]
        client = AriClient(f"http://127.0.0.1:{port}", "bridge", "secret", "maskbridge", request_timeout=1.0)
        clients.append(client)
        return state, client

    yield make
    for client in clients:
        await client.close()
    for server in servers:
        server.close()


JOIN = Call("POST", "/bridges/b-1/addChannel", {"channel": ["in-1", "out-1"], "inhibitConnectedLineUpdates": True})
DIAL = Call("POST", "/channels/out-1/dial", {"timeout": 11})


async def test_both_run_in_order_on_one_connection_and_each_answer_comes_back(raw) -> None:
    state, client = await raw(lambda m, t: ok(status=204) if "addChannel" in t else ok({"dialed": True}))
    assert await client.in_turn([JOIN, DIAL]) == [None, {"dialed": True}]
    assert [(c, m, t.split("?")[0]) for c, m, t in state.requests] == [
        (1, "POST", "/ari/bridges/b-1/addChannel"), (1, "POST", "/ari/channels/out-1/dial")]
    # The parameters as the HTTP client sends them: both legs, connected-line updates held back.
    assert "channel=in-1%2Cout-1" in state.requests[0][2] and "inhibitConnectedLineUpdates=true" in state.requests[0][2]


async def test_a_refused_request_is_returned_not_raised_and_the_next_one_ran(raw) -> None:
    refused = ok({"message": "Channel not in Stasis application"}, status=422)
    state, client = await raw(lambda m, t: refused if "addChannel" in t else ok(status=204))
    joined, dialed = await client.in_turn([JOIN, DIAL])
    assert isinstance(joined, AriConflict) and joined.status == 422 and "not in Stasis" in str(joined)
    assert dialed is None and len(state.requests) == 2


async def test_the_connection_is_kept_and_used_again(raw) -> None:
    state, client = await raw(lambda m, t: ok(status=204))
    await client.in_turn([JOIN, DIAL])
    await client.in_turn([JOIN, DIAL])
    assert state.connections == 1 and [c for c, _m, _t in state.requests] == [1, 1, 1, 1]


async def test_a_kept_connection_the_server_closed_meanwhile_is_replaced_and_nothing_runs_twice(raw) -> None:
    state, client = await raw(lambda m, t: ok(status=204))
    await client.in_turn([JOIN, DIAL])
    state.drop_idle()
    pipe = client._pipes[0]
    async with asyncio.timeout(5):
        while not pipe.reader.at_eof():
            await asyncio.sleep(0.01)  # wait-ok: polling the client socket's state until the close is there
    pipe.reader.at_eof = lambda: False  # type: ignore[method-assign]  # (the close still on its way: the race)
    assert await client.in_turn([JOIN, DIAL]) == [None, None]
    assert state.connections == 2 and [c for c, _m, _t in state.requests] == [1, 1, 2, 2]


async def test_a_single_request_goes_on_a_kept_connection_with_its_json_body(raw) -> None:
    state, client = await raw(lambda m, t: ok({"id": "out-1"}))
    made = await client.request("POST", "/channels/create", {"endpoint": "PJSIP/+79160000001@trunk"},
                                {"variables": {"MASK_NUMBER": "+74950000001"}})
    assert made == {"id": "out-1"}
    assert await client.request("GET", "/channels/out-1") == {"id": "out-1"}
    assert state.connections == 1
    assert [t for _c, _m, t in state.requests] == [
        "/ari/channels/create?endpoint=PJSIP%2F%2B79160000001%40trunk", "/ari/channels/out-1"]
    assert json.loads(state.bodies[0]) == {"variables": {"MASK_NUMBER": "+74950000001"}} and state.bodies[1] == b""


async def test_a_request_that_changes_something_runs_once_when_its_answer_is_lost(raw) -> None:
    """On a kept-alive connection closed with nothing read, a GET is asked again on a new
    connection; a POST is not (Asterisk may have carried it out before going down): the
    caller hears that Asterisk is unavailable, and it ran once."""
    served = 0

    def answer(method: str, target: str) -> bytes:
        nonlocal served
        served += 1
        return b"" if served in (2, 4) else ok({"ok": served})

    state, client = await raw(answer)
    await client.request("GET", "/asterisk/ping")
    with pytest.raises(AriUnavailable):
        await client.request("POST", "/bridges/b-1/record", {"name": "r-1"})
    assert [(c, m) for c, m, _t in state.requests] == [(1, "GET"), (1, "POST")]
    await client.request("GET", "/asterisk/ping")  # (a new connection, kept)
    assert await client.request("GET", "/asterisk/ping") == {"ok": 5}
    assert [(c, m) for c, m, _t in state.requests][2:] == [(2, "GET"), (2, "GET"), (3, "GET")]


async def test_a_connection_idle_too_long_is_not_used_again(raw, monkeypatch) -> None:
    monkeypatch.setattr(ari_client, "PIPE_IDLE_MAX", 0.0)
    state, client = await raw(lambda m, t: ok(status=204))
    await client.in_turn([JOIN, DIAL])
    await client.in_turn([JOIN, DIAL])
    assert state.connections == 2


async def test_an_answer_that_closes_the_connection_is_not_used_again(raw) -> None:
    state, client = await raw(lambda m, t: ok(status=204, close="dial" in t))
    await client.in_turn([JOIN, DIAL])
    await client.in_turn([JOIN, DIAL])
    assert state.connections == 2


async def test_a_server_that_does_not_answer_is_unavailable_within_the_timeout(raw) -> None:
    state, client = await raw(lambda m, t: ok(status=204) if "addChannel" in t else None)
    with pytest.raises(AriUnavailable) as failed:
        await client.in_turn([JOIN, DIAL])
    assert failed.value.status is None and "TimeoutError" in str(failed.value)
    assert client._pipes == [], "the connection that hung is not kept"


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 200 OK\r\n\r\n{}",  # no length
    b"HTTP/1.1 100 Continue\r\n\r\n",  # (never asked for)
    b"HTTP/1.1 200 OK\r\nX-Long: " + b"x" * 70000 + b"\r\nContent-Length: 0\r\n\r\n",  # a head past 64 KB
    b"garbage\r\n\r\n",
])
async def test_an_answer_it_cannot_read_or_a_connection_refused_is_unavailable(raw, answer: bytes) -> None:
    state, client = await raw(lambda m, t: answer)
    with pytest.raises(AriUnavailable):
        await client.in_turn([JOIN, DIAL])
    assert client._pipes == []
    closed = AriClient("http://127.0.0.1:9", "bridge", "secret", "maskbridge", request_timeout=1.0)
    with pytest.raises(AriUnavailable):
        await closed.in_turn([JOIN, DIAL])
    await closed.close()


async def test_over_tls_the_requests_go_one_after_the_other(monkeypatch) -> None:
    client = AriClient("https://pbx.example:8089", "bridge", "secret", "maskbridge")
    sent: list[str] = []

    async def request(method: str, path: str, params: dict[str, Any] | None = None, body: Any = None) -> Any:
        sent.append(path)
        if "addChannel" in path:
            raise AriConflict(method, path, 422, "Channel not in Stasis application")
        return None

    monkeypatch.setattr(client, "_request_aiohttp", request)
    joined, dialed = await client.in_turn([JOIN, DIAL])
    assert isinstance(joined, AriConflict) and dialed is None
    assert sent == ["/bridges/b-1/addChannel", "/channels/out-1/dial"]
    await client.close()


async def test_with_every_connection_in_use_the_requests_go_one_after_the_other(raw, monkeypatch) -> None:
    """PIPES_MAX connections writing at once: the next ones do not open more (Asterisk serves a
    limited number of connections), they go one by one on the HTTP pool, each once the one
    before has answered; and no more than PIPES_MAX are kept idle."""
    monkeypatch.setattr(ari_client, "PIPES_MAX", 2)
    release = asyncio.Event()
    waiting: list[str] = []

    state, client = await raw(lambda m, t: ok(status=204))
    original = ari_client._Pipe.answer

    async def slow_answer(pipe: Any) -> tuple[int, bytes, bool]:
        waiting.append("pipe")
        await release.wait()
        return await original(pipe)

    monkeypatch.setattr(ari_client._Pipe, "answer", slow_answer)
    busy = [asyncio.create_task(client.in_turn([JOIN, DIAL])) for _ in range(2)]
    async with asyncio.timeout(5):
        while len(waiting) < 2:
            await asyncio.sleep(0.01)  # wait-ok: until both connections wait for their answers
    assert await client.in_turn([JOIN, DIAL]) == [None, None], "one by one, not waiting for a connection"
    assert state.connections == 3  # (two raw ones, and the HTTP pool's)
    release.set()
    assert await asyncio.gather(*busy) == [[None, None], [None, None]]
    assert len(client._pipes) == 2


async def test_the_bridge_never_opens_more_connections_than_asterisk_serves() -> None:
    """Asterisk refuses connections past http.conf's sessionlimit: aiohttp's pool (the event
    stream's websocket in it) and the pipes, in use and idle, stay under it together, so that a
    burst after Asterisk was frozen waits for a connection instead."""
    client = AriClient("http://127.0.0.1:8088", "bridge", "secret", "maskbridge")
    try:
        assert client.session.connector is not None
        pool = client.session.connector.limit
        assert 0 < pool <= ari_client.HTTP_POOL_MAX
        assert pool + 2 * ari_client.PIPES_MAX < ari_client.ASTERISK_SESSION_LIMIT
    finally:
        await client.close()
