-- A session term: the called phone confirms before the two are joined (confirm_answer).
-- The called phone answers and hears "you have an incoming call: press 1 to accept it, 2 to
-- reject it" while the caller still hears ringback; a voicemail or an answering machine
-- that never presses 1 is never joined, so its greeting (often its owner's name or number)
-- never reaches the caller. The call row keeps the term: a restarted bridge must not join a
-- call nobody confirmed.
ALTER TABLE sessions ADD COLUMN confirm_answer boolean NOT NULL DEFAULT false;
ALTER TABLE calls ADD COLUMN confirm_answer boolean NOT NULL DEFAULT false;
ALTER TABLE calls DROP CONSTRAINT calls_state_check;
ALTER TABLE calls ADD CONSTRAINT calls_state_check CHECK (state IN (
    'routing', 'entering_code', 'ringing', 'confirming', 'connected', 'announcing', 'ended'));
ALTER TABLE calls DROP CONSTRAINT calls_outcome_check;
ALTER TABLE calls ADD CONSTRAINT calls_outcome_check CHECK (outcome IN (
    'answered', 'busy', 'no_answer', 'rejected', 'failed',
    'caller_cancelled', 'unknown_caller', 'session_closed', 'blocked', 'call_limit', 'quiet_hours',
    'unreachable', 'wrong_code', 'locked_out', 'redirected', 'not_confirmed'));

-- A call in progress is ended when one of its participants leaves the order: a courier
-- reassigned ('reassigned'), or the session closed or expired ('session_ended').
ALTER TABLE calls DROP CONSTRAINT calls_cut_reason_check;
ALTER TABLE calls ADD CONSTRAINT calls_cut_reason_check
    CHECK (cut_reason IN ('blocked', 'max_duration', 'blocked_by_client', 'reassigned', 'session_ended'));
