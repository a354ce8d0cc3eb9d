"""The stack's fixed listening ports, kept out of the kernel's ephemeral range.

Linux gives outgoing connections and unbound UDP sockets a local port from
net.ipv4.ip_local_port_range (32768-60999 by default). The local Postgres listens on 55432,
the benchmark's SIPp phones on 40000 and up: both inside that range (the tests' own stacks
keep their Postgres below it, on 154xx). Any client socket that happens to be given one of these as its local port, even
a connection to somewhere else, makes the server's bind fail with "Address already in use"
for as long as it lives; a Postgres restarted mid-run (the resilience tests restart it) is
the most exposed. The kernel's own remedy is net.ipv4.ip_local_reserved_ports: ports listed
there are never handed out automatically, and can still be bound explicitly.
"""

from __future__ import annotations

import fcntl
import os
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

PORT_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
RESERVED = Path("/proc/sys/net/ipv4/ip_local_reserved_ports")
# Two checkouts starting stacks at once must not each write the list without the other's ports.
LOCK = Path("/run/lock/maskbridge-ports.lock")

# Settings that name a first port of a block bound by one program: how many ports the block
# holds. (SIPp binds its media port and the ports after it, for each of the two phones; the
# caller phone's SIP port is the callee's plus one.)
BLOCKS = {"MB_BENCH_RTP_PORT": 20, "MB_BENCH_SIP_PORT": 2}


def listening_ports(env: Mapping[str, str]) -> set[int]:
    """The ports a stack with these settings binds explicitly: every MB_..._PORT setting (and
    the blocks above), and each RTP range (MB_..._RTP_START to MB_..._RTP_END: the PBX's, a
    second node's, the simulated carrier's) as a media guard covers it (the guard drops UDP to
    those ports from anyone but the carrier: a socket of another program given one of them for
    its own use would never get its answers)."""
    ports: set[int] = set()
    for name, value in env.items():
        if name.startswith("MB_") and name.endswith("_PORT") and value.isdigit():
            first = int(value)
            ports.update(range(first, first + BLOCKS.get(name, 1)))
    for name, start in env.items():
        end = env.get(name.removesuffix("RTP_START") + "RTP_END", "")
        if name.startswith("MB_") and name.endswith("RTP_START") and start.isdigit() and end.isdigit():
            ports.update(range(int(start), (int(end) | 1) + 1))  # (an even end: its RTCP port too)
    return {port for port in ports if 0 < port < 65536}


def parse(text: str) -> set[int]:
    """The ports of an ip_local_reserved_ports value ("8080,40000-40019")."""
    ports: set[int] = set()
    for part in text.replace("\n", "").split(","):
        part = part.strip()
        if not part:
            continue
        first, _, last = part.partition("-")
        ports.update(range(int(first), int(last or first) + 1))
    return ports


def format_ports(ports: Iterable[int]) -> str:
    """Ports as the kernel writes them: ascending, runs joined into ranges."""
    runs: list[list[int]] = []
    for port in sorted(set(ports)):
        if runs and port == runs[-1][1] + 1:
            runs[-1][1] = port
        else:
            runs.append([port, port])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _read_all(path: Path) -> str:
    """A /proc/sys file in one read: the kernel hands its whole value to the first read and
    then says end of file (Python's buffered first read, 8 KiB, would cut a long list)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.read(fd, 1 << 20).decode()
    finally:
        os.close(fd)


def reserve(env: Mapping[str, str], *, port_range: Path = PORT_RANGE, reserved: Path = RESERVED,
            lock: Path = LOCK) -> set[int]:
    """Add the stack's listening ports that fall in the ephemeral range to the kernel's
    reserved ports, keeping what was there (root only: elsewhere, or with /proc/sys read-only
    in a container, a warning on stderr, and the stack runs as before). Returns the ports
    newly reserved."""
    try:
        low, high = (int(v) for v in _read_all(port_range).split())
    except (OSError, ValueError):
        return set()  # not Linux, or no /proc: nothing to protect against
    wanted = {port for port in listening_ports(env) if low <= port <= high}
    if not wanted:
        return set()
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        holder = open(lock, "a")
    except OSError:
        holder = None  # (no lock to be had: still reserve)
    try:
        if holder is not None:
            fcntl.flock(holder, fcntl.LOCK_EX)
        try:
            text = _read_all(reserved)
            if not text.endswith("\n"):
                raise ValueError(f"{reserved} was not read whole")
            already = parse(text)
        except (OSError, ValueError) as exc:
            _warn(wanted, exc)
            return set()
        wanted -= already
        if not wanted:
            return set()
        try:
            reserved.write_text(format_ports(already | wanted) + "\n")
        except OSError as exc:
            _warn(wanted, exc)
            return set()
        return wanted
    finally:
        if holder is not None:
            holder.close()


def _warn(ports: set[int], exc: Exception) -> None:
    print(f"warning: could not reserve ports {format_ports(ports)} ({exc}); another program's connection "
          "may take one of them and stop the stack binding it", file=sys.stderr, flush=True)
