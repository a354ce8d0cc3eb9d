"""The bench's SIPp phones: what a killed bench left running is ended before the next one,
and the callee answers as a phone does."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import sipp
from bench.sipp import Callee, Phones, kill_leftovers, wait_bound


def test_phones_left_by_a_killed_bench_are_ended(tmp_path: Path) -> None:
    """A process that looks like the bench's SIPp callee of this work directory (as a killed
    bench leaves it, holding its ports) is ended; one of another directory is not."""
    def fake_sipp(work: Path) -> subprocess.Popen[bytes]:
        return subprocess.Popen(["sipp", "-c", "import time; time.sleep(60)", "-sf", str(work / "callee.xml")],  # wait-ok: the fake phone idles until killed
                                executable=sys.executable)

    mine, other = fake_sipp(tmp_path), fake_sipp(tmp_path / "other")
    try:
        assert kill_leftovers(tmp_path) == 1
        assert mine.wait(timeout=10) is not None
        assert other.poll() is None, "another stack's phones are left alone"
    finally:
        for proc in (mine, other):
            proc.kill()
            proc.wait(timeout=10)


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(call_id: str, port: int, media: int, branch: str, method: str = "INVITE", cseq: int = 1,
             to_tag: str = "") -> bytes:
    sdp = ("v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
           f"m=audio {media} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n") if method == "INVITE" else ""
    to = f"<sip:+79161000001@127.0.0.1>{';tag=' + to_tag if to_tag else ''}"
    content_type = "Content-Type: application/sdp\r\n" if sdp else ""
    return (f"{method} sip:+79161000001@127.0.0.1 SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP 127.0.0.1:{port};rport;branch={branch}\r\n"
            f'From: "+74959990000" <sip:+74959990000@127.0.0.1>;tag=pbx\r\nTo: {to}\r\n'
            f"Call-ID: {call_id}\r\nCSeq: {cseq} {method}\r\nContact: <sip:pbx@127.0.0.1:{port}>\r\n"
            f"Max-Forwards: 70\r\n{content_type}"
            f"Content-Length: {len(sdp)}\r\n\r\n{sdp}").encode()


def _response(sock: socket.socket, method: str, status: int) -> str:
    """The next response to `method` with `status` (others, and SIPp's retransmissions of
    earlier ones, skipped); fails after 10 s."""
    deadline = time.monotonic() + 10
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            text = sock.recv(65535).decode(errors="replace")
        except TimeoutError:
            break
        cseq = re.search(r"\r\nCSeq: *\d+ (\w+)", text)
        if text.startswith(f"SIP/2.0 {status} ") and cseq and cseq.group(1) == method:
            return text
    raise AssertionError(f"no {status} to {method} from SIPp's callee within 10 s")


def test_the_callee_answers_an_invite_sent_again_and_is_hung_up_normally(tmp_path: Path) -> None:
    """The PBX sends its INVITE again when SIPp answers late (a busy SIPp, 400 calls climbing):
    SIPp's callee once took that copy, arriving as it waited for the ACK, for an unexpected
    message, dropped the call and ignored the PBX's BYE (the bench counted a failed call: 1 of
    400). It now lets the copy pass, and the ACKs that each 200 sent again brings (SIPp once
    dropped a call on the second ACK the same way), and the call ends normally."""
    sip, media = _free_udp_port(), _free_udp_port()
    phones = Phones(host="127.0.0.1", callee_port=sip, caller_port=_free_udp_port(), caller_media=_free_udp_port(),
                    callee_media=_free_udp_port(), pbx=("127.0.0.1", 5060), work=tmp_path)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as pbx:
        pbx.bind(("127.0.0.1", 0))
        port = pbx.getsockname()[1]
        callee = Callee(phones)
        try:
            wait_bound("127.0.0.1", sip, callee)
            invite = _request("retransmitted-invite", port, media, "z9hG4bK-1")
            pbx.sendto(invite, ("127.0.0.1", sip))
            ok = _response(pbx, "INVITE", 200)
            to_tag = ok.split("\r\nTo:", 1)[1].split("\r\n", 1)[0].split(";tag=", 1)[1]
            pbx.sendto(invite, ("127.0.0.1", sip))  # the same INVITE again, as a retransmission
            for branch in ("z9hG4bK-2", "z9hG4bK-3", "z9hG4bK-4"):  # the ACK, then one for each 200 sent again
                pbx.sendto(_request("retransmitted-invite", port, media, branch, "ACK", 1, to_tag), ("127.0.0.1", sip))
            pbx.sendto(_request("retransmitted-invite", port, media, "z9hG4bK-5", "BYE", 2, to_tag), ("127.0.0.1", sip))
            _response(pbx, "BYE", 200)
        finally:
            callee.stop()


def test_the_callee_gives_up_a_call_whose_bye_never_came_and_stops_its_stream(tmp_path: Path, monkeypatch) -> None:
    """A call whose BYE never reaches SIPp's callee (lost under load) once streamed its tone
    until the callee stopped, into whatever call the PBX gave that port next. The callee now
    gives the call up CALLEE_GIVES_UP_MS after its last message, and its stream stops."""
    monkeypatch.setattr(sipp, "CALLEE_GIVES_UP_MS", 1500)
    sip = _free_udp_port()
    phones = Phones(host="127.0.0.1", callee_port=sip, caller_port=_free_udp_port(), caller_media=_free_udp_port(),
                    callee_media=_free_udp_port(), pbx=("127.0.0.1", 5060), work=tmp_path)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as pbx, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as media:
        pbx.bind(("127.0.0.1", 0))
        media.bind(("127.0.0.1", 0))
        port, media_port = pbx.getsockname()[1], media.getsockname()[1]
        callee = Callee(phones)
        try:
            wait_bound("127.0.0.1", sip, callee)
            pbx.sendto(_request("never-hung-up", port, media_port, "z9hG4bK-1"), ("127.0.0.1", sip))
            ok = _response(pbx, "INVITE", 200)
            to_tag = ok.split("\r\nTo:", 1)[1].split("\r\n", 1)[0].split(";tag=", 1)[1]
            pbx.sendto(_request("never-hung-up", port, media_port, "z9hG4bK-2", "ACK", 1, to_tag), ("127.0.0.1", sip))
            media.settimeout(10)
            media.recv(2048)  # the callee streams its tone
            began = time.monotonic()
            with pytest.raises(TimeoutError):
                while time.monotonic() - began < 15:
                    media.settimeout(1.0)  # a gap of a second: the stream has ended
                    media.recv(2048)
            assert time.monotonic() - began < 15, "the stream went on"
            assert "receive timeout" in (tmp_path / "callee-errors.log").read_text()
        finally:
            callee.stop()
