"""Fixtures of the compose tests: a docker engine (installed and started if the machine can
run one; the tests are skipped, with the reason, where it cannot), the stand-in base
images, docker-compose.yml up, and a simulated carrier of its own in front of it."""

from __future__ import annotations

import os
import warnings
from collections.abc import AsyncIterator, Callable, Iterator

import aiohttp
import pytest

from bridge.devstack import asterisk, containers
from bridge.devstack.carrier import Carrier
from bridge.devstack.settings import Stack
from tests.compose import stack as compose_stack
from tests.compose.stack import ComposeStack


@pytest.fixture(scope="session")
def settings() -> Stack:
    return compose_stack.settings()


@pytest.fixture(scope="session")
def engine(settings: Stack) -> None:
    if os.geteuid() != 0:
        pytest.skip("the compose tests install and start a docker engine: they need root")
    try:
        # Compose v2 comes out of the Asterisk root file system (Debian forky).
        asterisk.ensure_rootfs(settings)
        containers.ensure_engine(settings.rootfs)
    except containers.EngineUnavailable as exc:
        pytest.skip(f"no docker engine can run here: {exc}")
    containers.ensure_base_images()


def _cleanup(what: str, action: Callable[[], None]) -> None:
    """Cleaning up must not break the rest of the run: a failure is a warning, and the next
    run removes what is left (ComposeStack.up starts with `down`)."""
    try:
        action()
    except Exception as exc:
        warnings.warn(f"compose test: {what} failed: {exc}", stacklevel=1)


@pytest.fixture(scope="package")
def compose(engine: None, settings: Stack) -> Iterator[ComposeStack]:
    """docker-compose.yml up (built and healthy), with the simulated carrier in front of it;
    down again once the compose tests are done, not at the end of the whole run."""
    stack = ComposeStack(settings)
    try:
        stack.up()
        compose_stack.start_carrier(settings)
        yield stack
    finally:
        _cleanup("docker compose down", stack.down)
        _cleanup("removing replaced images", containers.prune_replaced_images)
        _cleanup("stopping the simulated carrier", lambda: compose_stack.stop_carrier(settings))


@pytest.fixture
async def carrier(compose: ComposeStack) -> AsyncIterator[Carrier]:
    async with Carrier(compose.stack) as net:
        yield net


@pytest.fixture
async def api(compose: ComposeStack) -> AsyncIterator[aiohttp.ClientSession]:
    """The compose bridge's HTTP API, with its token."""
    headers = {"Authorization": f"Bearer {compose.stack.env['MB_API_TOKEN']}"}
    async with aiohttp.ClientSession(base_url=compose.api, headers=headers) as http:
        yield http
