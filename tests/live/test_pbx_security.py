"""The PBX against strangers: a request from an address that is not the trunk's is refused
(403) before Asterisk reads whom it is from, whatever its From says (a real number, or
"trunk"); the bridge never hears of it; and the PBX's security log names the address, never
the number, in a line the README's fail2ban filter matches."""

from __future__ import annotations

import asyncio
import configparser
import re
import socket
import uuid
from pathlib import Path

from bridge.devstack import asterisk
from tests.live.siplog import identity_leaks

FILTER = Path(__file__).resolve().parents[2] / "docs" / "fail2ban" / "filter.d" / "maskbridge-asterisk.conf"
STRANGER = "127.0.0.254"  # no trunk: any loopback address the PBX was not told of


def invite_from(address: str, pbx: str, port: int, user: str, pool: str) -> str:
    """Send one INVITE from `address` (an ephemeral port) with `user` in its From; the status
    line of the PBX's final answer."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((address, 0))
        sock.settimeout(5)
        local = sock.getsockname()[1]
        call_id = uuid.uuid4().hex
        message = (
            f"INVITE sip:{pool}@{pbx}:{port} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP {address}:{local};branch=z9hG4bK{call_id[:12]};rport\r\n"
            f"From: \"{user}\" <sip:{user}@{address}>;tag={call_id[:8]}\r\n"
            f"To: <sip:{pool}@{pbx}>\r\nCall-ID: {call_id}\r\nCSeq: 1 INVITE\r\n"
            f"Contact: <sip:{user}@{address}:{local}>\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
        )
        sock.sendto(message.encode(), (pbx, port))
        while True:
            status = sock.recv(65535).decode(errors="replace").split("\r\n", 1)[0]
            if not status.startswith("SIP/2.0 1"):
                return status


def failregexes() -> list[re.Pattern[str]]:
    """The filter's failregex lines, <HOST> as fail2ban would fill it in (an address)."""
    parser = configparser.RawConfigParser()
    parser.read(FILTER)
    lines = [line.strip() for line in parser.get("Definition", "failregex").splitlines() if line.strip()]
    return [re.compile(line.replace("<HOST>", r"(?P<host>[0-9A-Fa-f.:]+)")) for line in lines]


async def test_a_stranger_is_refused_and_logged_by_address_only(stack, db, real_number, new_pool_number):
    env = stack.env
    security_log = asterisk.host_path(stack, "pbx", "log", "security.log")
    start = security_log.stat().st_size if security_log.exists() else 0
    number = real_number()
    pool = new_pool_number()
    began = await db.fetchval("SELECT now()")
    for user in (number, "trunk"):  # a caller's number; the trunk's endpoint name
        status = await asyncio.to_thread(invite_from, STRANGER, env["MB_PBX_SIP_BIND"], int(env["MB_PBX_SIP_PORT"]),
                                         user, pool)
        assert status.startswith("SIP/2.0 403"), (user, status)

    patterns = failregexes()
    async with asyncio.timeout(10):
        while True:
            with open(security_log, encoding="utf-8", errors="replace") as f:
                f.seek(start)
                written = f.read()
            matched = [m for line in written.splitlines() for p in patterns if (m := p.search(line))]
            if len([m for m in matched if m.group("host") == STRANGER]) >= 2:
                break
            await asyncio.sleep(0.05)  # wait-ok: polling the file Asterisk's logger writes
    assert not identity_leaks(written, [number]), "the security log names the stranger's address, not whom it claimed"
    # (The live tests run one at a time: no other call began meanwhile.)
    assert await db.fetchval("SELECT count(*) FROM calls WHERE started_at >= $1", began) == 0, \
        "nothing of a stranger's request reached the bridge"
