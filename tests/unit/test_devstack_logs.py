"""`make logs` follows the bridge log of the stack in MB_STACK_DIR (it once tailed .stack/
whatever MB_STACK_DIR said)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from bridge.devstack.processes import bridge_logs
from bridge.devstack.settings import PROJECT_DIR, Stack


def test_the_logs_are_those_of_the_stack_dir_one_bridge_or_every_node(tmp_path: Path) -> None:
    stack = Stack(env={"MB_STACK_DIR": str(tmp_path / "mine"), "MB_NODES": "1"})
    assert bridge_logs(stack) == [tmp_path / "mine" / "log" / "bridge.log"]
    for node in ("node-2", "node-1"):
        (tmp_path / "mine" / "nodes" / node / "log").mkdir(parents=True)
        (tmp_path / "mine" / "nodes" / node / "log" / "bridge.log").touch()
    assert bridge_logs(stack) == [tmp_path / "mine" / "nodes" / n / "log" / "bridge.log" for n in ("node-1", "node-2")]


def test_make_logs_asks_the_devstack() -> None:
    """(make -n: what it would run, without running it)"""
    out = subprocess.run(["make", "-n", "logs"], cwd=PROJECT_DIR, capture_output=True, text=True, check=True,
                         env={**os.environ, "MB_STACK_DIR": "/nowhere"}).stdout
    assert "-m bridge.devstack logs" in out and ".stack/" not in out
