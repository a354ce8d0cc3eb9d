-- A call whose other phone's network answered with a redirect (302: "call this number
-- instead"): the bridge does not follow it, and the caller hears the other phone is
-- unavailable. The call's outcome says what happened: 'redirected'.
ALTER TABLE calls DROP CONSTRAINT calls_outcome_check;
ALTER TABLE calls ADD CONSTRAINT calls_outcome_check CHECK (outcome IN (
    'answered', 'busy', 'no_answer', 'rejected', 'failed',
    'caller_cancelled', 'unknown_caller', 'session_closed', 'blocked', 'call_limit', 'quiet_hours',
    'unreachable', 'wrong_code', 'locked_out', 'redirected'));
