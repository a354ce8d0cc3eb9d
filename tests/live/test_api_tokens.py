"""Named API tokens through maskbridge-admin against the running bridge and its Postgres: a
token added works at its first request, its scopes are enforced, a revoked or expired one is
refused at its next request (no restart), the audits and the log name it, and its secret is
kept nowhere but in the answer of `token add`. And a conflicting open says nothing of who
differs."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from typing import Any

import aiohttp
import asyncpg
import pytest

from bridge.cli import admin_actor
from bridge.devstack import processes
from bridge.devstack.settings import Stack
from bridge.tokens import secret_hash


async def admin(stack: Stack, *args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bridge.cli", *args, env={**os.environ, **stack.bridge_env()},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def add_token(stack: Stack, name: str, *options: str) -> dict[str, Any]:
    code, out = await admin(stack, "--json", "token", "add", name, *options)
    assert code == 0, out
    token: dict[str, Any] = json.loads(out)
    return token


class Client:
    def __init__(self, stack: Stack, http: aiohttp.ClientSession) -> None:
        self.base = f"http://{stack.env['MB_API_BIND']}:{stack.env['MB_API_PORT']}"
        self.http = http

    async def request(self, secret: str, method: str, path: str, **kw: Any) -> tuple[int, Any, Any]:
        headers = {"Authorization": f"Bearer {secret}"}
        async with self.http.request(method, self.base + path, headers=headers, **kw) as resp:
            return resp.status, await resp.json(content_type=None), resp.headers


@pytest.fixture
async def client(stack: Stack) -> Any:
    async with aiohttp.ClientSession() as http:
        yield Client(stack, http)


def _name() -> str:
    return f"live-{uuid.uuid4().hex[:10]}"


async def test_a_token_added_works_at_once_within_its_scopes_and_a_revoked_one_is_refused_at_once(
    stack, client, db: asyncpg.Connection, real_number
):
    name = _name()
    token = await add_token(stack, name, "--scope", "sessions:read,sessions:write", "--expires", "30d")
    secret = token["secret"]
    assert token["name"] == name and token["scopes"] == ["sessions:read", "sessions:write"]
    assert secret.startswith(token["starts"]) and token["state"] == "active"
    # Only the hash is kept.
    row = await db.fetchrow("SELECT * FROM api_tokens WHERE name = $1", name)
    assert bytes(row["secret_hash"]) == secret_hash(secret)
    assert secret not in json.dumps({k: str(v) for k, v in dict(row).items()})

    # Works at its first request, for what its scopes reach.
    order = f"order-{uuid.uuid4()}"
    body = {"order_id": order, "courier_number": real_number(), "client_number": real_number()}
    status, session, _ = await client.request(secret, "POST", "/v1/sessions", json=body)
    assert status == 201, session
    status, answer, _ = await client.request(secret, "GET", "/v1/pool-numbers")
    assert status == 403 and answer["error"] == {
        "code": "insufficient_scope", "message": f"the token '{name}' lacks the scope pools:read",
        "details": {"required_scope": "pools:read"},
    }
    status, answer, _ = await client.request(secret, "POST", "/v1/blocklist", json={"number": real_number()})
    assert status == 403 and answer["error"]["details"] == {"required_scope": "blocklist:write"}
    # The session's history names the token that opened it.
    status, events, _ = await client.request(secret, "GET", f"/v1/sessions/{session['id']}/events")
    assert status == 200 and [(e["kind"], e["token"]) for e in events["items"]] == [("opened", name)]

    # The list shows it, never a secret.
    code, listed = await admin(stack, "--json", "token", "list")
    assert code == 0 and secret not in listed and "secret" not in listed
    [mine] = [t for t in json.loads(listed) if t["name"] == name]
    assert mine["state"] == "active" and mine["last_used_at"] is not None

    # Revoked: refused at its next request, by a bridge that was not restarted.
    code, out = await admin(stack, "token", "revoke", name)
    assert code == 0, out
    status, answer, headers = await client.request(secret, "POST", f"/v1/sessions/{session['id']}/close")
    assert status == 401 and answer["error"] == {"code": "unauthorized", "message": "the token was revoked"}
    assert headers["WWW-Authenticate"] == 'Bearer realm="maskbridge"'
    # (closed with the settings' token instead)
    status, _, _ = await client.request(stack.env["MB_API_TOKEN"], "POST", f"/v1/sessions/{session['id']}/close")
    assert status == 200
    status, events, _ = await client.request(stack.env["MB_API_TOKEN"], "GET", f"/v1/sessions/{session['id']}/events")
    assert [(e["kind"], e["token"]) for e in events["items"]] == [("opened", name), ("closed", "env")]

    # A name is never reused.
    code, out = await admin(stack, "token", "add", name, "--scope", "sessions:read")
    assert code == 1 and "never reused" in out

    # The bridge's log names the token on every request, and never holds its secret.
    log = processes.bridge_log(stack).read_text()
    lines = [json.loads(line) for line in log.splitlines() if name in line]
    assert {(e["route"], e["status"]) for e in lines if e.get("event") == "api.request"} >= {
        ("/v1/sessions", 201), ("/v1/pool-numbers", 403), ("/v1/blocklist", 403),
    }
    # (its random part is the 43 characters after the key id: they may hold "_" too, so the
    # secret is cut at the first two only; cut at the last, a secret ending "_w" once found
    # its "w" in the log)
    assert secret not in log and secret.split("_", 2)[2] not in log


async def test_an_expired_token_is_refused_and_admin_refuses_a_past_expiry(stack, client, db):
    name = _name()
    secret = (await add_token(stack, name, "--scope", "sessions:read"))["secret"]
    assert (await client.request(secret, "GET", "/v1/sessions?limit=1"))[0] == 200
    await db.execute("UPDATE api_tokens SET expires_at = now() - interval '1 second' WHERE name = $1", name)
    status, answer, _ = await client.request(secret, "GET", "/v1/sessions?limit=1")
    assert status == 401 and answer["error"]["message"] == "the token expired"
    code, out = await admin(stack, "token", "add", _name(), "--scope", "sessions:read", "--expires", "2020-01-01")
    assert code == 1 and "in the future" in out
    code, out = await admin(stack, "token", "add", _name(), "--scope", "sessions:admin")
    assert code == 1 and "unknown scope sessions:admin" in out
    code, out = await admin(stack, "token", "add", "env", "--scope", "sessions:read")
    assert code == 1 and "settings" in out


async def test_a_token_over_its_rate_gets_429_with_retry_after_and_others_go_on(stack, client):
    secret = (await add_token(stack, _name(), "--scope", "sessions:read", "--rate", "0.01"))["secret"]
    burst = int(stack.env["MB_API_BURST"])
    statuses = [(await client.request(secret, "GET", "/v1/sessions?limit=1"))[0] for _ in range(burst)]
    assert statuses == [200] * burst
    status, answer, headers = await client.request(secret, "GET", "/v1/sessions?limit=1")
    assert status == 429 and answer["error"]["code"] == "rate_limited"
    assert int(headers["Retry-After"]) >= 1
    assert answer["error"]["details"]["retry_after_seconds"] == int(headers["Retry-After"])
    # The settings' token has a bucket of its own.
    assert (await client.request(stack.env["MB_API_TOKEN"], "GET", "/v1/sessions?limit=1"))[0] == 200


async def test_a_named_token_with_recordings_read_is_audited_by_name(stack, client, db):
    name = _name()
    secret = (await add_token(stack, name, "--scope", "recordings:read"))["secret"]
    call_id = uuid.uuid4()
    status, answer, _ = await client.request(secret, "GET", f"/v1/calls/{call_id}/recording")
    assert status == 404 and answer["error"]["code"] == "recording_not_found"
    status, answer, _ = await client.request(secret, "GET", "/v1/recordings/access")
    assert status == 403 and answer["error"]["details"] == {"required_scope": "audit:read"}
    rows = await db.fetch("SELECT actor, token, action, result, status FROM recording_access WHERE token = $1 "
                          "ORDER BY id", name)
    assert [tuple(r) for r in rows] == [("token", name, "metadata", "not_found", 404),
                                        ("token", name, "audit", "denied", 403)]


async def test_a_conflicting_open_answers_the_same_whoever_differs(api, real_number):
    courier, client_number = real_number(), real_number()
    order = f"order-{uuid.uuid4()}"
    first = await api.open_session(order, courier, client_number)
    answers = []
    for body in (
        {"courier_number": real_number(), "client_number": client_number},  # another courier
        {"courier_number": courier, "client_number": real_number()},  # another client
        {"courier_number": real_number(), "client_number": real_number()},  # both
        {"courier_number": courier, "client_number": client_number, "mode": "order_code"},  # another mode
    ):
        status, answer = await api.request("POST", "/v1/sessions", json={"order_id": order, **body})
        assert status == 409
        answers.append(answer)
    assert all(a == answers[0] for a in answers), answers
    assert answers[0]["error"]["details"] == {"session_id": first["id"]}
    assert answers[0]["error"]["code"] == "order_has_open_session"


async def test_a_guessing_loop_against_the_real_bridge_learns_nothing_past_the_conflict_burst(
        stack, client, api, real_number):
    """The tester's attack: a token with sessions:read and sessions:write opens the order again
    with its own courier number and each candidate client number; the right one would answer
    200. The conflict budget (MB_API_CONFLICT_BURST, then MB_API_CONFLICT_RATE a minute)
    answers 429 before the open runs, the right guess included."""
    burst = int(stack.env["MB_API_CONFLICT_BURST"])
    secret = (await add_token(stack, _name(), "--scope", "sessions:read,sessions:write"))["secret"]
    courier, client_number = real_number(), real_number()
    order = f"order-{uuid.uuid4()}"
    await api.open_session(order, courier, client_number)
    candidates = [real_number() for _ in range(burst + 5)]
    candidates.insert(burst + 2, client_number)  # the right guess, past the burst
    statuses = []
    for candidate in candidates:
        status, answer, headers = await client.request(secret, "POST", "/v1/sessions", json={
            "order_id": order, "courier_number": courier, "client_number": candidate})
        statuses.append(status)
        if status == 429:
            assert answer["error"]["code"] == "rate_limited" and int(headers["Retry-After"]) >= 1
    # (one more 409 could slip in if the loop took a refill's 6 seconds; a 200 never)
    assert statuses[:burst] == [409] * burst and 200 not in statuses and statuses.count(429) >= 5, statuses
    # A reassignment is refused with it too; reads go on.
    session_id = (await client.request(secret, "GET", f"/v1/sessions?order_id={order}"))[1]["items"][0]["id"]
    status, _, _ = await client.request(secret, "POST", f"/v1/sessions/{session_id}/participants",
                                        json={"role": "courier", "number": client_number})
    assert status == 429


async def test_requests_without_a_valid_token_are_held_back_per_address_without_audit_rows(stack, client, db):
    burst = int(stack.env["MB_API_ADDRESS_BURST"])
    call_id = uuid.uuid4()
    made_up = "mbt_" + uuid.uuid4().hex[:12] + "_" + "x" * 43
    statuses = [(await client.request(made_up, "GET", f"/v1/calls/{call_id}/recording"))[0]
                for _ in range(burst * 3)]
    held = statuses.count(429)
    assert statuses[:burst] == [401] * burst and held >= burst, statuses
    audited = await db.fetchval("SELECT count(*) FROM recording_access WHERE call_id = $1", call_id)
    assert audited == len(statuses) - held  # none for the requests held back


async def test_changes_made_with_the_admin_tool_are_attributed_to_it(stack, api, db, real_number):
    order = f"order-{uuid.uuid4()}"
    number = real_number()
    code, out = await admin(stack, "--json", "session", "open", order, real_number(), real_number())
    assert code == 0, out
    session_id = json.loads(out)["id"]
    code, out = await admin(stack, "session", "close", session_id)
    assert code == 0, out
    status, events = await api.request("GET", f"/v1/sessions/{session_id}/events")
    assert status == 200
    user = admin_actor().removeprefix("admin:")  # (the unix user running the tests)
    assert [(e["kind"], e["token"]) for e in events["items"]] == [("opened", f"admin:{user}"),
                                                                   ("closed", f"admin:{user}")]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bridge.cli", "--json", "block", "add", "-", env={**os.environ, **stack.bridge_env()},
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await proc.communicate(number.encode() + b"\n")
    assert proc.returncode == 0, out
    entry = json.loads(out.decode()[out.decode().index("{"):])
    try:
        assert await db.fetchval("SELECT created_by_token FROM blocked_numbers WHERE id = $1",
                                 uuid.UUID(entry["id"])) == f"admin:{user}"
    finally:
        await admin(stack, "block", "remove", entry["id"])
