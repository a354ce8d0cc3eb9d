"""The recording routes' tokens, against the real HTTP app with an in-memory audit: the API
token never reaches a recording, the recording token never reaches the rest of the API, named
tokens reach what their scopes say, and every attempt is audited with the token's name."""

from __future__ import annotations

import uuid
import base64
import json
import os
from datetime import datetime, timezone
from types import SimpleNamespace
from typing import Any

import pytest
import structlog
from aiohttp.test_utils import TestClient, TestServer
from structlog.testing import capture_logs

from bridge.api.http import make_app
from bridge.cli import parser
from bridge.config import ConfigError, Settings
from bridge.calls.recording import wav_duration_ms
from bridge.recordings import Recordings
from bridge.store.recordings import RecordingRow
from token_fake import FakeTokenRepo, tokens_with

API_TOKEN = "api-token-0123456789abcdef"
RECORDING_TOKEN = "recording-token-0123456789ab"


class FakeRepo:
    def __init__(self) -> None:
        self.audit_rows: list[dict[str, Any]] = []
        self.rows: dict[uuid.UUID, RecordingRow] = {}
        self.asked: list[int | None] = []  # the `after` of every audit listing that reached the database

    async def audit(self, **row: Any) -> None:
        self.audit_rows.append(row)

    async def of_call(self, call_id: uuid.UUID) -> RecordingRow | None:
        return self.rows.get(call_id)

    async def access_log(self, *, call_id: uuid.UUID | None, after: int | None, limit: int) -> list[dict[str, Any]]:
        self.asked.append(after)
        return []


@pytest.fixture
async def app() -> Any:
    repo = FakeRepo()
    recordings = Recordings(SimpleNamespace(recordings=repo), None, RECORDING_TOKEN)  # type: ignore[arg-type]
    named = FakeTokenRepo()
    NAMED["auditor"] = named.add("auditor", ["audit:read"])
    NAMED["listener"] = named.add("listener", ["recordings:read"])
    NAMED["revoked"] = named.add("revoked", ["recordings:read", "audit:read"], revoked=True)
    NAMED["expired"] = named.add("expired", ["recordings:read"], expired=True)

    async def health() -> dict[str, Any]:
        return {"ari": True, "database": True}

    tokens = tokens_with(named, API_TOKEN, RECORDING_TOKEN)
    web_app = make_app(None, None, None, tokens, health, recordings)  # type: ignore[arg-type]
    async with TestClient(TestServer(web_app)) as client:
        yield client, repo


NAMED: dict[str, str] = {}  # name -> secret, of the fixture's named tokens


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.mark.parametrize(
    ("header", "who"),
    [
        ("", ("no_token", None)),
        (f"Bearer {RECORDING_TOKEN}", ("token", "recording")),
        (f"bearer  {RECORDING_TOKEN} ", ("token", "recording")),
        (f"Bearer {API_TOKEN}", ("token", "env")),
        (f"Basic {RECORDING_TOKEN}", ("invalid_token", None)),
        (f"Bearer {RECORDING_TOKEN}x", ("invalid_token", None)),
        ("Bearer ", ("invalid_token", None)),
    ],
)
async def test_which_token_a_request_holds(header: str, who: tuple[str, str | None]) -> None:
    caller = await tokens_with(FakeTokenRepo(), API_TOKEN, RECORDING_TOKEN).caller(header)
    assert (caller.kind, caller.token) == who


async def test_the_settings_tokens_have_their_scopes_and_an_empty_one_is_none() -> None:
    tokens = tokens_with(FakeTokenRepo(), API_TOKEN, "")
    assert (await tokens.caller("Bearer ")).kind == "invalid_token"
    env = await tokens.caller(f"Bearer {API_TOKEN}")
    assert not env.may("recordings:read") and not env.may("audit:read")
    assert env.may("sessions:write") and env.may("pools:admin") and env.may("blocklist:write")
    recording = await tokens_with(FakeTokenRepo(), API_TOKEN, RECORDING_TOKEN).caller(f"Bearer {RECORDING_TOKEN}")
    assert recording.scopes == {"recordings:read", "audit:read"}


async def test_the_api_token_gets_403_and_no_token_401_and_both_are_audited(app) -> None:
    client, repo = app
    call_id = uuid.uuid4()
    resp = await client.get(f"/v1/calls/{call_id}/recording/audio", headers=bearer(API_TOKEN))
    assert resp.status == 403
    assert (await resp.json())["error"] == {
        "code": "insufficient_scope", "message": "the token 'env' lacks the scope recordings:read",
        "details": {"required_scope": "recordings:read"},
    }
    resp = await client.get(f"/v1/calls/{call_id}/recording")
    assert resp.status == 401 and resp.headers["WWW-Authenticate"] == 'Bearer realm="maskbridge"'
    resp = await client.get("/v1/recordings/access", headers=bearer("nope-nope-nope-nope"))
    assert resp.status == 401
    assert [(r["actor"], r["token"], r["action"], r["result"], r["status"], r["call_id"])
            for r in repo.audit_rows] == [
        ("token", "env", "download", "denied", 403, call_id),
        ("no_token", None, "metadata", "denied", 401, call_id),
        ("invalid_token", None, "audit", "denied", 401, None),
    ]


async def test_named_tokens_reach_what_their_scopes_say_and_the_audit_names_them(app) -> None:
    client, repo = app
    call_id = uuid.uuid4()
    resp = await client.get(f"/v1/calls/{call_id}/recording", headers=bearer(NAMED["listener"]))
    assert resp.status == 404  # reached the recordings: this call has none
    resp = await client.get("/v1/recordings/access", headers=bearer(NAMED["listener"]))
    assert resp.status == 403 and (await resp.json())["error"]["details"] == {"required_scope": "audit:read"}
    resp = await client.get(f"/v1/calls/{call_id}/recording/audio", headers=bearer(NAMED["auditor"]))
    assert resp.status == 403
    resp = await client.get("/v1/recordings/access", headers=bearer(NAMED["auditor"]))
    assert resp.status == 200
    with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logged:
        resp = await client.get("/v1/recordings/access", headers=bearer(NAMED["revoked"]))
        assert resp.status == 401 and (await resp.json())["error"]["message"] == "the token was revoked"
        resp = await client.get(f"/v1/calls/{call_id}/recording", headers=bearer(NAMED["expired"]))
        assert resp.status == 401 and (await resp.json())["error"]["message"] == "the token expired"
    # A revoked or expired token, presented with its secret, is still that token: the audit
    # and the log name it (actor invalid_token: it was refused).
    assert [(r["actor"], r["token"], r["action"], r["result"], r["status"]) for r in repo.audit_rows] == [
        ("token", "listener", "metadata", "not_found", 404),
        ("token", "listener", "audit", "denied", 403),
        ("token", "auditor", "download", "denied", 403),
        ("token", "auditor", "audit", "granted", 200),
        ("invalid_token", "revoked", "audit", "denied", 401),
        ("invalid_token", "expired", "metadata", "denied", 401),
    ]
    denied = [(e["actor"], e["token"]) for e in logged if e["event"] == "recording.access_denied"]
    assert denied == [("invalid_token", "revoked"), ("invalid_token", "expired")]
    assert [e.get("token") for e in logged if e["event"] == "api.request"] == ["revoked", "expired"]


async def test_the_recording_token_does_not_open_the_rest_of_the_api(app) -> None:
    client, _repo = app
    resp = await client.get("/v1/sessions", headers=bearer(RECORDING_TOKEN))
    assert resp.status == 403
    assert (await resp.json())["error"]["details"] == {"required_scope": "sessions:read"}


async def test_a_call_id_that_is_no_uuid_is_not_found_and_audited(app) -> None:
    client, repo = app
    resp = await client.get("/v1/calls/not-a-uuid/recording", headers=bearer(RECORDING_TOKEN))
    assert resp.status == 404 and (await resp.json())["error"]["code"] == "recording_not_found"
    assert [(r["actor"], r["result"], r["status"], r["call_id"]) for r in repo.audit_rows] == [
        ("token", "not_found", 404, None)
    ]


async def test_a_deleted_recording_is_gone_and_its_metadata_hides_the_spool_name(app) -> None:
    client, repo = app
    now = datetime.now(timezone.utc)
    live, gone = uuid.uuid4(), uuid.uuid4()
    for call_id, deleted in ((live, None), (gone, now)):
        repo.rows[call_id] = RecordingRow(uuid.uuid4(), call_id, None, f"maskbridge-{call_id}", "wav", now, now,
                                          1000, 16044, deleted)
    resp = await client.get(f"/v1/calls/{gone}/recording/audio", headers=bearer(RECORDING_TOKEN))
    assert resp.status == 410 and (await resp.json())["error"]["code"] == "recording_deleted"
    resp = await client.get(f"/v1/calls/{live}/recording", headers=bearer(RECORDING_TOKEN))
    body = await resp.json()
    assert resp.status == 200 and body["duration_ms"] == 1000 and "name" not in body
    assert [(r["result"], r["status"]) for r in repo.audit_rows] == [("gone", 410), ("granted", 200)]


def test_the_length_of_a_wav_recording_from_its_size() -> None:
    assert wav_duration_ms(44) == 0
    assert wav_duration_ms(44 + 16000) == 1000
    assert wav_duration_ms(10) == 0


def _cursor(value: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")


@pytest.mark.parametrize("query", ["call_id=not-a-uuid", "limit=0", "cursor=%25%25", f"cursor={_cursor(10**30)}"])
async def test_the_audit_checks_the_token_before_the_parameters_and_audits_the_refusal(app, query: str) -> None:
    """Without a token with audit:read a bad parameter still gets 401/403, and is audited."""
    client, repo = app
    resp = await client.get(f"/v1/recordings/access?{query}")
    assert resp.status == 401
    resp = await client.get(f"/v1/recordings/access?{query}", headers=bearer(API_TOKEN))
    assert resp.status == 403
    # With it: 422, audited as well; nothing reached the database's listing.
    resp = await client.get(f"/v1/recordings/access?{query}", headers=bearer(RECORDING_TOKEN))
    assert resp.status == 422 and (await resp.json())["error"]["code"] == "invalid_input"
    assert [(r["actor"], r["token"], r["action"], r["result"], r["status"]) for r in repo.audit_rows] == [
        ("no_token", None, "audit", "denied", 401), ("token", "env", "audit", "denied", 403),
        ("token", "recording", "audit", "failed", 422),
    ]
    assert repo.asked == []


@pytest.mark.parametrize("cursor", [0, -1, 2**63, 10**30, True, "7"])
async def test_an_audit_cursor_outside_bigint_is_refused_not_a_server_error(app, cursor: Any) -> None:
    client, repo = app
    resp = await client.get(f"/v1/recordings/access?cursor={_cursor(cursor)}", headers=bearer(RECORDING_TOKEN))
    assert resp.status == 422
    assert (await resp.json())["error"]["details"] == {"field": "cursor"}
    assert repo.asked == []


@pytest.mark.parametrize("cursor", [1, 2**63 - 1])
async def test_an_audit_cursor_in_range_is_taken(app, cursor: int) -> None:
    client, repo = app
    resp = await client.get(f"/v1/recordings/access?cursor={_cursor(cursor)}", headers=bearer(RECORDING_TOKEN))
    assert resp.status == 200 and repo.asked == [cursor]


# --- retention settings ------------------------------------------------------------------

BASE_ENV = {"MB_DATABASE_URL": "postgresql://x@127.0.0.1/x", "MB_NUMBER_KEY": "k" * 40}


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch):
    for name in [n for n in os.environ if n.startswith("MB_")]:  # e.g. make test's MB_WEBHOOK_URL
        monkeypatch.delenv(name)
    for name, value in BASE_ENV.items():
        monkeypatch.setenv(name, value)
    return monkeypatch


@pytest.mark.parametrize("value", ["0", "-1", "3651", "thirty"])
def test_a_recording_retention_outside_1_to_3650_days_is_refused(env, value: str) -> None:
    env.setenv("MB_RECORDING_RETENTION_DAYS", value)
    with pytest.raises(ConfigError, match="MB_RECORDING_RETENTION_DAYS"):
        Settings.from_env(services=False)


@pytest.mark.parametrize(("value", "days"), [(None, 30), ("1", 1), ("3650", 3650)])
def test_a_recording_retention_in_range_is_taken(env, value: str | None, days: int) -> None:
    if value is not None:
        env.setenv("MB_RECORDING_RETENTION_DAYS", value)
    assert Settings.from_env(services=False).recording_retention_days == days


@pytest.mark.parametrize("value", ["0", "-5", "x"])
def test_housekeeping_refuses_recordings_older_than_less_than_a_day(value: str) -> None:
    with pytest.raises(SystemExit) as exit_:
        parser().parse_args(["housekeeping", "--recordings", "--recordings-older-than", value])
    assert exit_.value.code == 2


def test_housekeeping_takes_recordings_older_than_a_day_or_more() -> None:
    args = parser().parse_args(["housekeeping", "--recordings", "--recordings-older-than", "1"])
    assert args.recordings_older_than == 1


@pytest.mark.parametrize(("argv", "message"), [
    (["housekeeping", "--purge", "--older-than", "-3"], "must be from 1 to 3650 days, not -3"),
    (["housekeeping", "--purge", "--older-than", "0"], "must be from 1 to 3650 days, not 0"),
    (["housekeeping", "--purge", "--older-than", "3d"], "not a whole number of days"),
    (["housekeeping", "--recordings", "--recordings-older-than", "0"], "must be from 1 to 3650 days"),
    (["session", "list", "--limit", "-1"], "must be from 1 to 500 sessions"),
])
def test_the_admin_tool_refuses_a_cut_off_or_limit_out_of_range_before_it_runs(capsys, argv, message):
    """`housekeeping --purge --older-than -3` once purged today's numbers: refused, exit 2."""
    with pytest.raises(SystemExit) as exited:
        parser().parse_args(argv)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err
    assert parser().parse_args(["housekeeping", "--purge", "--older-than", "1"]).older_than == 1
