"""The media guard (asterisk-config/media-guard.sh) covers MB_RTP_START..MB_RTP_END, the range
rtp.conf gives Asterisk; an endpoint with a port range of its own (rtp_port_start and
rtp_port_end, newer Asterisk versions) would take calls' media outside it, unguarded."""

from __future__ import annotations

import re

from bridge.devstack.settings import PROJECT_DIR

CONFIG = PROJECT_DIR / "asterisk-config"


def test_the_pbxs_only_rtp_range_is_rtp_confs_own() -> None:
    rtp = (CONFIG / "common" / "rtp.conf").read_text()
    assert re.search(r"^rtpstart = \$\{MB_RTP_START\}$", rtp, re.M)
    assert re.search(r"^rtpend = \$\{MB_RTP_END\}$", rtp, re.M)
    for path in (CONFIG / "pbx").glob("*.conf"):
        assert not re.search(r"^\s*rtp_port_(start|end)\s*=", path.read_text(), re.M), path
