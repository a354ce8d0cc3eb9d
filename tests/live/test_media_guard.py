"""The PBX's media guard (asterisk-config/media-guard.sh) on this host's firewall: the running
stack has it, exactly as its settings say; applying it again changes nothing; removing it
leaves nothing; settings it cannot use are refused with a reason. Its effect on calls:
test_stray_rtp.py."""

from __future__ import annotations

import subprocess

import pytest

from bridge.devstack import media_guard
from bridge.devstack.settings import Stack

# A range of its own, away from any stack's, so the stack's guard is not touched.
RANGE = {"MB_RTP_START": "31000", "MB_RTP_END": "31009"}
CHAIN = "MB-MEDIA-31000"


def guard(action: str, **env: str) -> subprocess.CompletedProcess[str]:
    settings = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", **RANGE, **env}
    return subprocess.run(["sh", str(media_guard.SCRIPT), action], env=settings, capture_output=True, text=True,
                          check=False)


def rules(tool: str) -> list[str]:
    return [line for line in subprocess.run([tool, "-w", "-S"], capture_output=True, text=True,
                                            check=True).stdout.splitlines() if CHAIN in line]


@pytest.fixture
def clean():
    guard("remove", MB_TRUNK_MEDIA="192.0.2.1")
    yield
    guard("remove", MB_TRUNK_MEDIA="192.0.2.1")


def test_the_running_stack_has_its_guard(stack: Stack) -> None:
    assert media_guard.check(stack) == ""


def test_apply_is_exact_and_safe_to_run_twice_and_remove_leaves_nothing(clean) -> None:
    nets = {"MB_TRUNK_MEDIA": "192.0.2.1, 198.51.100.0/24,2001:db8::7"}
    assert guard("check", **nets).returncode == 1
    for _ in range(2):
        done = guard("apply", **nets)
        assert done.returncode == 0, done.stderr
    assert rules("iptables") == [
        f"-N {CHAIN}",
        f"-A INPUT -p udp -m udp --dport 31000:31009 -j {CHAIN}",
        f"-A {CHAIN} -s 192.0.2.1/32 -j RETURN",
        f"-A {CHAIN} -s 198.51.100.0/24 -j RETURN",
        f"-A {CHAIN} -j DROP",
    ]
    assert rules("ip6tables") == [
        f"-N {CHAIN}",
        f"-A INPUT -p udp -m udp --dport 31000:31009 -j {CHAIN}",
        f"-A {CHAIN} -s 2001:db8::7/128 -j RETURN",
        f"-A {CHAIN} -j DROP",
    ]
    assert guard("check", **nets).returncode == 0
    # Other carrier addresses: the check says the rules in place are not the settings'.
    other = guard("check", MB_TRUNK_MEDIA="192.0.2.9")
    assert other.returncode == 1 and "holds other rules" in other.stderr
    assert guard("remove", **nets).returncode == 0
    assert rules("iptables") == [] and rules("ip6tables") == []


def test_without_a_trunk_media_setting_the_trunk_host_is_the_carrier(clean) -> None:
    assert guard("apply", MB_TRUNK_MEDIA="", MB_TRUNK_HOST="192.0.2.5").returncode == 0
    assert f"-A {CHAIN} -s 192.0.2.5/32 -j RETURN" in rules("iptables")


@pytest.mark.parametrize(("env", "says"), [
    ({"MB_TRUNK_MEDIA": "", "MB_TRUNK_HOST": ""}, "set MB_TRUNK_MEDIA"),
    ({"MB_TRUNK_MEDIA": "carrier.example"}, "is not an address or network"),
    ({"MB_TRUNK_MEDIA": "192.0.2.1;reboot"}, "is not an address or network"),
    ({"MB_TRUNK_MEDIA": "192.0.2.1", "MB_RTP_START": "2x"}, "must be port numbers"),
    ({"MB_TRUNK_MEDIA": "192.0.2.1", "MB_RTP_START": "31010"}, "is above MB_RTP_END"),
])
def test_settings_it_cannot_use_are_refused_with_a_reason(clean, env: dict[str, str], says: str) -> None:
    done = guard("apply", **env)
    assert done.returncode == 2 and says in done.stderr, done
    assert rules("iptables") == []


def test_an_unknown_action_is_refused(clean) -> None:
    done = guard("open", MB_TRUNK_MEDIA="192.0.2.1")
    assert done.returncode == 2 and "usage" in done.stderr


def test_hold_applies_the_rules_and_leaves_them_when_stopped(clean) -> None:
    """The compose stack's media-guard service runs `hold`; stopped (or crashed), it leaves its
    rules: the PBX it guards may still run."""
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", **RANGE, "MB_TRUNK_MEDIA": "192.0.2.1"}
    holder = subprocess.Popen(["sh", str(media_guard.SCRIPT), "hold"], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None
        assert "only from: 192.0.2.1" in holder.stdout.readline()  # written once the rules are in place
        assert guard("check", MB_TRUNK_MEDIA="192.0.2.1").returncode == 0
        holder.terminate()
        assert holder.wait(timeout=10) == 0
        assert guard("check", MB_TRUNK_MEDIA="192.0.2.1").returncode == 0
    finally:
        holder.kill()
        holder.wait()
