"""No side doors: whatever else the trunk sends, the PBX dials no one but a live
participant (or support), and nothing reaches the other phone but the call itself.

REFER (a transfer, from either party), MESSAGE, INFO, SUBSCRIBE, PUBLISH, REGISTER,
NOTIFY, an INVITE that would replace a live call, feature codes keyed during a call, the
pickup extension, and the benchmark's baseline route outside a benchmark. Each request is
sent by the hostile network relay from the trunk's address, in and out of a live call's
dialog; each test checks that no new INVITE left the PBX."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from bridge.devstack import asterisk
from bridge.devstack.carrier import Carrier, Leg
from bridge.devstack.network import HostileNetwork, SipMessage
from tests.live.conftest import announced, wait_for_call_row
from tests.live.siplog import SipLog

SDP = (b"v=0\r\no=- 1 1 IN IP4 127.0.0.2\r\ns=-\r\nc=IN IP4 127.0.0.2\r\nt=0 0\r\n"
       b"m=audio 29998 RTP/AVP 8\r\na=rtpmap:8 PCMA/8000\r\n")
TRANSFER_TARGET = "+79990001122"  # the benchmark baseline's pattern: it would dial +79160001122


def new_dialogs_from_pbx(net: HostileNetwork, mark: int) -> list[SipMessage]:
    """INVITEs the PBX sent through the relay since `mark` that start a new call (not a
    re-INVITE: no To tag)."""
    return [m for m in net.sent_by_pbx(mark) if m.is_request and m.method == "INVITE" and not m.tag_of(m.first("To"))]


def new_calls_to_carrier(sip_log: SipLog, mark: int) -> list[str]:
    return [m.first_line for m in sip_log.since(mark) if m.direction == "received" and m.kind == "request"
            and m.first_line.startswith("INVITE ") and ";tag=" not in (m.header("To") or [""])[0]]


async def live_call(carrier: Carrier, api, real_number, *, tone_caller: int = 600) -> tuple[dict, str, str, Leg, Leg]:
    """A connected courier-to-client call, both legs through the hostile network."""
    courier, client = real_number(), real_number()
    session = await api.open_session(f"order-{uuid.uuid4()}", courier, client)
    leg, callee = await carrier.connected(
        courier, session["pool_number"], client, callee_phone={"answer_after": 0.3, "listen": False, "tone": 1000},
        listen=False, via_network=True, tone=tone_caller,
    )
    return session, courier, client, leg, callee


async def refused(net: HostileNetwork, send) -> SipMessage | None:
    """The PBX's final answer to a request it must refuse: a 3xx-6xx, or none at all (the
    request times out at the sender). Never a 2xx."""
    try:
        final, _ = await send
    except TimeoutError:
        return None
    assert final.status >= 300, f"the PBX accepted it:\n{final.text}"
    return final


@pytest.mark.parametrize("side", ["courier", "client"])
async def test_refer_is_refused_and_dials_no_one(side, hostile_network, carrier, api, real_number, sip_log, db):
    """Either party's network asks the PBX to transfer the other (to a number the local
    stack's old baseline route would have dialed, showing both real numbers): refused, no
    INVITE leaves the PBX, and the call goes on."""
    net = hostile_network
    session, courier, client, leg, callee = await live_call(carrier, api, real_number)
    mark, logged = net.mark(), sip_log.mark()
    referrer = courier if side == "courier" else client
    dialog = net.dialog_of(referrer)
    await refused(net, net.send_in_dialog(dialog, "REFER", [
        ("Refer-To", f"<sip:{TRANSFER_TARGET}@ims.example>"), ("Referred-By", f"<sip:{referrer}@ims.example>"),
    ], timeout=4))
    # Out of any dialog too.
    await refused(net, net.send_out_of_dialog("REFER", session["pool_number"], f"<sip:{referrer}@ims.example>",
                                              [("Refer-To", f"<sip:{TRANSFER_TARGET}@ims.example>")], timeout=4))
    assert not leg.ended.is_set() and not callee.ended.is_set(), "the call went on"
    await carrier.hangup(leg)
    await asyncio.wait_for(callee.ended.wait(), 10)
    assert not new_dialogs_from_pbx(net, mark) and not new_calls_to_carrier(sip_log, logged)
    row = await wait_for_call_row(db, session["id"])
    assert (row["outcome"], row["hangup_by"]) == ("answered", "caller")


async def test_message_is_refused_in_and_out_of_a_call(hostile_network, carrier, api, real_number, sip_log):
    """A text from one party's network, inside the call or outside it: refused, and the other
    phone receives no MESSAGE (it could carry anything, a phone number included)."""
    net = hostile_network
    session, courier, client, leg, callee = await live_call(carrier, api, real_number)
    mark, logged = net.mark(), sip_log.mark()
    body = f"call me directly: {courier}".encode()
    await refused(net, net.send_in_dialog(net.dialog_of(courier), "MESSAGE", [("Content-Type", "text/plain")], body,
                                          timeout=4))
    await refused(net, net.send_out_of_dialog("MESSAGE", session["pool_number"], f"<sip:{courier}@ims.example>",
                                              [("Content-Type", "text/plain")], body, timeout=4))
    await carrier.hangup(leg)
    await asyncio.wait_for(callee.ended.wait(), 10)
    received = [m for m in sip_log.since(logged) if m.direction == "received"]
    assert not [m for m in received if m.first_line.startswith("MESSAGE ")], "the other phone received a MESSAGE"
    assert not new_dialogs_from_pbx(net, mark) and not new_calls_to_carrier(sip_log, logged)


async def test_info_reaches_neither_the_other_phone_nor_anyone_else(hostile_network, carrier, api, real_number,
                                                                    sip_log):
    """INFO inside the call (a keypress the way some networks send it, or any other body):
    the other phone receives no INFO, whatever the PBX answers, and the call goes on."""
    net = hostile_network
    _session, courier, _client, leg, callee = await live_call(carrier, api, real_number)
    mark, logged = net.mark(), sip_log.mark()
    dialog = net.dialog_of(courier)
    for content_type, body in (("application/dtmf-relay", b"Signal=5\r\nDuration=160\r\n"),
                               ("text/plain", f"my number is {courier}".encode())):
        try:
            await net.send_in_dialog(dialog, "INFO", [("Content-Type", content_type)], body, timeout=4)
        except TimeoutError:
            pass  # left unanswered: refused all the same
    assert not leg.ended.is_set() and not callee.ended.is_set()
    await carrier.hangup(leg)
    await asyncio.wait_for(callee.ended.wait(), 10)
    received = [m for m in sip_log.since(logged) if m.direction == "received"]
    assert not [m for m in received if m.first_line.startswith("INFO ")], "the other phone received an INFO"
    assert not new_dialogs_from_pbx(net, mark) and not new_calls_to_carrier(sip_log, logged)


@pytest.mark.parametrize(("method", "headers", "body", "refusal"), [
    ("SUBSCRIBE", [("Event", "presence"), ("Expires", "60"), ("Accept", "application/pidf+xml")], b"", 603),
    ("SUBSCRIBE", [("Event", "dialog"), ("Expires", "60")], b"", 603),
    ("SUBSCRIBE", [("Event", "message-summary"), ("Expires", "60")], b"", 603),
    ("SUBSCRIBE", [("Event", "refer"), ("Expires", "60")], b"", 603),
    ("PUBLISH", [("Event", "presence"), ("Expires", "60"), ("Content-Type", "application/pidf+xml")], b"<x/>", None),
    ("REGISTER", [("Expires", "3600")], b"", None),
    ("NOTIFY", [("Event", "message-summary"), ("Content-Type", "application/simple-message-summary")],
     b"Messages-Waiting: yes\r\n", None),
    ("INFO", [("Content-Type", "text/plain")], b"hello", None),
    ("MESSAGE", [("Content-Type", "text/plain")], b"hello", None),
])
async def test_requests_outside_a_call_are_refused(method, headers, body, refusal, hostile_network, new_pool_number,
                                                   real_number, sip_log):
    """Nothing but an INVITE from the trunk reaches the dialplan or the bridge: every other
    request outside a dialog is refused (and subscriptions are refused by the trunk's
    `allow_subscribe = no`)."""
    net = hostile_network
    mark, logged = net.mark(), sip_log.mark()
    to = "trunk" if method == "REGISTER" else new_pool_number()
    final = await refused(net, net.send_out_of_dialog(method, to, f"<sip:{real_number()}@ims.example>", headers, body,
                                                      timeout=4))
    assert final is not None and 400 <= final.status, f"{method} got no refusal"
    if refusal is not None:
        assert final.status == refusal
    assert not new_dialogs_from_pbx(net, mark) and not new_calls_to_carrier(sip_log, logged)


async def test_an_invite_cannot_replace_a_live_call(hostile_network, carrier, api, real_number, sip_log, db):
    """An INVITE with Replaces naming a live call's dialog (exactly, Call-ID and tags) would
    put a new party in the call in the client's place, told whatever the bridge tells the
    client's leg. The PBX does not process Replaces at all: demanded (Require), the INVITE
    is refused (420); offered, it is a new call like any other (an unknown caller: an
    announcement), and the live call goes on untouched."""
    net = hostile_network
    session, courier, client, leg, callee = await live_call(carrier, api, real_number)
    dialog = net.dialog_of(client)
    invite = next(r.message for r in net.relayed if r.message.call_id == dialog and r.message.is_request
                  and r.message.method == "INVITE")
    answer = next(r.message for r in net.relayed if r.message.call_id == dialog and not r.message.is_request
                  and r.message.status == 200)
    replaces = (f"{dialog};to-tag={SipMessage.tag_of(answer.first('To'))}"
                f";from-tag={SipMessage.tag_of(invite.first('From'))}")
    mark, logged = net.mark(), sip_log.mark()
    intruder = f"<sip:{real_number()}@ims.example>"
    demanded, _ = await net.send_out_of_dialog("INVITE", client, intruder, [
        ("Content-Type", "application/sdp"), ("Replaces", replaces), ("Require", "replaces")], SDP)
    assert demanded.status == 420
    offered, _ = await net.send_out_of_dialog("INVITE", session["pool_number"], intruder, [
        ("Content-Type", "application/sdp"), ("Replaces", replaces), ("Supported", "replaces")], SDP)
    assert offered.status in (183, 200) or offered.status >= 400, offered.start
    assert not leg.ended.is_set() and not callee.ended.is_set(), "the live call was not taken over"
    await carrier.hangup(leg)
    await asyncio.wait_for(callee.ended.wait(), 10)
    assert not callee.hung_up_itself and callee.cause == 16
    row = await wait_for_call_row(db, session["id"])
    assert (row["outcome"], row["hangup_by"]) == ("answered", "caller")
    assert not new_dialogs_from_pbx(net, mark) and not new_calls_to_carrier(sip_log, logged)


async def test_feature_codes_are_only_keys(carrier, api, real_number, sip_log: SipLog, db):
    """Transfer, disconnect, parking and pickup codes keyed during a call do nothing but
    reach the other phone as keys: the call goes on and the PBX dials no one."""
    courier, client = real_number(), real_number()
    session = await api.open_session(f"order-{uuid.uuid4()}", courier, client)
    carrier.phone(client, action="answer", listen=False)
    leg = await carrier.call(courier, session["pool_number"], listen=False)
    callee = await asyncio.wait_for(carrier.incoming.get(), 10)
    await asyncio.wait_for(leg.answered.wait(), 10)
    logged = sip_log.mark()
    for keys in ("#", "*", "*2", "##", "*8", "#72", "*0", "**"):
        await carrier.press(leg, keys)
        await carrier.wait_digits(callee, keys)
    assert not leg.ended.is_set() and not callee.ended.is_set()
    await carrier.hangup(leg)
    await asyncio.wait_for(callee.ended.wait(), 10)
    assert not new_calls_to_carrier(sip_log, logged)
    row = await wait_for_call_row(db, session["id"])
    assert (row["outcome"], row["hangup_by"]) == ("answered", "caller")


async def test_the_pickup_extension_picks_up_nothing(hostile_network, real_number, sip_log):
    net = hostile_network
    mark, logged = net.mark(), sip_log.mark()
    for exten in ("*8", "**8", "*97"):
        final, _ = await net.send_out_of_dialog("INVITE", exten, f"<sip:{real_number()}@ims.example>",
                                                [("Content-Type", "application/sdp")], SDP)
        assert final.status >= 400, f"{exten}: {final.start}"
    assert not new_dialogs_from_pbx(net, mark) and not new_calls_to_carrier(sip_log, logged)


async def test_the_benchmark_route_exists_only_while_a_benchmark_runs(stack, carrier, real_number):
    """Outside `make bench` a call to the baseline's pattern (+7999...) is a call to an
    unknown number like any other: the caller hears an announcement and no phone rings."""
    caller = real_number()
    await announced(carrier, caller, TRANSFER_TARGET)
    with asterisk.bench_route(stack):
        leg = await carrier.call(caller, TRANSFER_TARGET, hangup_after=0.5, listen=False)
        callee = await asyncio.wait_for(carrier.incoming.get(), 10)
        assert callee.number == "+7916" + TRANSFER_TARGET[5:]
        await asyncio.wait_for(leg.ended.wait(), 10)
        await asyncio.wait_for(callee.ended.wait(), 10)
    await announced(carrier, caller, TRANSFER_TARGET)


async def test_a_request_from_an_address_that_is_no_trunk_is_refused_and_names_no_one_in_the_pbx_log(
    stack, real_number
):
    """A carrier's second signalling address (another SBC, a failover) is no trunk: its INVITE
    is refused, and the PBX's log does not keep the caller's number or name from it."""
    caller = real_number()
    log_path = asterisk.host_path(stack, "pbx", "log", "messages.log")
    before = log_path.stat().st_size if log_path.exists() else 0
    pbx = (stack.env["MB_PBX_SIP_BIND"], int(stack.env["MB_PBX_SIP_PORT"]))
    source = "127.0.0.23"  # (any loopback address but the trunk's)
    call_id = f"{uuid.uuid4()}@{source}"
    invite = (
        f"INVITE sip:+74950000001@{pbx[0]}:{pbx[1]} SIP/2.0\r\n"
        # (rport: the refusal is stateless, sent where the Via says, and this phone listens
        # on the port it was given.)
        f"Via: SIP/2.0/UDP {source}:5099;branch=z9hG4bK{uuid.uuid4().hex[:16]};rport\r\n"
        f'From: "Courier Petrov" <sip:{caller}@{source}>;tag={uuid.uuid4().hex[:8]}\r\n'
        f"To: <sip:+74950000001@{pbx[0]}>\r\n"
        f"Call-ID: {call_id}\r\nCSeq: 1 INVITE\r\nContact: <sip:{caller}@{source}:5099>\r\nMax-Forwards: 70\r\n"
        f"Content-Type: application/sdp\r\nContent-Length: {len(SDP)}\r\n\r\n"
    ).encode() + SDP
    loop = asyncio.get_running_loop()
    answers: asyncio.Queue[bytes] = asyncio.Queue()

    class Phone(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: object) -> None:
            answers.put_nowait(data)

    transport, _ = await loop.create_datagram_endpoint(Phone, local_addr=(source, 0))
    try:
        transport.sendto(invite, pbx)
        async with asyncio.timeout(10):
            while True:
                answer = (await answers.get()).decode(errors="replace")
                status = int(answer.split(" ", 2)[1]) if answer.startswith("SIP/2.0 ") else 0
                if status >= 200 and call_id in answer:
                    break
    finally:
        transport.close()
    assert status in (401, 403, 404, 407), answer.splitlines()[0]
    # Asterisk writes its log line before its answer leaves; reading the log now finds it.
    written = log_path.read_bytes()[before:].decode(errors="replace") if log_path.exists() else ""
    assert caller[-10:] not in written and "Petrov" not in written, written
