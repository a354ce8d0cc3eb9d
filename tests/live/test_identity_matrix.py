"""Identity, proven across a matrix: the PBX trunk's identity settings x how the caller
presents itself (a display name; its number withheld; Diversion and History-Info headers
that carry its real number; its network asserting its number and name again in an UPDATE
or re-INVITE once the call is under way) x scenarios (each direction, hold and resume from both
phones, the callee answering late, the caller hanging up while it rings). In each cell
every SIP message each phone received is scanned for the other side's real number and name.

The cells cover every pair of values of any two dimensions at least once (25 calls
instead of 75); each cell's settings are in its test id. How the *callee's* network
presents itself is the other matrix (test_identity_callee_network.py)."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from tests.live.siplog import SipLog, SipMessage, ended_by_caller, identity_leaks, logged, reinvite_answered
from tests.live.test_masked_call import split_by_phone

TRUNKS = {
    "plain": {},
    "pai-rpid-trusted": {"MB_TRUNK_SEND_PAI": "yes", "MB_TRUNK_SEND_RPID": "yes", "MB_TRUNK_TRUST_ID_OUTBOUND": "yes"},
    "no-connected-line": {"MB_TRUNK_SEND_CONNECTED_LINE": "no"},
}
PRESENTATIONS = ["number-only", "display-name", "withheld", "diversion-history-info", "pai-in-update"]
SCENARIOS = ["courier-to-client", "client-to-courier", "hold-and-resume", "callee-answers-late",
             "caller-hangs-up-ringing"]
CALLER_NAME = "Ivan Petrovsky"


def _cells() -> list[tuple[str, str, str]]:
    """Pairwise cover of the three dimensions (see the module's docstring): every
    (presentation, scenario) pair once, with trunk number (p + s) mod 3. For a fixed
    presentation the 5 scenarios, and for a fixed scenario the 4 presentations, run
    through all 3 trunks."""
    trunks = list(TRUNKS)
    return [(trunks[(p + s) % len(trunks)], presentation, scenario)
            for p, presentation in enumerate(PRESENTATIONS) for s, scenario in enumerate(SCENARIOS)]


CELLS = _cells()


def test_the_cells_cover_every_pair():
    for a, b in ((0, 1), (0, 2), (1, 2)):
        dims = [list(TRUNKS), PRESENTATIONS, SCENARIOS]
        wanted = {(x, y) for x in dims[a] for y in dims[b]}
        assert wanted <= {(c[a], c[b]) for c in CELLS}


@pytest.mark.parametrize(("trunk", "presentation", "scenario"), CELLS)
async def test_no_identity_leaks(trunk, presentation, scenario, carrier, api, real_number, sip_log: SipLog,
                                 trunk_identity):
    trunk_identity(TRUNKS[trunk])
    courier, client = real_number(), real_number()
    session = await api.open_session(f"order-{uuid.uuid4()}", courier, client)
    pool = session["pool_number"]
    caller, callee_number = (client, courier) if scenario == "client-to-courier" else (courier, client)
    name = CALLER_NAME if presentation == "display-name" else None
    headers = {}
    if presentation == "diversion-history-info":
        headers = {
            "Diversion": f"<sip:{caller}@carrier.example>;reason=unconditional",
            "History-Info": f"<sip:{caller}@carrier.example>;index=1",
        }
    if scenario == "caller-hangs-up-ringing":
        carrier.phone(callee_number, action="noanswer", ring_for=60)
    else:
        carrier.phone(callee_number, action="answer", answer_after=2.5 if scenario == "callee-answers-late" else 0.3)
    mark = sip_log.mark()

    hangup_after = None if scenario in ("caller-hangs-up-ringing", "hold-and-resume") else 1.0
    leg = await carrier.call(caller, pool, caller_name=name, headers=headers, hangup_after=hangup_after,
                             withheld=presentation == "withheld")
    callee = await asyncio.wait_for(carrier.incoming.get(), 10)
    if presentation == "pai-in-update":
        # The caller's network asserts the caller again, by name, once the call is under way
        # (while it rings, or after the answer): an UPDATE or re-INVITE with P-Asserted-Identity.
        if scenario == "caller-hangs-up-ringing":
            await asyncio.wait_for(leg.ringing.wait(), 10)
        else:
            await asyncio.wait_for(leg.answered.wait(), 10)
        step = sip_log.mark()
        await carrier.assert_identity(leg, caller, CALLER_NAME)
        await identity_update_answered(sip_log, step, "Petrovsky")
    if scenario == "caller-hangs-up-ringing":
        await asyncio.wait_for(leg.ringing.wait(), 10)
        await carrier.hangup(leg)
    if scenario == "hold-and-resume":
        await asyncio.wait_for(callee.answered.wait(), 10)
        await asyncio.wait_for(leg.answered.wait(), 10)
        for phone in (leg, callee):
            step = sip_log.mark()
            await carrier.hold(phone)
            await reinvite_answered(sip_log, step, "sendonly")
            step = sip_log.mark()
            await carrier.resume(phone)
            await reinvite_answered(sip_log, step, "sendrecv")
        await carrier.hangup(leg)
    await asyncio.wait_for(leg.ended.wait(), 20)
    await asyncio.wait_for(callee.ended.wait(), 10)

    assert callee.number == callee_number and callee.shown_number == pool and callee.shown_name in ("", pool)
    if scenario == "caller-hangs-up-ringing":
        assert callee.answered_at is None
    else:
        assert leg.answered_at is not None and callee.answered_at is not None

    messages = await logged(sip_log, mark, ended_by_caller(callee_number, answered=scenario != "caller-hangs-up-ringing"))
    calling, called = split_by_phone(messages, callee_number)
    assert any(m.first_line.startswith("INVITE") for m in called), "the called phone's INVITE is in the log"
    if scenario == "hold-and-resume":
        reinvites = [m for m in sip_log.since(mark) if m.first_line.startswith("INVITE") and "a=sendonly" in m.text]
        assert len(reinvites) == 2, "each phone put the call on hold once"
    if presentation == "withheld":
        # The caller really withheld its number (anonymous From, the number only in a
        # P-Asserted-Identity with Privacy: id), and was still put through.
        sent = next(m for m in sip_log.since(mark) if m.direction == "transmitted" and m.first_line.startswith("INVITE"))
        assert "anonymous" in sent.header("From")[0].lower() and sent.header("Privacy") == ["id"]
    if presentation == "diversion-history-info":
        # The caller's INVITE really carried them (so the PBX had them to leak).
        sent = [m for m in sip_log.since(mark) if m.direction == "transmitted" and m.first_line.startswith("INVITE")]
        assert any(m.header("Diversion") and m.header("History-Info") for m in sent)
    for msg in called:
        assert not identity_leaks(msg.text, [caller], ["Petrovsky"]), f"the caller reached the called phone:\n{msg.text}"
    for msg in calling:
        assert not identity_leaks(msg.text, [callee_number]), f"the callee's number reached the caller:\n{msg.text}"


async def identity_update_answered(sip_log: SipLog, mark: int, name: str, timeout: float = 10) -> SipMessage:
    """The PBX's answer to an UPDATE or re-INVITE the carrier sent since `mark` asserting `name`."""
    async with asyncio.timeout(timeout):
        while True:
            messages = sip_log.since(mark)
            for i, request in enumerate(messages):
                if request.direction != "transmitted" or name not in request.text or not (
                        request.first_line.startswith("UPDATE ") or request.first_line.startswith("INVITE ")):
                    continue
                for answer in messages[i + 1:]:
                    if answer.direction == "received" and answer.call_id == request.call_id \
                            and answer.header("CSeq") == request.header("CSeq") and answer.first_line[8:9] in "2":
                        return answer
            await asyncio.sleep(0.05)  # wait-ok: polling the carrier's SIP log
