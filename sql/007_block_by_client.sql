-- The client can block the other party of an order from the keypad: the blocked
-- participant's calls on this session are refused from then on.
ALTER TABLE participants ADD COLUMN blocked_at timestamptz;

ALTER TABLE session_events DROP CONSTRAINT session_events_kind_check;
ALTER TABLE session_events ADD CONSTRAINT session_events_kind_check CHECK (kind IN (
    'opened', 'extended', 'courier_reassigned', 'grace_started',
    'closed', 'expired', 'inactive', 'purged', 'blocked_by_client'));

ALTER TABLE calls DROP CONSTRAINT calls_cut_reason_check;
ALTER TABLE calls ADD CONSTRAINT calls_cut_reason_check
    CHECK (cut_reason IN ('blocked', 'max_duration', 'blocked_by_client'));
