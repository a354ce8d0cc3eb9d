-- Abuse controls per session: caps on the calls put through (per hour, per day) and quiet
-- hours when nobody is put through to the client. NULL: the bridge's defaults apply
-- (MB_CALLS_PER_HOUR, MB_CALLS_PER_DAY, MB_QUIET_HOURS); 0 / false: none for this session.
-- And a call outcome of its own for an unreachable callee (cause 1, 3, 20, 27).
ALTER TABLE sessions
    ADD COLUMN calls_per_hour integer CHECK (calls_per_hour >= 0),
    ADD COLUMN calls_per_day  integer CHECK (calls_per_day >= 0),
    ADD COLUMN quiet_hours    jsonb;  -- {"from": "22:00", "to": "08:00", "timezone": "Europe/Moscow"} or false

ALTER TABLE calls DROP CONSTRAINT calls_outcome_check;
ALTER TABLE calls ADD CONSTRAINT calls_outcome_check CHECK (outcome IN (
    'answered', 'busy', 'no_answer', 'rejected', 'failed',
    'caller_cancelled', 'unknown_caller', 'session_closed', 'blocked', 'call_limit', 'quiet_hours',
    'unreachable'));
