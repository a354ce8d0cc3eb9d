"""`make run` and `make stop` as an engineer (or a process supervisor) uses them: SIGTERM or
SIGHUP stops the whole stack as Ctrl-C does, and `make stop` stops whatever a `make run`
that was killed outright left behind, its bridge included.

Each scenario runs a stack of its own, on addresses and ports clear of the stack the other
live tests use (MB_PROCESSES_<name without MB_> moves one, as for the compose test)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bridge.devstack import asterisk, media_guard, monitoring, postgres, processes
from bridge.devstack.settings import DEFAULTS, PROJECT_DIR, Stack, load

SETTINGS = {
    "MB_PBX_SIP_BIND": "127.0.0.51",
    "MB_ARI_BIND": "127.0.0.51",
    "MB_API_BIND": "127.0.0.51",
    "MB_TRUNK_HOST": "127.0.0.52",
    "MB_PG_PORT": "15492",
    "MB_RTP_START": "44000",
    "MB_RTP_END": "44999",
    "MB_CARRIER_RTP_START": "45000",
    "MB_CARRIER_RTP_END": "45999",
    "MB_PROMETHEUS_BIND": "127.0.0.51",
}


@pytest.fixture(scope="module")
def environ(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment of the scenarios' stack: only its own MB_ settings (`make test`
    exports the main stack's)."""
    values = {name: os.environ.get("MB_PROCESSES_" + name[3:], value) for name, value in SETTINGS.items()}
    values["MB_STACK_DIR"] = str(tmp_path_factory.mktemp("stack"))
    values["MB_ROOTFS"] = os.environ.get("MB_ROOTFS", DEFAULTS["MB_ROOTFS"][0])
    base = {k: v for k, v in os.environ.items() if not k.startswith("MB_")}
    return {**base, **values}


@pytest.fixture
def own_stack(environ: dict[str, str]) -> Iterator[Stack]:
    stack = load(environ)
    yield stack
    subprocess.run(["make", "stop"], cwd=PROJECT_DIR, env=environ, capture_output=True, timeout=120)
    # (`make stop` leaves the guard, in case another checkout's PBX uses the range: this range
    # is the scenarios' own, and its rules would outlive the test run.)
    media_guard.remove(stack)


def everything_down(stack: Stack) -> dict[str, bool]:
    """What of the stack still runs (all False: nothing), found by its control sockets and
    pid files, and by /proc (an Asterisk whose socket another took over; a Prometheus)."""
    return {
        "postgres": postgres.is_running(stack),
        **{f"asterisk {i}": asterisk.is_running(stack, i) for i in asterisk.INSTANCES},
        **{f"asterisk {i} (any)": bool(processes.processes_with(b"asterisk", asterisk._conf(stack, i).encode()))
           for i in asterisk.INSTANCES},
        "bridge": bool(processes._bridges_of(stack)),
        "prometheus": bool(monitoring.prometheus_of(stack.dir / "prometheus")),
    }


def stack_up(stack: Stack) -> bool:
    """Whether all of the stack runs (a Prometheus is not part of it)."""
    return all(running for name, running in everything_down(stack).items() if name != "prometheus")


def make_run(environ: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """`make run` in the background, returned once the stack is up and the bridge healthy."""
    with open(log, "wb") as out:
        # (A process group of its own, as a terminal gives a command.)
        proc = subprocess.Popen(["make", "run"], cwd=PROJECT_DIR, env=environ, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    stack = load(environ)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        status = processes.health(stack)
        if status and all(status.values()):
            return proc
        time.sleep(0.5)  # wait-ok: polling (make run has no readiness signal but the bridge's health)
    raise AssertionError("make run did not bring the stack up:\n" + log.read_text()[-3000:])


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


# SIGTERM to make alone, as `kill` or a process supervisor sends it (make passes it on to
# its recipe); SIGTERM and SIGHUP to the whole process group, as a terminal that closes (or a
# supervisor that signals the group) sends them. (SIGHUP to make alone does nothing GNU make
# passes on: it waits for its recipe, which a terminal has signalled too.)
@pytest.mark.parametrize(
    ("signum", "group"),
    [(signal.SIGTERM, False), (signal.SIGTERM, True), (signal.SIGHUP, True)],
    ids=["SIGTERM-to-make", "SIGTERM-to-group", "SIGHUP-to-group"],
)
def test_make_run_stops_the_whole_stack_on_sigterm_and_sighup(environ, own_stack, tmp_path, signum, group):
    proc = make_run(environ, tmp_path / "run.log")
    assert stack_up(own_stack), "the stack runs"
    if group:
        os.killpg(proc.pid, signum)
    else:
        os.kill(proc.pid, signum)
    proc.wait(timeout=90)
    log = (tmp_path / "run.log").read_text()
    assert "stopping the stack" in log, log[-2000:]
    assert not any(everything_down(own_stack).values()), everything_down(own_stack)


def test_make_stop_stops_what_a_killed_make_run_left_the_bridge_included(environ, own_stack, tmp_path):
    proc = make_run(environ, tmp_path / "run.log")
    [devstack] = children(proc.pid)
    bridge = processes.bridge_pid(own_stack)
    assert bridge is not None
    # Killed outright: nothing of the own_stack could stop.
    os.kill(devstack, signal.SIGKILL)
    proc.wait(timeout=30)
    assert stack_up(own_stack), "the killed make run left its stack running"
    (own_stack.run_dir / "bridge.pid").unlink()  # and even the bridge's pid file is lost
    out = subprocess.run(["make", "stop"], cwd=PROJECT_DIR, env=environ, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert not any(everything_down(own_stack).values()), everything_down(own_stack)


def test_two_make_start_at_once_start_one_stack_and_make_stop_leaves_nothing(environ, own_stack):
    """The second one, started while the first is starting, stops at once and touches
    nothing of the first (it used to stop the first one's stack, and leave Asterisks that
    nothing could see)."""
    runs = [subprocess.Popen(["make", "start"], cwd=PROJECT_DIR, env=environ, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [(run.wait(timeout=300), *run.communicate()) for run in runs]
    assert sorted(code for code, _out, _err in outs) == [0, 2], outs
    refused = next(err for code, _out, err in outs if code == 2)
    assert "another `make run` or `make start` of this stack" in refused, refused
    assert processes.health(own_stack) == {"ari": True, "database": True}
    out = subprocess.run(["make", "stop"], cwd=PROJECT_DIR, env=environ, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert not any(everything_down(own_stack).values()), everything_down(own_stack)


def test_make_stop_also_stops_a_prometheus_whose_make_monitor_was_killed(environ, own_stack, tmp_path):
    assert subprocess.run(["make", "start"], cwd=PROJECT_DIR, env=environ, capture_output=True,
                          timeout=300).returncode == 0
    with open(tmp_path / "monitor.log", "wb") as log:
        monitor = subprocess.Popen([sys.executable, "-m", "bridge.devstack", "monitor"], cwd=PROJECT_DIR, env=environ,
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 30
    while not monitoring.prometheus_of(own_stack.dir / "prometheus") and time.monotonic() < deadline:
        time.sleep(0.1)  # wait-ok: polling (the monitor command has no readiness signal)
    assert monitoring.prometheus_of(own_stack.dir / "prometheus")
    os.kill(monitor.pid, signal.SIGKILL)
    monitor.wait(timeout=10)
    assert monitoring.prometheus_of(own_stack.dir / "prometheus"), "its Prometheus outlived it"
    again = subprocess.run([sys.executable, "-m", "bridge.devstack", "monitor"], cwd=PROJECT_DIR, env=environ,
                           capture_output=True, text=True, timeout=30)
    assert again.returncode == 2 and "a Prometheus of this stack runs already" in again.stderr, again.stderr
    out = subprocess.run(["make", "stop"], cwd=PROJECT_DIR, env=environ, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert not any(everything_down(own_stack).values()), everything_down(own_stack)
