"""The stack's listening ports in the kernel's ephemeral range are reserved, so no outgoing
connection is ever given one (a client socket on 127.0.0.1:55472 once kept the compose
test's Postgres from binding it: "could not bind ... Address already in use")."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bridge.devstack import ports
from bridge.devstack.settings import PROJECT_DIR


def files(tmp_path: Path, reserved: str = "", port_range: str = "32768\t60999\n") -> tuple[Path, Path]:
    (tmp_path / "range").write_text(port_range)
    (tmp_path / "reserved").write_text(reserved + "\n")
    return tmp_path / "range", tmp_path / "reserved"


def test_the_listening_ports_are_every_port_setting_the_sipp_block_and_the_guarded_rtp_range():
    """The RTP range too: its media guard drops UDP there from anyone but the carrier, so a
    socket given one of its ports as an ephemeral port would never get its answers (a live
    test's UDP peer did, once another test's stack had guarded 44000-44999)."""
    env = {"MB_PG_PORT": "55432", "MB_API_PORT": "8080", "MB_BENCH_RTP_PORT": "40000", "MB_RTP_START": "42000",
           "MB_RTP_END": "42998", "MB_NODE2_RTP_START": "52500", "MB_NODE2_RTP_END": "52509",
           "MB_API_BIND": "127.0.0.1", "MB_SOMETHING_PORT": "", "PATH_PORT": "1", "MB_LONE_RTP_START": "1"}
    assert ports.listening_ports(env) == {55432, 8080, *range(40000, 40020), *range(42000, 43000),
                                          *range(52500, 52510)}


@pytest.mark.parametrize("text, expected", [
    ("", set()), ("8080", {8080}), ("8080,40000-40002", {8080, 40000, 40001, 40002}), ("1,2\n", {1, 2}),
])
def test_the_kernel_s_list_is_read(text, expected):
    assert ports.parse(text) == expected
    assert ports.parse(ports.format_ports(expected)) == expected


def test_ports_are_written_as_the_kernel_writes_them():
    assert ports.format_ports([55432, 40001, 40000, 40002, 8080, 55432]) == "8080,40000-40002,55432"


def test_only_ports_in_the_ephemeral_range_are_reserved_and_what_was_there_stays(tmp_path, monkeypatch):
    port_range, reserved = files(tmp_path, reserved="9999,50000-50001")
    env = {"MB_PG_PORT": "55432", "MB_API_PORT": "8080", "MB_BENCH_RTP_PORT": "40000"}
    lock = tmp_path / "lock"
    added = ports.reserve(env, port_range=port_range, reserved=reserved, lock=lock)
    assert added == {55432, *range(40000, 40020)}
    assert reserved.read_text() == "9999,40000-40019,50000-50001,55432\n"
    # Twice is the same, and writes nothing.
    real_write = Path.write_text

    def no_second_write(self: Path, *args: object, **kwargs: object) -> int:
        assert self != reserved, "the list was written again"
        return real_write(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "write_text", no_second_write)
    assert ports.reserve(env, port_range=port_range, reserved=reserved, lock=lock) == set()
    assert reserved.read_text() == "9999,40000-40019,50000-50001,55432\n"


def test_a_kernel_that_refuses_is_a_warning_not_a_failure(tmp_path, capsys, monkeypatch):
    port_range, reserved = files(tmp_path)
    real_write = Path.write_text

    def refused(self: Path, *args: object, **kwargs: object) -> int:
        if self == reserved:
            raise PermissionError(13, "Permission denied")
        return real_write(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "write_text", refused)
    lock = tmp_path / "lock"
    assert ports.reserve({"MB_PG_PORT": "55432"}, port_range=port_range, reserved=reserved, lock=lock) == set()
    assert "could not reserve ports 55432" in capsys.readouterr().err  # (make test sends stdout away)
    assert reserved.read_text() == "\n"
    # No such files (not Linux): nothing to do.
    assert ports.reserve({"MB_PG_PORT": "55432"}, port_range=tmp_path / "none", reserved=reserved, lock=lock) == set()


def test_a_list_not_read_whole_is_never_written_back(tmp_path, capsys):
    """The kernel's value ends in a newline: without it the read was cut, and writing back
    what was read would drop the rest (other programs' reservations)."""
    port_range, reserved = files(tmp_path)
    reserved.write_text("8080,9000-90")
    assert ports.reserve({"MB_PG_PORT": "55432"}, port_range=port_range, reserved=reserved,
                         lock=tmp_path / "lock") == set()
    assert reserved.read_text() == "8080,9000-90"
    assert "was not read whole" in capsys.readouterr().err


# Run in a network namespace of its own, where the ephemeral range is two ports: first what
# goes wrong without the reservation, then that it no longer does.
IN_NAMESPACE = """
import errno, json, socket
from bridge.devstack import ports
from bridge.devstack.settings import PROJECT_DIR
ports.PORT_RANGE.write_text("40000 40001\\n")

def can_listen(port):
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port)); s.listen(); return True
        except OSError as exc:
            assert exc.errno == errno.EADDRINUSE, exc
            return False

out = {}
server = socket.create_server(("127.0.0.1", 9000))
clients = [socket.create_connection(("127.0.0.1", 9000)) for _ in range(2)]
out["before"] = sorted(c.getsockname()[1] for c in clients)
out["listen_before"] = can_listen(40000)
for c in clients: c.close()
out["reserved"] = sorted(ports.reserve({"MB_PG_PORT": "40000"}))
server = socket.create_server(("127.0.0.1", 9001))
client = socket.create_connection(("127.0.0.1", 9001))
out["after"] = client.getsockname()[1]
out["listen_after"] = can_listen(40000)
print(json.dumps(out))
"""


def test_the_kernel_never_gives_a_reserved_port_to_an_outgoing_connection():
    if os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("ip") is None:
        pytest.skip("needs root, unshare and ip (a network namespace of its own)")
    if subprocess.run(["unshare", "--net", "true"], capture_output=True, timeout=30).returncode != 0:
        pytest.skip("no network namespace can be made here (a container without CAP_SYS_ADMIN)")
    done = subprocess.run(["unshare", "--net", "sh", "-c", f"ip link set lo up && exec {sys.executable} -c \"$0\"",
                           IN_NAMESPACE], capture_output=True, text=True, timeout=60, cwd=PROJECT_DIR)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout)
    assert out == {"before": [40000, 40001], "listen_before": False, "reserved": [40000], "after": 40001,
                   "listen_after": True}
