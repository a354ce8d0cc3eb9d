-- A session's idle timeout counts from the end of its last call, and a call in progress
-- keeps the session open: "inactive" is a session nobody has called for
-- idle_timeout_seconds, not one whose conversation has lasted that long. (The end of a call
-- sets last_activity_at too: Store.call_ended.)
CREATE OR REPLACE FUNCTION maskbridge_session_due(s sessions) RETURNS text LANGUAGE sql STABLE AS $$
    SELECT CASE
        WHEN s.status = 'open' AND s.expires_at <= now() THEN 'expired'
        WHEN s.status = 'open' AND s.last_activity_at + make_interval(secs => s.idle_timeout_seconds) <= now()
             AND NOT EXISTS (SELECT 1 FROM calls c
                             WHERE c.session_id = s.id AND c.state IN ('ringing', 'confirming', 'connected'))
            THEN 'inactive'
        WHEN s.status = 'grace' AND s.grace_until <= now() THEN 'closed'
    END
$$;
