"""What users build and run stays upstream: the compose test (tests/compose) swaps in local
stand-ins through its own override file and build arguments, never through these files."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_dockerfiles_build_from_the_upstream_images_by_default():
    for dockerfile, upstream in (("Dockerfile", "python:3.11-slim"), ("asterisk-config/Dockerfile", "debian:forky-slim")):
        text = (ROOT / dockerfile).read_text()
        assert f"ARG BASE_IMAGE={upstream}\n" in text, dockerfile
        assert re.findall(r"^FROM .*$", text, re.M) == ["FROM ${BASE_IMAGE}"], dockerfile


def test_the_compose_file_runs_the_official_postgres_image():
    text = (ROOT / "docker-compose.yml").read_text()
    assert "    image: postgres:15\n" in text
    assert "maskbridge-test" not in text


def test_the_asterisk_tmpfs_mounts_belong_to_the_image_asterisk_user():
    uid = re.search(r"^ARG ASTERISK_UID=(\d+)$", (ROOT / "asterisk-config/Dockerfile").read_text(), re.M)
    assert uid
    mounts = re.findall(r"- (/srv/maskbridge/pbx/\S+):(\S+)", (ROOT / "docker-compose.yml").read_text())
    assert mounts
    for path, options in mounts:
        assert f"uid={uid.group(1)},gid={uid.group(1)}," in options, path


def test_the_bridge_service_passes_every_setting_the_bridge_reads():
    """An operator can set, through docker compose, every setting the bridge reads
    (bridge/config.py, and the session terms' defaults of bridge/terms.py)."""
    from bridge.config import SETTINGS
    from bridge.terms import Terms

    compose = (ROOT / "docker-compose.yml").read_text()
    bridge = compose.split("\n  bridge:\n", 1)[1]
    passed = set(re.findall(r"^      (MB_[A-Z0-9_]+):", bridge, re.M))
    read = {s.env for s in SETTINGS.values()} | {Terms.term(n).env for n in Terms.names()}
    read -= {"MB_DATABASE_URL", "MB_ARI_URL"}  # composed from the others in the file
    assert read <= passed, sorted(read - passed)
