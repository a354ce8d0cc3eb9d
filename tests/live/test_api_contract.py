"""The HTTP API against its own OpenAPI document, from the outside: schemathesis (every
operation, valid and invalid input, with the token) must get no 5xx and only answers the
document describes.

The API under test is a second bridge process, the real one (`python -m bridge`), on the
running Asterisk and Postgres but with a database and a Stasis application of its own: the
fuzzer blocks numbers, retires pool numbers and closes sessions at random, which must not
touch the data the other live tests call through."""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import socket
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from bridge.api.http import ROUTES
from bridge.devstack import postgres
from bridge.devstack.processes import PROJECT_DIR
from bridge.devstack.settings import Stack

DATABASE = "maskbridge_api_contract"
SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")
# Enough for every operation to see its examples, the schema's edge values and a fuzzed
# batch (about 2,000 requests in all); a failure prints the seed and the request to replay.
# MB_FUZZ_EXAMPLES and MB_FUZZ_SEED run a longer or another run by hand.
MAX_EXAMPLES = int(os.environ.get("MB_FUZZ_EXAMPLES", "40"))
SEED = int(os.environ.get("MB_FUZZ_SEED", "20261129"))


@dataclass
class Bridge:
    base: str
    token: str
    recording_token: str
    log: Path


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


async def _healthy(base: str, proc: asyncio.subprocess.Process, timeout: float = 30) -> None:
    async with aiohttp.ClientSession() as http, asyncio.timeout(timeout):
        while True:
            assert proc.returncode is None, "the bridge under test exited"
            try:
                async with http.get(base + "/healthz") as resp:
                    if resp.status == 200 and all((await resp.json()).values()):
                        return
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.1)  # wait-ok: polling a process that is starting


@pytest.fixture(scope="module")
def bridge_database(stack: Stack) -> Iterator[str]:
    url = postgres.fresh_database(stack, DATABASE)
    yield url
    postgres.drop_database(stack, DATABASE)


@pytest.fixture
async def bridge(stack: Stack, bridge_database: str, tmp_path: Path) -> AsyncIterator[Bridge]:
    host = stack.env["MB_API_BIND"]
    port = _free_port(host)
    token = secrets.token_urlsafe(24)
    recording_token = secrets.token_urlsafe(24)
    env = {
        **os.environ,
        **stack.bridge_env(),
        "MB_DATABASE_URL": bridge_database,
        "MB_ARI_APP": "maskbridge-api-contract",
        "MB_API_PORT": str(port),
        "MB_API_TOKEN": token,
        "MB_RECORDING_TOKEN": recording_token,
        "MB_NUMBER_KEY": secrets.token_urlsafe(24),
        "MB_WEBHOOK_URL": "",
        # The fuzzer sends thousands of requests a minute with one token: unlimited here, so that
        # each gets its real answer (429 is documented and unit-tested: tests/unit/test_api_tokens.py).
        "MB_API_RATE": "0",
        # (nor its conflicts, nor its requests without a valid token: tests/unit/test_api_guessing.py)
        "MB_API_CONFLICT_RATE": "0",
        "MB_API_ADDRESS_RATE": "0",
    }
    log = tmp_path / "bridge.log"
    with open(log, "wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bridge", cwd=PROJECT_DIR, env=env,
            stdout=out, stderr=asyncio.subprocess.STDOUT, stdin=asyncio.subprocess.DEVNULL,
        )
    base = f"http://{host}:{port}"
    try:
        await _healthy(base, proc)
        # Pool numbers in two regions, so that opening a session can succeed too.
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as http:
            numbers = [{"number": f"+7495{n:07d}", "region": r}
                       for r, first in (("RU-MOW", 1), ("RU-SPE", 500)) for n in range(first, first + 20)]
            async with http.post(base + "/v1/pool-numbers", json={"numbers": numbers}) as resp:
                assert resp.status in (200, 201), await resp.text()
        yield Bridge(base, token, recording_token, log)
    finally:
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 15)
        except TimeoutError:
            proc.kill()
            await proc.wait()


def _log_problems(log: Path) -> list[str]:
    problems = []
    for line in log.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            problems.append(line)  # everything the bridge writes is a JSON line
            continue
        if entry.get("level") in ("error", "critical") or "exception" in entry:
            problems.append(line)
    return problems


# Every check schemathesis has but one: positive_data_acceptance wants every request the
# document allows to succeed, and no JSON schema can say which strings are phone numbers
# (libphonenumber decides), which cursors this API gave out, or that quiet hours' "from" and
# "to" differ; those are refused with 422 invalid_input, as the document says. The recording
# routes take the recording token, everything else the API token.
CONFIG = """
headers = {{ Authorization = "Bearer {token}" }}

[[operations]]
include-path-regex = "recording"
headers = {{ Authorization = "Bearer {recording_token}" }}
"""


async def test_every_operation_answers_as_documented_whatever_it_is_sent(bridge: Bridge, tmp_path: Path):
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG.format(token=bridge.token, recording_token=bridge.recording_token))
    report = tmp_path / "schemathesis"
    command = [
        str(SCHEMATHESIS), "--config-file", str(config), "run", bridge.base + "/v1/openapi.json",
        "--checks", "all", "--exclude-checks", "positive_data_acceptance",
        "--max-examples", str(MAX_EXAMPLES),
        "--seed", str(SEED),
        "--generation-database", "none",
        "--workers", "2",
        "--request-timeout", "10",
        "--no-color",
        "--report", "junit", "--report-dir", str(report),
    ]
    proc = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=tmp_path
    )
    output, _ = await asyncio.wait_for(proc.communicate(), 900)
    text = output.decode(errors="replace")
    assert proc.returncode == 0, text[-20_000:]
    # schemathesis counts what it sent: a run that tested nothing is not a pass.
    # (schemathesis leaves out the operation serving the document it reads.)
    selected = re.search(r"Selected: (\d+)/(\d+)", text)
    tested = re.search(r"Tested: (\d+)", text)
    assert selected and tested, text[-5_000:]
    assert int(tested.group(1)) == int(selected.group(1)) == int(selected.group(2)) == len(ROUTES) - 1, text[-5_000:]
    assert _log_problems(bridge.log) == [], "the bridge logged failures while being fuzzed"
