"""The PBX's interception routines (mb-identity in extensions.conf), run on their own.

Asterisk runs `connected` on a leg before it tells that leg who is on the other side, and
`redirecting` before it tells it where the call was forwarded; the leg then sends what they
leave. The SIP tests show what reached the phones; they cannot show a field that no SIP header
carries today (a private name, a tag, a subaddress), which a module or a later Asterisk could
send. Here a Local channel fills every field of the leg with another person's identity, runs
the routine, and the PBX's own dialplan reads every field back: only the pool number is left.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable

import pytest

from bridge.ari import AriClient
from bridge.devstack import asterisk
from bridge.devstack.settings import Stack
from tests.live.conftest import pbx_ari

MASK = "+74957770011"

CONNECTED_FIELDS = {
    # field: what the routine must leave ("" for nothing)
    "name": MASK, "num": MASK, "name-valid": "1", "num-valid": "1", "pres": "allowed",
    "tag": "", "priv-tag": "",
    "subaddr": "", "subaddr-valid": "0",
    "priv-name": "", "priv-name-valid": "0", "priv-num": "", "priv-num-valid": "0",
    "priv-subaddr": "", "priv-subaddr-valid": "0",
}
PARTIES = ("from", "to", "orig")  # who forwarded the call, to whom, and who was called first
REDIRECTING_FIELDS = {
    "count": "0", "reason": "unknown", "orig-reason": "unknown",
    **{field: value for party in PARTIES for field, value in {
        f"{party}-name": MASK, f"{party}-num": MASK, f"{party}-pres": "allowed", f"{party}-tag": "",
        f"{party}-subaddr": "", f"{party}-subaddr-valid": "0",
        f"priv-{party}-name": "", f"priv-{party}-name-valid": "0", f"priv-{party}-num": "",
        f"priv-{party}-num-valid": "0", f"priv-{party}-subaddr": "", f"priv-{party}-subaddr-valid": "0",
        f"priv-{party}-tag": "",
    }.items()},
}


def fill_connected(real: Callable[[], str]) -> dict[str, str]:
    """Every connected-line field of the leg holding someone's identity (a private one, a
    presentation that withholds it, a tag and subaddresses too)."""
    # (A subaddress is valid only once said so; a name or number as soon as it is written.)
    return {
        "all": f'"Real Person" <{real()}>', "pres": "prohib", "tag": "ims-tag",
        "priv-tag": "private-tag", "subaddr": "5511", "subaddr-valid": "1", "priv-name": "Private Person",
        "priv-num": real(), "priv-subaddr": "6622", "priv-subaddr-valid": "1",
    }


def fill_redirecting(real: Callable[[], str]) -> dict[str, str]:
    """Every party of a redirection (who forwarded the call, to whom, who was called first)
    holding someone's identity, withheld, with tags and subaddresses, and its private one."""
    return {
        "count": "3", "reason": "cfb", "orig-reason": "cfu",
        **{field: value for n, party in enumerate(PARTIES, 1) for field, value in {
            f"{party}-all": f'"Person {party}" <{real()}>', f"{party}-pres": "prohib", f"{party}-tag": f"t{n}",
            f"{party}-subaddr": f"55{n}", f"{party}-subaddr-valid": "1",
            f"priv-{party}-name": f"Private {party}", f"priv-{party}-num": real(),
            f"priv-{party}-subaddr": f"66{n}", f"priv-{party}-subaddr-valid": "1", f"priv-{party}-tag": f"pt{n}",
        }.items()},
    }


def probe(routine: str, function: str, fill: dict[str, str], fields: list[str], hidden: list[str],
          result: str) -> str:
    """A context whose extension `routine` fills the leg, reads every field into the global
    `result`_BEFORE, runs the routine as Asterisk would, and reads every field into `result`.
    Asterisk reads a name or number back only while it is valid, and sends its string even
    when it is not: the `hidden` fields are then made valid again and their strings read into
    `result`_HIDDEN."""
    read = "|".join(f"${{{function}({field})}}" for field in fields)
    return "\n".join([
        "[mb-probe]",
        f"exten => {routine},1,Set(MASK_NUMBER={MASK})",
        *(f" same => n,Set({function}({field},i)={value})" for field, value in fill.items()),
        f" same => n,Set(GLOBAL({result}_BEFORE)={read})",
        f" same => n,GoSub(mb-identity,{routine},1)",
        f" same => n,Set(GLOBAL({result})={read})",
        *(f" same => n,Set({function}({field}-valid,i)=1)" for field in hidden),
        f" same => n,Set(GLOBAL({result}_HIDDEN)=strings:" + "|".join(f"${{{function}({f})}}" for f in hidden) + ")",
        " same => n,Hangup()",
        "",
    ])


@pytest.fixture
async def pbx(stack: Stack) -> AsyncIterator[AriClient]:
    client = pbx_ari(stack)
    try:
        yield client
    finally:
        await client.close()


async def global_once_set(pbx: AriClient, name: str, timeout: float = 10) -> str:
    async with asyncio.timeout(timeout):
        while True:
            value = str((await pbx.request("GET", "/asterisk/variable", {"variable": name})).get("value") or "")
            if value:
                return value
            await asyncio.sleep(0.05)  # wait-ok: polling a value the PBX's dialplan sets


async def run_routine(stack: Stack, pbx: AriClient, routine: str, function: str, fill: dict[str, str],
                      expected: dict[str, str], hidden: list[str]) -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
    """The leg's fields before and after the routine ran on it, and the strings of the
    `hidden` fields after it."""
    fields = list(expected)
    result = f"MB_PROBE_{uuid.uuid4().hex}"
    names = (result, f"{result}_BEFORE", f"{result}_HIDDEN")
    with asterisk.dialplan_also(stack, probe(routine, function, fill, fields, hidden, result)):
        out = await asyncio.to_thread(
            asterisk.rx, stack, "pbx", f"channel originate Local/{routine}@mb-probe application Wait 1"
        )
        assert out.returncode == 0, out.stderr or out.stdout
        try:
            after, before, strings = [await global_once_set(pbx, name) for name in names]
        finally:
            for name in names:
                await pbx.request("POST", "/asterisk/variable", {"variable": name, "value": ""})
    return (dict(zip(fields, before.split("|"), strict=True)), dict(zip(fields, after.split("|"), strict=True)),
            dict(zip(hidden, strings.removeprefix("strings:").split("|"), strict=True)))


def assert_filled(before: dict[str, str], fill: dict[str, str], function: str) -> None:
    """The leg did hold the other identity in every field filled (a write Asterisk refused,
    a misspelt field, would leave nothing for the routine to clear)."""
    for field, value in fill.items():
        if field.endswith("all"):  # '"Name" <number>': read back as its name and its number
            prefix = field.removesuffix("all")
            name, number = value.split('" <')
            assert (before[f"{prefix}name"], before[f"{prefix}num"]) == (name.strip('"'), number.rstrip(">")), field
        else:
            assert before[field] == value, f"{function}({field}) held {before[field]!r} before, not {value!r}"


CONNECTED_HIDDEN = ["priv-name", "priv-num"]
REDIRECTING_HIDDEN = [f"priv-{party}-{part}" for party in PARTIES for part in ("name", "num")]
ROUTINES = {
    # routine: its function, how the leg is filled, what the routine must leave, the hidden strings
    "connected": ("CONNECTEDLINE", fill_connected, CONNECTED_FIELDS, CONNECTED_HIDDEN),
    "redirecting": ("REDIRECTING", fill_redirecting, REDIRECTING_FIELDS, REDIRECTING_HIDDEN),
}


@pytest.mark.parametrize("routine", list(ROUTINES))
async def test_the_routine_leaves_only_the_pool_number_and_no_redirection(stack, pbx, real_number, routine) -> None:
    function, filler, expected, hidden = ROUTINES[routine]
    fill = filler(real_number)
    before, after, strings = await run_routine(stack, pbx, routine, function, fill, expected, hidden)
    assert_filled(before, fill, function)
    assert after == expected
    assert strings == dict.fromkeys(hidden, ""), "a private name or number left behind, marked invalid"
