"""The PBX's media guard on this host: its RTP port range takes UDP from the carrier's media
networks only (asterisk-config/media-guard.sh, the same script the compose stack's
media-guard service runs; why: that script's header and docs/production.md, "Media")."""

from __future__ import annotations

import subprocess

from bridge.devstack.settings import PROJECT_DIR, Stack

SCRIPT = PROJECT_DIR / "asterisk-config" / "media-guard.sh"


def _run(stack: Stack, action: str) -> subprocess.CompletedProcess[str]:
    # The stack's own range and carrier: with several nodes, the range is all the nodes'
    # shares, and the media comes from the carrier itself (the nodes' trunk is Kamailio,
    # which carries no media).
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", **{k: stack.env[k] for k in (
        "MB_RTP_START", "MB_RTP_END", "MB_TRUNK_MEDIA", "MB_TRUNK_HOST")}}
    return subprocess.run(["sh", str(SCRIPT), action], env=env, capture_output=True, text=True, check=False)


def apply(stack: Stack) -> None:
    """The rules in place, and checked: the PBX is not started without them."""
    done = _run(stack, "apply")
    if done.returncode != 0:
        raise RuntimeError(f"the PBX's media guard could not be applied (it needs root): {done.stderr.strip()}")
    if differs := check(stack):
        raise RuntimeError(f"the PBX's media guard is not as its settings say after applying it: {differs}")


def check(stack: Stack) -> str:
    """'' when the rules in place are the settings', else what differs."""
    done = _run(stack, "check")
    return "" if done.returncode == 0 else (done.stderr.strip() or f"exit {done.returncode}")


def remove(stack: Stack) -> None:
    """The stack's range's rules gone (the stack itself never does it: `make stop` leaves them,
    as the compose stack's guard does, since another checkout's PBX may use the same range)."""
    _run(stack, "remove")
