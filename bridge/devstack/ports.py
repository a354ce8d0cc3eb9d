"""The stack's fixed listening ports, kept out of the kernel's ephemeral range.

Linux gives outgoing connections and unbound UDP sockets a local port from
net.ipv4.ip_local_port_range (32768-60999 by default). The local Postgres listens on 55432
(and the tests' stacks on 554xx), the benchmark's SIPp phones on 40000 and up: all inside
that range. Any client socket that happens to be given one of these as its local port, even
a connection to somewhere else, makes the server's bind fail with "Address already in use"
for as long as it lives; a Postgres restarted mid-run (the resilience tests restart it) is
the most exposed. The kernel's own remedy is net.ipv4.ip_local_reserved_ports: ports listed
there are never handed out automatically, and can still be bound explicitly.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

PORT_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
RESERVED = Path("/proc/sys/net/ipv4/ip_local_reserved_ports")

# Settings that name a first port of a block bound by one program: how many ports the block
# holds. (SIPp binds its media port and the ports after it, for each of the two phones.)
BLOCKS = {"MB_BENCH_RTP_PORT": 20}


def listening_ports(env: Mapping[str, str]) -> set[int]:
    """The ports a stack with these settings binds explicitly: every MB_..._PORT setting (and
    the blocks above). The RTP ranges are left out: Asterisk skips a port it cannot bind."""
    ports: set[int] = set()
    for name, value in env.items():
        if name.startswith("MB_") and name.endswith("_PORT") and value.isdigit():
            first = int(value)
            ports.update(range(first, first + BLOCKS.get(name, 1)))
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


def reserve(env: Mapping[str, str], *, port_range: Path = PORT_RANGE, reserved: Path = RESERVED) -> set[int]:
    """Add the stack's listening ports that fall in the ephemeral range to the kernel's
    reserved ports (root only: elsewhere a warning, and the stack runs as before). Returns
    the ports newly reserved."""
    try:
        low, high = (int(v) for v in port_range.read_text().split())
        already = parse(reserved.read_text())
    except (OSError, ValueError):
        return set()  # not Linux, or no /proc: nothing to protect against
    wanted = {port for port in listening_ports(env) if low <= port <= high} - already
    if not wanted:
        return set()
    try:
        reserved.write_text(format_ports(already | wanted) + "\n")
    except OSError as exc:
        print(f"warning: could not reserve ports {format_ports(wanted)} ({exc}); another program's connection "
              "may take one of them and stop the stack binding it", flush=True)
        return set()
    return wanted
