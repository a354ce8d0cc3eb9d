"""MB_PBX_MAX_CALLS reaches the PBX's dialplan as a number, or nothing starts: the local
stack and the PBX image's entrypoint both refuse anything else (the dialplan compares it as
a number: a word there would let every call in, unlimited). What the limit does to calls is
tested live (tests/live/test_call_limit.py, and through Kamailio in tests/cluster)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from bridge.devstack.asterisk import CONFIG_DIR, render
from bridge.devstack.settings import DEFAULTS, PROJECT_DIR, load

ENTRYPOINT = PROJECT_DIR / "asterisk-config" / "docker-entrypoint.sh"


@pytest.mark.parametrize("value", ["lots", "-1", "1.5", "", " 600", "٦٠٠"])
def test_the_local_stack_refuses_a_limit_that_is_no_whole_number(tmp_path: Path, value: str) -> None:
    with pytest.raises(ValueError, match="MB_PBX_MAX_CALLS must be a whole number"):
        load({"MB_STACK_DIR": str(tmp_path), "MB_PG_DIR": str(tmp_path / "pg"), "MB_PBX_MAX_CALLS": value})


def test_the_local_stack_renders_the_limit_into_the_dialplan(tmp_path: Path) -> None:
    stack = load({"MB_STACK_DIR": str(tmp_path), "MB_PG_DIR": str(tmp_path / "pg"), "MB_PBX_MAX_CALLS": "250"})
    dialplan = render((CONFIG_DIR / "pbx" / "extensions.conf").read_text(), {**stack.env, "MB_AST_DIR": "/x"})
    assert re.search(r"^\[globals\]\n(;.*\n)*MAX_CALLS = 250$", dialplan, re.M)
    assert DEFAULTS["MB_PBX_MAX_CALLS"][0] == "600"


def _entrypoint_env(tmp_path: Path, limit: str) -> dict[str, str]:
    templates = " ".join(p.read_text() for p in (CONFIG_DIR / "common").glob("*.conf")) + " ".join(
        p.read_text() for p in (CONFIG_DIR / "pbx").glob("*.conf"))
    names = set(re.findall(r"\$\{(MB_[A-Z0-9_]+)\}", templates))
    env = {name: "x" for name in names}
    env.update(PATH=os.environ["PATH"], ASTERISK_TEMPLATES=str(CONFIG_DIR), MB_AST_DIR=str(tmp_path / "pbx"),
               MB_PBX_MAX_CALLS=limit)
    return env


@pytest.mark.parametrize("value", ["lots", "-1", "", "6 00"])
def test_the_pbx_image_refuses_a_limit_that_is_no_whole_number(tmp_path: Path, value: str) -> None:
    done = subprocess.run([str(ENTRYPOINT), "--render-only"], env=_entrypoint_env(tmp_path, value),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "MB_PBX_MAX_CALLS" in done.stderr
    assert not (tmp_path / "pbx" / "etc" / "extensions.conf").exists()


def test_the_pbx_image_renders_the_limit_into_the_dialplan(tmp_path: Path) -> None:
    done = subprocess.run([str(ENTRYPOINT), "--render-only"], env=_entrypoint_env(tmp_path, "0"),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    dialplan = (tmp_path / "pbx" / "etc" / "extensions.conf").read_text()
    assert re.search(r"^MAX_CALLS = 0$", dialplan, re.M)
