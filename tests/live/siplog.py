"""Reads the SIP messages the simulated carrier received (its pjsip logger writes sip.log)."""

from __future__ import annotations

import asyncio
import re
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

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


_SEPARATORS = re.compile(r"(?<=\d)[\s\-.()/]+(?=\d)")


def identity_leaks(text: str, numbers: Iterable[str], names: Iterable[str] = ()) -> list[str]:
    """Which of `numbers` and `names` the text of a SIP message holds. A number is found in
    any form (+79161234567, 79161234567, 89161234567, 9161234567: all hold its ten national
    digits), also written with separators (spaces, dashes, dots, parentheses, slashes) or
    percent-encoded; a name in any case."""
    forms = [text, unquote(text)]
    forms += [_SEPARATORS.sub("", form) for form in forms]
    found = [number for number in numbers if any(national_digits(number) in form for form in forms)]
    found += [name for name in names if any(name.lower() in form.lower() for form in forms)]
    return found


async def logged(sip_log: SipLog, mark: int, found: Callable[[list[SipMessage]], bool],
                 timeout: float = 10) -> list[SipMessage]:
    """The carrier's SIP messages since `mark`, once `found` is true of them. Asterisk writes
    sip.log a little after the event a test waited for (a call ended): a scan of the log must
    first wait for the last message it expects."""
    async with asyncio.timeout(timeout):
        while True:
            messages = sip_log.since(mark)
            if found(messages):
                return messages
            await asyncio.sleep(0.05)  # wait-ok: polling the carrier's SIP log


def ended_by_caller(callee_number: str, answered: bool = True) -> Callable[[list[SipMessage]], bool]:
    """The calling phone's BYE was answered and the called phone received the PBX's BYE; or,
    for a call the caller left while it rang, its CANCEL was answered (487) and the called
    phone received the PBX's CANCEL."""
    ending, told = ("BYE", "BYE ") if answered else ("INVITE", "CANCEL ")
    final = "SIP/2.0 200" if answered else "SIP/2.0 487"

    def found(messages: list[SipMessage]) -> bool:
        calling = [m for d in dialogs(messages).values() if not _invites(d, callee_number) for m in d]
        called = [m for d in dialogs(messages).values() if _invites(d, callee_number) for m in d]
        return any(m.direction == "received" and m.first_line.startswith(final)
                   and m.header("CSeq")[0].endswith(ending) for m in calling if m.header("CSeq")) \
            and any(m.direction == "received" and m.first_line.startswith(told) for m in called)

    return found


def _invites(dialog: list[SipMessage], callee_number: str) -> bool:
    return any(m.direction == "received" and m.first_line.startswith(f"INVITE sip:{callee_number}@") for m in dialog)


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
