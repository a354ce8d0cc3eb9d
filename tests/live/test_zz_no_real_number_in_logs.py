"""Runs after every other live test (conftest orders it last): no real number used in any
call of this run appears in full in the bridge's log, in the PBX's own (Asterisk's
messages.log), or in any file the PBX wrote under its log and spool directories."""

from __future__ import annotations

import re

from bridge.devstack import asterisk, processes
from tests.live.conftest import BRIDGE_LOG_START, USED_NUMBERS
from tests.live.siplog import identity_leaks, national_digits


def test_no_real_number_in_logs(stack):
    assert len(USED_NUMBERS) >= 20, "the live tests ran first and used real numbers"
    text = processes.bridge_log(stack).read_text()
    assert '"event": "call.connected"' in text, "the log holds this run's calls"
    leaks = sorted({n for n in USED_NUMBERS if national_digits(n) in text})
    assert not leaks, f"{len(leaks)} real numbers appear in full in {processes.bridge_log(stack)}"
    # Masked means the last two digits only (+***67): no more of a number around the stars
    # (in this run's lines: an older version's masks may stay in a checkout's log).
    this_run = processes.bridge_log(stack).read_bytes()[BRIDGE_LOG_START[0] if BRIDGE_LOG_START else 0:].decode()
    assert "+***" in this_run, "the log holds masked numbers"
    wide = sorted(set(re.findall(r"[0-9]\*\*\*[0-9]*|\*\*\*[0-9]{3,}", this_run)))
    assert not wide, f"masked numbers keep more than two digits: {wide[:5]}"


def test_no_real_number_in_the_pbx_log(stack):
    assert len(USED_NUMBERS) >= 20
    path = asterisk.host_path(stack, "pbx", "log", "messages.log")
    text = path.read_text(errors="replace") if path.exists() else ""
    leaks = sorted({n for n in USED_NUMBERS if national_digits(n) in text})
    assert not leaks, f"{len(leaks)} real numbers appear in full in {path}"


def test_no_real_number_in_the_pbx_files(stack):
    """Every file under the PBX's log and spool directories (its log, security log, call
    detail records, channel events, queue log, recordings and their metadata: whatever is
    there), read as bytes: none holds a run's real number in any form (+7..., 7..., 8...,
    with separators, percent-encoded). (The PBX writes no CDR, CEL or queue log at all:
    cdr.conf, cel.conf, logger.conf.)"""
    assert len(USED_NUMBERS) >= 20
    files = [path for top in ("log", "spool") for path in asterisk.host_path(stack, "pbx", top).rglob("*")
             if path.is_file()]
    assert any(path.name == "security.log" for path in files), "the security log is among them"
    leaks = {str(path): found for path in files
             if (found := identity_leaks(path.read_bytes().decode("latin-1"), USED_NUMBERS))}
    assert not leaks, leaks
    names = {path.name for path in files}
    assert not names & {"Master.csv", "queue_log"} and not any(path.parent.name in ("cdr-csv", "cel-custom")
                                                            for path in files), sorted(names)
