"""Asterisk instances (the PBX and the simulated carrier) run from the Debian forky root
file system with chroot, each with its own asterisk.conf and directories."""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bridge.devstack.settings import PROJECT_DIR, Stack

CONFIG_DIR = PROJECT_DIR / "asterisk-config"
INSTANCES = ("pbx", "carrier")
_VAR = re.compile(r"\$\{(MB_[A-Z0-9_]+)\}")


def render(text: str, values: dict[str, str]) -> str:
    """Fill in ${MB_...} names; Asterisk's own ${...} expressions are left alone."""

    def sub(m: re.Match[str]) -> str:
        name = m.group(1)
        if name not in values:
            raise KeyError(f"asterisk-config uses {name}, which has no value")
        return values[name]

    return _VAR.sub(sub, text)


def instance_values(stack: Stack, instance: str) -> dict[str, str]:
    values = dict(stack.env)
    values["MB_AST_DIR"] = stack.ast_dir(instance)
    if instance == "carrier":
        values.update(
            MB_SYSTEMNAME="carrier",
            MB_ENTITYID="02:00:00:00:00:fe",
            MB_ARI_BIND=stack.env["MB_TRUNK_HOST"],
            MB_ARI_PORT=stack.env["MB_CARRIER_ARI_PORT"],
            MB_ARI_USER="carrier",
            MB_ARI_PASSWORD=stack.env["MB_CARRIER_ARI_PASSWORD"],
            MB_RTP_START=stack.env["MB_CARRIER_RTP_START"],
            MB_RTP_END=stack.env["MB_CARRIER_RTP_END"],
        )
    return values


def host_path(stack: Stack, instance: str, *parts: str) -> Path:
    """A path of an instance, seen from the host."""
    return stack.rootfs / stack.ast_dir(instance).lstrip("/") / Path(*parts)


def write_config(stack: Stack, instance: str, overrides: dict[str, str] | None = None) -> None:
    """Render asterisk-config/common plus asterisk-config/<instance> into the instance's etc."""
    values = instance_values(stack, instance)
    values.update(overrides or {})
    etc = host_path(stack, instance, "etc")
    etc.mkdir(parents=True, exist_ok=True)
    for sub in ("db", "spool", "run", "log", "cache", "spool/recording"):
        host_path(stack, instance, sub).mkdir(parents=True, exist_ok=True)
    for src_dir in (CONFIG_DIR / "common", CONFIG_DIR / instance):
        for src in sorted(src_dir.glob("*.conf")):
            (etc / src.name).write_text(render(src.read_text(), values))
    # The benchmark's baseline route is the PBX's only while a benchmark runs (bench_route).
    if instance == "pbx":
        (etc / BENCH_ROUTE).unlink(missing_ok=True)
        # Call records an older configuration let Asterisk write (the PBX keeps none now:
        # cdr.conf, cel.conf, logger.conf's queue_log = no) go with it.
        log_dir = host_path(stack, instance, "log")
        (log_dir / "queue_log").unlink(missing_ok=True)
        for records in ("cdr-csv", "cdr-custom", "cel-custom"):
            shutil.rmtree(log_dir / records, ignore_errors=True)


BENCH_ROUTE = "extensions_bench.conf"


@contextmanager
def bench_route(stack: Stack) -> Iterator[None]:
    """The benchmark's baseline route (asterisk-config/bench) in the PBX's dialplan while the
    block runs, and gone after: otherwise any trunk caller dialing +7999... would be put
    through by it, outside any session (an open relay)."""
    source = CONFIG_DIR / "bench" / BENCH_ROUTE
    with _included(stack, render(source.read_text(), instance_values(stack, "pbx"))):
        yield


@contextmanager
def bench_route_also(stack: Stack, name: str) -> Iterator[None]:
    """Inside bench_route: asterisk-config/bench/NAME in the PBX's dialplan too while the
    block runs (added to the benchmark's file), and the benchmark's file alone again after."""
    etc = host_path(stack, "pbx", "etc")
    values = instance_values(stack, "pbx")
    base = render((CONFIG_DIR / "bench" / BENCH_ROUTE).read_text(), values)
    (etc / BENCH_ROUTE).write_text(base + "\n" + render((CONFIG_DIR / "bench" / name).read_text(), values))
    _reload_dialplan(stack)
    try:
        yield
    finally:
        (etc / BENCH_ROUTE).write_text(base)
        _reload_dialplan(stack)


@contextmanager
def dialplan_also(stack: Stack, text: str) -> Iterator[None]:
    """A test's own dialplan `text` in the PBX while the block runs, and gone after. It goes
    in the file the PBX includes for the benchmark (so not inside bench_route): contexts of
    its own, which no call from the trunk reaches; a channel enters them only when the test
    originates one there."""
    with _included(stack, text):
        yield


@contextmanager
def _included(stack: Stack, text: str) -> Iterator[None]:
    """`text` as the PBX's included dialplan file while the block runs, and no file after."""
    etc = host_path(stack, "pbx", "etc")
    (etc / BENCH_ROUTE).write_text(text)
    _reload_dialplan(stack)
    try:
        yield
    finally:
        (etc / BENCH_ROUTE).unlink(missing_ok=True)
        _reload_dialplan(stack)


def _reload_dialplan(stack: Stack) -> None:
    out = rx(stack, "pbx", "dialplan reload")
    if out.returncode != 0:
        raise RuntimeError(f"dialplan reload of the PBX failed: {out.stderr or out.stdout}")


def _conf(stack: Stack, instance: str) -> str:
    return f"{stack.ast_dir(instance)}/etc/asterisk.conf"


def rx(stack: Stack, instance: str, command: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    """Run one Asterisk CLI command against a running instance."""
    return subprocess.run(
        ["chroot", str(stack.rootfs), "asterisk", "-C", _conf(stack, instance), "-rx", command],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def is_running(stack: Stack, instance: str) -> bool:
    try:
        return rx(stack, instance, "core show version", timeout=5).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def start(stack: Stack, instance: str) -> None:
    """Start an instance in the background (Asterisk forks itself) and wait until fully booted."""
    write_config(stack, instance)
    if is_running(stack, instance):
        _reload_config(stack, instance)
        return
    subprocess.run(["chroot", str(stack.rootfs), "asterisk", "-C", _conf(stack, instance)], check=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if is_running(stack, instance):
            booted = rx(stack, instance, "core waitfullybooted", timeout=60)
            if booted.returncode == 0:
                return
        time.sleep(0.2)  # polling a process that has no readiness signal
    raise RuntimeError(f"Asterisk {instance} did not boot; see {host_path(stack, instance, 'log')}")


def reload(stack: Stack, instance: str, overrides: dict[str, str] | None = None) -> None:
    """Re-render the configuration and reload it (e.g. to change the trunk's identity settings)."""
    write_config(stack, instance, overrides)
    _reload_config(stack, instance)


def _reload_config(stack: Stack, instance: str) -> None:
    out = rx(stack, instance, "core reload")
    if out.returncode != 0:
        raise RuntimeError(f"reload of {instance} failed: {out.stderr or out.stdout}")


def stop(stack: Stack, instance: str) -> None:
    """Stop an instance: `core stop now`, and if it is still there after a while (a channel
    stuck in an application can hold the shutdown forever), SIGTERM, then SIGKILL. Any other
    Asterisk running this instance's configuration (started twice at once: its control
    socket and pid file were taken over by the other, and only /proc still finds it) goes too."""
    from bridge.devstack.processes import processes_with, terminate

    pid = _pid(stack, instance)
    if is_running(stack, instance):
        rx(stack, instance, "core stop now", timeout=30)
    strays = processes_with(b"asterisk", _conf(stack, instance).encode()) - {pid}
    if strays:
        terminate(strays)
    for sig in (None, signal.SIGTERM, signal.SIGKILL):
        if sig is not None and pid is not None and _alive(pid):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if not _alive(pid) and not is_running(stack, instance):
                return
            time.sleep(0.2)  # waiting for a process to exit
    raise RuntimeError(f"Asterisk {instance} (pid {pid}) would not stop")


def _pid(stack: Stack, instance: str) -> int | None:
    try:
        return int(host_path(stack, instance, "run", "asterisk.pid").read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def _alive(pid: int | None) -> bool:
    """Whether `pid` is a running Asterisk (not a zombie, not a process that reused the pid)."""
    if pid is None:
        return False
    try:
        if b"asterisk" not in Path(f"/proc/{pid}/cmdline").read_bytes():
            return False
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][:1] != "Z"
    except (FileNotFoundError, IndexError):
        return False


# Debian packages of the root file system: Asterisk, its English and Russian prompts, music
# on hold (what a held party hears), and Kamailio (in front of the nodes: MB_NODES above 1).
ROOTFS_PACKAGES = ("asterisk", "asterisk-core-sounds-en-gsm", "asterisk-core-sounds-ru-gsm", "asterisk-moh-opsound-gsm",
                   "kamailio")


def ensure_rootfs(stack: Stack) -> None:
    """Build the Asterisk 22 root file system with debootstrap if it is not there yet, and
    add the packages an older one lacks."""
    root = stack.rootfs
    root.parent.mkdir(parents=True, exist_ok=True)
    # One builder at a time: two checkouts (or `make run` and `make test`) starting together
    # share the root file system, and one debootstrap would delete the other's work.
    with open(root.with_name(root.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _build_rootfs(root)


def _build_rootfs(root: Path) -> None:
    if (root / "usr/sbin/asterisk").exists() and (root / ".maskbridge-complete").exists():
        _add_missing_packages(root)
        return
    if shutil.which("debootstrap") is None:
        raise RuntimeError("debootstrap is missing: run `make deps` (apt-get install debootstrap)")
    tmp = root.with_name(root.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    print(f"building the Asterisk 22 root file system in {root} (about a minute) ...", flush=True)
    subprocess.run(
        [
            "debootstrap",
            "--variant=minbase",
            "--include=" + ",".join(ROOTFS_PACKAGES),
            "forky",
            str(tmp),
            "http://deb.debian.org/debian",
            "/usr/share/debootstrap/scripts/sid",
        ],
        check=True,
    )
    (tmp / ".maskbridge-complete").write_text("debootstrap forky with asterisk\n")
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)


def _add_missing_packages(root: Path) -> None:
    installed = subprocess.run(
        ["chroot", str(root), "dpkg-query", "-W", "-f=${Package} ${db:Status-Status}\\n", *ROOTFS_PACKAGES],
        capture_output=True, text=True,
    ).stdout
    present = {line.split()[0] for line in installed.splitlines() if line.endswith(" installed")}
    missing = [name for name in ROOTFS_PACKAGES if name not in present]
    if not missing:
        return
    print(f"adding to the Asterisk root file system: {' '.join(missing)} ...", flush=True)
    env = {"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    # As debootstrap does, accept a mirror whose Release file is past its Valid-Until date.
    apt = ["chroot", str(root), "apt-get", "-o", "Acquire::Check-Valid-Until=false"]
    subprocess.run([*apt, "update", "-q"], check=True, env=env)
    subprocess.run(
        [*apt, "install", "-y", "-q", "--no-install-recommends", *missing],
        check=True, env=env,
    )
