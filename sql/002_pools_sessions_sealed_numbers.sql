-- Sessions and pools done right (issue 3).
--
-- * Pool numbers: region, and a lifecycle active -> cooling -> retired.
-- * Sessions: absolute and inactivity expiry, a post-order grace period, every state
--   change recorded in session_events.
-- * Participants: one row per person who took part (a reassigned courier leaves a row
--   behind), real numbers sealed (AES-GCM) and found through a keyed blind index. The
--   plaintext column is emptied by a Python step that runs right after this file (it needs
--   the key, which never enters the database) and dropped by 003.
-- * A participant "holds" its (number, pool number) pair while live and during the
--   cool-off after it left; the database allows one holder per pair.

ALTER TABLE pool_numbers
    ADD COLUMN state_changed_at timestamptz NOT NULL DEFAULT now(),
    ADD COLUMN cooling_until    timestamptz;
-- 001 took any text as a region and had no cooling time: bring old rows into the new rules
-- (a region that is no ISO 3166 code even in capitals is dropped: it only ever was a preference).
UPDATE pool_numbers SET region = upper(btrim(region)) WHERE region IS NOT NULL;
UPDATE pool_numbers SET region = NULL WHERE region !~ '^[A-Z]{2}(-[A-Z0-9]{1,3})?$';
UPDATE pool_numbers SET cooling_until = now() + interval '7 days' WHERE state = 'cooling';
ALTER TABLE pool_numbers
    ADD CONSTRAINT pool_numbers_region_form CHECK (region ~ '^[A-Z]{2}(-[A-Z0-9]{1,3})?$'),
    ADD CONSTRAINT pool_numbers_cooling_until CHECK ((state = 'cooling') = (cooling_until IS NOT NULL));
CREATE INDEX pool_numbers_region ON pool_numbers (region, state);

ALTER TABLE sessions DROP CONSTRAINT sessions_status_check;
ALTER TABLE sessions
    ADD CONSTRAINT sessions_status_check CHECK (status IN ('open', 'grace', 'closed')),
    ADD COLUMN region                text,
    ADD COLUMN expires_at            timestamptz NOT NULL DEFAULT now() + interval '1 day',
    ADD COLUMN idle_timeout_seconds  integer CHECK (idle_timeout_seconds > 0),
    ADD COLUMN last_activity_at      timestamptz NOT NULL DEFAULT now(),
    ADD COLUMN grace_seconds         integer NOT NULL DEFAULT 0 CHECK (grace_seconds >= 0),
    ADD COLUMN grace_until           timestamptz,
    ADD COLUMN end_reason            text CHECK (end_reason IN ('closed', 'expired', 'inactive')),
    ADD CONSTRAINT sessions_grace_until CHECK ((status = 'grace') = (grace_until IS NOT NULL));
ALTER TABLE sessions ALTER COLUMN expires_at DROP DEFAULT;
UPDATE sessions SET end_reason = 'closed' WHERE status = 'closed';
ALTER TABLE sessions ADD CONSTRAINT sessions_end_reason CHECK ((status = 'open') = (end_reason IS NULL));
CREATE INDEX sessions_open_expiry ON sessions (expires_at) WHERE status = 'open';
CREATE INDEX sessions_grace_expiry ON sessions (grace_until) WHERE status = 'grace';
CREATE INDEX sessions_created ON sessions (created_at, id);
CREATE INDEX sessions_order ON sessions (order_id, created_at);

CREATE TABLE session_events (
    id          bigserial PRIMARY KEY,
    session_id  uuid NOT NULL REFERENCES sessions (id),
    at          timestamptz NOT NULL DEFAULT now(),
    kind        text NOT NULL CHECK (kind IN (
                    'opened', 'extended', 'courier_reassigned', 'grace_started',
                    'closed', 'expired', 'inactive', 'purged')),
    detail      jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX session_events_session ON session_events (session_id, id);
INSERT INTO session_events (session_id, at, kind) SELECT id, created_at, 'opened' FROM sessions;
INSERT INTO session_events (session_id, at, kind) SELECT id, closed_at, 'closed' FROM sessions WHERE closed_at IS NOT NULL;

DROP INDEX participants_live_pair;
DROP INDEX participants_pair;
ALTER TABLE participants DROP CONSTRAINT participants_pkey;
ALTER TABLE participants
    ADD COLUMN id          uuid NOT NULL DEFAULT gen_random_uuid() PRIMARY KEY,
    ADD COLUMN number_idx  bytea,
    ADD COLUMN number_enc  bytea,
    ADD COLUMN joined_at   timestamptz NOT NULL DEFAULT now(),
    ADD COLUMN left_at     timestamptz,
    ADD COLUMN holds       boolean NOT NULL DEFAULT true,
    ADD COLUMN held_until  timestamptz,
    ADD COLUMN purged_at   timestamptz;
ALTER TABLE participants ALTER COLUMN real_number DROP NOT NULL;
UPDATE participants p SET joined_at = s.created_at, left_at = s.closed_at, holds = p.live
FROM sessions s WHERE s.id = p.session_id;
-- Sessions closed in the day before the upgrade start their cool-off (the default
-- MB_PAIR_COOLOFF, one day) as if they had closed under the new rules: each pair's latest
-- closed participant holds it, unless someone holds it live already.
WITH latest AS (
    SELECT DISTINCT ON (p.real_number, p.pool_number) p.id
    FROM participants p JOIN sessions s ON s.id = p.session_id
    WHERE NOT p.live AND s.closed_at > now() - interval '1 day'
    ORDER BY p.real_number, p.pool_number, s.closed_at DESC
)
UPDATE participants p SET holds = true, held_until = s.closed_at + interval '1 day'
FROM sessions s, latest l
WHERE l.id = p.id AND s.id = p.session_id
  AND NOT EXISTS (SELECT 1 FROM participants q
                  WHERE q.live AND q.real_number = p.real_number AND q.pool_number = p.pool_number);

ALTER TABLE calls
    ADD COLUMN callee_role            text CHECK (callee_role IN ('courier', 'client', 'support')),
    ADD COLUMN caller_participant_id  uuid REFERENCES participants (id),
    ADD COLUMN callee_participant_id  uuid REFERENCES participants (id);
ALTER TABLE calls ALTER COLUMN caller_masked DROP NOT NULL;
UPDATE calls c SET caller_participant_id = p.id
FROM participants p WHERE p.session_id = c.session_id AND p.role = c.caller_role;
UPDATE calls SET callee_role = CASE caller_role WHEN 'courier' THEN 'client' ELSE 'courier' END
WHERE caller_role IS NOT NULL AND outbound_channel_id IS NOT NULL;
CREATE INDEX calls_started ON calls (started_at) WHERE caller_masked IS NOT NULL;
