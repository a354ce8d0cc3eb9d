"""The README stays current: every setting the code reads is in its tables, with its default."""

from __future__ import annotations

import re
from pathlib import Path

from bridge.devstack.settings import DEFAULTS, SECRET_NAMES
from bridge.terms import Terms

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def test_every_local_stack_setting_is_documented_with_its_default():
    for name, (default, _) in DEFAULTS.items():
        if name == "MB_STACK_DIR":
            continue  # the default is the checkout's own path
        shown = f"`{default}`" if default else "(none)"
        assert f"| `{name}` | {shown} |" in README, name


def test_every_generated_secret_is_named():
    for name in SECRET_NAMES:
        assert f"`{name}`" in README.split("Generated secrets", 1)[1].split("##", 1)[0], name


def test_every_variable_the_bridge_reads_is_documented():
    read = set(re.findall(r'"(MB_[A-Z_]+)"', (ROOT / "bridge" / "config.py").read_text()))
    read |= {Terms.term(name).env for name in Terms.names()}  # the session terms' defaults
    bridge_table = README.split("The bridge process reads:", 1)[1].split("The local stack", 1)[0]
    assert read, "config.py reads its settings by name"
    for name in read:
        assert f"`{name}`" in bridge_table, name
