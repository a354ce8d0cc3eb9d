"""A docker engine and the base images for the compose test (tests/compose).

Our machines have no image registry: a docker engine runs, but `FROM python:3.11-slim`,
`debian:forky-slim`, `postgres:15` and `prom/prometheus` cannot be pulled. So this module

- installs Debian's docker engine (`docker.io`) if it is missing and starts `dockerd` if
  none answers (there is no systemd), on host networking only (no bridge, no iptables);
- installs Compose v2 as a docker CLI plugin, from Debian forky's `docker-compose` package,
  fetched inside the Asterisk root file system the local stack already builds (bookworm's
  docker-compose 1.29 refuses the compose file's `name:`);
- makes local stand-ins for the upstream base images: Debian bookworm and forky root file
  systems from debootstrap, imported with `docker import`, and images built from them
  (tests/compose/images/) that honour the contracts of python:3.11-slim, postgres:15 and
  prom/prometheus.

Everything is reused when present: the second run costs seconds. The stand-ins trust the
machine's own CA certificates (pip reaches PyPI through them); they are local test images,
never published, and the project's Dockerfiles copy no certificate.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from bridge.devstack.settings import PROJECT_DIR

DAEMON_JSON = Path("/etc/docker/daemon.json")
# Host networking only: the daemon touches neither the firewall nor the host's interfaces.
DAEMON_CONFIG = {"iptables": False, "bridge": "none"}
DOCKERD_LOG = Path("/var/log/maskbridge/dockerd.log")
# A directory the docker CLI searches for plugins (`docker compose`).
COMPOSE_PLUGIN = Path("/usr/local/lib/docker/cli-plugins/docker-compose")
# `up --wait --wait-timeout` needs Compose 2.17 or newer.
COMPOSE_MINIMUM = (2, 17)
MIRROR = "http://deb.debian.org/debian"
IMAGES_DIR = PROJECT_DIR / "tests" / "compose" / "images"

# Local stand-ins: name -> (Debian suite, debootstrap script). Bump RECIPE when what goes
# into them changes, so that an older one is made again.
RECIPE = "1"
ROOT_IMAGES = {
    "maskbridge-test/debian:bookworm": ("bookworm", None),
    # bookworm's debootstrap has no forky script; sid's is the same.
    "maskbridge-test/debian:forky": ("forky", "/usr/share/debootstrap/scripts/sid"),
}
# name -> its directory under tests/compose/images/ (a Dockerfile and what it copies).
BUILT_IMAGES = {
    "maskbridge-test/python:3.11": "python",
    "maskbridge-test/postgres:15": "postgres",
    "maskbridge-test/prometheus:2": "prometheus",
}


class EngineUnavailable(RuntimeError):
    """No docker engine can run on this machine; the message says why."""


def docker(*args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker", *args], capture_output=True, text=True, check=check, timeout=timeout)


def engine_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        return docker("info", "--format", "{{.ServerVersion}}", check=False, timeout=20).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def ensure_engine(rootfs: Path) -> None:
    """A docker engine that answers, and `docker compose` v2; raises EngineUnavailable."""
    if not engine_answers():
        if shutil.which("dockerd") is None:
            _install_engine()
        # (The package may have started one itself, through its init script.)
        if not engine_answers():
            _start_engine()
    _ensure_compose(rootfs)


def _install_engine() -> None:
    # The configuration first: a package that starts the daemon at install starts it right.
    _write_daemon_config()
    print("installing the docker engine (docker.io) ...", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for args in (["update", "-q"], ["install", "-y", "-q", "--no-install-recommends", "docker.io"]):
        out = subprocess.run(["apt-get", *args], capture_output=True, text=True, env=env)
        if out.returncode != 0 and args[0] == "install":
            raise EngineUnavailable(f"apt-get install docker.io failed: {out.stderr.strip()[-500:]}")
    if shutil.which("dockerd") is None:
        raise EngineUnavailable("docker.io is installed but has no dockerd")


def _write_daemon_config() -> None:
    if DAEMON_JSON.exists():
        return  # the machine's own: left as it is
    DAEMON_JSON.parent.mkdir(parents=True, exist_ok=True)
    DAEMON_JSON.write_text(json.dumps(DAEMON_CONFIG) + "\n")


def _start_engine() -> None:
    _write_daemon_config()
    DOCKERD_LOG.parent.mkdir(parents=True, exist_ok=True)
    print(f"starting dockerd (log: {DOCKERD_LOG}) ...", flush=True)
    with open(DOCKERD_LOG, "ab") as log:
        written_before = log.tell()
        proc = subprocess.Popen(
            ["dockerd"], stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True
        )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if engine_answers():
            return
        if proc.poll() is not None:
            break
        time.sleep(0.5)  # polling a daemon that has no readiness signal
    if proc.poll() is None:
        proc.terminate()
    with open(DOCKERD_LOG, "rb") as log:
        log.seek(written_before)
        said = log.read().decode(errors="replace").strip().splitlines()[-3:]
    raise EngineUnavailable(f"dockerd did not start (see {DOCKERD_LOG}): " + " | ".join(said))


def compose_version() -> tuple[int, int] | None:
    try:
        out = docker("compose", "version", "--short", check=False, timeout=20)
    except subprocess.TimeoutExpired:
        return None
    parts = out.stdout.strip().lstrip("v").split(".")
    if out.returncode != 0 or len(parts) < 2 or not all(p.isdigit() for p in parts[:2]):
        return None
    return int(parts[0]), int(parts[1])


def _ensure_compose(rootfs: Path) -> None:
    """Compose v2 from Debian forky's package (its binary needs nothing but libc), fetched
    with the forky root file system's apt and unpacked into the docker CLI's plugin directory."""
    version = compose_version()
    if version is not None and version >= COMPOSE_MINIMUM:
        return
    print("installing docker compose v2 from Debian forky ...", flush=True)
    with tempfile.TemporaryDirectory(dir=rootfs / "tmp") as tmp:
        inside = "/" + str(Path(tmp).relative_to(rootfs))
        apt = "apt-get -q -o Acquire::Check-Valid-Until=false"
        # The root file system's package lists are refreshed only if they are too old to
        # name a package the mirror still has.
        download = f"cd {inside} && ({apt} download docker-compose || ({apt} update && {apt} download docker-compose))"
        out = subprocess.run(["chroot", str(rootfs), "sh", "-c", download], capture_output=True, text=True)
        debs = sorted(Path(tmp).glob("docker-compose_*.deb"))
        if out.returncode != 0 or not debs:
            raise EngineUnavailable(f"cannot fetch docker-compose from Debian forky: {out.stderr.strip()[-500:]}")
        unpacked = Path(tmp) / "unpacked"
        subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(unpacked)], check=True)
        COMPOSE_PLUGIN.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(unpacked / "usr/libexec/docker/cli-plugins/docker-compose", COMPOSE_PLUGIN)
    version = compose_version()
    if version is None or version < COMPOSE_MINIMUM:
        raise EngineUnavailable(f"docker compose from forky does not run (version {version})")


# --- base images --------------------------------------------------------------------


def image_recipe(name: str) -> str | None:
    out = docker("image", "inspect", "--format", '{{index .Config.Labels "org.maskbridge.recipe"}}', name, check=False)
    return out.stdout.strip() if out.returncode == 0 else None


def ensure_base_images() -> None:
    """The stand-ins for the upstream base images, made if missing (a few minutes the
    first time), reused after."""
    for name, (suite, script) in ROOT_IMAGES.items():
        if image_recipe(name) != RECIPE:
            _import_root(name, suite, script)
    for name, directory in BUILT_IMAGES.items():
        # Docker's layer cache makes this instant once built.
        build(name, IMAGES_DIR / directory, {"BASE_IMAGE": "maskbridge-test/debian:bookworm"})


def prune_replaced_images() -> None:
    """Remove the images a newer build replaced (untagged, used by no container) that come
    from the stand-ins (they inherit the recipe label): each change to the bridge's code
    would otherwise leave a few hundred megabytes behind."""
    docker("image", "prune", "--force", "--filter", "label=org.maskbridge.recipe", check=False, timeout=300)


def build(name: str, context: Path, args: dict[str, str]) -> None:
    command = ["build", "--network", "host", "-t", name]
    for key, value in args.items():
        command += ["--build-arg", f"{key}={value}"]
    out = docker(*command, str(context), check=False, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"docker build of {name} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")


def _import_root(name: str, suite: str, script: str | None) -> None:
    print(f"making the base image {name} (debootstrap {suite}) ...", flush=True)
    with tempfile.TemporaryDirectory(prefix="maskbridge-root-", dir="/var/tmp") as tmp:
        root = Path(tmp) / "root"
        command = ["debootstrap", "--variant=minbase", "--include=ca-certificates", suite, str(root), MIRROR]
        out = subprocess.run([*command, *([script] if script else [])], capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"debootstrap {suite} failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
        # The mirror may be a snapshot whose Release is past its Valid-Until date.
        (root / "etc/apt/apt.conf.d/99maskbridge-snapshot").write_text('Acquire::Check-Valid-Until "false";\n')
        _trust_machine_certificates(root)
        for leftover in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for path in (root / leftover).glob("*"):
                if path.is_file():
                    path.unlink()
        changes = [
            "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "ENV LANG=C.UTF-8",
            'CMD ["bash"]',
            f"LABEL org.maskbridge.recipe={RECIPE}",
        ]
        options = " ".join(f"--change {shlex.quote(change)}" for change in changes)
        imported = subprocess.run(
            ["bash", "-c", f"set -o pipefail; tar -C {shlex.quote(str(root))} --numeric-owner -c . "
                           f"| docker import {options} - {shlex.quote(name)}"],
            capture_output=True, text=True,
        )
        if imported.returncode != 0:
            raise RuntimeError(f"docker import of {name} failed: {imported.stderr.strip()[-1000:]}")


def _trust_machine_certificates(root: Path) -> None:
    """The machine's local CA certificates (those update-ca-certificates adds to Debian's),
    trusted inside the root as on the machine: its egress to PyPI may depend on them."""
    local = Path("/usr/local/share/ca-certificates")
    found = sorted(local.rglob("*.crt")) if local.is_dir() else []
    if not found:
        return
    target = root / "usr/local/share/ca-certificates"
    target.mkdir(parents=True, exist_ok=True)
    for cert in found:
        shutil.copy2(cert, target / cert.name)
    subprocess.run(["chroot", str(root), "update-ca-certificates"], check=True, capture_output=True)
