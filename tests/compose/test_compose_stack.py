"""docker-compose.yml, built and run as users run it: every service healthy and hardened,
the pinned Asterisk, the API, a real masked call through the compose PBX from a simulated
carrier, and a call that survives a restart of the bridge's container."""

from __future__ import annotations

import asyncio
import random
import re
import subprocess
import time
import uuid
from typing import Any

import aiohttp
import pytest

from bridge.devstack import asterisk, media_guard
from bridge.devstack.monitoring import rule_count
from bridge.devstack.audio import samples, tone_share
from bridge.devstack.carrier import Carrier
from tests.compose.stack import PROJECT_DIR, SERVICES, ComposeStack
from tests.live.siplog import SipLog, dialogs, ended_by_caller, identity_leaks, logged

pytestmark = pytest.mark.compose

REGION = "RU-MOW"
# Every real number these tests use; none may reach the bridge's log.
USED: list[str] = []


def real_number() -> str:
    number = f"+7916{random.randrange(10_000_000):07d}"
    USED.append(number)
    return number


async def call_json(api: aiohttp.ClientSession, method: str, path: str, **kw: Any) -> tuple[int, Any]:
    async with api.request(method, path, **kw) as resp:
        return resp.status, await resp.json(content_type=None)


async def open_session(api: aiohttp.ClientSession) -> tuple[dict[str, Any], str, str]:
    """A new order session between two fresh real numbers, on a pool number imported for it."""
    pool = f"+7495{random.randrange(10_000_000):07d}"
    status, body = await call_json(api, "POST", "/v1/pool-numbers", json={"numbers": [{"number": pool, "region": REGION}]})
    assert status in (200, 201), body
    courier, client = real_number(), real_number()
    status, session = await call_json(
        api, "POST", "/v1/sessions",
        json={"order_id": f"order-{uuid.uuid4()}", "courier_number": courier, "client_number": client, "region": REGION},
    )
    assert status == 201, session
    assert session["pool_number"] == pool
    return session, courier, client


async def last_call(api: aiohttp.ClientSession, session_id: str, state: str, timeout: float = 15) -> dict[str, Any]:
    """The session's latest call record once it is in `state`, as the API shows it."""
    async with asyncio.timeout(timeout):
        while True:
            status, body = await call_json(api, "GET", f"/v1/sessions/{session_id}/calls")
            assert status == 200, body
            if body["items"] and body["items"][0]["state"] == state:
                return dict(body["items"][0])
            await asyncio.sleep(0.1)  # wait-ok: polling the bridge's record of the call


def pinned_asterisk_version() -> str:
    dockerfile = (PROJECT_DIR / "asterisk-config" / "Dockerfile").read_text()
    match = re.search(r"^ARG ASTERISK_VERSION=(\S+)$", dockerfile, re.M)
    assert match, "asterisk-config/Dockerfile pins Asterisk"
    return match.group(1).split(":", 1)[-1]  # without the Debian epoch


def test_every_service_is_up_healthy_and_hardened(compose: ComposeStack) -> None:
    for service in SERVICES:
        inspected = compose.container(service)
        host, config = inspected["HostConfig"], inspected["Config"]
        assert inspected["State"]["Health"]["Status"] == "healthy", service
        assert config["User"] not in ("", "root", "0"), f"{service} runs as root"
        assert host["ReadonlyRootfs"], service
        assert host["Init"], service
        assert host["CapDrop"] == ["ALL"] and not host["CapAdd"], service
        assert "no-new-privileges:true" in host["SecurityOpt"], service
        assert host["Memory"] > 0 and host["NanoCpus"] > 0 and host["PidsLimit"] > 0, service
        assert host["LogConfig"]["Type"] == "json-file" and host["LogConfig"]["Config"].get("max-size"), service
        assert host["NetworkMode"] == "host", service
        assert host["RestartPolicy"]["Name"] == "unless-stopped", service
    # What each really runs as, inside.
    assert compose.compose("exec", "-T", "bridge", "id", "-un").stdout.strip() == "maskbridge"
    assert compose.compose("exec", "-T", "asterisk", "id", "-un").stdout.strip() == "asterisk"
    assert compose.compose("exec", "-T", "postgres", "id", "-un").stdout.strip() == "postgres"
    assert compose.compose("exec", "-T", "prometheus", "id", "-u").stdout.strip() == "65534"


def test_the_media_guard_stands_in_front_of_the_pbx_with_one_capability(compose: ComposeStack) -> None:
    """The one service that runs as root: it holds no capability but the firewall's, and the
    host's firewall has its rules exactly (the PBX's RTP range, from the carrier only)."""
    inspected = compose.container("media-guard")
    host = inspected["HostConfig"]
    assert inspected["State"]["Health"]["Status"] == "healthy"
    assert host["CapDrop"] == ["ALL"] and [c.removeprefix("CAP_") for c in host["CapAdd"]] == ["NET_ADMIN"]
    assert host["ReadonlyRootfs"] and host["Init"] and "no-new-privileges:true" in host["SecurityOpt"]
    assert host["NetworkMode"] == "host" and host["Memory"] > 0 and host["PidsLimit"] > 0
    assert media_guard.check(compose.stack) == ""


def test_the_pbx_runs_the_pinned_asterisk(compose: ComposeStack) -> None:
    version = compose.compose("exec", "-T", "asterisk", "asterisk", "-rx", "core show version").stdout
    assert version.startswith(f"Asterisk {pinned_asterisk_version()} "), version
    # Its configuration came from the templates, with the compose file's settings.
    endpoints = compose.compose("exec", "-T", "asterisk", "asterisk", "-rx", "pjsip show aor trunk").stdout
    assert f"sip:{compose.stack.env['MB_TRUNK_HOST']}:{compose.stack.env['MB_TRUNK_PORT']}" in endpoints


async def test_the_api_answers(compose: ComposeStack, api: aiohttp.ClientSession) -> None:
    status, health = await call_json(api, "GET", "/healthz")
    assert (status, health) == (200, {"ari": True, "database": True})
    status, document = await call_json(api, "GET", "/v1/openapi.json")
    assert status == 200 and document["paths"]
    async with aiohttp.ClientSession(base_url=compose.api) as anonymous:
        status, refused = await call_json(anonymous, "GET", "/v1/pool-usage")
    assert status == 401, refused
    session, _, _ = await open_session(api)
    status, shown = await call_json(api, "GET", f"/v1/sessions/{session['id']}")
    assert status == 200 and shown["pool_number"] == session["pool_number"]
    status, usage = await call_json(api, "GET", "/v1/pool-usage")
    assert status == 200, usage


@pytest.mark.parametrize("direction", ["courier-to-client", "client-to-courier"])
async def test_a_masked_call_through_the_compose_pbx(
    compose: ComposeStack, carrier: Carrier, api: aiohttp.ClientSession, direction: str
) -> None:
    session, courier, client = await open_session(api)
    pool = session["pool_number"]
    caller, callee_number = (courier, client) if direction == "courier-to-client" else (client, courier)
    sip_log = SipLog(asterisk.host_path(compose.stack, "carrier", "log", "sip.log"))
    mark = sip_log.mark()

    carrier.phone(callee_number, action="answer", tone=1000)
    leg = await carrier.call(caller, pool, tone=600, hangup_after=2.0)
    callee = await asyncio.wait_for(carrier.incoming.get(), 15)
    await asyncio.wait_for(leg.ended.wait(), 20)
    await asyncio.wait_for(callee.ended.wait(), 10)

    assert callee.number == callee_number, "the other participant's phone rang"
    assert callee.shown_number == pool, "the called phone was shown the pool number"
    assert callee.shown_name in ("", pool)
    assert callee.answered_at is not None and callee.cause == 16
    # Media crosses the containerised PBX both ways: each phone hears the other's tone.
    await asyncio.wait_for(leg.recorded.wait(), 10)
    await asyncio.wait_for(callee.recorded.wait(), 10)
    heard_by_caller, rate = samples(carrier.recording_path(leg))
    heard_by_callee, _ = samples(carrier.recording_path(callee))
    assert tone_share(heard_by_caller, rate, 1000) > 0.5 and tone_share(heard_by_callee, rate, 600) > 0.5
    # Every SIP message the called phone received names the pool number, never the caller.
    messages = await logged(sip_log, mark, ended_by_caller(callee_number))
    called = [
        m for d in dialogs(messages).values()
        if any(m.first_line.startswith(f"INVITE sip:{callee_number}@") for m in d)
        for m in d if m.direction == "received"
    ]
    invite = next(m for m in called if m.first_line.startswith("INVITE"))
    assert pool in invite.header("From")[0]
    for message in called:
        assert not identity_leaks(message.text, [caller]), f"the caller's number reached the callee:\n{message.text}"
    record = await last_call(api, session["id"], "ended")
    assert (record["outcome"], record["hangup_by"]) == ("answered", "caller")


async def test_a_call_survives_a_restart_of_the_bridge_container(
    compose: ComposeStack, carrier: Carrier, api: aiohttp.ClientSession
) -> None:
    session, courier, client = await open_session(api)
    leg, callee = await carrier.connected(
        courier, session["pool_number"], client, callee_phone={"tone": 1000}, timeout=15, tone=600
    )
    record = await last_call(api, session["id"], "connected")
    await asyncio.to_thread(compose.compose, "restart", "bridge")
    await asyncio.to_thread(compose.wait_healthy)
    # The new process found the call in the database and the channels alive, and took it over.
    await asyncio.to_thread(compose.wait_log_line, "bridge", '"call.resumed"', record["id"])
    assert not leg.ended.is_set() and not callee.ended.is_set(), "the call stayed up across the restart"

    await carrier.hangup(leg)
    await asyncio.wait_for(callee.ended.wait(), 10)
    assert callee.cause == 16, "the restarted bridge hung up the other leg"
    record = await last_call(api, session["id"], "ended")
    assert (record["outcome"], record["hangup_by"]) == ("answered", "caller")


async def prometheus_query(compose: ComposeStack, path: str, **params: str) -> Any:
    env = compose.stack.env
    url = f"http://{env['MB_PROMETHEUS_BIND']}:{env['MB_PROMETHEUS_PORT']}{path}"
    async with aiohttp.ClientSession() as http, http.get(url, params=params) as resp:
        body = await resp.json()
    assert body["status"] == "success", body
    return body["data"]


async def test_the_monitoring_profile_scrapes_the_stack_with_the_alert_rules(compose: ComposeStack) -> None:
    """The profile's Prometheus (started with the stack by `--profile monitoring`): both
    targets up, every rule loaded and evaluated, and the calls above counted."""
    async with asyncio.timeout(60):
        while True:
            targets = (await prometheus_query(compose, "/api/v1/targets"))["activeTargets"]
            if sorted((t["labels"]["job"], t["health"]) for t in targets) == [("asterisk", "up"), ("maskbridge", "up")]:
                break
            await asyncio.sleep(0.5)  # wait-ok: Prometheus scrapes every second here
    groups = (await prometheus_query(compose, "/api/v1/rules"))["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert len(rules) == rule_count() and all(rule["health"] == "ok" for rule in rules), rules
    answered = (await prometheus_query(
        compose, "/api/v1/query", query='sum(max_over_time(maskbridge_calls_total{outcome="answered"}[30m]))'))["result"]
    assert answered and float(answered[0]["value"][1]) >= 1, answered


def _running_programs(compose: ComposeStack, service: str) -> list[str]:
    """The names of the processes in the service's container."""
    out = compose.compose("exec", "-T", service, "sh", "-c", "cat /proc/[0-9]*/comm 2>/dev/null", check=False)
    return out.stdout.split()


# How the guard's word can stand when the PBX's container starts without the rules in place:
# what `sh -c` writes into the guard's volume (nothing: none left).
STALE_WORDS = {
    # A reboot: the word of the boot before.
    "of another boot": 'echo "00000000-0000-0000-0000-000000000000 $MB_RTP_START $MB_RTP_END" > "$R"',
    # A guard killed outright (no trap ran) a minute ago: this boot's word, for this range, stale.
    "of a guard killed a minute ago": 'echo "$(cat /proc/sys/kernel/random/boot_id) $MB_RTP_START $MB_RTP_END" > "$R"'
                                      ' && touch -d "@$(($(date +%s) - 60))" "$R"',
    # A guard of another range (settings changed since): this boot's word, fresh, other ports.
    "for another range": 'echo "$(cat /proc/sys/kernel/random/boot_id) 30000 30999" > "$R"',
    # The guard stopped (its rules removed since, by hand): it took its word back.
    "taken back by a stopped guard": "true",
}


@pytest.mark.parametrize("stale", list(STALE_WORDS))
def test_the_pbx_starts_only_on_its_guards_fresh_word(compose: ComposeStack, stale: str) -> None:
    """After a reboot (or a restart of dockerd) docker starts the containers with no order
    between them, and the firewall's rules are gone (they live in the kernel); within a boot
    they can be gone too (removed by hand, a firewall reload) while the guard is stopped. The
    PBX's container, started alone, starts no Asterisk (so takes no call and opens no RTP
    port) until its guard runs and has its rules in place; then it starts by itself."""
    pbx = compose.container("asterisk")["Id"]
    guard = compose.container("media-guard")["Id"]
    subprocess.run(["docker", "stop", guard, pbx], check=True, capture_output=True, timeout=120)
    ready = "/srv/maskbridge/guard/ready"
    assert compose.compose("run", "--rm", "--no-deps", "--entrypoint", "sh", "media-guard", "-c",
                           f'test ! -e {ready} && echo gone').stdout.strip() == "gone", "a stopped guard left its word"
    compose.compose("run", "--rm", "--no-deps", "--entrypoint", "sh", "media-guard", "-c",
                    f"R={ready}; {STALE_WORDS[stale]}")
    media_guard.remove(compose.stack)
    assert media_guard.check(compose.stack) != ""
    waiting = "waiting for the media guard's rules of this boot"
    said_before = compose.logs("asterisk").count(waiting)
    try:
        subprocess.run(["docker", "start", pbx], check=True, capture_output=True, timeout=60)
        deadline = time.monotonic() + 30
        while compose.logs("asterisk").count(waiting) == said_before:
            assert time.monotonic() < deadline, "the PBX's container did not say it waits for its guard"
            time.sleep(0.2)  # wait-ok: polling the container's output (docker has no event for a line)
        assert compose.container("asterisk")["State"]["Running"]
        assert "asterisk" not in _running_programs(compose, "asterisk"), "Asterisk started before its guard"
        assert media_guard.check(compose.stack) != "", "nothing put the rules back"
    finally:
        subprocess.run(["docker", "start", guard], check=True, capture_output=True, timeout=60)
    # The guard applies its rules and says so: the PBX starts Asterisk, the bridge finds it.
    compose.wait_healthy(timeout=120)
    assert media_guard.check(compose.stack) == ""
    assert "asterisk" in _running_programs(compose, "asterisk")


def test_the_bridge_log_holds_no_real_number(compose: ComposeStack) -> None:
    """What the bridge's container wrote (its JSON log, through docker's log driver)."""
    log = compose.logs("bridge")
    assert '"event"' in log, "the bridge logs JSON lines"
    assert USED, "the tests above used real numbers"
    assert not identity_leaks(log, USED), "a real number reached the bridge's log"
