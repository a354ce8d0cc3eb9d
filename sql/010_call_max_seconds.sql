-- The maximum duration a call was put through with, so that a bridge restarted during the
-- call still ends it on time (counted from answered_at).
ALTER TABLE calls ADD COLUMN max_seconds integer CHECK (max_seconds > 0);
