"""SIPp as the benchmark's phones: a caller process per load step, one callee process per run.

The PBX knows its trunk by the carrier's address (MB_TRUNK_HOST) and sends every outbound
leg to sip:MB_TRUNK_HOST:MB_TRUNK_PORT, where the simulated carrier (an Asterisk) listens.
While `phones()` runs, the PBX's trunk points at MB_BENCH_SIP_PORT of the same address
instead (its SIP configuration reloaded, as the tests do for their relay), where SIPp's
callee answers; SIPp's caller sends from the next port of that address, so the PBX takes
its calls as the trunk's. The carrier Asterisk is left alone, and the trunk is pointed back
when the block ends, whatever happened inside.

SIPp 3.6.1 streams RTP (rtp_stream) from one media socket per process (-mp): every call of
the caller sends from that port, every call of the callee from its own. Each side sends
its tone for as long as the call lasts; what each side hears is read off the wire
(bench/capture.py), not from SIPp.
"""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bench.measure import CALLEE_TONE, CALLER_TONE, SETUP_LIMIT
from bridge.devstack import asterisk, processes
from bridge.devstack.settings import Stack

SCENARIOS = Path(__file__).resolve().parent / "sipp"
SETUP_LIMIT_MS = round(SETUP_LIMIT * 1000)  # dial to answer, at most, for a call to count as set up


# --- G.711: mu-law (PCMU, payload type 0), A-law (PCMA, payload type 8) ------------------


def ulaw_encode(sample: int) -> int:
    """One 16-bit linear sample to a mu-law byte (ITU-T G.711)."""
    bias, clip = 0x84, 32635
    sign = 0x80 if sample < 0 else 0
    magnitude = min(abs(sample), clip) + bias
    exponent = 7
    mask = 0x4000
    while exponent > 0 and not magnitude & mask:
        exponent -= 1
        mask >>= 1
    mantissa = (magnitude >> (exponent + 3)) & 0x0F
    return ~(sign | (exponent << 4) | mantissa) & 0xFF


def alaw_encode(sample: int) -> int:
    """One 16-bit linear sample to an A-law byte (ITU-T G.711)."""
    value, mask = sample >> 3, 0xD5
    if value < 0:
        value, mask = -value - 1, 0x55
    segment = next((s for s, end in enumerate((0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF)) if value <= end), 8)
    if segment == 8:
        return 0x7F ^ mask
    return ((segment << 4) | ((value >> (1 if segment < 2 else segment)) & 0x0F)) ^ mask


_ULAW_DECODE: list[int] = []
for _byte in range(256):
    _u = ~_byte & 0xFF
    _t = (((_u & 0x0F) << 3) + 0x84) << ((_u & 0x70) >> 4)
    _ULAW_DECODE.append((0x84 - _t) if _u & 0x80 else (_t - 0x84))


def ulaw_decode(payload: bytes) -> list[int]:
    return [_ULAW_DECODE[b] for b in payload]


def tone_file(path: Path, freq: int, seconds: int = 1, rate: int = 8000, level: float = 8000.0) -> Path:
    """A raw PCMU file of a steady tone that loops without a click (a whole number of
    cycles per second): what rtp_stream plays, 160 bytes per 20 ms packet."""
    data = bytes(ulaw_encode(round(level * math.sin(2 * math.pi * freq * i / rate)))
                 for i in range(seconds * rate))
    path.write_bytes(data)
    return path


# --- the two SIPp processes ----------------------------------------------------------------


@dataclass(frozen=True)
class Phones:
    """Where the benchmark's phones are: SIP and media addresses of both sides."""

    host: str
    callee_port: int
    caller_port: int
    caller_media: int
    callee_media: int
    pbx: tuple[str, int]
    work: Path

    @classmethod
    def of(cls, stack: Stack, work: Path) -> "Phones":
        e = stack.env
        sip = int(e["MB_BENCH_SIP_PORT"])
        media = int(e["MB_BENCH_RTP_PORT"])
        return cls(host=e["MB_TRUNK_HOST"], callee_port=sip, caller_port=sip + 1,
                   caller_media=media, callee_media=media + 10,
                   pbx=(e["MB_PBX_SIP_BIND"], int(e["MB_PBX_SIP_PORT"])), work=work)


def _scenario(work: Path, name: str, tone: int) -> Path:
    tone_path = work / f"tone-{tone}.ulaw"
    if not tone_path.exists():
        tone_file(tone_path, tone)
    text = (SCENARIOS / f"{name}.xml").read_text().replace("@TONE@", str(tone_path))
    path = work / f"{name}.xml"
    path.write_text(text)
    return path


def _common(phones: Phones, port: int, media: int) -> list[str]:
    return ["-i", phones.host, "-p", str(port), "-bind_local", "-mi", phones.host, "-mp", str(media),
            "-nostdin", "-t", "u1", "-max_socket", "4096", "-rtp_threadtasks", "50"]


# SIPp's callee gives a call up (aborts it, and its stream with it; it sends no BYE of its
# own) when no BYE came this long after its last message: longer than any call the benchmark
# holds (its 500-call step: 37 s). Without a limit, a call whose BYE never reached the callee
# streamed its tone to the PBX port it had until the callee stopped, into whichever call the
# PBX gave that port next.
CALLEE_GIVES_UP_MS = 90_000


class Callee:
    """SIPp answering every call the PBX sends to the trunk, for as long as it runs."""

    def __init__(self, phones: Phones) -> None:
        self.phones = phones
        scenario = _scenario(phones.work, "callee", CALLEE_TONE)
        self.errors = phones.work / "callee-errors.log"
        cmd = ["sipp", "-sf", str(scenario), *_common(phones, phones.callee_port, phones.callee_media),
               "-aa", "-recv_timeout", str(CALLEE_GIVES_UP_MS), "-trace_err", "-error_file", str(self.errors)]
        self.proc = subprocess.Popen(cmd, cwd=phones.work, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGUSR1)  # SIPp's own "quit when the calls are done"
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@dataclass
class CallerRun:
    """What one caller run reported: its exit status, CPU and its stderr."""

    returncode: int
    cpu_seconds: float
    wall_seconds: float
    stderr: str = ""
    successful: int | None = None  # SIPp's own count of calls that ran their scenario to the end
    failed: int | None = None


def caller_run(phones: Phones, calls: list[tuple[str, str]], rate: float, hold_ms: int, tag: str,
               timeout: float | None = None) -> CallerRun:
    """Place `calls` (caller, dialed) at `rate` per second, each talking `hold_ms` before the
    caller hangs up; blocks until the last call ended (or `timeout` seconds)."""
    scenario = _scenario(phones.work, "caller", CALLER_TONE)
    inf = phones.work / f"calls-{tag}.csv"
    inf.write_text("SEQUENTIAL\n" + "".join(f"{a};{b}\n" for a, b in calls))
    stats = phones.work / f"calls-{tag}-stats.csv"
    stats.unlink(missing_ok=True)
    count = len(calls)
    limit = timeout if timeout is not None else count / rate + hold_ms / 1000 + 60
    cmd = ["sipp", f"{phones.pbx[0]}:{phones.pbx[1]}", "-sf", str(scenario), "-inf", str(inf),
           *_common(phones, phones.caller_port, phones.caller_media),
           "-r", f"{rate:g}", "-rp", "1000", "-m", str(count), "-l", str(max(count, 10)), "-d", str(hold_ms),
           "-recv_timeout", "20000", "-timeout", f"{math.ceil(limit)}s", "-timeout_error",
           "-aa", "-default_behaviors", "all", "-trace_stat", "-stf", str(stats), "-fd", "10"]
    started = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=phones.work, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    err: list[bytes] = []
    reader = threading.Thread(target=lambda: err.append(proc.stderr.read() if proc.stderr else b""), daemon=True)
    reader.start()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    reader.join(timeout=5)
    successful, failed = _counts(stats)
    return CallerRun(returncode=proc.returncode, cpu_seconds=usage.ru_utime + usage.ru_stime,
                     wall_seconds=time.monotonic() - started,
                     stderr=b"".join(err).decode(errors="replace")[-2000:], successful=successful, failed=failed)


def _counts(stats: Path) -> tuple[int | None, int | None]:
    """Successful and failed calls, cumulated, from the last line of SIPp's statistics file."""
    try:
        lines = [ln for ln in stats.read_text(errors="replace").splitlines() if ln.strip()]
    except FileNotFoundError:
        return None, None
    if len(lines) < 2:
        return None, None
    head, last = lines[0].split(";"), lines[-1].split(";")
    row = dict(zip(head, last, strict=False))
    try:
        return int(row["SuccessfulCall(C)"]), int(row["FailedCall(C)"])
    except (KeyError, ValueError):
        return None, None


def kill_leftovers(work: Path) -> int:
    """SIPp phones of an earlier bench of this stack that was killed (its children outlive
    it, holding their ports: the next SIPp could not bind and exited at once). Returns how
    many were ended."""
    leftovers = set().union(*(processes.processes_with(b"sipp", str(work / scenario).encode())
                              for scenario in ("caller.xml", "callee.xml")))
    processes.terminate(leftovers)
    return len(leftovers)


@contextmanager
def phones(stack: Stack, work: Path) -> Iterator[tuple[Phones, Callee]]:
    """The PBX's trunk pointed at SIPp's callee for the block, and the callee running;
    both undone at the end: the PBX's trunk configuration is put back byte for byte, so
    whatever a test had set on it (identity settings, the relay) is as it was."""
    work.mkdir(parents=True, exist_ok=True)
    kill_leftovers(work)
    p = Phones.of(stack, work)
    pjsip = asterisk.host_path(stack, "pbx", "etc", "pjsip.conf")
    saved = pjsip.read_text()
    pointed, found = re.subn(r"(?m)^contact = sip:\S+$", f"contact = sip:{p.host}:{p.callee_port}", saved)
    if found != 1:
        raise RuntimeError(f"{pjsip}: expected one trunk contact, found {found}")
    pjsip.write_text(pointed)
    try:
        _reload(stack)
        callee = Callee(p)
        try:
            wait_bound(p.host, p.callee_port, callee)
            yield p, callee
        finally:
            callee.stop()
    finally:
        pjsip.write_text(saved)
        _reload(stack)


def _reload(stack: Stack) -> None:
    out = asterisk.rx(stack, "pbx", "module reload res_pjsip.so")
    if out.returncode != 0:
        raise RuntimeError(f"reload of the PBX's SIP configuration failed: {out.stderr or out.stdout}")


def wait_bound(host: str, port: int, callee: Callee, timeout: float = 10) -> None:
    """Until SIPp's callee holds its SIP port (it binds within milliseconds of starting)."""
    needle = f"{int.from_bytes(bytes(map(int, host.split('.')))[::-1], 'big'):08X}:{port:04X}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not callee.alive():
            err = callee.proc.stderr.read().decode(errors="replace") if callee.proc.stderr else ""
            raise RuntimeError(f"SIPp's callee exited at start: {err[-500:]}")
        if needle in Path("/proc/net/udp").read_text():
            return
        time.sleep(0.05)  # wait-ok: polling the kernel's socket table for SIPp's bind
    raise RuntimeError(f"SIPp's callee did not bind {host}:{port}")
