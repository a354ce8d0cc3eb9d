"""The benchmark measures the PBX's own process, never a console attached to it: a console
left open (`asterisk -rvvv`, which renames itself rasterisk) once had a whole `make bench`
measure its CPU and memory (0 ms per call, 2 MB) instead of the PBX's."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench import measure
from bridge.devstack.settings import Stack

SLEEP = "import time; time.sleep(60)"  # wait-ok: a stand-in process that only has to exist (killed after)


@pytest.fixture
def stack(tmp_path: Path) -> Stack:
    return Stack(env={"MB_STACK_DIR": str(tmp_path / "stack")})


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        proc.kill()
        proc.wait()


def _like(argv0: str, *args: str) -> subprocess.Popen[bytes]:
    """A process whose command line reads `argv0 -c <sleep> args...` (a stand-in: python),
    once /proc shows it so (a make test once found the server stand-in's command line not
    there yet, right after it started)."""
    proc = subprocess.Popen([argv0, "-c", SLEEP, *args], executable=sys.executable)
    want = b"\0".join(arg.encode() for arg in (argv0, "-c", SLEEP, *args))
    deadline = time.monotonic() + 10
    while Path(f"/proc/{proc.pid}/cmdline").read_bytes().rstrip(b"\0") != want:
        assert time.monotonic() < deadline, f"/proc never showed the command line of {argv0}"
        time.sleep(0.01)  # wait-ok: polling /proc for the new process's command line
    return proc


def test_a_console_is_not_the_pbx(stack: Stack, processes: list[subprocess.Popen[bytes]]) -> None:
    conf = f"{stack.ast_dir('pbx')}/etc/asterisk.conf"
    processes += [_like("rasterisk", "C", conf, "-rvvv"), _like("asterisk", "-C", conf, "-rx", "core show uptime"),
                  _like("asterisk", "-C", conf, "-r")]
    assert measure.asterisk_pid(stack, "pbx") is None
    server = _like("/usr/sbin/asterisk", "-C", conf)
    processes.append(server)
    assert measure.asterisk_pid(stack, "pbx") == server.pid
    assert measure.asterisk_pid(stack, "carrier") is None
