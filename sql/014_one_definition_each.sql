-- One definition each.
--
-- Session terms are named alike everywhere (bridge/terms.py): the call row keeps a term
-- under the session's column name.
ALTER TABLE calls RENAME COLUMN max_seconds TO max_call_seconds;

-- The languages of announcements are defined by the bridge (bridge/languages.py), which
-- writes them into this table at every start; a pool number's language must be one.
CREATE TABLE languages (code text PRIMARY KEY);
INSERT INTO languages (code) SELECT DISTINCT language FROM pool_numbers WHERE language IS NOT NULL;
ALTER TABLE pool_numbers DROP CONSTRAINT pool_numbers_language_check;
ALTER TABLE pool_numbers ADD CONSTRAINT pool_numbers_language_fkey FOREIGN KEY (language) REFERENCES languages (code);

-- When a session is due to end, and how: 'expired' (an open session past its expiry),
-- 'inactive' (an open session idle past its timeout), 'closed' (a grace period over), or
-- NULL. Routing, the end of a session and the housekeeping sweep all ask this.
CREATE FUNCTION maskbridge_session_due(s sessions) RETURNS text LANGUAGE sql STABLE AS $$
    SELECT CASE
        WHEN s.status = 'open' AND s.expires_at <= now() THEN 'expired'
        WHEN s.status = 'open' AND s.last_activity_at + make_interval(secs => s.idle_timeout_seconds) <= now()
            THEN 'inactive'
        WHEN s.status = 'grace' AND s.grace_until <= now() THEN 'closed'
    END
$$;
