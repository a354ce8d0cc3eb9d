"""Recorded sessions, with real calls: both parties hear the consent announcement before
they hear each other, the bridged call is one WAV file reached only with the recording
token, every access is audited, and retention deletes the audio from Asterisk."""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
import uuid
from typing import Any

import aiohttp
import asyncpg
import pytest

from bridge.ari import AriClient, AriNotFound
from bridge.devstack import asterisk, processes
from bridge.devstack.audio import rms, samples, tone_share
from bridge.devstack.carrier import Carrier, Leg
from bridge.devstack.settings import PROJECT_DIR, Stack
from tests.live.conftest import Api, wait_for_call_row
from tests.live.test_announcements import envelope, prompt_envelope

CALLER_TONE, CALLEE_TONE = 600, 1000  # what the courier's and the client's phones play
CONSENT = "conf-now-recording"
# The prompt's length in each language: its GSM file's size, 33 bytes per 20 ms.
PROMPT_SECONDS = {"en": 3828 / 1650, "ru": 3003 / 1650}
CONSENT_SECONDS = PROMPT_SECONDS["en"]


async def recorded_session(api: Api, real_number: Any, new_pool_number: Any, region: str, *,
                           record: bool = True, language: str = "en") -> tuple[str, str, dict[str, Any]]:
    """(courier, client, session) on a pool number of the test's own, in `language`."""
    await api.request("POST", "/v1/pool-numbers", json={"numbers": [
        {"number": new_pool_number(), "region": region, "language": language}]})
    courier, client = real_number(), real_number()
    session = await api.open_session(f"order-{uuid.uuid4()}", courier, client, region=region, record=record)
    assert session["record"] is record
    return courier, client, session


async def place(carrier: Carrier, courier: str, client: str, pool: str, *, caller_hangs_up_after: float | None,
                callee_hangs_up_after: float | None = None) -> tuple[Leg, Leg]:
    carrier.phone(client, action="answer", tone=CALLEE_TONE, hangup_after=callee_hangs_up_after)
    leg = await carrier.call(courier, pool, tone=CALLER_TONE, hangup_after=caller_hangs_up_after)
    callee = await asyncio.wait_for(carrier.incoming.get(), 10)
    await asyncio.wait_for(leg.ended.wait(), 30)
    await asyncio.wait_for(callee.ended.wait(), 10)
    await asyncio.wait_for(leg.recorded.wait(), 10)
    await asyncio.wait_for(callee.recorded.wait(), 10)
    return leg, callee


def correlation(a: list[float], b: list[float]) -> float:
    m = min(len(a), len(b))
    a, b = a[:m], b[:m]
    ma, mb = sum(a) / m, sum(b) / m
    cov = sum((x - ma) * (y - mb) for x, y in zip(a, b))
    norm = math.sqrt(sum((x - ma) ** 2 for x in a) * sum((y - mb) ** 2 for y in b)) or 1.0
    return cov / norm


def aligned(heard: list[float], prompt: list[float]) -> tuple[float, float]:
    """How alike a phone's first seconds and the prompt are (the best correlation of their
    20 ms loudness envelopes, the phone starting to listen up to 0.6 s before or after the
    prompt began), and where the prompt ends in what the phone heard (seconds)."""
    best, end = -1.0, 0.0
    for shift in range(-30, 31):  # blocks of 20 ms by which the prompt starts late
        score = correlation(heard[max(0, shift):], prompt[max(0, -shift):])
        if score > best:
            best, end = score, (len(prompt) + shift) * 0.02
    return best, end


def first_heard(values: list[int], rate: int, freq: int) -> float:
    """When a tone first makes most of what a phone hears (seconds), in blocks of 20 ms."""
    n = rate // 50
    for start in range(0, len(values) - n + 1, n):
        if tone_share(values[start:start + n], rate, freq) > 0.5:
            return start / rate
    return len(values) / rate


def heard(carrier: Carrier, leg: Leg) -> tuple[list[int], int]:
    return samples(carrier.recording_path(leg))


def share(values: list[int], rate: int, freq: int, start: float, end: float) -> float:
    return tone_share(values[int(start * rate):int(end * rate)], rate, freq)


async def recording_row(db: asyncpg.Connection, call_id: uuid.UUID) -> dict[str, Any]:
    """The call's recording row once the bridge has finished it."""
    async with asyncio.timeout(15):
        while True:
            row = await db.fetchrow("SELECT * FROM recordings WHERE call_id = $1", call_id)
            if row is not None and row["bytes"] is not None:
                return dict(row)
            await asyncio.sleep(0.05)  # wait-ok: polling the database the bridge writes to


class RecordingApi:
    """The recording routes, with whichever token a test presents."""

    def __init__(self, stack: Stack) -> None:
        self.base = f"http://{stack.env['MB_API_BIND']}:{stack.env['MB_API_PORT']}"
        self.tokens = {"recording": stack.env["MB_RECORDING_TOKEN"], "api": stack.env["MB_API_TOKEN"],
                       "wrong": "not-the-recording-token-0123456789"}

    async def get(self, path: str, token: str | None, **params: str) -> tuple[int, Any, bytes]:
        headers = {"Authorization": f"Bearer {self.tokens[token]}"} if token else {}
        async with aiohttp.ClientSession() as http, http.get(self.base + path, headers=headers, params=params) as r:
            raw = await r.read()
            return r.status, r.headers.get("Content-Type"), raw


@pytest.fixture
def recordings_api(stack: Stack) -> RecordingApi:
    return RecordingApi(stack)


@pytest.mark.parametrize("language", ["en", "ru"])
async def test_both_hear_the_consent_announcement_then_each_other_and_the_call_is_one_wav(
    language, stack, carrier, api, db, real_number, new_pool_number, fresh_region, recordings_api, webhooks, tmp_path
):
    courier, client, session = await recorded_session(api, real_number, new_pool_number, fresh_region,
                                                      language=language)
    leg, callee = await place(carrier, courier, client, session["pool_number"], caller_hangs_up_after=6.5)
    row = await wait_for_call_row(db, session["id"])
    assert (row["outcome"], row["hangup_by"], row["record"]) == ("answered", "caller", True)

    prompts = {lang: prompt_envelope(stack, lang, CONSENT) for lang in PROMPT_SECONDS}
    other_language = "ru" if language == "en" else "en"
    for phone, other_tone in ((leg, CALLEE_TONE), (callee, CALLER_TONE)):
        values, rate = heard(carrier, phone)
        # First the announcement in the pool number's language (by its loudness envelope),
        # and nothing of the other phone...
        score, prompt_ends = aligned(envelope(values, rate), prompts[language])
        assert score > 0.6, (phone.role, score)
        assert score > aligned(envelope(values, rate), prompts[other_language])[0] + 0.3, phone.role
        assert share(values, rate, other_tone, 0, prompt_ends - 0.1) < 0.05, phone.role
        # ...then the other phone, once the announcement is over.
        assert first_heard(values, rate, other_tone) > prompt_ends - 0.1, phone.role
        assert share(values, rate, other_tone, prompt_ends + 0.5, len(values) / rate - 0.3) > 0.6, phone.role

    recording = await recording_row(db, row["id"])
    status, kind, raw = await recordings_api.get(f"/v1/calls/{row['id']}/recording", "recording")
    assert status == 200 and kind.startswith("application/json"), raw
    meta = json.loads(raw)
    assert meta["id"] == str(recording["id"]) and meta["call_id"] == str(row["id"])
    assert meta["session_id"] == session["id"] and meta["format"] == "wav" and meta["deleted_at"] is None
    assert "name" not in meta, "the name in Asterisk's spool stays inside"
    # The caller hung up 6.5 s after the announcement began: the rest was recorded.
    talk_ms = 6500 - PROMPT_SECONDS[language] * 1000
    assert talk_ms - 1500 < meta["duration_ms"] < talk_ms + 1000, meta
    assert meta["bytes"] == 44 + 16 * meta["duration_ms"]

    status, kind, audio = await recordings_api.get(f"/v1/calls/{row['id']}/recording/audio", "recording")
    assert status == 200 and kind == "audio/wav" and len(audio) == meta["bytes"]
    path = tmp_path / "call.wav"
    path.write_bytes(audio)
    values, rate = samples(path)
    assert rate == 8000 and rms(values) > 500
    # One file, both parties in it: each phone's tone makes a good part of what was recorded.
    mine, theirs = tone_share(values, rate, CALLER_TONE), tone_share(values, rate, CALLEE_TONE)
    assert mine > 0.25 and theirs > 0.25 and mine + theirs > 0.8, (mine, theirs)
    stored = asterisk.host_path(stack, "pbx", "spool", "recording")
    assert [p.name for p in stored.glob(f"*{row['id']}*")] == [f"{recording['name']}.wav"]

    ended = [d for d in await webhooks.events_of(str(row["id"]), {"call.ended"})
             if d["body"]["type"] == "call.ended"][0]["body"]["data"]
    assert ended["recording_id"] == str(recording["id"])
    assert "recording" not in json.dumps({k: v for k, v in ended.items() if k != "recording_id"})


async def test_only_the_recording_token_reaches_a_recording_and_every_attempt_is_audited(
    carrier, api, db, real_number, new_pool_number, fresh_region, recordings_api
):
    courier, client, session = await recorded_session(api, real_number, new_pool_number, fresh_region)
    await place(carrier, courier, client, session["pool_number"], caller_hangs_up_after=CONSENT_SECONDS + 1.5)
    call_id = (await wait_for_call_row(db, session["id"]))["id"]
    recording = await recording_row(db, call_id)

    attempts = [(token, route) for token in (None, "api", "wrong") for route in ("", "/audio")]
    for token, route in attempts:
        status, _kind, raw = await recordings_api.get(f"/v1/calls/{call_id}/recording{route}", token)
        assert status == (403 if token == "api" else 401), (token, route, raw)
        assert b"RIFF" not in raw
    status, _kind, _raw = await recordings_api.get("/v1/recordings/access", "api", call_id=str(call_id))
    assert status == 403
    status, _kind, raw = await recordings_api.get(f"/v1/calls/{call_id}/recording/audio", "recording")
    assert status == 200 and raw[:4] == b"RIFF"

    audit = await db.fetch(
        "SELECT coalesce(token, actor) AS actor, action, result, status, recording_id, remote FROM recording_access WHERE call_id = $1 "
        "ORDER BY id", call_id,
    )
    expected = [
        *[({None: "no_token", "api": "env", "wrong": "invalid_token"}[token],
           "metadata" if not route else "download", "denied", 403 if token == "api" else 401)
          for token, route in attempts],
        ("env", "audit", "denied", 403),
        ("recording", "download", "granted", 200),
    ]
    assert [(a["actor"], a["action"], a["result"], a["status"]) for a in audit] == expected
    assert audit[-1]["recording_id"] == recording["id"]
    assert all(a["remote"] for a in audit), "where each request came from"

    # The audit is readable with the recording token (and reading it is audited too).
    status, _kind, raw = await recordings_api.get("/v1/recordings/access", "recording", call_id=str(call_id))
    items = json.loads(raw)["items"]
    assert status == 200 and [i["action"] for i in items][:2] == ["audit", "download"]
    assert len(items) == len(expected) + 1


async def test_an_unrecorded_session_hears_no_announcement_and_records_nothing(
    stack, carrier, api, db, real_number, new_pool_number, fresh_region, recordings_api
):
    courier, client, session = await recorded_session(api, real_number, new_pool_number, fresh_region, record=False)
    leg, callee = await place(carrier, courier, client, session["pool_number"], caller_hangs_up_after=3.0)
    row = await wait_for_call_row(db, session["id"])
    assert row["record"] is False
    for phone, other_tone in ((leg, CALLEE_TONE), (callee, CALLER_TONE)):
        values, rate = heard(carrier, phone)
        # The other phone from the first moment: no announcement in between.
        assert share(values, rate, other_tone, 0.1, 1.5) > 0.6, phone.role
    assert await db.fetchval("SELECT count(*) FROM recordings WHERE call_id = $1", row["id"]) == 0
    assert not list(asterisk.host_path(stack, "pbx", "spool", "recording").glob(f"*{row['id']}*"))
    status, _kind, raw = await recordings_api.get(f"/v1/calls/{row['id']}/recording", "recording")
    assert status == 404 and b"recording_not_found" in raw
    audit = await db.fetchrow("SELECT * FROM recording_access WHERE call_id = $1", row["id"])
    assert (audit["actor"], audit["token"], audit["result"], audit["status"]) == ("token", "recording", "not_found", 404)


@pytest.mark.parametrize("who", ["caller", "callee"])
async def test_a_hangup_during_the_consent_announcement_ends_the_call_cleanly(
    who, carrier, api, db, real_number, new_pool_number, fresh_region
):
    courier, client, session = await recorded_session(api, real_number, new_pool_number, fresh_region)
    early = 1.0  # seconds after answer: well inside the announcement
    leg, callee = await place(carrier, courier, client, session["pool_number"],
                              caller_hangs_up_after=early if who == "caller" else None,
                              callee_hangs_up_after=early if who == "callee" else None)
    row = await wait_for_call_row(db, session["id"])
    assert (row["outcome"], row["hangup_by"]) == ("answered", who)
    other = callee if who == "caller" else leg
    assert other.cause == 16, "the PBX hung up the other phone normally"
    assert leg.duration is not None and callee.duration is not None
    assert leg.duration < CONSENT_SECONDS and callee.duration < CONSENT_SECONDS
    for phone, other_tone in ((leg, CALLEE_TONE), (callee, CALLER_TONE)):
        values, rate = heard(carrier, phone)
        assert share(values, rate, other_tone, 0, len(values) / rate) < 0.05, "they never heard each other"
    assert await db.fetchval("SELECT count(*) FROM recordings WHERE call_id = $1", row["id"]) == 0


async def test_retention_deletes_the_audio_from_asterisk_and_the_api_says_gone(
    stack, carrier, api, db, real_number, new_pool_number, fresh_region, recordings_api
):
    courier, client, session = await recorded_session(api, real_number, new_pool_number, fresh_region)
    await place(carrier, courier, client, session["pool_number"], caller_hangs_up_after=CONSENT_SECONDS + 1.0)
    call_id = (await wait_for_call_row(db, session["id"]))["id"]
    recording = await recording_row(db, call_id)
    audio_file = asterisk.host_path(stack, "pbx", "spool", "recording", f"{recording['name']}.wav")
    assert audio_file.exists()

    # Thirty-one days later (MB_RECORDING_RETENTION_DAYS is 30)...
    await db.execute(
        "UPDATE recordings SET started_at = started_at - interval '31 days', ended_at = ended_at - interval '31 days' "
        "WHERE id = $1", recording["id"],
    )
    # ...the housekeeping deletes it (the bridge runs it hourly; the admin tool on demand).
    done = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "bridge.devstack", "admin", "--json", "housekeeping", "--recordings"],
        cwd=PROJECT_DIR, env=os.environ, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["recordings"]["recordings_deleted"] >= 1
    assert not audio_file.exists(), "the audio is gone from Asterisk's spool"
    assert await db.fetchval("SELECT deleted_at FROM recordings WHERE id = $1", recording["id"]) is not None

    for route in ("", "/audio"):
        status, _kind, raw = await recordings_api.get(f"/v1/calls/{call_id}/recording{route}", "recording")
        assert status == 410 and b"recording_deleted" in raw, raw
    audit = await db.fetch(
        "SELECT coalesce(token, actor) AS actor, action, result, status FROM recording_access WHERE recording_id = $1 ORDER BY id",
        recording["id"],
    )
    assert [tuple(a) for a in audit] == [
        ("retention", "delete", "granted", 200),
        ("recording", "metadata", "gone", 410),
        ("recording", "download", "gone", 410),
    ]


async def test_a_recorded_call_that_ends_while_the_bridge_is_down_is_finished_by_the_next_process(
    stack, carrier, api, db, real_number, new_pool_number, fresh_region, recordings_api
):
    """The caller hangs up while no bridge process runs. The next one hangs up the client,
    stops the recording in Asterisk, stores its size (the API serves it at once, not 409
    recording_in_progress) and destroys the bridge."""
    courier, client, session = await recorded_session(api, real_number, new_pool_number, fresh_region)
    carrier.phone(client, action="answer", tone=CALLEE_TONE)
    leg = await carrier.call(courier, session["pool_number"], tone=CALLER_TONE)
    callee = await asyncio.wait_for(carrier.incoming.get(), 10)
    call_id = (await wait_for_call_row(db, session["id"], state="connected"))["id"]
    name = f"maskbridge-{call_id}"
    env = stack.bridge_env()
    ari = AriClient(env["MB_ARI_URL"], env["MB_ARI_USER"], env["MB_ARI_PASSWORD"], env["MB_ARI_APP"])
    try:
        async with asyncio.timeout(15):  # the consent announcement, then Asterisk records
            while True:
                try:
                    await ari.request("GET", f"/recordings/live/{name}")
                    break
                except AriNotFound:
                    await asyncio.sleep(0.1)  # wait-ok: polling Asterisk for the recording to begin

        await asyncio.to_thread(processes.stop_bridge, stack)
        try:
            await carrier.hangup(leg)
            await asyncio.wait_for(leg.ended.wait(), 10)
            assert not callee.ended.is_set(), "nobody hangs up the client while the bridge is down"
        finally:
            await asyncio.to_thread(processes.start_bridge, stack)
            await asyncio.to_thread(processes.wait_healthy, stack)

        await asyncio.wait_for(callee.ended.wait(), 15)
        row = await wait_for_call_row(db, session["id"])
        assert (row["outcome"], row["hangup_by"]) == ("answered", "system")
        recording = await recording_row(db, call_id)
        assert recording["ended_at"] is not None and recording["bytes"] > 44
        assert recording["duration_ms"] == (recording["bytes"] - 44) // 16
        status, kind, audio = await recordings_api.get(f"/v1/calls/{call_id}/recording/audio", "recording")
        assert status == 200 and kind == "audio/wav" and len(audio) == recording["bytes"]
        with pytest.raises(AriNotFound):
            await ari.request("GET", f"/recordings/live/{name}")
        with pytest.raises(AriNotFound):
            await ari.get_bridge(str(call_id))
    finally:
        await ari.close()
