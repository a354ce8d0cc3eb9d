"""Reads the SIP messages the simulated carrier received (its pjsip logger writes sip.log)."""

from __future__ import annotations

import asyncio
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

_HEADER = re.compile(
    r"^\[[^\]]+\] VERBOSE\[\d+\][^:]*: <--- (Received|Transmitting) SIP (request|response) \(\d+ bytes\) "
)
_LOG_LINE = re.compile(r"^\[\d{4}-\d\d-\d\d ")


@dataclass(frozen=True)
class SipMessage:
    direction: str  # received | transmitted
    kind: str  # request | response
    text: str

    @property
    def first_line(self) -> str:
        return self.text.split("\n", 1)[0]

    def header(self, name: str) -> list[str]:
        prefix = name.lower() + ":"
        return [
            line.split(":", 1)[1].strip()
            for line in self.text.split("\n")
            if line.lower().startswith(prefix)
        ]

    @property
    def call_id(self) -> str:
        values = self.header("Call-ID")
        return values[0] if values else ""


class SipLog:
    def __init__(self, path: Path) -> None:
        self.path = path

    def mark(self) -> int:
        return self.path.stat().st_size if self.path.exists() else 0

    def since(self, offset: int) -> list[SipMessage]:
        with open(self.path, encoding="utf-8", errors="replace") as f:
            f.seek(offset)
            lines = f.read().split("\n")
        messages: list[SipMessage] = []
        current: tuple[str, str] | None = None
        body: list[str] = []

        def flush() -> None:
            if current is not None:
                messages.append(SipMessage(current[0], current[1], "\n".join(body).strip("\n")))

        for line in lines:
            m = _HEADER.match(line)
            if m:
                flush()
                current = ("received" if m.group(1) == "Received" else "transmitted", m.group(2))
                body = []
            elif _LOG_LINE.match(line):
                flush()
                current = None
                body = []
            elif current is not None:
                body.append(line)
        flush()
        return messages


def dialogs(messages: list[SipMessage]) -> dict[str, list[SipMessage]]:
    """Messages grouped by Call-ID."""
    out: dict[str, list[SipMessage]] = defaultdict(list)
    for msg in messages:
        out[msg.call_id].append(msg)
    return dict(out)


def national_digits(number: str) -> str:
    """The part of a number every form of it contains (+79161234567, 79161234567 and
    89161234567 all contain 9161234567)."""
    return number.lstrip("+")[-10:]


async def reinvite_answered(sip_log: SipLog, mark: int, direction: str, timeout: float = 10) -> SipMessage:
    """The PBX's 200 OK to a re-INVITE with a=`direction` that the carrier sent since `mark`."""
    async with asyncio.timeout(timeout):
        while True:
            messages = sip_log.since(mark)
            for i, invite in enumerate(messages):
                if invite.direction != "transmitted" or not invite.first_line.startswith("INVITE") \
                        or f"a={direction}" not in invite.text:
                    continue
                cseq = invite.header("CSeq")
                for answer in messages[i + 1:]:
                    if answer.direction == "received" and answer.first_line.startswith("SIP/2.0 200") \
                            and answer.call_id == invite.call_id and answer.header("CSeq") == cseq:
                        return answer
            await asyncio.sleep(0.05)  # wait-ok: polling the carrier's SIP log
