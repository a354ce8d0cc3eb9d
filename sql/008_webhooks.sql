-- Signed webhooks to the order system. Events are written to this outbox in the same
-- statement as the call row they describe (the call path never waits for the order
-- system); the bridge delivers them in the background and retries with backoff.
CREATE TABLE webhook_outbox (
    id               uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    seq              bigserial NOT NULL,
    event            text NOT NULL CHECK (event IN ('call.started', 'call.answered', 'call.ended', 'call.blocked')),
    payload          jsonb NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    attempts         integer NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    delivered_at     timestamptz,
    failed_at        timestamptz,  -- gave up after the last attempt
    last_error       text
);
CREATE INDEX webhook_outbox_due ON webhook_outbox (next_attempt_at, seq) WHERE delivered_at IS NULL AND failed_at IS NULL;

-- What an event says about a call: pseudonymous references only (participant ids, never
-- a phone number but the pool number).
CREATE FUNCTION maskbridge_call_event(c calls) RETURNS jsonb LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object(
        'call_id', c.id, 'session_id', c.session_id,
        'order_id', (SELECT s.order_id FROM sessions s WHERE s.id = c.session_id),
        'pool_number', c.pool_number, 'caller_role', c.caller_role, 'callee_role', c.callee_role,
        'caller_participant_id', c.caller_participant_id, 'callee_participant_id', c.callee_participant_id,
        'state', c.state, 'outcome', c.outcome, 'hangup_by', c.hangup_by, 'hangup_cause', c.hangup_cause,
        'cut_reason', c.cut_reason, 'started_at', c.started_at, 'answered_at', c.answered_at,
        'ended_at', c.ended_at, 'duration_seconds', c.duration_seconds)
$$;
