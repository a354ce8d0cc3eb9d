"""A hostile network between the PBX and the simulated carrier (dev and test only).

The simulated carrier is an Asterisk: it can ring, answer, redirect, transfer and play
audio like a real network's phones, but it builds every SIP header itself. Real networks
send whatever they like: a callee's IMS core asserts her identity in P-Asserted-Identity
in its 180 and 200, a forwarding network answers 181 with Diversion and History-Info, a
peer sends REFER, MESSAGE or INFO in the middle of a call. `HostileNetwork` is a SIP relay
over UDP, placed between the two, that forwards every message as it is, except what a test
tells it to change: headers added to or removed from chosen messages, a response turned
into another, requests of its own injected into a dialog. It also keeps every message it
relayed, so a test sees exactly what the PBX sent.

Both peers identify each other by IP address only, so the relay sits on the same two
addresses at other ports: the PBX reaches it as its trunk (MB_TRUNK_HOST, another port),
and the carrier as the PBX (MB_PBX_SIP_BIND, another port). Forwarding is fixed: whatever
arrives from the PBX goes to the carrier and the other way round; responses find their way
back because both peers answer to the source port (rport). Contact headers are rewritten
to the relay, so in-dialog requests pass through it too. SDP is left alone: media flows
directly between the two Asterisks.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import cast

# RFC 3261 compact forms -> full header names.
_COMPACT = {
    "i": "call-id", "m": "contact", "f": "from", "t": "to", "v": "via", "l": "content-length",
    "c": "content-type", "k": "supported", "s": "subject", "e": "content-encoding", "o": "event",
    "r": "refer-to", "b": "referred-by", "x": "session-expires", "u": "allow-events",
}


def _canonical(name: str) -> str:
    low = name.strip().lower()
    return _COMPACT.get(low, low)


@dataclass
class SipMessage:
    """One SIP message: its start line, its headers in order, and its body."""

    start: str
    headers: list[tuple[str, str]]
    body: bytes = b""

    @classmethod
    def parse(cls, data: bytes) -> "SipMessage":
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("utf-8", errors="replace").split("\r\n")
        headers: list[tuple[str, str]] = []
        for line in lines[1:]:
            if line[:1] in (" ", "\t") and headers:  # a folded header line
                name, value = headers[-1]
                headers[-1] = (name, value + " " + line.strip())
            elif ":" in line:
                name, value = line.split(":", 1)
                headers.append((name.strip(), value.strip()))
        return cls(lines[0], headers, body)

    def encode(self) -> bytes:
        lines = [self.start]
        lines += [f"{name}: {value}" for name, value in self.headers if _canonical(name) != "content-length"]
        lines.append(f"Content-Length: {len(self.body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + self.body

    @property
    def text(self) -> str:
        return self.encode().decode("utf-8", errors="replace")

    # --- reading ----------------------------------------------------------------------

    @property
    def is_request(self) -> bool:
        return not self.start.startswith("SIP/2.0")

    @property
    def method(self) -> str:
        """The request's method, or for a response the method of the request it answers."""
        if self.is_request:
            return self.start.split(" ", 1)[0]
        return self.cseq[1]

    @property
    def status(self) -> int:
        return int(self.start.split(" ", 2)[1]) if not self.is_request else 0

    @property
    def request_uri(self) -> str:
        return self.start.split(" ")[1] if self.is_request else ""

    def header(self, name: str) -> list[str]:
        want = _canonical(name)
        return [value for n, value in self.headers if _canonical(n) == want]

    def first(self, name: str) -> str:
        values = self.header(name)
        return values[0] if values else ""

    @property
    def call_id(self) -> str:
        return self.first("Call-ID")

    @property
    def cseq(self) -> tuple[int, str]:
        number, _, method = self.first("CSeq").partition(" ")
        return int(number or 0), method.strip()

    @property
    def branch(self) -> str:
        m = re.search(r";\s*branch=([^;,\s]+)", self.first("Via"))
        return m.group(1) if m else ""

    @staticmethod
    def tag_of(value: str) -> str:
        m = re.search(r";\s*tag=([^;,\s]+)", value)
        return m.group(1) if m else ""

    @staticmethod
    def user_of(value: str) -> str:
        """The user part of the URI in a From, To, Contact or similar header value."""
        m = re.search(r"(?:sips?|tel):([^@;>\s]+)", value)
        return m.group(1) if m else ""

    # --- changing -----------------------------------------------------------------------

    def set(self, name: str, value: str) -> None:
        """Replace every header of this name with one (kept in place of the first)."""
        want = _canonical(name)
        out: list[tuple[str, str]] = []
        done = False
        for n, v in self.headers:
            if _canonical(n) == want:
                if not done:
                    out.append((name, value))
                    done = True
            else:
                out.append((n, v))
        if not done:
            out.append((name, value))
        self.headers = out

    def add(self, name: str, value: str) -> None:
        self.headers.append((name, value))

    def remove(self, name: str) -> None:
        want = _canonical(name)
        self.headers = [(n, v) for n, v in self.headers if _canonical(n) != want]

    def copy(self) -> "SipMessage":
        return SipMessage(self.start, list(self.headers), self.body)


# A rule sees each message on its way and the way it goes ("to_pbx" or "to_carrier"); it
# returns None to leave the message alone, or the messages to send instead (none: dropped).
Rule = Callable[[SipMessage, str], "list[SipMessage] | None"]


@dataclass
class Relayed:
    """A message the relay saw: `towards` the PBX or the carrier; `injected` by the relay."""

    at: float
    towards: str
    message: SipMessage
    injected: bool = False


@dataclass
class _Dialog:
    """What the relay knows of one dialog, to send requests into it as the carrier's side."""

    call_id: str
    carrier_is_caller: bool
    carrier_party: str = ""  # From of requests from the carrier's side (with its tag)
    pbx_party: str = ""  # To of such requests (with the PBX's tag)
    pbx_contact: str = ""  # where such requests go (the request URI)
    shift: int = 0  # added to the CSeq of the carrier's requests (the relay's own came in between)
    highest: int = 0  # the highest CSeq sent to the PBX from the carrier's side
    sent_for: dict[int, int] = field(default_factory=dict)  # CSeq the PBX saw -> the carrier's own


class _Side(asyncio.DatagramProtocol):
    def __init__(self, on_datagram: Callable[[bytes], None]) -> None:
        self.on_datagram = on_datagram
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if data.strip():  # keep-alive CRLFs carry nothing
            self.on_datagram(data)


class HostileNetwork:
    """The relay (see the module's docstring). Use as an async context manager."""

    def __init__(
        self,
        pbx: tuple[str, int],
        carrier: tuple[str, int],
        facing_pbx: tuple[str, int],
        facing_carrier: tuple[str, int],
    ) -> None:
        self.pbx = pbx
        self.carrier = carrier
        self.facing_pbx = facing_pbx  # where the PBX reaches us: its trunk
        self.facing_carrier = facing_carrier  # where the carrier reaches us: its PBX
        self.rules: list[Rule] = []
        self.relayed: list[Relayed] = []
        self.changed = asyncio.Event()  # set at every message; waiters clear it
        self._dialogs: dict[str, _Dialog] = {}
        self._pending: dict[str, tuple[asyncio.Future[SipMessage], list[SipMessage]]] = {}
        self._to_pbx: _Side | None = None
        self._to_carrier: _Side | None = None
        self._cseq = itertools.count(1)

    async def __aenter__(self) -> "HostileNetwork":
        loop = asyncio.get_running_loop()
        _, self._to_pbx = await loop.create_datagram_endpoint(
            lambda: _Side(self._from_pbx), local_addr=self.facing_pbx
        )
        _, self._to_carrier = await loop.create_datagram_endpoint(
            lambda: _Side(self._from_carrier), local_addr=self.facing_carrier
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        for side in (self._to_pbx, self._to_carrier):
            if side is not None and side.transport is not None:
                side.transport.close()
        for future, _ in self._pending.values():
            if not future.done():
                future.cancel()

    def rewrite(self, rule: Rule) -> Rule:
        """Apply `rule` to every message from now on (until `stop_rewriting`)."""
        self.rules.append(rule)
        return rule

    def stop_rewriting(self, rule: Rule) -> None:
        if rule in self.rules:
            self.rules.remove(rule)

    # --- what was relayed -----------------------------------------------------------------

    def mark(self) -> int:
        return len(self.relayed)

    def since(self, mark: int) -> list[Relayed]:
        return self.relayed[mark:]

    def sent_by_pbx(self, mark: int = 0) -> list[SipMessage]:
        """Every message the PBX sent through the relay since `mark`, as the PBX sent it."""
        return [r.message for r in self.relayed[mark:] if r.towards == "to_carrier"]

    async def wait_for(self, found: Callable[[], bool], timeout: float = 10) -> None:
        """Until `found()` is true of what was relayed (checked at every message)."""
        async with asyncio.timeout(timeout):
            while not found():
                self.changed.clear()
                await self.changed.wait()

    def dialog_of(self, number: str) -> str:
        """The Call-ID of the latest dialog whose INVITE was addressed to, or came from, `number`."""
        for relayed in reversed(self.relayed):
            msg = relayed.message
            if msg.is_request and msg.method == "INVITE" and number in (
                msg.user_of(msg.first("To")), msg.user_of(msg.first("From"))
            ):
                return msg.call_id
        raise LookupError("no dialog of that number went through the relay")

    # --- forwarding -----------------------------------------------------------------------

    def _note(self, towards: str, msg: SipMessage, injected: bool = False) -> None:
        self.relayed.append(Relayed(time.monotonic(), towards, msg, injected))
        self.changed.set()

    def _from_pbx(self, data: bytes) -> None:
        msg = SipMessage.parse(data)
        self._note("to_carrier", msg.copy())
        if not msg.is_request and msg.branch in self._pending:
            self._answer_to_injected(msg)
            return
        self._learn(msg, from_pbx=True)
        if not msg.is_request:
            self._unshift(msg)
        self._contact_to(msg, self.facing_carrier)
        for out in self._apply_rules(msg, "to_carrier"):
            self._send(self._to_carrier, out, self.carrier)

    def _from_carrier(self, data: bytes) -> None:
        msg = SipMessage.parse(data)
        self._learn(msg, from_pbx=False)
        self._contact_to(msg, self.facing_pbx)
        for out in self._apply_rules(msg, "to_pbx"):
            if out.is_request:
                self._shift(out)
            self._note("to_pbx", out.copy())
            self._send(self._to_pbx, out, self.pbx)

    def _apply_rules(self, msg: SipMessage, towards: str) -> list[SipMessage]:
        out = [msg]
        for rule in list(self.rules):
            changed: list[SipMessage] = []
            for m in out:
                result = rule(m, towards)
                changed.extend([m] if result is None else result)
            out = changed
        return out

    @staticmethod
    def _send(side: _Side | None, msg: SipMessage, to: tuple[str, int]) -> None:
        if side is not None and side.transport is not None:
            side.transport.sendto(msg.encode(), to)

    @staticmethod
    def _contact_to(msg: SipMessage, where: tuple[str, int]) -> None:
        """Contact points at the relay, so that in-dialog requests come through it."""
        contact = msg.first("Contact")
        if not contact or contact.strip() == "*":
            return
        rewritten = re.sub(r"(sips?:(?:[^@>;]*@)?)(\[[^\]]+\]|[^:;>]+)(:\d+)?",
                           lambda m: f"{m.group(1)}{where[0]}:{where[1]}", contact, count=1)
        msg.set("Contact", rewritten)

    # --- dialogs and the CSeq of requests injected into them ---------------------------------

    def _learn(self, msg: SipMessage, from_pbx: bool) -> None:
        call_id = msg.call_id
        initial = msg.is_request and msg.method == "INVITE" and not msg.tag_of(msg.first("To"))
        if initial and call_id not in self._dialogs:
            self._dialogs[call_id] = _Dialog(call_id, carrier_is_caller=not from_pbx)
        dialog = self._dialogs.get(call_id)
        if dialog is None:
            return
        if msg.is_request and msg.method == "INVITE":
            if from_pbx and not dialog.carrier_is_caller:
                dialog.pbx_party = msg.first("From")
                dialog.pbx_contact = _uri_of(msg.first("Contact")) or dialog.pbx_contact
            if not from_pbx and dialog.carrier_is_caller and not dialog.carrier_party:
                dialog.carrier_party = msg.first("From")
        if not msg.is_request and msg.method == "INVITE" and 100 < msg.status < 300:
            if from_pbx and dialog.carrier_is_caller:
                dialog.pbx_party = msg.first("To")
                dialog.pbx_contact = _uri_of(msg.first("Contact")) or dialog.pbx_contact
            if not from_pbx and not dialog.carrier_is_caller:
                dialog.carrier_party = msg.first("To")

    def _shift(self, msg: SipMessage) -> None:
        """A request of the carrier's, on its way to the PBX: numbered after the relay's own."""
        dialog = self._dialogs.get(msg.call_id)
        if dialog is None:
            return
        number, method = msg.cseq
        if method in ("ACK", "CANCEL"):
            # They carry their INVITE's number, as the PBX saw it.
            sent = next((s for s, own in dialog.sent_for.items() if own == number), number + dialog.shift)
        else:
            sent = number + dialog.shift
            if sent <= dialog.highest:
                dialog.shift += dialog.highest + 1 - sent
                sent = dialog.highest + 1
            dialog.highest = max(dialog.highest, sent)
        dialog.sent_for[sent] = number
        if sent != number:
            msg.set("CSeq", f"{sent} {method}")

    def _unshift(self, msg: SipMessage) -> None:
        """A response of the PBX to a request of the carrier's: back to the carrier's own number."""
        dialog = self._dialogs.get(msg.call_id)
        if dialog is None:
            return
        number, method = msg.cseq
        own = dialog.sent_for.get(number, number)
        if own != number:
            msg.set("CSeq", f"{own} {method}")

    # --- requests of the relay's own ------------------------------------------------------

    async def send_in_dialog(
        self, call_id: str, method: str, headers: Iterable[tuple[str, str]] = (), body: bytes = b"",
        from_party: str | None = None, timeout: float = 10,
    ) -> tuple[SipMessage, list[SipMessage]]:
        """Send the PBX a request inside a dialog, as the carrier's side of it would (an
        UPDATE, INFO, MESSAGE, REFER ...). `from_party` replaces the From header's name and
        URI (the tag stays: the dialog is still found). Returns the final response and the
        provisional ones."""
        dialog = self._dialogs[call_id]
        if not (dialog.carrier_party and dialog.pbx_party and dialog.pbx_contact):
            raise RuntimeError(f"the dialog {call_id} is not established through the relay")
        number = dialog.highest + 1
        dialog.highest = number
        dialog.shift += 1  # the carrier's next request comes after this one
        sender = dialog.carrier_party
        if from_party is not None:
            sender = from_party + f";tag={SipMessage.tag_of(dialog.carrier_party)}"
        msg = self._request(method, dialog.pbx_contact, sender, dialog.pbx_party, call_id, number, headers, body)
        return await self._transact(msg, timeout)

    async def send_out_of_dialog(
        self, method: str, to_number: str, from_party: str, headers: Iterable[tuple[str, str]] = (),
        body: bytes = b"", timeout: float = 10,
    ) -> tuple[SipMessage, list[SipMessage]]:
        """Send the PBX a request outside any dialog from the trunk's address (MESSAGE,
        SUBSCRIBE, OPTIONS, REFER, INVITE ...). An INVITE's final response is acknowledged;
        a 2xx one is then ended with BYE (the relay keeps no calls)."""
        host, port = self.pbx
        uri = f"sip:{to_number}@{host}:{port}"
        sender = f"{from_party};tag={uuid.uuid4().hex[:10]}"
        msg = self._request(method, uri, sender, f"<{uri}>", f"{uuid.uuid4()}@mb-relay", next(self._cseq),
                            headers, body)
        final, provisional = await self._transact(msg, timeout)
        if method == "INVITE":
            ack = self._request("ACK", uri, sender, final.first("To"), msg.call_id, msg.cseq[0], (), b"")
            if final.status >= 300:
                ack.set("Via", msg.first("Via"))  # the same transaction
            self._note("to_pbx", ack.copy(), injected=True)
            self._send(self._to_pbx, ack, self.pbx)
            if 200 <= final.status < 300:
                target = _uri_of(final.first("Contact")) or uri
                bye = self._request("BYE", target, sender, final.first("To"), msg.call_id, msg.cseq[0] + 1, (), b"")
                await self._transact(bye, timeout)
        return final, provisional

    def _request(
        self, method: str, uri: str, sender: str, to: str, call_id: str, cseq: int,
        headers: Iterable[tuple[str, str]], body: bytes,
    ) -> SipMessage:
        host, port = self.facing_pbx
        msg = SipMessage(f"{method} {uri} SIP/2.0", [
            ("Via", f"SIP/2.0/UDP {host}:{port};rport;branch=z9hG4bK-mb{uuid.uuid4().hex}"),
            ("Max-Forwards", "70"),
            ("From", sender),
            ("To", to),
            ("Call-ID", call_id),
            ("CSeq", f"{cseq} {method}"),
            ("Contact", f"<sip:{host}:{port}>"),
            ("User-Agent", "hostile-network"),
        ], body)
        for name, value in headers:
            msg.add(name, value)
        return msg

    async def _transact(self, msg: SipMessage, timeout: float) -> tuple[SipMessage, list[SipMessage]]:
        future: asyncio.Future[SipMessage] = asyncio.get_running_loop().create_future()
        provisional: list[SipMessage] = []
        self._pending[msg.branch] = (future, provisional)
        try:
            self._note("to_pbx", msg.copy(), injected=True)
            # UDP: send again until answered (T1 = 0.5 s, doubling), as any UA would.
            interval = 0.5
            async with asyncio.timeout(timeout):
                while True:
                    self._send(self._to_pbx, msg, self.pbx)
                    try:
                        final = await asyncio.wait_for(asyncio.shield(future), interval)
                        return final, provisional
                    except TimeoutError:
                        if provisional and msg.method == "INVITE":
                            return await future, provisional  # a 1xx stops retransmission
                        interval = min(interval * 2, 4.0)
        finally:
            self._pending.pop(msg.branch, None)

    def _answer_to_injected(self, msg: SipMessage) -> None:
        future, provisional = self._pending[msg.branch]
        if msg.status < 200:
            provisional.append(msg)
        elif not future.done():
            future.set_result(msg)


def _uri_of(value: str) -> str:
    m = re.search(r"<([^>]+)>", value)
    if m:
        return m.group(1)
    return value.split(";", 1)[0].strip()


# --- rules a test picks from ---------------------------------------------------------------


def add_headers(
    headers: Iterable[tuple[str, str]], *, towards: str = "to_pbx", statuses: Iterable[int] = (),
    methods: Iterable[str] = (), of_number: str | None = None,
) -> Rule:
    """Add `headers` to responses with one of `statuses` and to requests of one of
    `methods`, going `towards`, in dialogs of `of_number` (its INVITE's To or From user)."""
    headers = list(headers)
    statuses, methods = set(statuses), set(methods)

    def rule(msg: SipMessage, way: str) -> list[SipMessage] | None:
        if way != towards or not _of(msg, of_number):
            return None
        if (msg.is_request and msg.method in methods) or (not msg.is_request and msg.status in statuses):
            for name, value in headers:
                msg.add(name, value)
        return None

    return rule


def forwarded_first(headers: Iterable[tuple[str, str]], *, of_number: str | None = None) -> Rule:
    """The callee's network says the call is forwarded: its first 180 or 183 to the PBX is
    preceded by a `181 Call Is Being Forwarded` carrying `headers` (e.g. Diversion)."""
    headers = list(headers)
    done: set[str] = set()

    def rule(msg: SipMessage, way: str) -> list[SipMessage] | None:
        if way != "to_pbx" or msg.is_request or msg.status not in (180, 183) or msg.call_id in done \
                or not _of(msg, of_number):
            return None
        done.add(msg.call_id)
        forwarded = SipMessage("SIP/2.0 181 Call Is Being Forwarded", [
            (n, v) for n, v in msg.headers if _canonical(n) in ("via", "from", "to", "call-id", "cseq", "contact")
        ])
        for name, value in headers:
            forwarded.add(name, value)
        return [forwarded, msg]

    return rule


def _of(msg: SipMessage, number: str | None) -> bool:
    if number is None:
        return True
    return number in (msg.user_of(msg.first("To")), msg.user_of(msg.first("From")))


def for_stack(env: dict[str, str]) -> HostileNetwork:
    """The relay at the local stack's addresses (MB_RELAY_PORT on both). The PBX reaches it
    only while its trunk points there (asterisk.reload with MB_TRUNK_PORT = MB_RELAY_PORT);
    the carrier, on calls placed with `via_network`."""
    port = int(env["MB_RELAY_PORT"])
    return HostileNetwork(
        pbx=(env["MB_PBX_SIP_BIND"], int(env["MB_PBX_SIP_PORT"])),
        carrier=(env["MB_TRUNK_HOST"], int(env["MB_TRUNK_PORT"])),
        facing_pbx=(env["MB_TRUNK_HOST"], port),
        facing_carrier=(env["MB_PBX_SIP_BIND"], port),
    )
