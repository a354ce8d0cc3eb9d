-- A blocklist of real numbers (sealed like participants' numbers, found by the same keyed
-- blind index). A blocked number's calls are refused on every session, and its calls in
-- progress are ended: an insert notifies the bridge (channel maskbridge_blocklist).
CREATE TABLE blocked_numbers (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    number_idx  bytea NOT NULL UNIQUE,
    number_enc  bytea NOT NULL,
    reason      text CHECK (length(reason) <= 500),
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX blocked_numbers_created ON blocked_numbers (created_at, id);

ALTER TABLE calls DROP CONSTRAINT calls_outcome_check;
ALTER TABLE calls
    ADD CONSTRAINT calls_outcome_check CHECK (outcome IN (
        'answered', 'busy', 'no_answer', 'rejected', 'failed',
        'caller_cancelled', 'unknown_caller', 'session_closed', 'blocked')),
    -- Why the bridge itself ended a call that was ringing or connected (hangup_by 'system').
    ADD COLUMN cut_reason text CHECK (cut_reason IN ('blocked'));
