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


def bridge_log(stack: Stack) -> Path:
    return stack.log_dir / "bridge.log"


def bridge_pid(stack: Stack) -> int | None:
    try:
        pid = int(_pidfile(stack).read_text())
        os.kill(pid, 0)
        return pid
    except (FileNotFoundError, ValueError, ProcessLookupError):
        return None


def health(stack: Stack) -> dict[str, bool] | None:
    url = f"http://{stack.env['MB_API_BIND']}:{stack.env['MB_API_PORT']}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
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


def stop_bridge(stack: Stack, timeout: float = 15) -> None:
    pid = bridge_pid(stack)
    if pid is None:
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.1)  # waiting for a process to exit
    else:
        os.kill(pid, signal.SIGKILL)
    _pidfile(stack).unlink(missing_ok=True)
