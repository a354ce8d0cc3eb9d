"""The bench's SIPp phones: what a killed bench left running is ended before the next one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from bench.sipp import kill_leftovers


def test_phones_left_by_a_killed_bench_are_ended(tmp_path: Path) -> None:
    """A process that looks like the bench's SIPp callee of this work directory (as a killed
    bench leaves it, holding its ports) is ended; one of another directory is not."""
    def fake_sipp(work: Path) -> subprocess.Popen[bytes]:
        return subprocess.Popen(["sipp", "-c", "import time; time.sleep(60)", "-sf", str(work / "callee.xml")],  # wait-ok: the fake phone idles until killed
                                executable=sys.executable)

    mine, other = fake_sipp(tmp_path), fake_sipp(tmp_path / "other")
    try:
        assert kill_leftovers(tmp_path) == 1
        assert mine.wait(timeout=10) is not None
        assert other.poll() is None, "another stack's phones are left alone"
    finally:
        for proc in (mine, other):
            proc.kill()
            proc.wait(timeout=10)
