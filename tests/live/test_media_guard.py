"""The PBX's media guard (asterisk-config/media-guard.sh) on this host's firewall: the running
stack has it, exactly as its settings say; applying it again changes nothing and puts its
jump back in front; it covers the last port's RTCP; removing one range leaves another's;
settings it cannot use, or that would open the range, are refused with a reason; `hold`
puts drifted rules back. Its effect on calls: test_stray_rtp.py."""

from __future__ import annotations

import subprocess
import time

import pytest

from bridge.devstack import media_guard
from bridge.devstack.settings import Stack

# Ranges of their own, away from any stack's, so the stack's guard is not touched.
RANGE = {"MB_RTP_START": "31000", "MB_RTP_END": "31009"}


def chain(start: int, end: int, *nets: str) -> str:
    """The guard's chain for a range and carrier networks (as the script writes them, in its
    order: IPv4 first): MB-MEDIA-<start>-<end>-<7 hex digits of their cksum>."""
    written = "".join(f" {n}" for n in nets if ":" not in n) + "".join(f" {n}" for n in nets if ":" in n)
    crc = int(subprocess.run(["cksum"], input=written, capture_output=True, text=True, check=True).stdout.split()[0])
    return f"MB-MEDIA-{start}-{end}-{crc % (1 << 28):07x}"


CHAIN = chain(31000, 31009, "192.0.2.1/32")  # (CARRIER's)
JUMP = f"-A INPUT -p udp -m udp --dport 31000:31009 -j {CHAIN}"
OTHER = {"MB_RTP_START": "31000", "MB_RTP_END": "31005"}  # an earlier range of the same start
CARRIER = {"MB_TRUNK_MEDIA": "192.0.2.1"}


def guard(action: str, **env: str) -> subprocess.CompletedProcess[str]:
    settings = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", **RANGE, **env}
    return subprocess.run(["sh", str(media_guard.SCRIPT), action], env=settings, capture_output=True, text=True,
                          check=False)


def rules(tool: str, name: str = CHAIN) -> list[str]:
    return [line for line in subprocess.run([tool, "-w", "-S"], capture_output=True, text=True,
                                            check=True).stdout.splitlines() if name in line]


def remove_test_guards() -> None:
    """Every guard of the tests' own ports (31000-31009, and the ephemeral range's test), by
    their rules as iptables lists them, whatever carrier they were applied for."""
    for tool in ("iptables", "ip6tables"):
        listed = subprocess.run([tool, "-w", "-S"], capture_output=True, text=True, check=True).stdout.splitlines()
        for line in listed:
            if line.startswith("-A INPUT ") and (" -j MB-MEDIA-310" in line or (" -j ACCEPT" in line and "31000:" in line)):
                subprocess.run([tool, "-w", "-D", *line.split()[1:]], capture_output=True, check=False)
        for line in listed:
            if line.startswith("-N MB-MEDIA-310"):
                subprocess.run([tool, "-w", "-F", line.split()[1]], capture_output=True, check=False)
                subprocess.run([tool, "-w", "-X", line.split()[1]], capture_output=True, check=False)


@pytest.fixture
def clean():
    remove_test_guards()
    yield
    remove_test_guards()


def test_the_running_stack_has_its_guard(stack: Stack) -> None:
    assert media_guard.check(stack) == ""


def test_apply_is_exact_and_safe_to_run_twice_and_remove_leaves_nothing(clean) -> None:
    nets = {"MB_TRUNK_MEDIA": "192.0.2.1, 198.51.100.0/24,2001:db8::7"}
    mine = chain(31000, 31009, "192.0.2.1/32", "198.51.100.0/24", "2001:db8::7/128")
    jump = f"-A INPUT -p udp -m udp --dport 31000:31009 -j {mine}"
    assert guard("check", **nets).returncode == 1
    for _ in range(2):
        done = guard("apply", **nets)
        assert done.returncode == 0, done.stderr
    assert rules("iptables", mine) == [
        f"-N {mine}",
        jump,
        f"-A {mine} -s 192.0.2.1/32 -j RETURN",
        f"-A {mine} -s 198.51.100.0/24 -j RETURN",
        f"-A {mine} -j DROP",
    ]
    assert rules("ip6tables", mine) == [f"-N {mine}", jump, f"-A {mine} -s 2001:db8::7/128 -j RETURN",
                                        f"-A {mine} -j DROP"]
    assert guard("check", **nets).returncode == 0
    # Its chain changed by hand: the check says the rules in place are not the settings'.
    subprocess.run(["iptables", "-w", "-I", mine, "1", "-s", "192.0.2.9", "-j", "RETURN"], check=True)
    changed = guard("check", **nets)
    assert changed.returncode == 1 and "holds other rules" in changed.stderr
    assert guard("remove", **nets).returncode == 0
    assert rules("iptables", "MB-MEDIA-310") == [] and rules("ip6tables", "MB-MEDIA-310") == []


@pytest.mark.parametrize("rule", [
    ["-p", "udp", "--dport", "31000:31009", "-j", "ACCEPT"],
    ["-s", "127.0.0.99/32", "!", "-p", "tcp", "-j", "ACCEPT"],  # every protocol but TCP
    ["-m", "comment", "--comment", " -p tcp ", "-j", "ACCEPT"],  # looks like TCP only in its text
    ["-j", "MB-MEDIA-1-2-abcdef0"],  # a chain named like a guard's, that could hold anything
])
def test_a_rule_that_could_let_the_range_in_before_the_guard_fails_the_check_and_apply_puts_the_guard_first(
        clean, rule: list[str]) -> None:
    assert guard("apply", **CARRIER).returncode == 0
    if rule[-1].startswith("MB-MEDIA-"):
        subprocess.run(["iptables", "-w", "-N", rule[-1]], check=True)
    subprocess.run(["iptables", "-w", "-I", "INPUT", "1", *rule], check=True)
    try:
        failed = guard("check", **CARRIER)
        assert failed.returncode == 1 and "first:" in failed.stderr, failed
        assert guard("apply", **CARRIER).returncode == 0
        assert guard("check", **CARRIER).returncode == 0
        first = subprocess.run(["iptables", "-w", "-S", "INPUT"], capture_output=True, text=True, check=True)
        assert first.stdout.splitlines()[1] == JUMP
    finally:
        subprocess.run(["iptables", "-w", "-D", "INPUT", *rule], check=True)
        if rule[-1].startswith("MB-MEDIA-"):
            subprocess.run(["iptables", "-w", "-X", rule[-1]], check=True)


def test_another_carriers_guard_of_the_same_range_is_its_own_and_fails_the_check(clean) -> None:
    """A second stack (or a mistake) guarding the same range for another carrier once took
    this guard's chain over; it is a chain of its own, and each check names the other."""
    other = {"MB_TRUNK_MEDIA": "192.0.2.9"}
    assert guard("apply", **CARRIER).returncode == 0
    assert guard("apply", **other).returncode == 0
    assert chain(31000, 31009, "192.0.2.9/32") in guard("check", **CARRIER).stderr
    assert CHAIN in guard("check", **other).stderr
    assert rules("iptables")[2:] == [f"-A {CHAIN} -s 192.0.2.1/32 -j RETURN", f"-A {CHAIN} -j DROP"]
    assert guard("remove", **other).returncode == 0
    assert guard("check", **CARRIER).returncode == 0


def test_an_even_end_takes_in_the_rtcp_port_of_a_call_on_it(clean) -> None:
    """Asterisk gives calls even ports up to the end, each with its RTCP on the next: with an
    even end, that is one past it."""
    assert guard("apply", **CARRIER, **OTHER).returncode == 0  # 31000-31005: odd, nothing past it
    assert f"-A INPUT -p udp -m udp --dport 31000:31005 -j {chain(31000, 31005, '192.0.2.1/32')}" in rules(
        "iptables", "31005")
    even = {**CARRIER, "MB_RTP_START": "31000", "MB_RTP_END": "31004"}
    try:
        guard("remove", **CARRIER, **OTHER)
        assert guard("apply", **even).returncode == 0
        assert f"-A INPUT -p udp -m udp --dport 31000:31005 -j {chain(31000, 31004, '192.0.2.1/32')}" in rules(
            "iptables", "31004")
    finally:
        guard("remove", **even)


def test_removing_an_earlier_range_leaves_the_running_ones_guard(clean) -> None:
    """After a change of range (the same start, another end), the earlier range's rules are
    removed with the earlier settings: the running range's guard stays whole."""
    assert guard("apply", **CARRIER, **OTHER).returncode == 0
    assert guard("apply", **CARRIER).returncode == 0
    assert guard("remove", **CARRIER, **OTHER).returncode == 0
    assert rules("iptables", "MB-MEDIA-31000-31005") == []
    assert guard("check", **CARRIER).returncode == 0
    assert guard("check", **CARRIER).returncode == 0


def test_without_a_trunk_media_setting_the_trunk_host_is_the_carrier(clean) -> None:
    assert guard("apply", MB_TRUNK_MEDIA="", MB_TRUNK_HOST="192.0.2.5").returncode == 0
    assert f"-A {chain(31000, 31009, '192.0.2.5/32')} -s 192.0.2.5/32 -j RETURN" in rules("iptables", "31000-31009")


@pytest.mark.parametrize(("env", "says"), [
    ({"MB_TRUNK_MEDIA": "", "MB_TRUNK_HOST": ""}, "set MB_TRUNK_MEDIA"),
    ({"MB_TRUNK_MEDIA": "carrier.example"}, "is not an IPv4 address"),
    ({"MB_TRUNK_MEDIA": "192.0.2.1;reboot"}, "is not an IPv4 address"),
    ({"MB_TRUNK_MEDIA": "127.2"}, "is not an IPv4 address"),
    ({"MB_TRUNK_MEDIA": "2130706434"}, "is not an IPv4 address"),
    ({"MB_TRUNK_MEDIA": "192.0.2.256"}, "is not an IPv4 address"),
    ({"MB_TRUNK_MEDIA": "192.0.2.1/0"}, "a prefix of 16 to 32 bits"),
    ({"MB_TRUNK_MEDIA": "0.0.0.0/0"}, "a prefix of 16 to 32 bits"),
    ({"MB_TRUNK_MEDIA": "10.0.0.0/8"}, "a prefix of 16 to 32 bits"),
    ({"MB_TRUNK_MEDIA": "*"}, "is not an IPv4 address"),  # (not matched against file names)
    ({"MB_TRUNK_MEDIA": ","}, "set MB_TRUNK_MEDIA"),
    ({"MB_TRUNK_MEDIA": "10.0.0.0/08"}, "no valid prefix"),
    ({"MB_TRUNK_MEDIA": "203.0.113.5/24"}, "host bits set"),
    ({"MB_TRUNK_MEDIA": "::/0"}, "a prefix of 32 to 128 bits"),
    ({"MB_TRUNK_MEDIA": "2001::/16"}, "a prefix of 32 to 128 bits"),
    ({"MB_TRUNK_MEDIA": "2001:DB8::1"}, "lower case"),
    ({"MB_TRUNK_MEDIA": "192.0.2.1", "MB_RTP_START": "2x"}, "must be a port number"),
    ({"MB_TRUNK_MEDIA": "192.0.2.1", "MB_RTP_START": "031000"}, "must be a port number"),
    ({"MB_TRUNK_MEDIA": "192.0.2.1", "MB_RTP_START": "1000"}, "below 1024"),
    ({"MB_TRUNK_MEDIA": "192.0.2.1", "MB_RTP_END": "65535"}, "above 65534"),
    # Asterisk would take these for unreasonable and use 5000-31000, which the guard would not cover.
    ({"MB_TRUNK_MEDIA": "192.0.2.1", "MB_RTP_END": "31000"}, "Asterisk would use 5000-31000"),
    ({"MB_TRUNK_MEDIA": "192.0.2.1", "MB_RTP_START": "31009"}, "Asterisk would use 5000-31000"),
    ({"MB_TRUNK_MEDIA": "192.0.2.1"}, "usage"),  # an unknown action: below
])
def test_settings_it_cannot_use_are_refused_with_a_reason(clean, env: dict[str, str], says: str) -> None:
    done = guard("open" if says == "usage" else "apply", **env)
    assert done.returncode == 2 and says in done.stderr, done
    assert rules("iptables", "MB-MEDIA-3") == []


@pytest.mark.parametrize(("written", "printed"), [("2001:db8:0:0::7", "2001:db8::7/128"),
                                                  ("2001:0db8::7", "2001:db8::7/128"),
                                                  ("2001:db8::7/64", "2001:db8::/64")])
def test_an_ipv6_network_in_another_form_than_ip6tables_prints_is_refused_with_that_form(clean, written: str,
                                                                                      printed: str) -> None:
    done = guard("apply", MB_TRUNK_MEDIA=f"192.0.2.1,{written}")
    assert done.returncode == 2 and "write them as it prints them" in done.stderr and printed in done.stderr, done


def test_another_guard_over_some_of_the_ports_fails_the_check(clean) -> None:
    """An earlier range's guard left in place, for another carrier, would drop this one's
    carrier on the ports the two share: the check says which guard to remove."""
    earlier = {"MB_RTP_START": "31000", "MB_RTP_END": "31005", "MB_TRUNK_MEDIA": "192.0.2.9"}
    assert guard("apply", **earlier).returncode == 0
    assert guard("apply", **CARRIER).returncode == 0
    failed = guard("check", **CARRIER)
    assert failed.returncode == 1 and f"{chain(31000, 31005, '192.0.2.9/32')} (31000:31005)" in failed.stderr, failed
    assert guard("remove", **earlier).returncode == 0
    assert guard("check", **CARRIER).returncode == 0


def test_hold_applies_the_rules_puts_them_back_when_they_drift_and_leaves_them_when_stopped(clean) -> None:
    """The compose stack's media-guard service runs `hold`; stopped (or crashed), it leaves its
    rules: the PBX it guards may still run."""
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", **RANGE, **CARRIER}
    holder = subprocess.Popen(["sh", str(media_guard.SCRIPT), "hold"], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None
        assert "only from: 192.0.2.1/32" in holder.stdout.readline()  # written once the rules are in place
        assert guard("check", **CARRIER).returncode == 0
        subprocess.run(["iptables", "-w", "-F", CHAIN], check=True)  # someone empties the chain
        deadline = time.monotonic() + 30
        while guard("check", **CARRIER).returncode != 0:
            assert time.monotonic() < deadline, "hold did not put the rules back"
            time.sleep(0.5)  # wait-ok: polling the firewall (it has no event); hold checks every 2 s
        holder.terminate()
        assert holder.wait(timeout=10) == 0
        assert guard("check", **CARRIER).returncode == 0
    finally:
        holder.kill()
        holder.wait()


def test_a_range_in_the_kernels_ephemeral_range_is_applied_with_a_warning(clean) -> None:
    """Any program's socket may be given a port of the ephemeral range; the guard would drop
    its answers (the bridge's SIP probe of its PBX once lost them so): apply says so."""
    low, high = (int(v) for v in open("/proc/sys/net/ipv4/ip_local_port_range").read().split())
    inside = {**CARRIER, "MB_RTP_START": str(low + low % 2), "MB_RTP_END": str(low + low % 2 + 9)}
    try:
        done = guard("apply", **inside)
        assert done.returncode == 0 and f"overlap the ephemeral range {low}-{high}: reserve them" in done.stderr
        if 31009 < low:
            assert "ephemeral" not in guard("apply", **CARRIER).stderr  # (31000-31009: below it)
    finally:
        guard("remove", **inside)
