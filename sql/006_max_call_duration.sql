-- A maximum call duration per session (NULL: the bridge's default, MB_MAX_CALL_DURATION):
-- both parties hear a warning tone before the bridge ends the call.
ALTER TABLE sessions ADD COLUMN max_call_seconds integer CHECK (max_call_seconds > 0);
ALTER TABLE calls DROP CONSTRAINT calls_cut_reason_check;
ALTER TABLE calls ADD CONSTRAINT calls_cut_reason_check CHECK (cut_reason IN ('blocked', 'max_duration'));
