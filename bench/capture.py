"""The benchmark's clock and ear: packets captured on the loopback (tcpdump), read back here.

Every SIP message between SIPp and the PBX is stamped by the kernel as it crosses the
loopback, one clock for both sides of a call: a call's post-dial delay is the callee's
INVITE arriving minus the caller's INVITE leaving, and whether it was set up and ended
normally is read from the same messages. For a sample of calls, the RTP the PBX sends to
each side is decoded (PCMU) to check which tone that side heard.
"""

from __future__ import annotations

import signal
import struct
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bench.sipp import SETUP_LIMIT_MS, Phones, ulaw_decode
from bridge.devstack.network import SipMessage


class Capture:
    """tcpdump writing the packets that match `bpf` to `path` (packet-buffered, so the file
    can be read while the capture runs), from start until stop. Immediate mode: otherwise
    libpcap hands packets over a block at a time, up to a second late, and a capture
    stopped within that second has lost them."""

    def __init__(self, path: Path, bpf: str) -> None:
        self.path = path
        self.bpf = bpf
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> "Capture":
        self.path.unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            ["tcpdump", "-i", "lo", "-n", "-U", "--immediate-mode", "-B", "16384", "-s", "0", "-Z", "root",
             "-w", str(self.path), self.bpf],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
        )
        assert self.proc.stderr is not None
        line = self.proc.stderr.readline().decode(errors="replace")  # "listening on lo, ..." once ready
        if "listening on" not in line:
            self.stop()
            raise RuntimeError(f"tcpdump did not start: {line.strip()}")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> "Capture":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass(frozen=True)
class Packet:
    at: float
    src: tuple[str, int]
    dst: tuple[str, int]
    payload: bytes


_LINK_HEADER = {1: 14, 113: 16, 276: 20, 0: 4, 12: 0, 101: 0}


def packets(path: Path) -> Iterator[Packet]:
    """The UDP over IPv4 packets of a pcap file (a record cut short by a running capture ends it)."""
    data = path.read_bytes() if path.exists() else b""
    if len(data) < 24:
        return
    magic = struct.unpack("<I", data[:4])[0]
    endian = "<" if magic in (0xA1B2C3D4, 0xA1B23C4D) else ">"
    nano = magic in (0xA1B23C4D, 0x4D3CB2A1)
    link = struct.unpack(endian + "I", data[20:24])[0] & 0xFFFF
    skip = _LINK_HEADER.get(link)
    if skip is None:
        raise ValueError(f"{path}: link type {link} not handled")
    pos = 24
    while pos + 16 <= len(data):
        sec, frac, caplen, _ = struct.unpack(endian + "IIII", data[pos:pos + 16])
        pos += 16
        if pos + caplen > len(data):
            return
        frame = data[pos:pos + caplen]
        pos += caplen
        ip = frame[skip:]
        if len(ip) < 20 or ip[0] >> 4 != 4 or ip[9] != 17:
            continue
        ihl = (ip[0] & 0x0F) * 4
        udp = ip[ihl:]
        if len(udp) < 8:
            continue
        sport, dport = struct.unpack("!HH", udp[:4])
        yield Packet(
            at=sec + frac / (1e9 if nano else 1e6),
            src=(".".join(map(str, ip[12:16])), sport),
            dst=(".".join(map(str, ip[16:20])), dport),
            payload=udp[8:],
        )


# --- calls, as SIP showed them ---------------------------------------------------------------


@dataclass
class Leg:
    """One leg of a call between SIPp and the PBX, as its messages crossed the loopback."""

    call_id: str
    number: str  # caller leg: the caller's number; callee leg: the called number
    dialed: str = ""
    invite: float | None = None  # caller leg: INVITE sent; callee leg: INVITE received
    invite_cseq: int = 0
    answered: float | None = None  # 200 to the INVITE
    final: int | None = None  # the INVITE's final status
    final_at: float | None = None  # when it crossed
    pbx_media: int | None = None  # the PBX's RTP port for this leg (its SDP)
    bye: float | None = None
    bye_from_pbx: bool = False
    bye_ok: bool = False


@dataclass
class Call:
    """A caller leg and the callee leg the PBX set up for it (if any)."""

    caller: Leg
    callee: Leg | None = None

    @property
    def setup_ms(self) -> float | None:
        """Dialing (the caller's INVITE out) to the callee's INVITE in."""
        if self.callee is None or self.caller.invite is None or self.callee.invite is None:
            return None
        return (self.callee.invite - self.caller.invite) * 1000

    @property
    def answer_ms(self) -> float | None:
        if self.caller.invite is None or self.caller.answered is None:
            return None
        return (self.caller.answered - self.caller.invite) * 1000

    @property
    def answered_late(self) -> bool:
        """Answered, but more than SETUP_LIMIT_MS after dialing."""
        answer = self.answer_ms
        return answer is not None and answer > SETUP_LIMIT_MS

    @property
    def up(self) -> bool:
        """Both legs answered, neither hung up yet."""
        return (self.callee is not None and self.caller.answered is not None and self.callee.answered is not None
                and self.caller.bye is None and self.callee.bye is None)

    def why_not(self) -> str:
        """'' when the call succeeded: both legs set up within 3 s of dialing, and both
        ended normally (the caller's BYE answered 200, the PBX's BYE to the callee too)."""
        c, e = self.caller, self.callee
        if e is None:
            return f"no callee (caller got {c.final or 'nothing'})"
        if c.answered is None:
            return f"caller not answered ({c.final or 'no final answer'})"
        if self.answered_late:
            return f"answered after more than {SETUP_LIMIT_MS / 1000:g} s"
        if c.bye_from_pbx:
            return "dropped by the PBX"
        if not (c.bye and c.bye_ok):
            return "caller's hangup not answered"
        if not (e.bye and e.bye_from_pbx and e.bye_ok):
            return "callee not hung up normally"
        return ""


def _sdp_port(body: bytes) -> int | None:
    for line in body.decode(errors="replace").splitlines():
        if line.startswith("m=audio "):
            return int(line.split()[1])
    return None


def calls(pcap: Path, phones: Phones, callees: dict[str, str]) -> list[Call]:
    """The calls in a capture of SIP between SIPp and the PBX, caller legs in the order they
    were placed, each paired with the callee leg of the callee its caller's call should ring
    (`callees`: caller -> callee; see pair)."""
    caller_legs: dict[str, Leg] = {}
    callee_legs: dict[str, Leg] = {}
    caller_side = (phones.host, phones.caller_port)
    callee_side = (phones.host, phones.callee_port)
    for p in packets(pcap):
        if caller_side in (p.src, p.dst):
            legs, ours = caller_legs, p.src == caller_side
        elif callee_side in (p.src, p.dst):
            legs, ours = callee_legs, p.src == callee_side
        else:
            continue
        try:
            msg = SipMessage.parse(p.payload)
        except (ValueError, IndexError):
            continue
        call_id = msg.call_id
        if msg.is_request and msg.method == "INVITE" and call_id not in legs:
            if legs is caller_legs:
                leg = Leg(call_id, msg.user_of(msg.first("From")), dialed=msg.user_of(msg.request_uri), invite=p.at)
            else:
                leg = Leg(call_id, msg.user_of(msg.request_uri), invite=p.at, pbx_media=_sdp_port(msg.body))
            leg.invite_cseq = msg.cseq[0]
            legs[call_id] = leg
            continue
        leg_or_none = legs.get(call_id)
        if leg_or_none is None:
            continue
        leg = leg_or_none
        if msg.is_request and msg.method == "BYE" and leg.bye is None:
            leg.bye, leg.bye_from_pbx = p.at, not ours
        elif not msg.is_request and msg.method == "INVITE" and msg.cseq[0] == leg.invite_cseq \
                and msg.status >= 200:
            if leg.final is None:
                leg.final, leg.final_at = msg.status, p.at
            if msg.status == 200 and leg.answered is None:
                leg.answered = p.at
                if legs is caller_legs:
                    leg.pbx_media = _sdp_port(msg.body)
        elif not msg.is_request and msg.method == "BYE" and msg.status == 200:
            leg.bye_ok = True
    return pair(list(caller_legs.values()), list(callee_legs.values()), callees)


def pair(caller_legs: list[Leg], callee_legs: list[Leg], callees: dict[str, str]) -> list[Call]:
    """Each caller leg (in the order placed) with the first callee leg of its callee that
    was invited while the call was still going: not before it was dialed, and not after the
    PBX refused it (a final status other than 200) or it hung up. The bench's pairs repeat
    within a run (a pair calls again every few seconds), so without the second bound a call
    the PBX refused took the callee leg of the pair's next call, which then counted as one
    that reached no callee: each refusal was counted twice ("caller not answered (503)" and
    "no callee (caller got 200)", as many of one as of the other in the runs at the bridge's
    limit). A pair that calls again while its last call is still being set up cannot be told
    apart: the ramp gives each call of a step a pair of its own (bench.load.ramp)."""
    by_number: dict[str, list[Leg]] = {}
    for leg in sorted(callee_legs, key=lambda x: x.invite or 0):
        by_number.setdefault(leg.number, []).append(leg)
    out: list[Call] = []
    for leg in sorted(caller_legs, key=lambda x: x.invite or 0):
        queue = by_number.get(callees.get(leg.number, ""), [])
        while queue and (queue[0].invite or 0) < (leg.invite or 0):
            queue.pop(0)  # a callee leg before this call was placed is not this call's
        ended = leg.final_at if leg.final not in (None, 200) else leg.bye
        if queue and ended is not None and (queue[0].invite or 0) > ended:
            out.append(Call(leg))  # (that leg is a later call's)
        else:
            out.append(Call(leg, queue.pop(0) if queue else None))
    return out


# --- what each side heard ---------------------------------------------------------------------


@dataclass
class Heard:
    """The audio the PBX sent to each side of one call during a listen window."""

    caller_number: str
    caller_heard: list[int] = field(default_factory=list)
    callee_heard: list[int] = field(default_factory=list)


def rtp_filter(pbx_host: str, ports: list[int]) -> str:
    return f"udp and src host {pbx_host} and (" + " or ".join(f"src port {p}" for p in ports) + ")"


def audio(pcap: Path, pbx_host: str, legs: dict[int, tuple[str, str]]) -> dict[str, Heard]:
    """Decode the PCMU the PBX sent from each port in `legs` (port -> (caller number,
    'caller' | 'callee')): what each sampled side heard, by caller number."""
    heard: dict[str, Heard] = {}
    for p in packets(pcap):
        if p.src[0] != pbx_host or p.src[1] not in legs or len(p.payload) < 12:
            continue
        number, side = legs[p.src[1]]
        rtp = p.payload
        if rtp[1] & 0x7F != 0:  # only PCMU carries the tones
            continue
        skip = 12 + 4 * (rtp[0] & 0x0F)
        if rtp[0] & 0x10 and len(rtp) >= skip + 4:
            skip += 4 + 4 * struct.unpack("!H", rtp[skip + 2:skip + 4])[0]
        h = heard.setdefault(number, Heard(number))
        (h.caller_heard if side == "caller" else h.callee_heard).extend(ulaw_decode(rtp[skip:]))
    return heard
