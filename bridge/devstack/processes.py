"""The bridge process of the local stack: start in the background, wait until healthy, stop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from bridge.devstack.settings import PROJECT_DIR, Stack


def _pidfile(stack: Stack) -> Path:
    return stack.run_dir / "bridge.pid"


def processes_with(*parts: bytes) -> set[int]:
    """Every process whose command line holds each of `parts` as one of its arguments
    (found through /proc: what a pid file lost or overwritten no longer names)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if all(part in argv for part in parts) and int(entry.name) != os.getpid():
                found.add(int(entry.name))
    return found


def terminate(pids: set[int], timeout: float = 10) -> None:
    """SIGTERM, and SIGKILL to whatever is still there after `timeout` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout
        while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.1)  # waiting for processes to exit
        if not any(_alive(pid) for pid in pids):
            return


def bridge_log(stack: Stack) -> Path:
    return stack.log_dir / "bridge.log"


def bridge_logs(stack: Stack) -> list[Path]:
    """The bridge logs of the stack in MB_STACK_DIR: each node's when it ran several (make
    run NODES=2, whether or not NODES is given again), else its one bridge's."""
    return sorted(stack.dir.glob("nodes/*/log/bridge.log")) or [bridge_log(stack)]


def bridge_pid(stack: Stack) -> int | None:
    """The bridge of the pid file, while it runs (a killed one left as a zombie does not)."""
    try:
        pid = int(_pidfile(stack).read_text())
    except (FileNotFoundError, ValueError):
        return None
    return pid if _alive(pid) else None


def health(stack: Stack) -> dict[str, bool] | None:
    url = f"http://{stack.env['MB_API_BIND']}:{stack.env['MB_API_PORT']}/healthz"
    try:
        # (the bridge's own checks of Asterisk and of the database take up to 2 s each)
        with urllib.request.urlopen(url, timeout=5) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return json.loads(exc.read() or b"{}")
    except (urllib.error.URLError, OSError, ValueError):
        return None


def wait_healthy(stack: Stack, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = health(stack)
        if status and all(status.values()):
            return
        if bridge_pid(stack) is None and not status:
            break
        time.sleep(0.2)  # polling a process that has no readiness signal
    raise RuntimeError(f"the bridge did not become healthy; see {bridge_log(stack)}")


def bridge_command() -> list[str]:
    return [sys.executable, "-m", "bridge"]


def record_bridge(stack: Stack, pid: int) -> None:
    """The pid file of a bridge process started by someone else (make run)."""
    stack.run_dir.mkdir(parents=True, exist_ok=True)
    _pidfile(stack).write_text(str(pid))


def start_bridge(stack: Stack) -> None:
    if bridge_pid(stack) is not None:
        return
    stack.run_dir.mkdir(parents=True, exist_ok=True)
    stack.log_dir.mkdir(parents=True, exist_ok=True)
    with open(bridge_log(stack), "ab") as log:
        proc = subprocess.Popen(
            bridge_command(),
            cwd=PROJECT_DIR,
            env={**os.environ, **stack.bridge_env()},
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    _pidfile(stack).write_text(str(proc.pid))
    wait_healthy(stack)


def _bridges_of(stack: Stack) -> set[int]:
    """Every running bridge process of this checkout's stack: the one in the pid file, and
    any other (a `make run` killed before it could stop its bridge; a pid file lost) found
    by its command line and the database it was given (each stack has its own)."""
    pids = set()
    pid = bridge_pid(stack)
    if pid is not None:
        pids.add(pid)
    wanted = f"MB_DATABASE_URL={stack.database_url}".encode()
    node = f"MB_NODE_ID={stack.env['MB_NODE_ID']}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            if cmdline[1:3] != [b"-m", b"bridge"]:
                continue
            environ = (entry / "environ").read_bytes().split(b"\0")
            # (the nodes of a stack share its database: each node's bridge by its node id;
            # a bridge of before node ids had none)
            if wanted in environ and (node in environ or not any(v.startswith(b"MB_NODE_ID=") for v in environ)):
                pids.add(int(entry.name))
        except (OSError, IndexError):
            continue  # gone meanwhile, or not ours to read
    return pids


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        os.waitpid(pid, os.WNOHANG)  # our own child: reaped once it exits
    except ChildProcessError:
        pass
    try:
        return "Z" not in Path(f"/proc/{pid}/stat").read_text().split(")", 1)[1][:3]
    except OSError:
        return False


def stop_bridge(stack: Stack, timeout: float = 15) -> None:
    """SIGTERM to every bridge process of the stack (it leaves calls in progress to the
    next one), SIGKILL to any still running after `timeout` seconds."""
    pids = _bridges_of(stack)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)  # waiting for processes to exit
    for pid in pids:
        if _alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    _pidfile(stack).unlink(missing_ok=True)
