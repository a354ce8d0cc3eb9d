-- Optional call recording. A session opened with "record": true (or by default with
-- MB_RECORD_CALLS=yes) has its connected calls recorded, after both parties heard that the
-- call is recorded. The audio stays in Asterisk's recording spool; the bridge reaches it
-- through ARI only. Every access through the API, granted or not, is written to
-- recording_access.
ALTER TABLE sessions ADD COLUMN record boolean NOT NULL DEFAULT false;
-- The call knows it too: a bridge restarted during the call still finishes its recording.
ALTER TABLE calls ADD COLUMN record boolean NOT NULL DEFAULT false;

CREATE TABLE recordings (
    id           uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    call_id      uuid NOT NULL UNIQUE REFERENCES calls (id),
    session_id   uuid REFERENCES sessions (id),
    name         text NOT NULL UNIQUE CHECK (name ~ '^[A-Za-z0-9_-]{1,100}$'),  -- in Asterisk's spool
    format       text NOT NULL CHECK (format IN ('wav')),
    started_at   timestamptz NOT NULL DEFAULT now(),
    ended_at     timestamptz,
    duration_ms  integer CHECK (duration_ms >= 0),
    bytes        bigint CHECK (bytes >= 0),
    deleted_at   timestamptz,  -- the retention job deleted the audio; the row stays
    CHECK (deleted_at IS NULL OR ended_at IS NOT NULL)
);
CREATE INDEX recordings_retention ON recordings (ended_at) WHERE deleted_at IS NULL;

-- The audit trail: who asked for what, from where, and what they got. Denied requests are
-- here too (their call id as asked, when it is one).
CREATE TABLE recording_access (
    id            bigserial PRIMARY KEY,
    at            timestamptz NOT NULL DEFAULT now(),
    recording_id  uuid REFERENCES recordings (id),
    call_id       uuid,
    actor         text NOT NULL CHECK (actor IN ('recording_token', 'api_token', 'invalid_token', 'no_token',
                                                 'retention')),
    remote        text,
    action        text NOT NULL CHECK (action IN ('metadata', 'download', 'audit', 'delete')),
    result        text NOT NULL CHECK (result IN ('granted', 'denied', 'not_found', 'gone', 'failed')),
    status        integer NOT NULL
);
CREATE INDEX recording_access_recording ON recording_access (recording_id, at);
