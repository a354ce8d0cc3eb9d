-- Reads and deletes that scanned whole tables once they grew (issue 14's measurements: every
-- session read was a sequential scan of all participants ever, 53 ms at a million):
-- a session's participants, past ones included (participants_live_role covers live ones only);
CREATE INDEX participants_session ON participants (session_id);
-- the foreign keys a delete of a participant or a session has to check.
CREATE INDEX calls_caller_participant ON calls (caller_participant_id) WHERE caller_participant_id IS NOT NULL;
CREATE INDEX calls_callee_participant ON calls (callee_participant_id) WHERE callee_participant_id IS NOT NULL;
CREATE INDEX recordings_session ON recordings (session_id) WHERE session_id IS NOT NULL;
