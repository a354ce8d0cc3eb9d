"""Identity, proven against a hostile callee's network: how the called phone's network
presents itself (nothing; P-Asserted-Identity and Remote-Party-ID with the callee's number
and name in its 18x, in its 200, or in UPDATEs and re-INVITEs after the answer; a 181 "call
is being forwarded" with Diversion and History-Info; a 302 redirect) x the PBX trunk's
identity settings x the direction of the call. Every cell is a real call through the PBX,
with the hostile network relay (bridge/devstack/network.py) putting the headers in; every
SIP message each phone received is scanned for the other side's real number in any form
and name, and for any redirection at all."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from bridge.devstack import asterisk
from bridge.devstack.network import HostileNetwork, SipMessage, add_headers, forwarded_first
from tests.live.conftest import wait_for_call_row
from tests.live.siplog import SipLog, SipMessage as LoggedMessage, ended_by_caller, identity_leaks, logged
from tests.live.test_masked_call import split_by_phone

TRUNKS = {
    "plain": {},
    # Everything the trunk can send on: identity headers sent, trusted outbound. (The other
    # network's identity headers are never read: pjsip.conf, trust_connected_line.)
    "pai-rpid-trusted": {
        "MB_TRUNK_SEND_PAI": "yes", "MB_TRUNK_SEND_RPID": "yes", "MB_TRUNK_TRUST_ID_OUTBOUND": "yes",
        "MB_TRUNK_SEND_CONNECTED_LINE": "yes",
    },
    "no-connected-line": {"MB_TRUNK_SEND_CONNECTED_LINE": "no"},
}
CALLEE_NETWORKS = ["none", "pai-18x", "pai-200", "pai-update", "forwarded-181", "redirect-302"]
DIRECTIONS = ["courier-to-client", "client-to-courier"]
CALLEE_NAME = "Maria Smirnova"


def asserted(number: str, name: str = CALLEE_NAME) -> list[tuple[str, str]]:
    """The identity an IMS network asserts for its subscriber, in every form it might:
    two P-Asserted-Identity (SIP and tel URIs), a Remote-Party-ID in national form."""
    national = "8" + number[2:]
    return [
        ("P-Asserted-Identity", f'"{name}" <sip:{number}@ims.example;user=phone>'),
        ("P-Asserted-Identity", f"<tel:{number}>"),
        ("Remote-Party-ID", f'"{name}" <sip:{national}@ims.example>;party=called;privacy=off;screen=yes'),
    ]


def redirection(callee: str, target: str) -> list[tuple[str, str]]:
    return [
        ("Diversion", f'"{CALLEE_NAME}" <sip:{callee}@ims.example>;reason=user-busy;counter=1;privacy=off'),
        ("History-Info", f"<sip:{callee}@ims.example>;index=1"),
        ("History-Info", f"<sip:{target}@ims.example?Reason=SIP%3Bcause%3D486>;index=1.1"),
    ]


def in_dialog_requests_of(number: str, headers: list[tuple[str, str]]):
    """Every request the callee's side sends inside its dialog (re-INVITE, UPDATE, BYE)
    carries `headers` too."""

    def rule(msg: SipMessage, way: str) -> list[SipMessage] | None:
        if way == "to_pbx" and msg.is_request and msg.method in ("INVITE", "UPDATE", "BYE", "INFO") \
                and msg.tag_of(msg.first("To")) and number in (msg.user_of(msg.first("From")), msg.user_of(msg.first("To"))):
            for name, value in headers:
                msg.add(name, value)
        return None

    return rule


CELLS = [(t, n, d) for t in TRUNKS for n in CALLEE_NETWORKS for d in DIRECTIONS]


@pytest.mark.parametrize("trunk", list(TRUNKS))
def test_the_pbx_never_reads_the_other_networks_identity_headers(trunk, stack, trunk_identity):
    """The other network's P-Asserted-Identity and Remote-Party-ID are never turned into a
    connected-line update: Asterisk writes an update into the other leg before the
    interception routine masks it, and a hangup meanwhile stops the routine, leaving the
    real identity in that leg's final response (a 302 with P-Asserted-Identity once gave the
    caller's 480 the callee's name and number, with the trust on). Whatever the trunk's
    identity settings, and with the setting that once turned the trust on given as well."""
    trunk_identity({**TRUNKS[trunk], "MB_TRUNK_TRUST_CONNECTED_LINE": "yes"})
    shown = asterisk.rx(stack, "pbx", "pjsip show endpoint trunk").stdout
    endpoint = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in shown.splitlines()) if v}
    assert endpoint.get("trust_connected_line") == "no", shown
    # (nor sent on: the redirection, the other source of identity updates)
    assert endpoint.get("send_diversion") == "false" and endpoint.get("redirect_method") == "user", shown


def _requests_to(messages: list[LoggedMessage], method: str) -> list[LoggedMessage]:
    return [m for m in messages if m.kind == "request" and m.first_line.startswith(method + " ")]


@pytest.mark.parametrize(("trunk", "callee_network", "direction"), CELLS)
async def test_the_callee_network_cannot_reveal_the_callee(
    trunk, callee_network, direction, hostile_network: HostileNetwork, carrier, api, real_number,
    sip_log: SipLog, trunk_identity, db,
):
    net = hostile_network
    trunk_identity(TRUNKS[trunk])
    courier, client, forwarded_to = real_number(), real_number(), real_number()
    session = await api.open_session(f"order-{uuid.uuid4()}", courier, client)
    pool = session["pool_number"]
    caller, callee_number = (courier, client) if direction == "courier-to-client" else (client, courier)
    hostile = asserted(callee_number)

    if callee_network == "redirect-302":
        carrier.phone(callee_number, action="redirect", redirect_to=f"sip:{forwarded_to}@ims.example")
        net.rewrite(add_headers(redirection(callee_number, forwarded_to) + hostile, statuses=[302],
                                of_number=callee_number))
    else:
        carrier.phone(callee_number, action="answer", answer_after=0.5, listen=False,
                      early_media=callee_network == "pai-18x")
    if callee_network == "pai-18x":
        net.rewrite(add_headers(hostile, statuses=[180, 183], of_number=callee_number))
    elif callee_network == "pai-200":
        net.rewrite(add_headers(hostile, statuses=[200], of_number=callee_number))
    elif callee_network == "forwarded-181":
        net.rewrite(forwarded_first(redirection(callee_number, forwarded_to) + hostile, of_number=callee_number))
    elif callee_network == "pai-update":
        net.rewrite(in_dialog_requests_of(callee_number, hostile))
    mark, relayed = sip_log.mark(), net.mark()

    leg = await carrier.call(caller, pool, listen=False)
    callee = await asyncio.wait_for(carrier.incoming.get(), 10)
    if callee_network == "redirect-302":
        await asyncio.wait_for(leg.ended.wait(), 15)
        assert leg.answered_at is None and callee.answered_at is None
    else:
        await asyncio.wait_for(leg.answered.wait(), 10)
        await asyncio.wait_for(callee.answered.wait(), 10)
        if callee_network == "pai-update":
            await update_identity_mid_call(net, carrier, callee, callee_number)
        await carrier.hangup(leg)
        await asyncio.wait_for(leg.ended.wait(), 10)
        await asyncio.wait_for(callee.ended.wait(), 10)

    # The hostile network really said who the callee is (so the PBX had it to leak).
    told_pbx = "\n".join(r.message.text for r in net.since(relayed) if r.towards == "to_pbx")
    if callee_network != "none":
        assert CALLEE_NAME in told_pbx and "Remote-Party-ID" in told_pbx
    if callee_network in ("forwarded-181", "redirect-302"):
        assert "Diversion" in told_pbx and "History-Info" in told_pbx
    if callee_network == "forwarded-181":
        assert "SIP/2.0 181 " in told_pbx

    if callee_network == "redirect-302":
        messages = await logged(sip_log, mark, lambda msgs: any(
            m.direction == "received" and m.kind == "response" and m.header("CSeq")[0].endswith("INVITE")
            and m.first_line[8:9] in "3456" for m in split_by_phone(msgs, callee_number)[0]))
    else:
        messages = await logged(sip_log, mark, ended_by_caller(callee_number))
    calling, called = split_by_phone(messages, callee_number)
    assert called and calling, "both phones' dialogs are in the carrier's log"
    pbx_to_callee = [m for m in net.sent_by_pbx(relayed) if callee_number in m.first("To") + m.first("From")]
    assert pbx_to_callee, "the relay saw what the PBX sent the callee's network"
    for msg in calling:
        assert not identity_leaks(msg.text, [callee_number, forwarded_to], [CALLEE_NAME, "Smirnova"]), \
            f"the callee's identity reached the caller:\n{msg.text}"
        assert not msg.header("Diversion") and not msg.header("History-Info"), f"a redirection reached the caller:\n{msg.text}"
        assert not msg.first_line.startswith("SIP/2.0 3"), f"the caller got a redirect:\n{msg.text}"
    for text in [m.text for m in called] + [m.text for m in pbx_to_callee]:
        assert not identity_leaks(text, [caller]), f"the caller's number reached the callee:\n{text}"
    # Whatever identity the PBX did send the caller about the other side is the pool number.
    for msg in calling:
        for value in msg.header("P-Asserted-Identity") + msg.header("Remote-Party-ID"):
            assert pool in value, f"an identity other than the pool number:\n{msg.text}"
    assert callee.shown_number == pool and callee.shown_name in ("", pool)

    if callee_network == "redirect-302":
        finals = [m for m in calling if m.kind == "response" and m.header("CSeq")[0].endswith("INVITE")
                  and not m.first_line.startswith("SIP/2.0 1")]
        assert finals and all(m.first_line.startswith("SIP/2.0 480") for m in finals), \
            "the caller heard the other phone is unavailable"
        invites = [m for m in net.sent_by_pbx(relayed) if m.is_request and m.method == "INVITE"]
        assert len(invites) == 1, "the redirect was not followed: no INVITE after the 302"
        assert len(_requests_to([m for m in sip_log.since(mark) if m.direction == "received"], "INVITE")) == 1
        row = await wait_for_call_row(db, session["id"])
        assert (row["outcome"], row["hangup_cause"], row["answered_at"]) == ("redirected", 23, None)
    else:
        row = await wait_for_call_row(db, session["id"])
        assert row["outcome"] == "answered"
    if trunk == "pai-rpid-trusted" and callee_network != "redirect-302":
        # The setting is really on: the caller's 200 OK asserts an identity, the pool number.
        ok = next(m for m in calling if m.first_line.startswith("SIP/2.0 200") and "INVITE" in m.header("CSeq")[0])
        assert pool in ok.header("P-Asserted-Identity")[0]


async def update_identity_mid_call(net: HostileNetwork, carrier, callee, callee_number: str) -> None:
    """After the answer the callee's network says who she is, three ways: the carrier's own
    connected-line update (an UPDATE or re-INVITE with P-Asserted-Identity), an UPDATE the
    relay sends in the dialog with every identity header and her name in From, and (by the
    rule) identity headers on every request of hers."""
    relayed = net.mark()
    await carrier.assert_identity(callee, callee_number, CALLEE_NAME)
    await net.wait_for(lambda: any(
        r.towards == "to_pbx" and r.message.is_request and r.message.method in ("UPDATE", "INVITE")
        and CALLEE_NAME in r.message.text for r in net.since(relayed)))
    dialog = net.dialog_of(callee_number)
    final, _ = await net.send_in_dialog(dialog, "UPDATE", asserted(callee_number),
                                        from_party=f'"{CALLEE_NAME}" <sip:{callee_number}@ims.example>')
    assert final.status == 200, f"the PBX accepted the UPDATE:\n{final.text}"
    # (The PBX does not read these: trust_connected_line is off, whatever the settings. Read,
    # each became a connected-line update of the caller's leg, which [mb-identity] rewrote to
    # the pool number, unless a hangup stopped it first.)
