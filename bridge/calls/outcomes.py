"""What a call's row says of it, defined once: its states, its outcomes, why the bridge cut it,
and who hung up. The migrations' CHECK constraints allow exactly these (a unit test compares);
the flow writes them and the API documents them from here."""

from __future__ import annotations

# The state of a call in progress (the row's `state`), as the flow goes.
STATES = ("routing", "entering_code", "ringing", "confirming", "connected", "announcing", "ended")

OUTCOMES = (
    "answered",  # they talked (however it ended)
    "busy", "no_answer", "rejected", "unreachable",  # the other phone's network refused (by cause)
    "redirected",  # the other network answered 302: never followed
    "not_confirmed",  # the other phone answered but never pressed 1 (confirm_answer)
    "failed",  # the bridge or the network failed
    "caller_cancelled",  # the caller hung up before the call was answered (an answer that crossed
    # the caller's hangup included: the caller never heard it, the other phone is hung up)
    "unknown_caller", "session_closed", "blocked", "call_limit", "quiet_hours",  # told why not, then hung up
    "wrong_code", "locked_out",  # order-code numbers
    "node_lost",  # its node's Asterisk died or was stopped: ended by another node's reaper, by its own
    # bridge once that Asterisk was back (restarted: the call's channels gone with nobody hanging up),
    # or as that Asterisk shut down (its own hangups, for the shutdown)
)

# Why the bridge ended a call itself (hangup_by "system"). A cut before the answer is the
# call's outcome too (CUT_OUTCOMES); after it the outcome stays "answered".
CUT_REASONS = ("blocked", "max_duration", "blocked_by_client", "reassigned", "session_ended")
CUT_OUTCOMES = {
    "blocked": "blocked",
    "blocked_by_client": "blocked",
    "reassigned": "session_closed",  # the courier left the order while it rang
    "session_ended": "session_closed",
    "max_duration": "answered",  # (only a connected call has a maximum duration)
}

HANGUP_BY = ("caller", "callee", "system")
