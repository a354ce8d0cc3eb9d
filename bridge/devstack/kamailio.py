"""Kamailio in front of the nodes (MB_NODES above 1), run from the Asterisk root file system
(Debian forky's kamailio package) with chroot, in the foreground of a process of its own.

It listens where a one-node stack's PBX would (MB_PBX_SIP_BIND:MB_PBX_SIP_PORT): the carrier
calls it, and each node's trunk is it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

from bridge.devstack.asterisk import render
from bridge.devstack.settings import PROJECT_DIR, Stack

CONFIG = PROJECT_DIR / "kamailio" / "kamailio.cfg"
FR_TIMER_MS = 2000  # how long a node that does not answer an INVITE is waited for
PING_INTERVAL = 2  # seconds between two OPTIONS probes of each node


def _dir(stack: Stack) -> str:
    """Its directory, as seen inside the root file system."""
    return f"/srv/maskbridge/{stack.instance_tag}/kamailio"


def _host(stack: Stack, *parts: str) -> Path:
    return stack.rootfs / _dir(stack).lstrip("/") / Path(*parts)


def _pidfile(stack: Stack) -> Path:
    return stack.run_dir / "kamailio.pid"


def log_path(stack: Stack) -> Path:
    return stack.log_dir / "kamailio.log"


def values(stack: Stack) -> dict[str, str]:
    e = stack.env
    return {
        "MB_KAM_ADDRESS": e["MB_PBX_SIP_BIND"],
        "MB_KAM_PORT": e["MB_PBX_SIP_PORT"],
        "MB_KAM_CARRIER_IP": e["MB_TRUNK_HOST"],
        "MB_KAM_CARRIER_PORT": e["MB_TRUNK_PORT"],
        "MB_KAM_RUN_DIR": f"{_dir(stack)}/run",
        "MB_KAM_DISPATCHER_LIST": f"{_dir(stack)}/dispatcher.list",
        "MB_KAM_FR_TIMER": str(FR_TIMER_MS),
        "MB_KAM_PING_INTERVAL": str(PING_INTERVAL),
        "MB_KAM_DEBUG": "2",
        "MB_KAM_CHILDREN": "4",
    }


def dispatcher_list(nodes: list[Stack]) -> str:
    """Set 1: every node's PBX, with its node id as an attribute."""
    return "".join(
        f"1 sip:{n.env['MB_PBX_SIP_BIND']}:{n.env['MB_PBX_SIP_PORT']} 0 0 node={n.env['MB_NODE_ID']}\n" for n in nodes
    )


def write_config(stack: Stack) -> None:
    _host(stack, "run").mkdir(parents=True, exist_ok=True)
    (_host(stack) / "kamailio.cfg").write_text(render(CONFIG.read_text(), values(stack)))
    (_host(stack) / "dispatcher.list").write_text(dispatcher_list(stack.nodes))


def pid(stack: Stack) -> int | None:
    try:
        value = int(_pidfile(stack).read_text())
        if b"kamailio" in Path(f"/proc/{value}/cmdline").read_bytes():
            return value
    except (FileNotFoundError, ValueError, ProcessLookupError):
        pass
    return None


def rpc(stack: Stack, *command: str, timeout: float = 5) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["chroot", str(stack.rootfs), "kamcmd", "-s", f"unix:{_dir(stack)}/run/kamailio_ctl", *command],
        capture_output=True, text=True, timeout=timeout,
    )


def start(stack: Stack) -> None:
    """Start it (unless it runs), and wait until it answers its control socket."""
    write_config(stack)
    if pid(stack) is not None:
        rpc(stack, "dispatcher.reload")
        return
    stack.run_dir.mkdir(parents=True, exist_ok=True)
    stack.log_dir.mkdir(parents=True, exist_ok=True)
    with open(log_path(stack), "ab") as log:
        proc = subprocess.Popen(
            ["chroot", str(stack.rootfs), "kamailio", "-DD", "-E", "-f", f"{_dir(stack)}/kamailio.cfg"],
            stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True,
        )
    _pidfile(stack).write_text(str(proc.pid))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"Kamailio exited ({proc.returncode}); see {log_path(stack)}")
        if rpc(stack, "core.uptime").returncode == 0:
            return
        time.sleep(0.2)  # polling a process that has no readiness signal
    raise RuntimeError(f"Kamailio did not start; see {log_path(stack)}")


def stop(stack: Stack) -> None:
    """SIGTERM to Kamailio and its children (its own process group), SIGKILL if it lingers."""
    running = pid(stack)
    if running is not None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(running, sig)
            except ProcessLookupError:
                break
            if _gone(running, timeout=10):
                break
    _pidfile(stack).unlink(missing_ok=True)


def _gone(process: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.waitpid(process, os.WNOHANG)  # (our own child: reaped)
        except ChildProcessError:
            pass
        try:
            if Path(f"/proc/{process}/stat").read_text().rsplit(") ", 1)[1][:1] == "Z":
                return True
        except (FileNotFoundError, IndexError):
            return True
        time.sleep(0.1)  # waiting for a process to exit
    return False


def is_running(stack: Stack) -> bool:
    return pid(stack) is not None


_DEST = re.compile(r"URI:\s*(sip:\S+).*?FLAGS:\s*(\S+)", re.S)


def node_states(stack: Stack) -> dict[str, str]:
    """What Kamailio thinks of each node (its SIP URI): "up" (active), "down" (inactive or
    disabled), from `dispatcher.list`."""
    out = rpc(stack, "dispatcher.list")
    if out.returncode != 0:
        return {}
    states = {}
    for uri, flags in _DEST.findall(out.stdout):
        states[uri] = "up" if flags.startswith("A") else "down"
    return states
